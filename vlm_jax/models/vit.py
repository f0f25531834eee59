"""Vision Transformer (big_vision layout) with MAP / GAP / CLS pooling.

Params: ``embedding`` (patch conv; after ``stem_conv_{i}`` for the conv stem, or
after the ResNet stem's ``conv_root``, ``gn_root``, ``block{s}/...`` for stem "resnet"),
``pos_embedding`` (learned posemb only), ``cls`` (pool "tok" only), ``pre_norm``
(CLIP-style LayerNorm before the encoder, off by default),
``Transformer/encoderblock_{i}/...`` (``Transformer/encoderblock/...`` stacked
[depth, ...] with ``scan``), ``Transformer/encoder_norm``,
``MAPHead_0/...`` (pool "map"), ``head`` (optional projection).
See ``layers`` for the logical axis names.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import layers, resnet, scan, tome

# Published widths/depths/MLP dims/heads (Zhai et al. 2021, "Scaling Vision
# Transformers", Table 2; So400m from Alabdulmohsin et al. 2023, "Getting ViT in
# Shape"; the "-opt" shapes as used by big_vision).
_VARIANTS = {
    #          width  depth  mlp_dim  heads
    "mu":     (32,    1,     128,     2),
    "Ti":     (192,   12,    768,     3),
    "S":      (384,   12,    1536,    6),
    "M":      (512,   12,    2048,    8),
    "B":      (768,   12,    3072,    12),
    "L":      (1024,  24,    4096,    16),
    "So400m": (1152,  27,    4304,    16),
    "H":      (1280,  32,    5120,    16),
    "g":      (1408,  40,    6144,    16),
    "g-opt":  (1536,  40,    6144,    16),
    "G":      (1664,  48,    8192,    16),
    "G-opt":  (1536,  48,    8192,    16),
    "e":      (1792,  56,    15360,   16),
}

POOL_TYPES = ("map", "gap", "tok", "none")
POSEMB_TYPES = ("learn", "sincos2d")
STEM_TYPES = ("patch", "conv", "resnet")


def decode_variant(variant: str | None) -> dict[str, int]:
    """"B/16" -> {width, depth, mlp_dim, num_heads, patch_size}; "B" -> the same without patch_size.

    Known sizes: mu, Ti, S, M, B, L, So400m, H, g, g-opt, G, G-opt, e; any
    integer patch size. None -> {}. Unknown names raise ValueError naming them.
    """
    if variant is None:
        return {}
    name, _, patch = str(variant).partition("/")
    if name not in _VARIANTS:
        raise ValueError(f"Unknown model variant {variant!r}: size {name!r} is not one of "
                         f"{sorted(_VARIANTS)}")
    width, depth, mlp_dim, heads = _VARIANTS[name]
    out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
    if patch:
        if not patch.isdigit() or int(patch) <= 0:
            raise ValueError(f"Unknown model variant {variant!r}: patch size {patch!r} "
                             "is not a positive integer")
        out["patch_size"] = int(patch)
    return out


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


class ViT(nn.Module):
    """ViT image encoder.

    __call__(image [B, H, W, C] float, train=False) -> (x, out):
      x: [B, head] with a head, else [B, width] (pool map/gap/tok) or
         [B, N, width] (pool "none");
      out: "stem" [B, h, w, width] patch grid, "with_posemb" [B, N, width],
         "encoded" [B, N, width] (final-normed patch tokens, CLS dropped),
         "tokens" [B, N(+1), width] (final-normed tokens, CLS first when pool "tok"),
         "encoder/block{i:02d}" [B, N(+1), width], "pre_logits", "logits" (with head).
    The token grid is (H, W) / total_stride and must divide exactly.
    stem "resnet" (hybrid ViT, e.g. R50+B/16: stem_depths (3, 4, 9), patch_size 1)
    runs BiT-v1 ResNet stages (``resnet.hybrid_stem``, stride 4 * 2**(len - 1))
    before the patch embedding, which then works on the ResNet's feature map.
    Learned posembs are stored for ``image_size`` and resized bilinearly for other
    input sizes; sincos2d posembs are computed for the input grid.
    ``attention_fn`` is passed to every attention layer (see layers.attention).

    ``tome_r`` > 0 (an int, or one int per block) turns on Token Merging
    (``models/tome.py``): each block merges up to r tokens after its attention,
    attention is proportional to token size, GAP is a size-weighted mean and the
    MAP probe gets the log-size bias; the CLS token (pool "tok") is never merged.
    Then "tokens", "encoded" and "encoder/block{i:02d}" have fewer tokens and
    out["token_sizes"] [B, N'(+1)] float32 gives how many patches (or the CLS)
    each of out["tokens"] stands for. Same parameters as tome_r=0; attention
    weights are not sown (explain.py needs tome_r=0). tome_r=0 is the plain ViT.

    ``scan`` runs the encoder blocks as one ``nn.scan`` (params
    ``Transformer/encoderblock/...`` stacked [depth, ...]; see ``models/scan.py``),
    ``remat_policy`` picks what each block keeps for the backward pass; both as
    ``layers.Encoder``. scan does not combine with ``tome_r`` (ValueError).
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int | Sequence[int] = 16
    image_size: int | Sequence[int] = 224
    pool_type: str = "map"
    posemb: str = "learn"
    stem: str = "patch"
    stem_features: Sequence[int] = (64, 128, 256)
    stem_strides: Sequence[int] = (2, 2, 2)
    stem_depths: Sequence[int] = (3, 4, 9)
    head: int | None = None
    head_bias: bool = True
    patch_bias: bool = True
    pre_norm: bool = False
    dropout: float = 0.0
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    remat: bool = False
    attention_fn: Callable | None = None
    dtype: Any = jnp.float32
    tome_r: int | Sequence[int] = 0
    scan: bool = False
    remat_policy: str = ""

    def _check(self):
        for field, value, allowed in (("pool_type", self.pool_type, POOL_TYPES),
                                      ("posemb", self.posemb, POSEMB_TYPES),
                                      ("stem", self.stem, STEM_TYPES)):
            if value not in allowed:
                raise ValueError(f"ViT {field}={value!r} is not one of {allowed}")
        if self.stem == "conv" and len(self.stem_features) != len(self.stem_strides):
            raise ValueError(f"ViT stem_features {tuple(self.stem_features)} and stem_strides "
                             f"{tuple(self.stem_strides)} must have the same length")

    @property
    def total_stride(self) -> tuple[int, int]:
        """Input pixels per token along (H, W): patch size times the conv / ResNet stem stride."""
        ph, pw = _pair(self.patch_size)
        s = int(np.prod(self.stem_strides)) if self.stem == "conv" else 1
        if self.stem == "resnet":
            s = resnet.hybrid_stem_stride(self.stem_depths)
        return ph * s, pw * s

    @property
    def grid_size(self) -> tuple[int, int]:
        """Token grid (h, w) at the configured ``image_size``."""
        (ih, iw), (sh, sw) = _pair(self.image_size), self.total_stride
        if ih % sh or iw % sw or ih < sh or iw < sw:
            raise ValueError(f"ViT image_size {(ih, iw)} is not a positive multiple of the "
                             f"total stride {(sh, sw)} (patch_size x prod(stem_strides))")
        return ih // sh, iw // sw

    @nn.compact
    def __call__(self, image, train: bool = False):
        self._check()
        if image.ndim != 4:
            raise ValueError(f"ViT expects images [B, H, W, C], got shape {image.shape}")
        sh, sw = self.total_stride
        if image.shape[1] % sh or image.shape[2] % sw:
            raise ValueError(f"image size {image.shape[1:3]} is not a multiple of the ViT "
                             f"total stride {(sh, sw)}")
        out = {}
        x = jnp.asarray(image).astype(self.dtype)
        act = layers.get_activation(self.act)
        conv_init = nn.initializers.lecun_normal()
        if self.stem == "conv":
            for i, (f, s) in enumerate(zip(self.stem_features, self.stem_strides)):
                x = nn.Conv(f, (3, 3), strides=(s, s), padding="SAME", dtype=self.dtype,
                            kernel_init=layers.named_init(conv_init, (None, None, "conv_in", "conv_out")),
                            bias_init=layers.named_init(nn.initializers.zeros, ("conv_out",)),
                            name=f"stem_conv_{i}")(x)
                x = act(x)
        elif self.stem == "resnet":
            x = resnet.hybrid_stem(x, self.stem_depths, dtype=self.dtype)
        p = _pair(self.patch_size)
        x = nn.Conv(self.width, p, strides=p, padding="VALID", use_bias=self.patch_bias,
                    dtype=self.dtype,
                    kernel_init=layers.named_init(conv_init, (None, None, "conv_in", "embed")),
                    bias_init=layers.named_init(nn.initializers.zeros, ("embed",)),
                    name="embedding")(x)
        b, h, w, c = x.shape
        out["stem"] = x
        x = jnp.reshape(x, (b, h * w, c))

        if self.posemb == "learn":
            gh, gw = self.grid_size
            pe = layers.learned_posemb(self, "pos_embedding", (1, gh * gw, c))
            pe = layers.resize_posemb(pe, (gh, gw), (h, w))
        else:
            pe = layers.posemb_sincos_2d(h, w, c)
        x = x + pe.astype(self.dtype)
        out["with_posemb"] = x

        if self.pool_type == "tok":
            cls = self.param("cls", layers.named_init(nn.initializers.zeros, (None, None, "embed")),
                             (1, 1, c), jnp.float32)
            x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (b, 1, 1)), x], axis=1)
        if self.pre_norm:
            x = layers.layer_norm("pre_norm", self.ln_eps, self.dtype)(x)
        x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)

        schedule = tome.parse_r(self.tome_r, self.depth)
        sizes = None
        if not schedule:
            x, enc_out = layers.Encoder(
                depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                dropout=self.dropout, act=self.act, ln_eps=self.ln_eps,
                attention_fn=self.attention_fn, remat=self.remat, dtype=self.dtype,
                remat_policy=self.remat_policy, scan=self.scan, name="Transformer")(x, None, train)
        else:
            if self.scan:
                raise ValueError("ViT scan=True cannot run Token Merging (tome_r > 0): each "
                                 "block changes the token count; use scan=False with ToMe")
            policy = scan.remat_policy(self.remat, self.remat_policy)
            if policy not in ("none", "full"):
                raise ValueError(f"ViT with tome_r > 0 rematerialises fully or not at all; "
                                 f"remat_policy={policy!r} needs tome_r=0")
            if self.is_mutable_collection("intermediates"):
                raise ValueError("ViT with tome_r > 0 does not sow attention weights (token "
                                 "counts change per block); use tome_r=0 for attention maps")
            x, enc_out, sizes = tome.ToMeEncoder(
                depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                r=schedule, protect_first=self.pool_type == "tok", dropout=self.dropout,
                act=self.act, ln_eps=self.ln_eps, attention_fn=self.attention_fn,
                remat=policy == "full", dtype=self.dtype, name="Transformer")(x, None, train)
            out["token_sizes"] = sizes
        out.update({f"encoder/{k}": v for k, v in enc_out.items()})
        out["tokens"] = encoded = x

        if self.pool_type == "map" and sizes is not None:
            x = tome.ToMeMAPHead(mlp_dim=self.mlp_dim, num_heads=self.num_heads, act=self.act,
                                 ln_eps=self.ln_eps, attention_fn=self.attention_fn,
                                 dtype=self.dtype, name="MAPHead_0")(x, sizes)
        elif self.pool_type == "map":
            x = layers.MAPHead(mlp_dim=self.mlp_dim, num_heads=self.num_heads, act=self.act,
                               ln_eps=self.ln_eps, attention_fn=self.attention_fn,
                               dtype=self.dtype, name="MAPHead_0")(x)
        elif self.pool_type == "gap" and sizes is not None:
            x = tome.weighted_mean(x, sizes)
        elif self.pool_type == "gap":
            x = jnp.mean(x, axis=1)
        elif self.pool_type == "tok":
            x, encoded = x[:, 0], x[:, 1:]
        out["encoded"] = encoded
        out["pre_logits"] = x

        if self.head is not None:
            x = nn.Dense(self.head, use_bias=self.head_bias, dtype=self.dtype,
                         kernel_init=layers.named_init(nn.initializers.lecun_normal(), ("embed", "proj")),
                         bias_init=layers.named_init(nn.initializers.zeros, ("proj",)),
                         name="head")(x)
            out["logits"] = x
        return x, out
