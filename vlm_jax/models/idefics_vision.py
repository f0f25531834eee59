"""The Idefics2 / Idefics3 (SmolVLM) vision tower, and the Idefics3 vision front-end.

A SigLIP-style ViT for images padded to a common size:

    patch conv (with bias) -> + position embedding -> encoder (padding keys hidden)
    -> final LayerNorm (transformers' post_layernorm)

Position embedding: one learned table of G x G rows (G = image_size // patch_size,
``num_patches_per_side``). An image whose real part covers rows x cols patches
(counted in the first column / first row of its patch mask) gets, at patch
(i, j), the row bucket(i / rows) * G + bucket(j / cols), where bucket(t) counts
the boundaries 1/G, 2/G, ... that are <= t (t clipped below 1); so every real
image spans the whole table whatever its size, and any image size works. Padding
patches use row 0. The arithmetic is float32 and the boundaries are the float32
values torch's arange produces (``bucket_boundaries``), as transformers'
``Idefics3VisionEmbeddings`` uses them, so the ids are identical.

Attention: padding patches are hidden as keys; they still compute outputs (as
queries), which the connector shuffles along with the real tokens.

    tower = IdeficsVisionTower(width, depth, mlp_dim, num_heads, patch_size, image_size)
    x, out = tower(images [B, H, W, C], patch_mask [B, H/p, W/p] bool or None)
        # x [B, (H/p)*(W/p), width]: the final-normed tokens, row-major
    front = Idefics3FrontEnd(tower, PixelShuffleProjector(out_dim, scale))
    y, out = front(images, patch_mask)   # [B, N / scale**2, out_dim]

Params (tower): ``embedding`` (patch conv kernel [p, p, C, D], bias [D]),
``pos_embedding`` [G*G, D], ``Transformer/encoderblock_{i}/...`` and
``Transformer/encoder_norm`` (= post_layernorm), as ``layers.Encoder``.
The front-end holds them under ``tower/`` and the projection under ``connector/proj``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import layers
from vlm_jax.models.pixel_shuffle import PixelShuffleProjector

__all__ = ["bucket_boundaries", "bucketed_position_ids", "IdeficsVisionTower",
           "Idefics3FrontEnd"]


def torch_cpu_lanes() -> int:
    """The float32 vector width torch's CPU kernels dispatch to here: 16 with AVX-512
    (torch's test: avx512 vl, bw and dq), else 8 (AVX2, ARM); ``ATEN_CPU_CAPABILITY``
    overrides it as it does torch's choice."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if cap:
        return 16 if cap.startswith("avx512") else 8
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return 8
    return 16 if {"avx512vl", "avx512bw", "avx512dq"} <= set(flags) else 8


def bucket_boundaries(num_patches_per_side: int, lanes: int | None = None) -> np.ndarray:
    """float32 boundaries 1/G, 2/G, ... (< 1), bit-identical to what torch's CPU kernel makes of
    ``torch.arange(1/G, 1.0, 1/G)`` (float32), which transformers bucketizes against.

    That kernel counts ceil((1 - 1/G) / (1/G)) values in float64 and fills blocks of
    2 * ``lanes`` values with vectors: each vector of ``lanes`` values starts at
    float32(start + i0 * step) and adds k * step (float64) to that rounded base; the
    remaining tail gets float32(start + i * step). Some boundaries therefore differ
    by one float32 ulp from k/G, which moves a patch across a bucket whenever
    i / rows hits k/G exactly (e.g. G = 19 with 19 or 38 patch rows). ``lanes`` is
    the float32 vector width torch's CPU kernels dispatch to: 8 for AVX2 (checked
    bit-exact against torch 2.14 for G < 1100), 16 where torch dispatches AVX-512;
    None: ``torch_cpu_lanes()``, this machine's.
    """
    lanes = torch_cpu_lanes() if lanes is None else lanes
    g = int(num_patches_per_side)
    if g < 1:
        raise ValueError(f"num_patches_per_side must be >= 1, got {g}")
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    step = 1.0 / g
    n = int(np.ceil((1.0 - step) / step))
    idx = np.arange(n)
    out = np.float32(step + idx * step)                    # scalar tail
    vec = n - n % (2 * lanes)                              # vectorised part
    base = np.float32(step + (idx[:vec] // lanes) * lanes * step)
    out[:vec] = np.float32(base.astype(np.float64) + (idx[:vec] % lanes) * step)
    return np.asarray(out, np.float32).reshape(n)


def bucketed_position_ids(patch_mask: jax.Array, num_patches_per_side: int,
                          lanes: int | None = None) -> jax.Array:
    """Position-table rows [B, h*w] int32 for a patch mask [B, h, w] (True = real patch).

    See the module docstring: fractional coordinates per image, bucketed onto the
    G x G table; padding patches get 0. ``lanes``: see ``bucket_boundaries``.
    """
    mask = jnp.asarray(patch_mask).astype(bool)
    b, h, w = mask.shape
    g = int(num_patches_per_side)
    bounds = jnp.asarray(bucket_boundaries(g, lanes))
    rows = jnp.sum(mask[:, :, 0], axis=1).astype(jnp.float32)  # real patch rows per image
    cols = jnp.sum(mask[:, 0, :], axis=1).astype(jnp.float32)
    top = np.float32(1.0 - 1e-6)

    def bucket(n, count):
        frac = jnp.arange(n, dtype=jnp.float32)[None, :] * (1.0 / count)[:, None]
        frac = jnp.minimum(frac, top)
        return jnp.sum(frac[..., None] >= bounds, axis=-1).astype(jnp.int32)  # [B, n]

    ids = bucket(h, rows)[:, :, None] * g + bucket(w, cols)[:, None, :]
    return jnp.where(mask, ids, 0).reshape(b, h * w)


class IdeficsVisionTower(nn.Module):
    """Idefics2/3 vision transformer (see the module docstring).

    __call__(images [B, H, W, C], patch_mask=None, train=False) -> (x, out):
      x: [B, h*w, width] final-normed tokens (h, w = H // p, W // p; extra pixels
         beyond a multiple of p are ignored, as a "valid" conv does);
      out: "tokens" (= x), "encoder/block{i:02d}" [B, h*w, width] (before the final
         norm), "position_ids" [B, h*w], "patch_mask" [B, h*w] bool.
    ``patch_mask`` [B, h, w] bool (True = real patch); None means all real.
    ``image_size`` only sets the table side G = image_size // patch_size;
    ``bucket_lanes``: see ``bucket_boundaries`` (8 reproduces torch on AVX2 / ARM CPUs;
    None: this machine's, ``torch_cpu_lanes()``).
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int = 14
    image_size: int = 378
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    dropout: float = 0.0
    remat: bool = False
    attention_fn: Callable | None = None
    bucket_lanes: int | None = None
    dtype: Any = jnp.float32

    @property
    def num_patches_per_side(self) -> int:
        return int(self.image_size) // int(self.patch_size)

    @nn.compact
    def __call__(self, images, patch_mask=None, train: bool = False):
        if images.ndim != 4:
            raise ValueError(f"IdeficsVisionTower expects images [B, H, W, C], got {images.shape}")
        p, g = int(self.patch_size), self.num_patches_per_side
        if g < 1:
            raise ValueError(f"image_size={self.image_size} is smaller than patch_size={p}")
        b, hh, ww, _ = images.shape
        h, w = hh // p, ww // p
        if h < 1 or w < 1:
            raise ValueError(f"images {hh}x{ww} are smaller than one {p}x{p} patch")
        if patch_mask is None:
            patch_mask = jnp.ones((b, h, w), bool)
        elif tuple(patch_mask.shape) != (b, h, w):
            raise ValueError(f"patch_mask shape {tuple(patch_mask.shape)} != (B, H/p, W/p) = "
                             f"{(b, h, w)} for images {tuple(images.shape)} and patch size {p}")
        patch_mask = jnp.asarray(patch_mask).astype(bool)
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=jnp.float32,
                    kernel_init=layers.named_init(nn.initializers.lecun_normal(),
                                                  (None, None, "conv_in", "embed")),
                    bias_init=layers.named_init(nn.initializers.zeros, ("embed",)),
                    name="embedding")(jnp.asarray(images).astype(self.dtype))
        x = x.reshape(b, h * w, self.width)
        table = self.param("pos_embedding", layers.named_init(
            nn.initializers.normal(stddev=1.0 / np.sqrt(self.width)), (None, "embed")),
            (g * g, self.width), jnp.float32)
        ids = bucketed_position_ids(patch_mask, g, self.bucket_lanes)
        x = x + jnp.take(table, ids, axis=0).astype(self.dtype)
        x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)
        keys = patch_mask.reshape(b, 1, 1, h * w)
        x, enc = layers.Encoder(depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                                dropout=self.dropout, act=self.act, ln_eps=self.ln_eps,
                                attention_fn=self.attention_fn, remat=self.remat,
                                dtype=self.dtype, name="Transformer")(x, keys, train)
        out = {f"encoder/{k}": v for k, v in enc.items()}
        out.update(tokens=x, position_ids=ids, patch_mask=patch_mask.reshape(b, h * w))
        return x, out


class Idefics3FrontEnd(nn.Module):
    """Idefics3 / SmolVLM vision front-end: tower, then pixel shuffle + projection.

    __call__(images [B, H, W, C], patch_mask=None, train=False) -> (y, out):
      y [B, (h*w) / scale**2, out_dim]: what the language model receives per image
      (h*w must be a square number with a side divisible by the connector's scale);
      out: the tower's ``out`` plus "features" (= y).
    ``interop/hf_idefics3`` loads transformers' Idefics3ForConditionalGeneration
    into it and computes ``get_image_features`` (padding frames, pixel masks).
    """

    hf_family: ClassVar[str] = "hf_idefics3"

    tower: IdeficsVisionTower
    connector: PixelShuffleProjector

    @nn.compact
    def __call__(self, images, patch_mask=None, train: bool = False):
        x, out = self.tower(images, patch_mask, train)
        y = self.connector(x, out["patch_mask"], train)
        out["features"] = y
        return y, out
