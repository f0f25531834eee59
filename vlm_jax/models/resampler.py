"""Perceiver Resampler: a fixed number of learned latents read a variable-length token sequence.

    resampler = PerceiverResampler(num_latents=64, depth=3, num_heads=8)
    latents = resampler.apply(variables, tokens, mask)   # [B, N, D] -> [B, 64, out_dim or D]

Each of ``depth`` blocks lets the latents attend to concat(context, latents)
(keys and values from both, queries from the latents only), adds the result to
the latents, then applies a residual feed-forward; a final norm follows. The
``mask`` ([B, N] bool, True = token) hides padded context tokens, so padding
never changes the output; the latents always see each other.

Two variants:

    "flamingo"  Flamingo (Alayrac et al. 2022; open_flamingo's PerceiverResampler):
                LayerNorms (eps 1e-5) on the context and on the latents, bias-free
                q / k / v / out projections, an FFN LayerNorm -> Dense -> GELU (exact)
                -> Dense without biases, final LayerNorm.
    "idefics2"  transformers' Idefics2PerceiverResampler: RMSNorms (eps 1e-6, scale
                only), grouped-query attention (``num_kv_heads`` key/value heads),
                a SwiGLU MLP act(gate(x)) * up(x) -> down (act "silu"), no biases,
                final RMSNorm.

Optional ``out_dim`` adds a Dense projection (with bias, named "proj") after the
final norm. Parameters (logical axis names, see ``layers``):

    latents                           [num_latents, D]       (None, "embed")
    block_{i}/latents_norm, context_norm, mlp_norm   scale (and bias) [D]  ("norm",)
    block_{i}/attention/query/kernel  [D, H, Dh]             ("embed", "heads", "kv")
    block_{i}/attention/key|value/kernel  [D, KV, Dh]        ("embed", "heads", "kv")
    block_{i}/attention/out/kernel    [H, Dh, D]             ("heads", "kv", "embed")
    block_{i}/mlp_in, mlp_out/kernel  (flamingo)             ("embed", "mlp") / ("mlp", "embed")
    block_{i}/mlp_gate, mlp_up, mlp_down/kernel (idefics2)   ("embed", "mlp") / ("mlp", "embed")
    final_norm; proj/kernel [D, out_dim] ("embed", "proj"), proj/bias ("proj",)
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers

Array = jax.Array
VARIANTS = ("flamingo", "idefics2")


def activation(name: str) -> Callable[[Array], Array]:
    """``layers.get_activation`` plus "silu" (= "swish"), the SwiGLU gate of Llama-style MLPs."""
    if name in ("silu", "swish"):
        return jax.nn.silu
    try:
        return layers.get_activation(name)
    except ValueError:
        raise ValueError(f"Unknown activation {name!r}; expected 'silu' or one of "
                         f"{sorted(layers.ACTIVATIONS)}") from None


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, computed in float32.

    ``scale`` [D] ("norm",), initialised to ones (T5 / Llama / Idefics2 RMSNorm).
    """

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", layers.named_init(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (scale * y).astype(self.dtype)


def _norm(variant: str, eps: float, dtype, name: str) -> nn.Module:
    if variant == "idefics2":
        return RMSNorm(eps=eps, dtype=dtype, name=name)
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                        scale_init=layers.named_init(nn.initializers.ones, ("norm",)),
                        bias_init=layers.named_init(nn.initializers.zeros, ("norm",)), name=name)


def _dense_general(features, names, dtype, name, axis=-1):
    return nn.DenseGeneral(features, axis=axis, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                           kernel_init=layers.named_init(nn.initializers.xavier_uniform(), names),
                           name=name)


class LatentAttention(nn.Module):
    """Latents attend to concat(context, latents); grouped-query heads, no biases.

    latents [B, L, D], context [B, N, D], key_mask [B, N + L] bool or None
    -> [B, L, D]. Query head h reads key/value head h // (num_heads / num_kv_heads).
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, latents: Array, context: Array, key_mask: Array | None = None) -> Array:
        d = latents.shape[-1]
        kv_in = jnp.concatenate([context, latents], axis=1)
        names = ("embed", "heads", "kv")
        q = _dense_general((self.num_heads, self.head_dim), names, self.dtype, "query")(latents)
        k = _dense_general((self.num_kv_heads, self.head_dim), names, self.dtype, "key")(kv_in)
        v = _dense_general((self.num_kv_heads, self.head_dim), names, self.dtype, "value")(kv_in)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = layers.dot_product_attention_f32(q, k, v, mask=mask, dtype=self.dtype)
        return _dense_general(d, ("heads", "kv", "embed"), self.dtype, "out", axis=(-2, -1))(y)


class PerceiverBlock(nn.Module):
    """One resampler block: x + Attn(norm(x), norm(context)), then x + MLP(norm(x)).

    x [B, L, D] latents, context [B, N, D] (not yet normed), key_mask [B, N + L] or None.
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int
    mlp_ratio: int
    variant: str
    act: str
    eps: float
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array, key_mask: Array | None, train: bool) -> Array:
        d = x.shape[-1]
        hidden = self.mlp_ratio * d

        def dense(f, names, name):
            return nn.Dense(f, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                            kernel_init=layers.named_init(nn.initializers.xavier_uniform(), names))

        y = _norm(self.variant, self.eps, self.dtype, "latents_norm")(x)
        c = _norm(self.variant, self.eps, self.dtype, "context_norm")(context)
        y = LatentAttention(self.num_heads, self.head_dim, self.num_kv_heads, self.dtype,
                            name="attention")(y, c, key_mask)
        x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
        y = _norm(self.variant, self.eps, self.dtype, "mlp_norm")(x)
        act = activation(self.act)
        if self.variant == "idefics2":
            y = act(dense(hidden, ("embed", "mlp"), "mlp_gate")(y)) * dense(
                hidden, ("embed", "mlp"), "mlp_up")(y)
            y = dense(d, ("mlp", "embed"), "mlp_down")(y)
        else:
            y = dense(d, ("mlp", "embed"), "mlp_out")(act(dense(hidden, ("embed", "mlp"), "mlp_in")(y)))
        x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
        return layers.constrain(x, ("batch", "length", "embed"))


