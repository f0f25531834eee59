"""Transformer building blocks shared by the ViT, text and NaViT towers.

Parameter names follow big_vision (``Transformer/encoderblock_{i}/...``,
``MlpBlock_0/Dense_{0,1}``, ``MultiHeadDotProductAttention_0/{query,key,value,out}``)
so that weight import from big_vision npz files and transformers is a renaming.

Logical axis names
------------------
Every parameter is created through ``nn.with_logical_partitioning``; the parallel
code maps these names to mesh axes with a rules table. A name missing from the
rules leaves that dimension replicated.

Parameters:

    "embed"     model width D (residual stream): Dense in/out, LayerNorm-free dims,
                posemb / cls / probe last dim, embedding table columns
    "mlp"       MLP hidden dim (mlp_dim)
    "heads"     attention heads
    "kv"        per-head dim (head_dim = D / heads)
    "vocab"     token-embedding rows
    "norm"      LayerNorm scale and bias [D] (small; usually replicated)
    "conv_in"   input channels of a convolution kernel (3 for RGB, or stem features)
    "conv_out"  output channels of a conv-stem convolution (not the final patch
                projection, whose output dim is "embed")
    "proj"      output dim of a tower's final projection ``head`` (the shared
                image-text embedding dim)
    (CNNs)      ResNet / BiT / ConvNeXt (``resnet.py``, ``convnext.py``) reuse the
                conv names: kernels (None, None, "conv_in", "conv_out"), depthwise
                kernels (None, None, None, "conv_out"), channel-wise norm scales /
                biases, conv biases and ConvNeXt's layer_scale ("conv_out",),
                ConvNeXt's pointwise MLP ("conv_in", "mlp") and ("mlp", "conv_out").
                BatchNorm running statistics (collection "batch_stats") carry no
                names: they are small and stay replicated.
    "layers"    the leading [depth] dim of a scanned encoder's stacked block params
                (``Encoder(scan=True)``, see ``models/scan.py``); replicated by the
                default rules, so each device holds its shards of every layer
    None        replicated: spatial kernel dims, leading singleton dims, scalars
                such as the two-tower ``t`` and ``b``

Activations (``constrain``: pinned by the train step's rules, ``parallel.activation_rules``;
elsewhere flax's ``nn.with_logical_constraint``, a no-op without rules):

    ("batch", "length", "embed")   token streams between blocks
    ("batch", "length", "mlp")     the MLP hidden activation
    ("batch", "embed")             pooled features
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import parallel
from vlm_jax.models import scan as scan_lib

Dtype = Any
Array = jax.Array

_LN_DEFAULT_EPS = 1e-6


def named_init(init, names):
    """Shorthand: an initializer whose param carries logical axis ``names``."""
    return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: Array, names: Sequence[str | None]) -> Array:
    """Logical sharding constraint on an activation (a no-op without axis rules;
    the train step's rules: ``parallel.activation_rules``)."""
    return parallel.constrain_activation(x, names)


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # tanh approximation: big_vision's nn.gelu default, transformers "gelu_pytorch_tanh".
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu": functools.partial(nn.gelu, approximate=False),  # exact erf form
    "quick_gelu": _quick_gelu,  # OpenAI CLIP
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Activation by config name: one of ``ACTIVATIONS`` ("gelu_tanh", "gelu", "quick_gelu")."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dot_product_attention_f32(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                              dropout_rng=None, dropout_rate=0.0, deterministic=False,
                              dtype=None, precision=None, module=None):
    """Default attention: softmax(q k^T / sqrt(Dh) + bias, masked) v, the softmax in float32.

    query [B, Lq, H, Dh], key/value [B, Lk, H, Dh]; mask broadcastable to
    [B, H, Lq, Lk] (True = attend). Returns [B, Lq, H, Dh] (float32 when the
    softmax ran in float32, as flax's ``nn.dot_product_attention`` with
    ``force_fp32_for_softmax``, whose numerics, dropout and sown
    ``attention_weights`` [B, H, Lq, Lk] (with ``module``) this follows).
    Two things differ, both for speed on XLA:CPU (experiments/cpu_speed.md): heads
    are moved in front of the sequence before the two batched matmuls ([B, H, L,
    Dh], as torch's SDPA takes them; about twice as fast as flax's
    '...qhd,...khd->...hqk' form), and the softmax's division by its row sums is
    applied to the output rather than to the weights (as flash attention does).
    Results equal flax's up to float rounding. Custom ``attention_fn`` hooks
    receive the same arguments (those their signature accepts).
    """
    query, key, value = nn.dtypes.promote_dtype(query, key, value, dtype=dtype)
    dtype = query.dtype
    q, k, v = (jnp.swapaxes(t, -3, -2) for t in (query, key, value))  # [..., H, L, Dh]
    q = q / jnp.sqrt(q.shape[-1]).astype(dtype)
    w = jnp.einsum("...hqd,...hkd->...hqk", q, k, precision=precision)
    if bias is not None:
        w = w + bias
    if mask is not None:
        w = jnp.where(mask, w, jnp.finfo(dtype).min)
    w = w.astype(jnp.float32)  # the softmax in float32, as flax's
    # softmax(w) v = (exp(w - max) v) / sum(exp(w - max)): the normalisation is applied
    # to the [.., Lq, Dh] output instead of the [.., Lq, Lk] weights, one pass over
    # the scores fewer (XLA:CPU runs the forward 1.4x faster, experiments/cpu_speed.md).
    # The max is a constant for autodiff, as in jax.nn.softmax (the function does not
    # depend on it).
    e = jnp.exp(w - jax.lax.stop_gradient(jnp.max(w, axis=-1, keepdims=True)))
    total = jnp.sum(e, axis=-1, keepdims=True)
    if module and module.is_mutable_collection("intermediates"):
        module.sow("intermediates", "attention_weights", e / total)
    if not deterministic and dropout_rate > 0.0:
        keep_prob = 1.0 - dropout_rate
        shape = ((1,) * (key.ndim - 2) + w.shape[-2:]) if broadcast_dropout else w.shape
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
        e = e * (keep.astype(e.dtype) / jnp.asarray(keep_prob, dtype=e.dtype))
    out = jnp.einsum("...hqk,...hkd->...hqd", e, v, precision=precision) / total
    return jnp.swapaxes(out, -3, -2)


