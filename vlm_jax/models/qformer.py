"""Q-Former (BLIP-2, Li et al. 2023): learned queries read image tokens through a BERT-style stack.

    qformer = QFormer(num_queries=32, depth=12, num_heads=12, width=768, cross_attention_frequency=2,
                      out_dim=2560)
    feats = qformer.apply(variables, image_tokens)   # [B, N, D_enc] -> [B, 32, 2560]

The same computation as transformers' Blip2QFormerModel on query embeddings only
(no text tokens), followed by BLIP-2's ``language_projection``:

    q = Dropout(LayerNorm(query_tokens))                       (eps ``ln_eps``, default 1e-12)
    for layer i (post-LN blocks):
        q = LayerNorm(q + Dense(SelfAttention(q)))              "attention", "attention_norm"
        if i % cross_attention_frequency == 0:
            q = LayerNorm(q + Dense(CrossAttention(q, tokens))) "crossattention", "crossattention_norm"
        q = LayerNorm(q + Dense(act(Dense(q))))                 "intermediate_query", "output_query",
                                                                "output_query_norm"
    out = Dense(out_dim)(q)  when out_dim is set                "language_projection"

Cross-attention keys and values are projected from the tokens' own width
(``encoder_width``, transformers' ``encoder_hidden_size``) to ``width``; the
activation is exact GELU by default (transformers' "gelu"). There is no final
norm beyond each block's post-LN.

Parameters (logical axis names, see ``layers``): ``query_tokens`` [1, Q, width]
(None, None, "embed"); attention query/key/value kernels [D_in, H, Dh]
("embed", "heads", "kv") with biases [H, Dh]; out kernels [H, Dh, width]
("heads", "kv", "embed"); intermediate_query [width, mlp_dim] ("embed", "mlp");
output_query [mlp_dim, width] ("mlp", "embed"); norms ("norm",);
language_projection [width, out_dim] ("embed", "proj").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers

Array = jax.Array


def _ln(eps: float, dtype, name: str) -> nn.LayerNorm:
    # two-pass variance: BERT's eps 1e-12 leaves no slack for E[x^2] - E[x]^2 cancellation
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                        scale_init=layers.named_init(nn.initializers.ones, ("norm",)),
                        bias_init=layers.named_init(nn.initializers.zeros, ("norm",)), name=name)


def _key_mask(mask: Array | None) -> Array | None:
    return None if mask is None else jnp.asarray(mask, bool)[:, None, None, :]


class QFormerLayer(nn.Module):
    """One post-LN Q-Former layer on the queries: self-attention, optional cross-attention, FFN.

    q [B, Q, width], tokens [B, N, D_enc] -> [B, Q, width]. ``token_mask`` /
    ``query_mask`` [B, N] / [B, Q] bool (True = attend) hide keys.
    """

    num_heads: int
    mlp_dim: int
    cross_attention: bool
    act: str = "gelu"
    ln_eps: float = 1e-12
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q: Array, tokens: Array, token_mask: Array | None = None,
                 query_mask: Array | None = None, train: bool = False) -> Array:
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)  # noqa: E731
        y = layers.attention(self.num_heads, dtype=self.dtype, name="attention")(
            q, q, mask=_key_mask(query_mask))
        q = _ln(self.ln_eps, self.dtype, "attention_norm")(q + drop(y))
        if self.cross_attention:
            y = layers.attention(self.num_heads, dtype=self.dtype, name="crossattention")(
                q, tokens, mask=_key_mask(token_mask))
            q = _ln(self.ln_eps, self.dtype, "crossattention_norm")(q + drop(y))
        kinit = nn.initializers.xavier_uniform()
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=layers.named_init(kinit, ("embed", "mlp")),
                     bias_init=layers.named_init(nn.initializers.zeros, ("mlp",)),
                     name="intermediate_query")(q)
        y = layers.get_activation(self.act)(y)
        y = layers.constrain(y, ("batch", "length", "mlp"))
        y = nn.Dense(q.shape[-1], dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=layers.named_init(kinit, ("mlp", "embed")),
                     bias_init=layers.named_init(nn.initializers.zeros, ("embed",)),
                     name="output_query")(y)
        q = _ln(self.ln_eps, self.dtype, "output_query_norm")(q + drop(y))
        return layers.constrain(q, ("batch", "length", "embed"))


class QFormer(nn.Module):
    """[B, N, D_enc] image tokens -> [B, num_queries, out_dim or width] (see the module docstring).

    num_queries: learned query tokens (0: none; the queries must then be passed
      as ``queries``, as for transformers' standalone Blip2QFormerModel).
    depth, num_heads: layers and attention heads (width % num_heads == 0).
    mlp_dim: feed-forward width (default 4 * width).
    cross_attention_frequency: layer i cross-attends to the tokens when
      i % cross_attention_frequency == 0 (BLIP-2 uses 2).
    out_dim: the language projection's output width (None: no projection).
    encoder_width: the tokens' width D_enc; checked against the input when set.
    width: the Q-Former's hidden width (default encoder_width, else the tokens' width).
    act, ln_eps, dropout: FFN activation, LayerNorm epsilon, hidden dropout rate (train only).

    __call__(tokens, mask=None, train=False, queries=None, query_mask=None):
    ``mask`` [B, N] bool hides padded image tokens from the cross-attention;
    ``queries`` [B or 1, Q, width] replace the learned query tokens;
    ``query_mask`` [B, Q] hides queries as self-attention keys (transformers'
    ``attention_mask``).
    """

    num_queries: int
    depth: int
    num_heads: int
    mlp_dim: int | None = None
    cross_attention_frequency: int = 1
    out_dim: int | None = None
    encoder_width: int | None = None
    width: int | None = None
    act: str = "gelu"
    ln_eps: float = 1e-12
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, mask: Array | None = None, train: bool = False,
                 queries: Array | None = None, query_mask: Array | None = None) -> Array:
        if tokens.ndim != 3:
            raise ValueError(f"QFormer expects tokens [B, N, D], got shape {tokens.shape}")
        b, n, d_enc = tokens.shape
        if self.encoder_width is not None and d_enc != self.encoder_width:
            raise ValueError(f"QFormer encoder_width={self.encoder_width} but the tokens have "
                             f"width {d_enc}")
        width = self.width or self.encoder_width or d_enc
        if self.depth < 1 or self.num_heads < 1 or self.cross_attention_frequency < 1:
            raise ValueError(f"QFormer depth={self.depth}, num_heads={self.num_heads} and "
                             f"cross_attention_frequency={self.cross_attention_frequency} must be >= 1")
        if width % self.num_heads:
            raise ValueError(f"QFormer width {width} is not divisible by num_heads={self.num_heads}")
        if mask is not None and tuple(mask.shape) != (b, n):
            raise ValueError(f"QFormer mask must be [B, N] = {(b, n)}, got {tuple(mask.shape)}")
        if queries is None:
            if self.num_queries < 1:
                raise ValueError("QFormer with num_queries=0 needs queries [B, Q, width]")
            init = layers.named_init(nn.initializers.normal(0.02), (None, None, "embed"))
            queries = self.param("query_tokens", init, (1, self.num_queries, width), jnp.float32)
        elif queries.ndim != 3 or queries.shape[-1] != width or queries.shape[0] not in (1, b):
            raise ValueError(f"QFormer queries must be [B or 1, Q, {width}], got {queries.shape}")
        q = jnp.broadcast_to(queries, (b, *queries.shape[1:])).astype(self.dtype)
        if query_mask is not None and tuple(query_mask.shape) != q.shape[:2]:
            raise ValueError(f"QFormer query_mask must be [B, Q] = {q.shape[:2]}, got "
                             f"{tuple(query_mask.shape)}")
        q = _ln(self.ln_eps, self.dtype, "layernorm")(q)
        q = nn.Dropout(self.dropout)(q, deterministic=not train)
        tokens = layers.constrain(tokens.astype(self.dtype), ("batch", "length", "embed"))
        for i in range(self.depth):
            q = QFormerLayer(self.num_heads, self.mlp_dim or 4 * width,
                             cross_attention=i % self.cross_attention_frequency == 0, act=self.act,
                             ln_eps=self.ln_eps, dropout=self.dropout, dtype=self.dtype,
                             name=f"layer_{i}")(q, tokens, mask, query_mask, train)
        if self.out_dim is not None:
            q = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=jnp.float32,
                         kernel_init=layers.named_init(nn.initializers.xavier_uniform(),
                                                       ("embed", "proj")),
                         bias_init=layers.named_init(nn.initializers.zeros, ("proj",)),
                         name="language_projection")(q)
        return q
