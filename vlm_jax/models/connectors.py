"""Connectors: vision tokens [B, N, D] -> the tokens a language model receives [B, M, d_llm].

    cfg = connectors.default_config()          # model.connector
    cfg.type, cfg.out_dim = "mlp", 2048
    connector = connectors.build(cfg)
    y = connector.apply(variables, tokens, mask=None, train=False)   # [B, M, out_dim]

Every connector built here is called as ``connector(tokens [B, N, D], mask=None,
train=False) -> [B, M, out_dim]``; ``mask`` [B, N] (True = token) hides padding
where the connector mixes tokens (attention pooling, resampler, Q-Former) and is
ignored by the token-wise ones.

    type              M                what
    "none"            N                identity (tokens pass unchanged; no out_dim)
    "linear"          N                one Dense (LLaVA "linear", PaliGemma's projection)
    "mlp"             N                Dense -> act -> Dense (LLaVA-1.5, ``depth`` Denses)
    "attention_pool"  num_tokens       learned probes attend over the tokens (``AttentionPool``)
    "perceiver"       num_tokens       Perceiver Resampler (``models/resampler.py``)
    "qformer"         num_tokens       BLIP-2 Q-Former (``models/qformer.py``)
    "pixel_shuffle"   N / scale**2     space-to-depth + Dense (``models/pixel_shuffle.py``)

Multi-layer / multi-scale features:
    ``select_features(out, layers, strategy)`` picks hidden states of a ViT's ``out``
    dict with transformers' indexing (LLaVA's vision_feature_layer) and concatenates
    several on channels; ``MultiScale(tower, scales)`` runs a tower at several image
    sizes and stacks the scales on channels (S2-wrapper style).

Parameters (logical axis names, see ``layers``):
    Projector  Dense_0/kernel [D, H] ("embed", "mlp"), Dense_1/kernel [H, out] ("mlp", "embed");
               depth 1: Dense_0/kernel [D, out] ("embed", "proj"); biases named like the output dim
    AttentionPool  probe [1, K, D] (None, None, "embed"), MultiHeadDotProductAttention_0,
               LayerNorm_0, MlpBlock_0, optional out [D, out_dim] ("embed", "proj")
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import layers

Array = jax.Array
CONNECTOR_TYPES = ("none", "linear", "mlp", "attention_pool", "perceiver", "qformer",
                   "pixel_shuffle")
STRATEGIES = ("full", "default")


class Identity(nn.Module):
    """The "none" connector: tokens [B, N, D] pass unchanged (mask and train ignored)."""

    @nn.compact
    def __call__(self, tokens: Array, mask: Array | None = None, train: bool = False) -> Array:
        return tokens


class Projector(nn.Module):
    """Token-wise projection [B, N, D] -> [B, N, out_dim].

    depth 1: one Dense (LLaVA "linear", PaliGemma's multi_modal_projector.linear);
    depth 2: Dense(hidden_dim) -> act -> Dense(out_dim) (LLaVA-1.5's MLP; hidden_dim
    defaults to out_dim); depth k > 2: k - 1 hidden Denses with act between them.
    Submodules ``Dense_0``, ``Dense_1``, ... ``act``: a ``layers.ACTIVATIONS`` name
    ("gelu" is the exact erf GELU, LLaVA's default). ``mask`` is ignored (token-wise).
    """

    out_dim: int
    hidden_dim: int | None = None
    depth: int = 2
    act: str = "gelu"
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, mask: Array | None = None, train: bool = False) -> Array:
        if self.depth < 1:
            raise ValueError(f"Projector depth must be >= 1, got {self.depth}")
        act = layers.get_activation(self.act)
        init = nn.initializers.lecun_normal()
        hidden = self.hidden_dim or self.out_dim
        x = tokens.astype(self.dtype)
        for i in range(self.depth):
            last = i == self.depth - 1
            features = self.out_dim if last else hidden
            if self.depth == 1:
                names = ("embed", "proj")
            else:
                names = ("embed" if i == 0 else "mlp", "embed" if last else "mlp")
            x = nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype,
                         kernel_init=layers.named_init(init, names),
                         bias_init=layers.named_init(nn.initializers.zeros, names[1:]),
                         name=f"Dense_{i}")(x)
            if not last:
                x = act(x)
        return x


class AttentionPool(nn.Module):
    """Several learned probes attend over the tokens: [B, N, D] -> [B, K, out_dim or D].

    The MAP head (``layers.MAPHead``) with ``num_probes`` probes: y = MHA(probes, x),
    then y + MLP(LN(y)), then an optional Dense ``out`` to ``out_dim``. ``mask``
    [B, N] (True = token) hides padded tokens from every probe. ``mlp_dim``
    defaults to 4 * D.
    """

    num_probes: int
    num_heads: int
    mlp_dim: int | None = None
    out_dim: int | None = None
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, mask: Array | None = None, train: bool = False) -> Array:
        if tokens.ndim != 3:
            raise ValueError(f"AttentionPool expects tokens [B, N, D], got shape {tokens.shape}")
        b, n, d = tokens.shape
        if d % self.num_heads:
            raise ValueError(f"AttentionPool: width {d} is not divisible by num_heads "
                             f"{self.num_heads}")
        probe = self.param("probe", layers.named_init(nn.initializers.xavier_uniform(),
                                                      (None, None, "embed")),
                           (1, self.num_probes, d), jnp.float32)
        probe = jnp.broadcast_to(probe.astype(self.dtype), (b, self.num_probes, d))
        attn_mask = None
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.shape != (b, n):
                raise ValueError(f"AttentionPool mask must be [B, N] = {(b, n)}, got {mask.shape}")
            attn_mask = mask.astype(bool)[:, None, None, :]
        y = layers.attention(self.num_heads, dtype=self.dtype)(
            probe, tokens.astype(self.dtype), mask=attn_mask)
        z = layers.layer_norm(eps=self.ln_eps, dtype=self.dtype)(y)
        y = y + layers.MlpBlock(self.mlp_dim or 4 * d, act=self.act, dtype=self.dtype)(z, train)
        y = layers.constrain(y, ("batch", "length", "embed"))
        if self.out_dim is not None:
            y = nn.Dense(self.out_dim, dtype=self.dtype,
                         kernel_init=layers.named_init(nn.initializers.lecun_normal(),
                                                       ("embed", "proj")),
                         bias_init=layers.named_init(nn.initializers.zeros, ("proj",)),
                         name="out")(y)
        return y


# ---------------------------------------------------------------- multi-layer features

def _num_blocks(out: dict) -> int:
    n = sum(1 for k in out if k.startswith("encoder/block"))
    if n == 0:
        raise ValueError("the tower's outputs hold no 'encoder/block{i:02d}' entries: "
                         "select_features needs a ViT-style tower")
    return n


def hidden_state(out: dict, index: int) -> Array:
    """transformers' ``hidden_states[index]`` from a ViT's ``out`` dict.

    hidden_states has depth + 1 entries: [0] is the encoder's input (after the
    embeddings, CLS and CLIP's pre-norm; ``out["encoder/input"]``, see
    ``frontend.VisionFrontEnd`` which adds it), [i > 0] is the output of block i - 1
    (``out["encoder/block{i-1:02d}"]``, before the final norm). Negative indices
    count from the end (-1 = the last block's output). The final-normed tokens
    (SigLIP's last_hidden_state) are ``out["tokens"]``, selected by "final" in
    ``select_features``.
    """
    depth = _num_blocks(out)
    i = int(index)
    if not -(depth + 1) <= i <= depth:
        raise ValueError(f"feature layer {index} is out of range for a tower with {depth} "
                         f"blocks (hidden states -{depth + 1}..{depth})")
    i %= depth + 1
    if i == 0:
        if "encoder/input" not in out:
            raise ValueError("feature layer 0 (the encoder input) is not in the tower's "
                             "outputs; run the tower through frontend.VisionFrontEnd, which "
                             "adds out['encoder/input']")
        return out["encoder/input"]
    return out[f"encoder/block{i - 1:02d}"]


def select_features(out: dict, layers: int | str | Sequence[int | str] = -1,
                    strategy: str = "full", num_prefix_tokens: int = 1) -> Array:
    """Tokens [B, N', C] from a ViT's ``out`` dict, LLaVA-style.

    layers: an index of transformers' hidden_states (see ``hidden_state``: -1 = last
    block's output, -2 = the one before, 0 = encoder input), "final" (the
    final-normed tokens, ``out["tokens"]``), or a list of those, whose tokens are
    concatenated on channels (C = len(layers) * D), as LLaVA does for a list of
    vision_feature_layer.
    strategy: "full" keeps every token; "default" drops the first
    ``num_prefix_tokens`` (LLaVA's "default" drops one token, the CLS, even for
    towers that have none, e.g. SigLIP).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"feature strategy {strategy!r} is not one of {STRATEGIES}")
    many = isinstance(layers, (list, tuple))
    picks = list(layers) if many else [layers]
    if not picks:
        raise ValueError("select_features: empty list of layers")
    feats = []
    for layer in picks:
        if isinstance(layer, str):
            if layer != "final":
                raise ValueError(f"feature layer {layer!r}: expected an int or 'final'")
            x = out["tokens"]
        else:
            x = hidden_state(out, layer)
        if strategy == "default":
            x = x[:, num_prefix_tokens:]
        feats.append(x)
    return feats[0] if len(feats) == 1 else jnp.concatenate(feats, axis=-1)


class MultiScale(nn.Module):
    """One tower at several image sizes, scales stacked on channels (S2-wrapper style).

    __call__(image [B, H, W, C], train=False) -> (x, out) like the wrapped ViT,
    where every token entry of ``out`` ("tokens", "encoder/block{i:02d}",
    "encoder/input" when present) is [B, P + n, D * len(scales)]: for each size s
    in ``scales`` the image is resized to (s, s) (bilinear, antialiased), the tower
    runs (one set of weights; a learned posemb is resized by the ViT), its patch
    grid is average-pooled down to the grid of the smallest scale (each grid must
    be an integer multiple of it), and the scales are concatenated on channels in
    the order given. The P prefix tokens (1 for a CLS tower, pool "tok") are
    concatenated on channels too. ``x`` is the smallest scale's pooled output.
    """

    tower: nn.Module
    scales: Sequence[int]

    @property
    def pool_type(self) -> str | None:
        """The wrapped tower's (so VisionFrontEnd(drop_cls=None) sees its CLS token)."""
        return getattr(self.tower, "pool_type", None)

    @property
    def total_stride(self) -> tuple[int, int]:
        return self.tower.total_stride

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pool_type == "tok" else 0

    @nn.compact
    def __call__(self, image: Array, train: bool = False):
        if len(self.scales) < 1:
            raise ValueError("MultiScale needs at least one scale")
        sh, sw = self.tower.total_stride
        grids = []
        for s in self.scales:
            if s % sh or s % sw:
                raise ValueError(f"MultiScale: scale {s} is not a multiple of the tower's "
                                 f"stride {(sh, sw)}")
            grids.append((s // sh, s // sw))
        base = min(grids)
        for g in grids:
            if g[0] % base[0] or g[1] % base[1]:
                raise ValueError(f"MultiScale: token grid {g} is not an integer multiple of "
                                 f"the smallest grid {base} (scales {tuple(self.scales)})")
        p = self.num_prefix_tokens
        outs, first_x = [], None
        for s, g in zip(self.scales, grids):
            img = jax.image.resize(image, (image.shape[0], s, s, image.shape[-1]), "bilinear")
            x, out = self.tower(img, train=train)
            first_x = x if first_x is None or g == base else first_x
            outs.append((g, out))
        merged = {}
        keys = [k for k in outs[0][1] if k == "tokens" or k.startswith("encoder/")]
        for k in keys:
            parts = []
            for g, out in outs:
                t = out[k]
                b, _, d = t.shape
                grid = t[:, p:].reshape(b, g[0], g[1], d)
                fh, fw = g[0] // base[0], g[1] // base[1]
                grid = grid.reshape(b, base[0], fh, base[1], fw, d).mean(axis=(2, 4))
                parts.append(jnp.concatenate([t[:, :p], grid.reshape(b, -1, d)], axis=1))
            merged[k] = jnp.concatenate(parts, axis=-1)
        return first_x, merged


# ---------------------------------------------------------------- config

def default_config() -> ml_collections.ConfigDict:
    """``model.connector`` fields with their defaults (a two-layer MLP projector).

        type            "mlp"    one of CONNECTOR_TYPES
        out_dim         None     the language model's width (None: from ``build``'s out_dim)
        hidden_dim      None     mlp: hidden width (None: out_dim)
        depth           2        mlp: number of Denses; perceiver / qformer: blocks / layers
        num_tokens      64       attention_pool probes, perceiver latents, qformer queries
        num_heads       8        attention_pool / perceiver / qformer heads
        act             "gelu"   mlp activation (exact GELU, as LLaVA)
        use_bias        True     linear / mlp biases
        scale           2        pixel_shuffle: space-to-depth factor
        feature_layers  -1       hidden state(s) of the tower fed to the connector
                                 (see select_features: int, "final" or a list)
        strategy        "full"   "full" | "default" (drop the CLS / first token)
    """
    cfg = ml_collections.ConfigDict(dict(
        type="mlp", out_dim=ml_collections.FieldReference(None, field_type=int),
        hidden_dim=ml_collections.FieldReference(None, field_type=int), depth=2, num_tokens=64,
        num_heads=8, act="gelu", use_bias=True, scale=2,
        feature_layers=ml_collections.FieldReference(-1, field_type=object), strategy="full"))
    cfg.lock()
    return cfg


def _get(cfg, key, default):
    try:
        v = cfg[key]
    except (KeyError, AttributeError):
        return default
    return default if v is None else v


def build(cfg, out_dim: int | None = None, dtype: Any = jnp.float32) -> nn.Module:
    """The connector ``cfg`` (a ``default_config()``-like ConfigDict or dict) describes.

    out_dim: the language model's width, used where ``cfg.out_dim`` is None.
    Raises ValueError for an unknown type or a missing out_dim.
    """
    kind = _get(cfg, "type", "mlp")
    if kind not in CONNECTOR_TYPES:
        raise ValueError(f"Unknown connector type {kind!r}; expected one of {CONNECTOR_TYPES}")
    if kind == "none":
        return Identity()
    dim = _get(cfg, "out_dim", out_dim)
    if dim is None and kind in ("linear", "mlp", "pixel_shuffle"):
        raise ValueError(f"connector type {kind!r} needs out_dim (model.connector.out_dim or "
                         "build(cfg, out_dim=...))")
    dim = None if dim is None else int(dim)
    heads, tokens, depth = (int(_get(cfg, "num_heads", 8)), int(_get(cfg, "num_tokens", 64)),
                            int(_get(cfg, "depth", 2)))
    if kind in ("linear", "mlp"):
        hidden = _get(cfg, "hidden_dim", None)
        return Projector(dim, hidden_dim=None if hidden is None else int(hidden),
                         depth=1 if kind == "linear" else depth, act=_get(cfg, "act", "gelu"),
                         use_bias=bool(_get(cfg, "use_bias", True)), dtype=dtype)
    if kind == "attention_pool":
        return AttentionPool(tokens, heads, out_dim=dim, dtype=dtype)
    if kind == "perceiver":
        from vlm_jax.models.resampler import PerceiverResampler
        return PerceiverResampler(num_latents=tokens, depth=depth, num_heads=heads, out_dim=dim,
                                  dtype=dtype)
    if kind == "qformer":
        from vlm_jax.models.qformer import QFormer
        return QFormer(num_queries=tokens, depth=depth, num_heads=heads, out_dim=dim, dtype=dtype)
    from vlm_jax.models.pixel_shuffle import PixelShuffleProjector
    return PixelShuffleProjector(dim, scale=int(_get(cfg, "scale", 2)), dtype=dtype)


def num_output_tokens(cfg, num_tokens_in: int) -> int:
    """How many tokens the connector ``cfg`` sends the LM for ``num_tokens_in`` vision tokens."""
    kind = _get(cfg, "type", "mlp")
    if kind in ("none", "linear", "mlp"):
        return int(num_tokens_in)
    if kind == "pixel_shuffle":
        return int(num_tokens_in) // int(_get(cfg, "scale", 2)) ** 2
    if kind in ("attention_pool", "perceiver", "qformer"):
        return int(_get(cfg, "num_tokens", 64))
    raise ValueError(f"Unknown connector type {kind!r}; expected one of {CONNECTOR_TYPES}")


__all__ = ["CONNECTOR_TYPES", "STRATEGIES", "Identity", "Projector", "AttentionPool", "MultiScale",
           "hidden_state", "select_features", "default_config", "build", "num_output_tokens"]