def matmul_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` for DenseGeneral layers, as one 2-D matmul where it can be.

    A contraction of ``lhs``'s trailing axes with ``rhs``'s leading axes (no
    batch axes), e.g. the attention projections [B, L, D] x [D, H, Dh] and
    [B, L, H, Dh] x [H, Dh, D], is computed as [B*L, K] @ [K, N] and reshaped
    back: the same function. Given several contracted or free kernel axes,
    XLA:CPU transposes the kernel into a fresh buffer for the backward pass of
    every layer; the flat form needs no copy (experiments/cpu_speed.md). Any
    other contraction goes to ``lax.dot_general`` unchanged.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, k = tuple(lc), tuple(rc), len(lc)
    if (lb or rb or lc != tuple(range(lhs.ndim - k, lhs.ndim)) or rc != tuple(range(k))
            or lhs.ndim - k < 1 or rhs.ndim - k < 1):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    free_l, free_r = lhs.shape[:lhs.ndim - k], rhs.shape[k:]
    kk = math.prod(rhs.shape[:k])
    out = jax.lax.dot_general(lhs.reshape(-1, kk), rhs.reshape(kk, -1), (((1,), (0,)), ((), ())),
                              precision=precision, preferred_element_type=preferred_element_type)
    return out.reshape(free_l + free_r)


def layer_norm(name: str | None = None, eps: float = _LN_DEFAULT_EPS, dtype: Dtype = jnp.float32):
    """LayerNorm with logically named scale/bias (["norm"])."""
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, name=name,
        scale_init=named_init(nn.initializers.ones, ("norm",)),
        bias_init=named_init(nn.initializers.zeros, ("norm",)))


def attention(num_heads: int, *, dtype: Dtype, attention_fn: Callable | None = None,
              dropout_rate: float = 0.0, name: str | None = None) -> nn.MultiHeadDotProductAttention:
    """Multi-head attention with logically named query/key/value/out DenseGeneral params.

    query/key/value kernels [D, H, Dh] ("embed", "heads", "kv") with biases [H, Dh];
    out kernel [H, Dh, D] ("heads", "kv", "embed") with bias [D].
    """
    init = nn.initializers.xavier_uniform()
    return nn.MultiHeadDotProductAttention(
        num_heads=num_heads, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=named_init(init, ("embed", "heads", "kv")),
        bias_init=named_init(nn.initializers.zeros, ("heads", "kv")),
        out_kernel_init=named_init(init, ("heads", "kv", "embed")),
        out_bias_init=named_init(nn.initializers.zeros, ("embed",)),
        attention_fn=attention_fn or dot_product_attention_f32,
        qkv_dot_general=matmul_dot_general, out_dot_general=matmul_dot_general,
        dropout_rate=dropout_rate, force_fp32_for_softmax=True,
        deterministic=True, name=name)


def sows_attention_weights(attention_fn: Callable | None) -> bool:
    """Whether ``attention(..., attention_fn)`` layers can sow their probabilities.

    Called with ``sow_weights=True``, flax's attention passes itself as ``module``
    to the attention_fn, and ``nn.dot_product_attention`` sows the softmax
    probabilities [B, H, Lq, Lk] as ``intermediates/attention_weights`` (free
    unless "intermediates" is mutable). Hooks without a ``module`` argument
    (fused kernels, wrappers) cannot receive it, so they are called as before.
    """
    fn = attention_fn or dot_product_attention_f32
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "module" in params


class MlpBlock(nn.Module):
    """Transformer MLP: Dense(mlp_dim) -> act -> dropout -> Dense(D). [..., D] -> [..., D]."""

    mlp_dim: int
    dropout: float = 0.0
    act: str = "gelu_tanh"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        d = x.shape[-1]
        kinit = nn.initializers.xavier_uniform()
        binit = nn.initializers.normal(stddev=1e-6)
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=named_init(kinit, ("embed", "mlp")),
                     bias_init=named_init(binit, ("mlp",)))(x)
        x = get_activation(self.act)(x)
        if x.ndim == 3:
            x = constrain(x, ("batch", "length", "mlp"))
        x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)
        return nn.Dense(d, dtype=self.dtype, kernel_init=named_init(kinit, ("mlp", "embed")),
                        bias_init=named_init(binit, ("embed",)))(x)


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    x [B, L, D] -> [B, L, D]. ``mask`` broadcastable to [B, H, L, L], True = attend.
    With "intermediates" mutable, the attention probabilities [B, H, L, L] are sown
    at ``MultiHeadDotProductAttention_0/attention_weights`` (see ``sows_attention_weights``).
    """

    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    act: str = "gelu_tanh"
    ln_eps: float = _LN_DEFAULT_EPS
    attention_fn: Callable | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, train: bool = False) -> Array:
        y = layer_norm(eps=self.ln_eps, dtype=self.dtype)(x)
        y = attention(self.num_heads, dtype=self.dtype, attention_fn=self.attention_fn)(
            y, y, mask=mask, sow_weights=sows_attention_weights(self.attention_fn))
        y = nn.Dropout(rate=self.dropout)(y, deterministic=not train)
        x = constrain(x + y, ("batch", "length", "embed"))
        y = layer_norm(eps=self.ln_eps, dtype=self.dtype)(x)
        y = MlpBlock(self.mlp_dim, self.dropout, self.act, self.dtype)(y, train)
        y = nn.Dropout(rate=self.dropout)(y, deterministic=not train)
        return constrain(x + y, ("batch", "length", "embed"))


class Encoder(nn.Module):
    """Stack of ``depth`` Encoder1DBlocks and a final LayerNorm ("encoder_norm").

    x [B, L, D] -> (x [B, L, D], out) with out["block{i:02d}"] the output of block i
    (before the final norm). Unused entries of ``out`` cost nothing under jit.

    ``scan`` False: blocks "encoderblock_{i}", unrolled. True: one block run by
    ``nn.scan`` with stacked params "encoderblock/..." [depth, ...] (leading
    logical axis "layers"); sown attention weights are stacked the same way.
    ``models.scan.to_scanned`` / ``to_unrolled`` convert between the layouts.
    ``remat`` / ``remat_policy``: rematerialise each block in the backward pass
    under a policy (``models.scan.REMAT_POLICIES``; "" follows ``remat``).
    """

    depth: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    act: str = "gelu_tanh"
    ln_eps: float = _LN_DEFAULT_EPS
    attention_fn: Callable | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    remat_policy: str = ""
    scan: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, train: bool = False):
        policy = scan_lib.remat_policy(self.remat, self.remat_policy)
        kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                  act=self.act, ln_eps=self.ln_eps, attention_fn=self.attention_fn,
                  dtype=self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        if self.scan:
            def body(blk, carry, mask):
                y = blk(carry, mask, train)
                return y, y
            if policy != "none":
                body = nn.remat(body, policy=scan_lib.checkpoint_policy(policy), prevent_cse=False)
            body = nn.scan(body, variable_axes={"params": 0, "intermediates": 0},
                           split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                           length=self.depth,
                           metadata_params={nn.PARTITION_NAME: scan_lib.LAYERS_AXIS})
            x, ys = body(Encoder1DBlock(**kw, name=scan_lib.SCANNED_BLOCK), x, mask)
            out = {f"block{i:02d}": ys[i] for i in range(self.depth)}
        else:
            block_cls = Encoder1DBlock
            if policy != "none":  # (self, x, mask, train)
                block_cls = nn.remat(Encoder1DBlock, static_argnums=(3,),
                                     policy=scan_lib.checkpoint_policy(policy))
            out = {}
            for i in range(self.depth):
                x = block_cls(**kw, name=f"encoderblock_{i}")(x, mask, train)
                out[f"block{i:02d}"] = x
        x = layer_norm("encoder_norm", self.ln_eps, self.dtype)(x)
        return x, out


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens.

    x [B, L, D] -> [B, D]. ``probe`` [1, 1, D]; then y + MLP(LN(y)). ``mask``
    (optional, [B, L] bool or broadcastable to [B, H, 1, L]) hides padding tokens.
    The probe's attention [B, H, 1, L] is sown like ``Encoder1DBlock``'s.
    """

    mlp_dim: int
    num_heads: int
    act: str = "gelu_tanh"
    ln_eps: float = _LN_DEFAULT_EPS
    attention_fn: Callable | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        b, _, d = x.shape
        probe = self.param("probe", named_init(nn.initializers.xavier_uniform(), (None, None, "embed")),
                           (1, 1, d), jnp.float32)
        probe = jnp.tile(probe, (b, 1, 1)).astype(self.dtype)
        if mask is not None and mask.ndim == 2:
            mask = mask[:, None, None, :]
        y = attention(self.num_heads, dtype=self.dtype, attention_fn=self.attention_fn)(
            probe, x, mask=mask, sow_weights=sows_attention_weights(self.attention_fn))
        z = layer_norm(eps=self.ln_eps, dtype=self.dtype)(y)
        y = y + MlpBlock(self.mlp_dim, act=self.act, dtype=self.dtype)(z)
        return constrain(y[:, 0], ("batch", "embed"))


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0,
                     dtype: Dtype = jnp.float32) -> Array:
    """Fixed 2-D sin-cos position embedding (MoCo v3 / big_vision layout).

    Returns [1, h*w, width], row-major over the (row, col) grid; channels are
    [sin(x), cos(x), sin(y), cos(y)] blocks of width/4 frequencies each, with
    x the column and y the row index. ``width`` must be a multiple of 4.
    """
    if width % 4:
        raise ValueError(f"sincos2d posemb needs width divisible by 4, got width={width}")
    y, x = np.mgrid[:h, :w]
    n = width // 4
    omega = np.arange(n) / max(n - 1, 1)
    omega = 1.0 / (temperature ** omega)
    y = np.einsum("m,d->md", y.reshape(-1), omega)
    x = np.einsum("m,d->md", x.reshape(-1), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(pe[None], dtype)


def resize_posemb(posemb: Array, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> Array:
    """Bilinearly resize a learned posemb [1, gh*gw, D] laid out on ``old_hw`` to ``new_hw``."""
    if tuple(old_hw) == tuple(new_hw):
        return posemb
    d = posemb.shape[-1]
    grid = posemb.reshape(1, *old_hw, d)
    grid = jax.image.resize(grid, (1, *new_hw, d), method="bilinear")
    return grid.reshape(1, new_hw[0] * new_hw[1], d)


def learned_posemb(module: nn.Module, name: str, shape: tuple[int, ...]) -> Array:
    """Create (inside ``module``'s compact scope) a learned posemb param, std 1/sqrt(D).

    ``shape`` is e.g. [1, N, D]; axis names (None, None, "embed").
    """
    init = nn.initializers.normal(stddev=1.0 / np.sqrt(shape[-1]))
    names = (None,) * (len(shape) - 1) + ("embed",)
    return module.param(name, named_init(init, names), shape, jnp.float32)


# ---------------------------------------------------------------- convolutional building blocks
# Shared by the CNN encoders (resnet.py, convnext.py) and the ViT's hybrid stem.

CONV_KERNEL_NAMES = (None, None, "conv_in", "conv_out")


def conv_padding(padding) -> str | list[tuple[int, int]]:
    """"SAME"/"VALID" pass through; an int p pads p pixels on every side, as torch's Conv2d does.

    torch pads symmetrically; flax's "SAME" pads (0, 1) for even inputs at stride 2,
    so torch parity needs the explicit form.
    """
    if isinstance(padding, str):
        return padding
    return [(int(padding), int(padding))] * 2


def conv(features: int, kernel_size: int, strides: int = 1, *, padding="SAME",
         use_bias: bool = False, groups: int = 1, init: Callable | None = None,
         dtype: Dtype = jnp.float32, name: str | None = None, cls=nn.Conv, **kw) -> nn.Conv:
    """A square 2-D convolution [B, H, W, Cin] -> [B, H', W', features] with named params.

    kernel [k, k, Cin/groups, features]: (None, None, "conv_in", "conv_out"), or
    (None, None, None, "conv_out") for grouped / depthwise convolutions;
    bias [features] ("conv_out",). ``padding``: "SAME", "VALID" or an int (torch-style).
    ``init`` defaults to lecun normal; ``cls`` may be a subclass such as StdConv.
    """
    names = CONV_KERNEL_NAMES if groups == 1 else (None, None, None, "conv_out")
    return cls(features, (kernel_size, kernel_size), strides=(strides, strides),
               padding=conv_padding(padding), use_bias=use_bias, feature_group_count=groups,
               dtype=dtype, param_dtype=jnp.float32,
               kernel_init=named_init(init or nn.initializers.lecun_normal(), names),
               bias_init=named_init(nn.initializers.zeros, ("conv_out",)), name=name, **kw)


def standardize_kernel(w: Array, eps: float, eps_on_std: bool = False) -> Array:
    """Weight standardisation of a conv kernel [kh, kw, Cin, Cout] over (kh, kw, Cin) per output.

    (w - mean) / sqrt(var + eps), or (w - mean) / (std + eps) with ``eps_on_std``
    (the ViT-hybrid / big_vision ``bit.py`` form). Computed in float32.
    """
    w = jnp.asarray(w, jnp.float32)
    w = w - jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    var = jnp.mean(jnp.square(w), axis=(0, 1, 2), keepdims=True)
    return w / (jnp.sqrt(var) + eps) if eps_on_std else w * jax.lax.rsqrt(var + eps)


class StdConv(nn.Conv):
    """nn.Conv whose kernel is weight-standardised on every use (Qiao et al. 2019; BiT).

    The stored parameter stays raw; only the kernel the convolution sees is
    standardised, so the optimiser updates the raw weights. ``eps`` and
    ``eps_on_std``: see ``standardize_kernel``.
    """

    eps: float = 1e-10
    eps_on_std: bool = False

    def param(self, name, *args, **kwargs):
        p = super().param(name, *args, **kwargs)
        # nn.Conv fetches its kernel through self.param: standardising here keeps
        # all of nn.Conv's padding / grouping / dtype logic.
        return standardize_kernel(p, self.eps, self.eps_on_std) if name == "kernel" else p


def batch_norm(*, train: bool, momentum: float = 0.9, eps: float = 1e-5, zero_init: bool = False,
               dtype: Dtype = jnp.float32, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm over [..., C] with named scale/bias ("conv_out",).

    ``momentum`` is flax's (running = momentum * running + (1 - momentum) * batch):
    0.9 equals torch's momentum=0.1. Batch statistics with ``train`` (update the
    "batch_stats" collection: apply(..., mutable=["batch_stats"])), running ones
    otherwise. Under jax.jit on a batch-sharded array the mean is over the global
    batch. Differs from torch in one detail: the running variance is updated with
    the biased batch variance (torch uses the unbiased n/(n-1) one).
    ``zero_init`` starts the scale at 0 (residual branches start as identity).
    """
    return nn.BatchNorm(
        use_running_average=not train, momentum=momentum, epsilon=eps, dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=named_init(nn.initializers.zeros if zero_init else nn.initializers.ones,
                              ("conv_out",)),
        bias_init=named_init(nn.initializers.zeros, ("conv_out",)), name=name)


def group_norm(groups: int = 32, *, eps: float = 1e-5, zero_init: bool = False,
               dtype: Dtype = jnp.float32, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm over [B, H, W, C] (``groups`` groups of C/groups channels) with named scale/bias.

    The variance is the two-pass E[(x - mean)^2] (exact, as BiT computes it).
    """
    return nn.GroupNorm(
        num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=named_init(nn.initializers.zeros if zero_init else nn.initializers.ones,
                              ("conv_out",)),
        bias_init=named_init(nn.initializers.zeros, ("conv_out",)), name=name)


def channel_layer_norm(*, eps: float = 1e-6, dtype: Dtype = jnp.float32,
                       name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the channels of [..., C] feature maps, scale/bias named ("conv_out",).

    Two-pass variance, for parity with torch's LayerNorm on large-mean activations.
    """
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
        scale_init=named_init(nn.initializers.ones, ("conv_out",)),
        bias_init=named_init(nn.initializers.zeros, ("conv_out",)), name=name)
