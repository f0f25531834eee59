"""Text transformer tower (SigLIP style by default, CLIP style by options).

Params: ``Embed_0/embedding`` [vocab, width], ``pos_embedding`` [1, max_len, width],
``Transformer/encoderblock_{i}/...`` (``Transformer/encoderblock/...`` stacked
[depth, ...] with ``scan``, see ``models/scan.py``), ``Transformer/encoder_norm``, ``head``.

SigLIP: non-causal attention, no padding mask, pool the last position, head with bias.
CLIP:   causal mask, pool at the argmax token id (the EOT token has the largest id
        in CLIP's vocabulary), head without bias (``head_bias=False``).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.models import layers
from vlm_jax.models.vit import decode_variant

TEXT_POOL_TYPES = ("last", "eos", "first", "mean")


def decode_text_variant(variant: str | None) -> dict[str, int]:
    """"B" -> {width, depth, mlp_dim, num_heads} (same shapes as the ViT sizes, as in SigLIP).

    A patch suffix ("B/16") is rejected: text towers have no patches.
    """
    if variant is not None and "/" in str(variant):
        raise ValueError(f"Unknown text variant {variant!r}: text variants take no patch size "
                         "(use e.g. 'B', not 'B/16')")
    return decode_variant(variant)


class TextTransformer(nn.Module):
    """Token encoder. __call__(tokens int [B, L], train=False) -> (x, out).

    L <= max_len (positions 0..L-1 are used). x: [B, head] with a head, else [B, width].
    out: "embedded" [B, L, width] (tokens + positions), "encoder/block{i:02d}",
    "encoded" [B, L, width] (final-normed), "pre_logits" [B, width], "logits".
    Pool types: "last" (position -1), "eos" (argmax token id per row), "first", "mean".
    ``scan`` / ``remat_policy``: as ``layers.Encoder``.
    """

    vocab_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    max_len: int = 64
    pool_type: str = "last"
    causal: bool = False
    head: int | None = None
    head_bias: bool = True
    dropout: float = 0.0
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    remat: bool = False
    attention_fn: Callable | None = None
    dtype: Any = jnp.float32
    scan: bool = False
    remat_policy: str = ""

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        if self.pool_type not in TEXT_POOL_TYPES:
            raise ValueError(f"text pool_type={self.pool_type!r} is not one of {TEXT_POOL_TYPES}")
        if tokens.ndim != 2:
            raise ValueError(f"text tokens must be [B, L] integers, got shape {tokens.shape}")
        b, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"text tokens have length {length} > max_len={self.max_len}")
        out = {}
        x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                     embedding_init=layers.named_init(nn.linear.default_embed_init,
                                                      ("vocab", "embed")))(tokens)
        pe = layers.learned_posemb(self, "pos_embedding", (1, self.max_len, self.width))
        x = x + pe[:, :length].astype(self.dtype)
        out["embedded"] = x
        x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)

        mask = nn.make_causal_mask(tokens) if self.causal else None  # [B, 1, L, L]
        x, enc_out = layers.Encoder(
            depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
            dropout=self.dropout, act=self.act, ln_eps=self.ln_eps,
            attention_fn=self.attention_fn, remat=self.remat, dtype=self.dtype,
            remat_policy=self.remat_policy, scan=self.scan, name="Transformer")(x, mask, train)
        out.update({f"encoder/{k}": v for k, v in enc_out.items()})
        out["encoded"] = x

        if self.pool_type == "last":
            x = x[:, -1]
        elif self.pool_type == "first":
            x = x[:, 0]
        elif self.pool_type == "eos":
            x = x[jnp.arange(b), jnp.argmax(tokens, axis=-1)]
        else:
            x = jnp.mean(x, axis=1)
        x = layers.constrain(x, ("batch", "embed"))
        out["pre_logits"] = x

        if self.head is not None:
            x = nn.Dense(self.head, use_bias=self.head_bias, dtype=self.dtype,
                         kernel_init=layers.named_init(nn.initializers.lecun_normal(),
                                                       ("embed", "proj")),
                         bias_init=layers.named_init(nn.initializers.zeros, ("proj",)),
                         name="head")(x)
            out["logits"] = x
        return x, out
