"""Pixel shuffle (space-to-depth) on a square token grid, and the Idefics3 / SmolVLM connector.

    y = pixel_shuffle(x, scale)        # [B, N, D] -> [B, N / scale**2, D * scale**2]
    proj = PixelShuffleProjector(out_dim, scale)
    tokens = proj(x, mask=None, train=False)   # [B, N, D] -> [B, N / scale**2, out_dim]

The N tokens are a side x side grid, row-major (side = sqrt(N)). Each output
token gathers one scale x scale block of neighbouring tokens; its channels are
ordered (row within the block, column within the block, channel):

    y[b, I * (side/scale) + J, (r * scale + c) * D + d] = x[b, (I*scale + r) * side + J*scale + c, d]

which is the order transformers' ``Idefics3Connector.pixel_shuffle`` produces
(so Idefics3 / SmolVLM projection weights apply unchanged). The projection is a
Dense named "proj" (Idefics3's ``connector.modality_projection.proj``, a Linear
without bias).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers

__all__ = ["pixel_shuffle", "grid_side", "PixelShuffleProjector"]


def grid_side(num_tokens: int, scale: int) -> int:
    """Side of the square grid of ``num_tokens`` tokens; ValueError unless it is a
    square number whose side is a multiple of ``scale`` (a positive int)."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"pixel shuffle scale must be a positive int, got {scale!r}")
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"pixel shuffle needs a square token grid, but N={num_tokens} tokens "
                         "is not a square number")
    if side % scale:
        raise ValueError(f"pixel shuffle: the grid side {side} (N={num_tokens}) is not "
                         f"divisible by scale={scale}")
    return side


def pixel_shuffle(x: jax.Array, scale: int) -> jax.Array:
    """Space-to-depth on a square grid: [B, N, D] -> [B, N / scale**2, D * scale**2].

    Channel order (row in block, column in block, channel) as in Idefics3; see
    the module docstring. ValueError when N is not a square number or its side
    is not divisible by ``scale``.
    """
    if x.ndim != 3:
        raise ValueError(f"pixel_shuffle expects tokens [B, N, D], got shape {x.shape}")
    b, n, d = x.shape
    side = grid_side(n, scale)
    k = side // scale
    x = x.reshape(b, k, scale, k, scale, d)       # [B, I, r, J, c, D]
    x = x.transpose(0, 1, 3, 2, 4, 5)             # [B, I, J, r, c, D]
    return x.reshape(b, k * k, scale * scale * d)


class PixelShuffleProjector(nn.Module):
    """Pixel shuffle then a linear projection (the Idefics3 / SmolVLM connector).

    __call__(tokens [B, N, D], mask=None, train=False) -> [B, N / scale**2, out_dim].
    N must be a square number with a side divisible by ``scale``. ``mask`` (the
    connector call signature's optional key mask [B, N]) is accepted and unused:
    every grid cell is shuffled and projected, padding included, as Idefics3 does.
    Params: ``proj/kernel`` [D * scale**2, out_dim] (logical axes "mlp", "embed":
    the wide shuffled input, the language model's width) and, with ``use_bias``,
    ``proj/bias`` [out_dim] ("embed",).
    """

    out_dim: int
    scale: int = 2
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        del mask, train
        x = pixel_shuffle(jnp.asarray(tokens).astype(self.dtype), self.scale)
        x = layers.constrain(x, ("batch", "length", "mlp"))
        y = nn.Dense(self.out_dim, use_bias=self.use_bias, dtype=self.dtype,
                     param_dtype=jnp.float32,
                     kernel_init=layers.named_init(nn.initializers.lecun_normal(), ("mlp", "embed")),
                     bias_init=layers.named_init(nn.initializers.zeros, ("embed",)),
                     name="proj")(x)
        return layers.constrain(y, ("batch", "length", "embed"))
