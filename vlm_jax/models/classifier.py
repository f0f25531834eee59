"""An image encoder with a linear classification head.

Params: ``img/...`` (the encoder, any image tower: ViT, ResNet, ConvNeXt, ...)
and ``head/{kernel,bias}`` [C, num_classes]. BatchNorm encoders also carry a
``batch_stats`` collection: pass ``mutable=["batch_stats"]`` with ``train=True``.

    model = ImageClassifier(encoder=ResNet(...), num_classes=1000)
    logits = model.apply(variables, images)                       # inference
    logits, updates = model.apply(variables, images, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": key})
    feats, out = model.apply(variables, images, method="encode")  # pooled features, intermediates
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers


class ImageClassifier(nn.Module):
    """encoder (returns (features [B, C], out)) -> Dense(num_classes) "head".

    __call__(images float32 [B, H, W, 3], train=False) -> logits float32 [B, num_classes].
    ``head_init``: "zeros" (big_vision's classification default: every class starts
    equal) or "lecun" (torch-style random init).
    """

    encoder: nn.Module
    num_classes: int
    head_init: str = "zeros"
    dtype: Any = jnp.float32

    def setup(self):
        self.img = self.encoder.clone(parent=self, name="img")
        if self.head_init not in ("zeros", "lecun"):
            raise ValueError(f"head_init={self.head_init!r} is not 'zeros' or 'lecun'")
        init = (nn.initializers.zeros if self.head_init == "zeros"
                else nn.initializers.lecun_normal())
        self.head = nn.Dense(
            self.num_classes, dtype=self.dtype,
            kernel_init=layers.named_init(init, ("embed", "classes")),
            bias_init=layers.named_init(nn.initializers.zeros, ("classes",)), name="head")

    def encode(self, images, train: bool = False):
        """images [B, H, W, 3] -> (features [B, C], out dict of the encoder's intermediates)."""
        x, out = self.img(images, train=train)
        if x.ndim != 2:
            raise ValueError(f"the classifier's encoder must pool to [B, C] features, got shape "
                             f"{x.shape} (set model.image.pool_type to a pooling type)")
        return x, out

    def __call__(self, images, train: bool = False) -> jax.Array:
        x, _ = self.encode(images, train=train)
        return self.head(x).astype(jnp.float32)
