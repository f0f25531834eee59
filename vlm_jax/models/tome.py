"""Token Merging (ToMe; Bolya et al. 2023, "Token Merging: Your ViT but Faster").

Each transformer block, after its attention and before its MLP, merges ``r``
pairs of similar tokens, so later blocks run on fewer tokens. No training and
no new parameters: a ViT's weights work as they are (``ViT(tome_r=...)``).

Per block (``ToMeBlock``):

  1. Attention with *proportional attention*: ``log(size)`` of each key token is
     added to the attention logits, so a token that stands for s merged patches
     weighs as much as s copies of it would (``SizedAttention``).
  2. Bipartite soft matching (``bipartite_soft_matching``): the tokens are split
     alternately into sets A (even positions) and B (odd positions); the metric is
     the attention keys averaged over heads, compared by cosine similarity; each A
     token picks its most similar B token and the ``r`` A tokens with the most
     similar partners are merged into them. The first token (a CLS token, pool
     "tok") can be protected: it is never merged and stays first.
  3. Merging is a size-weighted average (``merge_wavg``); sizes (how many input
     patches a token stands for) add up.

``r`` is a static int per block, capped at ``(tokens - protected) // 2`` (never
more than set A holds), so every shape is static under jit and at least half
the tokens of a block always remain. All of it works under jit, grad and
remat, and keeps the ("batch", "length", "embed") logical constraints.

The blocks keep the parameter names of ``layers.Encoder1DBlock`` /
``layers.MAPHead`` (``LayerNorm_0``, ``MultiHeadDotProductAttention_0/{query,key,
value,out}``, ``LayerNorm_1``, ``MlpBlock_0``), so a checkpoint trained without
ToMe loads into a ToMe ViT unchanged.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import layers

Array = jax.Array


# ---------------------------------------------------------------- schedules


def parse_r(tome_r: int | Sequence[int], depth: int) -> tuple[int, ...]:
    """``ViT.tome_r`` -> tokens to merge in each of ``depth`` blocks (before capping).

    An int is the same r in every block; a sequence gives one r per block and must
    have ``depth`` entries. Values must be ints >= 0. Returns () when all are 0
    (ToMe off).
    """
    if isinstance(tome_r, (int, np.integer)) and not isinstance(tome_r, bool):
        sched = (int(tome_r),) * depth
    elif isinstance(tome_r, (list, tuple)):
        sched = tuple(tome_r)
        if len(sched) != depth:
            raise ValueError(f"tome_r schedule {sched} has {len(sched)} entries; the ViT has "
                             f"depth {depth}")
    else:
        raise ValueError(f"tome_r must be an int or a per-block sequence of ints, got {tome_r!r}")
    for v in sched:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"tome_r entries must be ints >= 0, got {tome_r!r}")
    sched = tuple(int(v) for v in sched)
    return sched if any(sched) else ()


def capped_r(r: int, num_tokens: int, protect_first: bool = False) -> int:
    """The r a block with ``num_tokens`` tokens really merges: min(r, (tokens - protected) // 2)."""
    return max(0, min(int(r), (int(num_tokens) - int(protect_first)) // 2))


def token_counts(num_tokens: int, schedule: Sequence[int],
                 protect_first: bool = False) -> list[int]:
    """Tokens left after each block: [after block 0, ..., after the last block]."""
    counts, t = [], int(num_tokens)
    for r in schedule:
        t -= capped_r(r, t, protect_first)
        counts.append(t)
    return counts


def constant_r_for(num_tokens: int, depth: int, fraction: float = 0.5,
                   protect_first: bool = False) -> int:
    """Smallest constant r that leaves at most ``fraction`` of the tokens after the last block."""
    for r in range(num_tokens + 1):
        if token_counts(num_tokens, (r,) * depth, protect_first)[-1] <= fraction * num_tokens:
            return r
    return num_tokens


def decreasing_schedule(num_tokens: int, depth: int, fraction: float = 0.5,
                        protect_first: bool = False) -> tuple[int, ...]:
    """A linearly decreasing schedule (ToMe's inflection -1) that removes the tokens
    ``num_tokens * (1 - fraction)`` (rounded up) in total: most merging in the first
    blocks, none in the last."""
    total = int(np.ceil(num_tokens * (1 - fraction)))
    w = np.arange(depth, 0, -1, dtype=np.float64) - 1  # depth-1, ..., 0
    if w.sum() == 0:
        w = np.ones(depth)
    cum = np.round(np.cumsum(w) / w.sum() * total).astype(int)
    sched = tuple(int(v) for v in np.diff(np.concatenate([[0], cum])))
    if token_counts(num_tokens, sched, protect_first)[-1] > num_tokens - total:
        raise ValueError(f"cannot remove {total} of {num_tokens} tokens in {depth} blocks "
                         "(at most half the tokens per block)")
    return sched


# ---------------------------------------------------------------- matching and merging


def bipartite_soft_matching(metric: Array, r: int, protect_first: bool = False
                            ) -> Callable[[Array], Array]:
    """ToMe's bipartite soft matching on ``metric`` [B, T, C] -> ``merge(x)``.

    Set A is tokens 0, 2, 4, ...; set B is tokens 1, 3, 5, ... Each A token's
    best B match by cosine similarity; the r A tokens with the highest such
    similarity are summed into their matches. ``merge(x)`` maps [B, T, ...] to
    [B, T - r, ...]: the unmerged A tokens (in A order when ``protect_first``,
    so token 0 stays first; otherwise by decreasing similarity, as the reference
    code), then all B tokens. It sums; ``merge_wavg`` turns that into a size-weighted
    average. ``r`` (static) is capped by ``capped_r``; the matching carries no gradient.
    """
    if metric.ndim != 3:
        raise ValueError(f"metric must be [B, T, C], got shape {metric.shape}")
    t = metric.shape[1]
    r = capped_r(r, t, protect_first)
    if r == 0:
        return lambda x: x
    metric = jax.lax.stop_gradient(metric).astype(jnp.float32)
    metric = metric / jnp.maximum(jnp.linalg.norm(metric, axis=-1, keepdims=True), 1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = jnp.einsum("bic,bjc->bij", a, b)
    if protect_first:
        scores = scores.at[:, 0, :].set(-jnp.inf)
    node_max = jnp.max(scores, axis=-1)                            # [B, Na]
    node_idx = jnp.argmax(scores, axis=-1)                         # [B, Na]
    edge_idx = jnp.argsort(-node_max, axis=-1)                     # most similar first
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = jnp.take_along_axis(node_idx, src_idx, axis=1)       # [B, r]
    if protect_first:
        unm_idx = jnp.sort(unm_idx, axis=-1)                       # token 0 stays first
    batch = jnp.arange(metric.shape[0])[:, None]

    def merge(x: Array) -> Array:
        if x.shape[:2] != metric.shape[:2]:
            raise ValueError(f"merge expects [B, T, ...] = {metric.shape[:2]}, got {x.shape}")
        src, dst = x[:, ::2], x[:, 1::2]
        unm = src[batch, unm_idx]                                  # [B, Na - r, ...]
        moved = src[batch, src_idx]                                # [B, r, ...]
        dst = dst.at[batch, dst_idx].add(moved)
        return jnp.concatenate([unm, dst], axis=1)

    return merge


def merge_wavg(merge: Callable[[Array], Array], x: Array, sizes: Array) -> tuple[Array, Array]:
    """Size-weighted merge: x [B, T, D], sizes [B, T] -> (x [B, T', D], sizes [B, T']).

    Merged tokens are the average of their parts weighted by size; sizes add up.
    """
    total = merge(sizes)
    summed = merge(x * sizes[..., None].astype(x.dtype))
    return (summed / total[..., None].astype(x.dtype)).astype(x.dtype), total


# ---------------------------------------------------------------- modules


def _check_hook(attention_fn: Callable | None) -> Callable:
    fn = attention_fn or layers.dot_product_attention_f32
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as e:
        raise ValueError(f"Token Merging needs an attention_fn whose signature can be read "
                         f"(it passes the log-size bias as `bias=`): {fn!r}") from e
    if "bias" not in params:
        raise ValueError(f"Token Merging (tome_r > 0) adds log(size) to the attention logits "
                         f"through the attention_fn's `bias` argument, which {fn!r} lacks; "
                         "use tome_r=0 or an attention_fn that takes `bias`")
    return fn


class SizedAttention(nn.Module):
    """Multi-head attention that adds a per-key bias to the logits and returns the keys.

    The parameters are those of ``layers.attention`` (flax's
    MultiHeadDotProductAttention: ``query``/``key``/``value`` [D, H, Dh] and ``out``
    [H, Dh, D] with the same logical names and inits), so the module replaces it
    under the name "MultiHeadDotProductAttention_0".

    __call__(inputs_q [B, Lq, D], inputs_kv [B, Lk, D], key_bias [B, Lk] or None)
      -> (out [B, Lq, D], keys [B, Lk, H, Dh]).
    ``attention_fn`` gets ``bias`` [B, 1, 1, Lk] (see ``layers.dot_product_attention_f32``).
    """

    num_heads: int
    attention_fn: Callable | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array, key_bias: Array | None = None):
        d = inputs_q.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
        fn = _check_hook(self.attention_fn)
        init = nn.initializers.xavier_uniform()
        dense = functools.partial(
            nn.DenseGeneral, axis=-1, features=(self.num_heads, d // self.num_heads),
            dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=layers.named_init(init, ("embed", "heads", "kv")),
            bias_init=layers.named_init(nn.initializers.zeros, ("heads", "kv")))
        q = dense(name="query")(inputs_q)
        k = dense(name="key")(inputs_kv)
        v = dense(name="value")(inputs_kv)
        bias = None if key_bias is None else key_bias[:, None, None, :].astype(jnp.float32)
        kwargs = dict(bias=bias, mask=None, dropout_rng=None, dropout_rate=0.0,
                      broadcast_dropout=True, deterministic=True, dtype=self.dtype,
                      precision=None, force_fp32_for_softmax=True)
        params = inspect.signature(fn).parameters
        x = fn(q, k, v, **{n: val for n, val in kwargs.items() if n in params})
        out = nn.DenseGeneral(
            features=d, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=layers.named_init(init, ("heads", "kv", "embed")),
            bias_init=layers.named_init(nn.initializers.zeros, ("embed",)), name="out")(x)
        return out, k


class ToMeBlock(nn.Module):
    """``layers.Encoder1DBlock`` with proportional attention and ``r`` merges after attention.

    __call__(x [B, T, D], sizes [B, T] float32, train) -> (x [B, T - r', D], sizes [B, T - r'])
    with r' = ``capped_r(r, T, protect_first)``. Same parameters as Encoder1DBlock.
    """

    mlp_dim: int
    num_heads: int
    r: int = 0
    protect_first: bool = False
    dropout: float = 0.0
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    attention_fn: Callable | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, sizes: Array, train: bool = False):
        y = layers.layer_norm(eps=self.ln_eps, dtype=self.dtype)(x)
        y, keys = SizedAttention(self.num_heads, self.attention_fn, self.dtype,
                                 name="MultiHeadDotProductAttention_0")(y, y, jnp.log(sizes))
        y = nn.Dropout(rate=self.dropout)(y, deterministic=not train)
        x = layers.constrain(x + y, ("batch", "length", "embed"))
        if self.r:
            merge = bipartite_soft_matching(jnp.mean(keys, axis=2), self.r, self.protect_first)
            x, sizes = merge_wavg(merge, x, sizes)
            x = layers.constrain(x, ("batch", "length", "embed"))
            sizes = layers.constrain(sizes, ("batch", "length"))
        y = layers.layer_norm(eps=self.ln_eps, dtype=self.dtype)(x)
        y = layers.MlpBlock(self.mlp_dim, self.dropout, self.act, self.dtype)(y, train)
        y = nn.Dropout(rate=self.dropout)(y, deterministic=not train)
        return layers.constrain(x + y, ("batch", "length", "embed")), sizes


class ToMeEncoder(nn.Module):
    """``layers.Encoder`` built of ToMeBlocks (same parameter tree).

    __call__(x [B, T, D], sizes [B, T] or None (ones), train)
      -> (x [B, T', D] final-normed, out, sizes [B, T'] float32);
    out["block{i:02d}"] is block i's output (its own token count).
    ``r``: one int per block (see ``parse_r``), capped per block by ``capped_r``.
    """

    depth: int
    mlp_dim: int
    num_heads: int
    r: Sequence[int] = ()
    protect_first: bool = False
    dropout: float = 0.0
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    attention_fn: Callable | None = None
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, sizes: Array | None = None, train: bool = False):
        if len(self.r) != self.depth:
            raise ValueError(f"ToMeEncoder needs one r per block: depth {self.depth}, r {self.r}")
        block_cls = ToMeBlock
        if self.remat:
            block_cls = nn.remat(ToMeBlock, static_argnums=(3,))  # (self, x, sizes, train)
        if sizes is None:
            sizes = jnp.ones(x.shape[:2], jnp.float32)
        x = layers.constrain(x, ("batch", "length", "embed"))
        out = {}
        for i, r in enumerate(self.r):
            x, sizes = block_cls(
                mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                r=capped_r(r, x.shape[1], self.protect_first), protect_first=self.protect_first,
                dropout=self.dropout, act=self.act, ln_eps=self.ln_eps,
                attention_fn=self.attention_fn, dtype=self.dtype,
                name=f"encoderblock_{i}")(x, sizes, train)
            out[f"block{i:02d}"] = x
        x = layers.layer_norm("encoder_norm", self.ln_eps, self.dtype)(x)
        return x, out, sizes


class ToMeMAPHead(layers.MAPHead):
    """``layers.MAPHead`` whose probe attention adds log(size) of each token (same params).

    __call__(x [B, T, D], sizes [B, T]) -> [B, D].
    """

    @nn.compact
    def __call__(self, x: Array, sizes: Array) -> Array:  # pylint: disable=arguments-renamed
        b, _, d = x.shape
        probe = self.param("probe", layers.named_init(nn.initializers.xavier_uniform(),
                                                      (None, None, "embed")),
                           (1, 1, d), jnp.float32)
        probe = jnp.tile(probe, (b, 1, 1)).astype(self.dtype)
        y, _ = SizedAttention(self.num_heads, self.attention_fn, self.dtype,
                              name="MultiHeadDotProductAttention_0")(probe, x, jnp.log(sizes))
        z = layers.layer_norm(eps=self.ln_eps, dtype=self.dtype)(y)
        y = y + layers.MlpBlock(self.mlp_dim, act=self.act, dtype=self.dtype)(z)
        return layers.constrain(y[:, 0], ("batch", "embed"))


def weighted_mean(x: Array, sizes: Array) -> Array:
    """Size-weighted mean over tokens: x [B, T, D], sizes [B, T] -> [B, D] (GAP under ToMe)."""
    w = (sizes / jnp.sum(sizes, axis=1, keepdims=True)).astype(x.dtype)
    return jnp.einsum("btd,bt->bd", x, w)
