"""Image-text two-tower model (SigLIP / CLIP).

Params: ``img/...`` (the image tower), ``txt/...`` (the text tower), ``t`` [1]
(log temperature, init log(temperature_init)), ``b`` [1] (logit bias, init
bias_init; absent when bias_init is None, then b = 0 as in CLIP).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import layers


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x [..., D] -> float32 x / ||x|| along the last axis (eps guards a zero vector)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class TwoTower(nn.Module):
    """Two towers and the contrastive temperature / bias.

    image, text: unbound tower modules returning (features [B, D], out dict), e.g.
    ``vit.ViT`` / ``navit`` towers and ``text.TextTransformer``; they are stored
    under the names "img" and "txt". Both towers must output the same D.

    __call__(images, tokens, train=False) -> (zimg [B, D], ztxt [B, D], out):
      zimg/ztxt are L2-normalised float32 (None when that input is None);
      out["t"] = exp(stored t) (scalar float32), out["b"] = bias (scalar; 0 without
      bias), out["t/parameterized"] = stored log t, and "img/<k>"/"txt/<k>" tower
      intermediates (plus "img/features"/"txt/features", the unnormalised outputs).
    ``init`` needs both images and tokens so that both towers get parameters.

    NaViT towers: ``images`` may be a packed batch (dict, see models/navit.py) with
    S sequences of M slots; the image tower then gives [S, M, D], which is
    flattened to zimg [S*M, D] (slot-major within a row), and ``tokens`` may be
    [S, M, L] (the caption of each slot), flattened to [S*M, L].
    out["img/valid"] [S*M] bool marks the slots that hold an image; the loss
    must ignore the others (``losses.sigmoid_loss(..., valid=...)``).
    """

    image: nn.Module
    text: nn.Module
    temperature_init: float = 10.0
    bias_init: float | None = -10.0
    dtype: Any = jnp.float32

    def setup(self):
        self.img = self.image.clone(parent=self, name="img")
        self.txt = self.text.clone(parent=self, name="txt")
        self.t = self.param(
            "t", layers.named_init(nn.initializers.constant(np.log(self.temperature_init)), (None,)),
            (1,), jnp.float32)
        if self.bias_init is not None:
            self.b = self.param(
                "b", layers.named_init(nn.initializers.constant(self.bias_init), (None,)),
                (1,), jnp.float32)

    def encode_image(self, images, train: bool = False) -> jax.Array:
        """images [B, H, W, 3] float -> [B, D] before normalisation.

        For a NaViT tower ``images`` is a packed batch dict and the result is
        [S, M, D] (zeros in empty slots; see models/navit.py).
        """
        return self.img(images, train=train)[0]

    def encode_text(self, tokens, train: bool = False) -> jax.Array:
        """tokens int32 [B, L] -> [B, D] before normalisation."""
        return self.txt(tokens, train=train)[0]

    def __call__(self, images, tokens, train: bool = False):
        out = {}
        zimg = ztxt = None
        if images is not None:
            x, img_out = self.img(images, train=train)
            if x.ndim == 3:  # packed NaViT batch: [S, M, D] slots -> rows
                x = x.reshape(-1, x.shape[-1])
                img_out = dict(img_out, valid=img_out["valid"].reshape(-1))
            out.update({f"img/{k}": v for k, v in img_out.items()})
            out["img/features"] = x
            zimg = l2_normalize(x)
        if tokens is not None:
            if tokens.ndim == 3:  # one caption per NaViT slot [S, M, L]
                tokens = tokens.reshape(-1, tokens.shape[-1])
            y, txt_out = self.txt(tokens, train=train)
            out.update({f"txt/{k}": v for k, v in txt_out.items()})
            out["txt/features"] = y
            ztxt = l2_normalize(y)
        if zimg is not None and ztxt is not None and zimg.shape[-1] != ztxt.shape[-1]:
            raise ValueError(f"image tower outputs D={zimg.shape[-1]} but text tower outputs "
                             f"D={ztxt.shape[-1]}; set model.out_dim / model.image.head")
        out["t/parameterized"] = self.t[0]
        out["t"] = jnp.exp(self.t[0])
        out["b"] = self.b[0] if self.bias_init is not None else jnp.zeros((), jnp.float32)
        return zimg, ztxt, out


class ProjectedTower(nn.Module):
    """An image encoder whose pooled features are projected to the shared width.

    For CNN towers (ResNet, ConvNeXt) in a two-tower model (``model.image.head=True``):
    __call__(images, train=False) -> (x [B, dim], out) with the encoder's ``out`` plus
    "pre_logits" (its features) and "logits" (the projection). Params:
    ``encoder/...`` and ``head/{kernel,bias}`` [C, dim] ("embed", "proj").
    """

    encoder: nn.Module
    dim: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        x, out = self.encoder(images, train=train)
        if x.ndim != 2:
            raise ValueError(f"a two-tower image tower must pool to [B, C], got {x.shape}; "
                             "set model.image.pool_type='gap'")
        y = nn.Dense(self.dim, use_bias=self.use_bias, dtype=self.dtype,
                     kernel_init=layers.named_init(nn.initializers.lecun_normal(),
                                                   ("embed", "proj")),
                     bias_init=layers.named_init(nn.initializers.zeros, ("proj",)),
                     name="head")(x)
        return y, dict(out, pre_logits=x, logits=y)