class PerceiverResampler(nn.Module):
    """[B, N, D] tokens -> [B, num_latents, out_dim or D] (see the module docstring).

    num_latents, depth, num_heads: latents, blocks, query heads.
    head_dim: per-head width (default D // num_heads).
    mlp_ratio: feed-forward hidden width = mlp_ratio * D.
    out_dim: optional Dense after the final norm.
    variant: "flamingo" or "idefics2".
    num_kv_heads: key/value heads (default num_heads; must divide it).
    act: feed-forward activation (default "gelu" for flamingo, "silu" for idefics2).
    norm_eps: norm epsilon (default 1e-5 for flamingo's LayerNorm, 1e-6 for idefics2's RMSNorm).
    dropout: dropout rate on the attention and feed-forward residual branches (train only).
    """

    num_latents: int
    depth: int
    num_heads: int
    head_dim: int | None = None
    mlp_ratio: int = 4
    out_dim: int | None = None
    variant: str = "flamingo"
    num_kv_heads: int | None = None
    act: str | None = None
    norm_eps: float | None = None
    dropout: float = 0.0
    dtype: Any = jnp.float32

    def _check(self, d: int) -> tuple[int, int]:
        if self.variant not in VARIANTS:
            raise ValueError(f"PerceiverResampler variant={self.variant!r} is not one of {VARIANTS}")
        for field in ("num_latents", "depth", "num_heads", "mlp_ratio"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"PerceiverResampler {field}={getattr(self, field)} must be >= 1")
        head_dim = self.head_dim
        if head_dim is None:
            if d % self.num_heads:
                raise ValueError(f"PerceiverResampler: width {d} is not divisible by num_heads="
                                 f"{self.num_heads}; set head_dim")
            head_dim = d // self.num_heads
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"PerceiverResampler num_kv_heads={kv} must divide num_heads="
                             f"{self.num_heads}")
        return head_dim, kv

    @nn.compact
    def __call__(self, tokens: Array, mask: Array | None = None, train: bool = False) -> Array:
        if tokens.ndim != 3:
            raise ValueError(f"PerceiverResampler expects tokens [B, N, D], got shape {tokens.shape}")
        b, n, d = tokens.shape
        head_dim, kv = self._check(d)
        if mask is not None and tuple(mask.shape) != (b, n):
            raise ValueError(f"PerceiverResampler mask must be [B, N] = {(b, n)}, got "
                             f"{tuple(mask.shape)}")
        idefics2 = self.variant == "idefics2"
        eps = self.norm_eps if self.norm_eps is not None else (1e-6 if idefics2 else 1e-5)
        act = self.act or ("silu" if idefics2 else "gelu")
        activation(act)  # unknown names raise here

        latents = self.param("latents", layers.named_init(nn.initializers.normal(1.0), (None, "embed")),
                             (self.num_latents, d), jnp.float32)
        x = jnp.broadcast_to(latents.astype(self.dtype), (b, self.num_latents, d))
        context = layers.constrain(tokens.astype(self.dtype), ("batch", "length", "embed"))
        key_mask = None
        if mask is not None:
            key_mask = jnp.concatenate(
                [jnp.asarray(mask, bool), jnp.ones((b, self.num_latents), bool)], axis=1)
        for i in range(self.depth):
            x = PerceiverBlock(self.num_heads, head_dim, kv, self.mlp_ratio, self.variant, act, eps,
                               self.dropout, self.dtype, name=f"block_{i}")(x, context, key_mask, train)
        x = _norm(self.variant, eps, self.dtype, "final_norm")(x)
        if self.out_dim is not None:
            x = nn.Dense(self.out_dim, dtype=self.dtype, param_dtype=jnp.float32, name="proj",
                         kernel_init=layers.named_init(nn.initializers.xavier_uniform(),
                                                       ("embed", "proj")),
                         bias_init=layers.named_init(nn.initializers.zeros, ("proj",)))(x)
        return x
