"""CLIP's ModifiedResNet image tower (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision", section 2.4), as OpenAI and open_clip build it.

How it differs from a torchvision ResNet:

  * stem: three 3x3 convolutions (width/2 stride 2, width/2, width), each followed by
    BatchNorm and ReLU, then a 2x2 average pool instead of the max pool;
  * anti-aliased downsampling: a strided bottleneck keeps all its convolutions at
    stride 1 and average-pools (kernel = stride) after the 3x3 conv; its shortcut is
    AvgPool(stride) -> 1x1 conv -> BN;
  * attention pooling: the mean of the final feature map is prepended as an extra
    token, a learned position embedding is added, and one multi-head attention layer
    (heads = 32 * width / 64) produces the output at that mean token, projected to
    ``out_dim``.

Params (under the tower's scope; conv kernels [k, k, in, out] with axis names
(None, None, "conv_in", "conv_out"), BatchNorm scale/bias [C] named ("conv_out",), as
for the other CNN towers, see ``layers``):

    stem_conv_{0,1,2}/kernel, stem_bn_{0,1,2}/{scale,bias}
    stage{s}_block{j}/{conv1,conv2,conv3}/kernel, .../{bn1,bn2,bn3}/{scale,bias}
    stage{s}_block0/{downsample_conv/kernel, downsample_bn/{scale,bias}}  (first block of a stage)
    attnpool/pos_embedding [1, 1 + gh*gw, C]         (None, None, "embed"); C = 32 * width
    attnpool/{query,key,value}/kernel [C, H, C/H]    ("embed", "heads", "kv"), bias [H, C/H]
    attnpool/out/kernel [H, C/H, out_dim]            ("heads", "kv", "proj"), bias [out_dim]

BatchNorm running statistics live in the ``batch_stats`` collection under the same
module paths ({mean, var}). Inference (``train=False``) reads them; training
(``train=True``) normalises with batch statistics and needs
``mutable=["batch_stats"]``. flax updates ``stat = momentum * stat + (1 - momentum) *
batch_value`` (momentum 0.9 here equals torch's momentum 0.1) and, unlike torch,
stores the biased batch variance.

Input sizes: the learned pooling posemb is stored for the configured ``image_size``
(grid image_size / 32). Other sizes (non-square included) work: the grid part of the
posemb is resized bilinearly to the feature grid and the mean-token row is kept.
open_clip itself only accepts the configured size, so only that size is a parity
claim.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import layers

# open_clip's model_configs/RN*.json: (blocks per stage, stem width, embed_dim, image_size).
VARIANTS: dict[str, tuple[tuple[int, int, int, int], int, int, int]] = {
    "RN50": ((3, 4, 6, 3), 64, 1024, 224),
    "RN101": ((3, 4, 23, 3), 64, 512, 224),
    "RN50x4": ((4, 6, 10, 6), 80, 640, 288),
    "RN50x16": ((6, 8, 18, 8), 96, 768, 384),
    "RN50x64": ((3, 15, 36, 10), 128, 1024, 448),
}
EXPANSION = 4  # bottleneck output channels = 4 * planes
TOTAL_STRIDE = 32  # stem 2 * avgpool 2 * stages 2 * 2 * 2
_HEAD_WIDTH = 64  # channels per attention-pool head in every CLIP ResNet


def decode_variant(variant: str) -> dict:
    """"RN50" -> {layers, width, embed_dim, image_size} (open_clip's RN model configs).

    Known: RN50, RN101, RN50x4, RN50x16, RN50x64. Unknown names raise ValueError.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown CLIP ResNet variant {variant!r}; known: {sorted(VARIANTS)}")
    blocks, width, embed_dim, image_size = VARIANTS[variant]
    return dict(layers=blocks, width=width, embed_dim=embed_dim, image_size=image_size)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1) -> nn.Conv:
    # Explicit torch-style padding (k // 2 on every side): flax "SAME" pads (0, 1) at stride 2.
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    return layers.conv(features, kernel, stride, padding=kernel // 2, init=init, dtype=dtype,
                       name=name)


def _batch_norm(train: bool, momentum: float, eps: float, dtype, name: str,
                zero_scale: bool = False) -> nn.BatchNorm:
    return layers.batch_norm(train=train, momentum=momentum, eps=eps, zero_init=zero_scale,
                             dtype=dtype, name=name)


def _avg_pool(x: jax.Array, k: int) -> jax.Array:
    # torch AvgPool2d(k): kernel = stride = k, no padding, odd edges dropped (floor).
    return nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID") if k > 1 else x


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> [avgpool(stride)] -> 1x1 (x4 channels) plus a shortcut, then ReLU.

    x [B, H, W, C] -> [B, H/stride, W/stride, 4 * planes] (floor division).

    The shortcut is AvgPool(stride) -> 1x1 conv -> BN when the stride or the channel
    count changes, else the identity. ``bn3`` scales start at zero, so each residual
    branch starts switched off (open_clip initialises it so).
    """

    planes: int
    stride: int = 1
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def bn(name, **kw):
            return _batch_norm(train, self.bn_momentum, self.bn_eps, self.dtype, name, **kw)

        out_ch = self.planes * EXPANSION
        y = nn.relu(bn("bn1")(_conv(self.planes, 1, self.dtype, "conv1")(x)))
        y = nn.relu(bn("bn2")(_conv(self.planes, 3, self.dtype, "conv2")(y)))
        y = _avg_pool(y, self.stride)
        y = bn("bn3", zero_scale=True)(_conv(out_ch, 1, self.dtype, "conv3")(y))
        if self.stride > 1 or x.shape[-1] != out_ch:
            x = _avg_pool(x, self.stride)
            x = bn("downsample_bn")(_conv(out_ch, 1, self.dtype, "downsample_conv")(x))
        return nn.relu(x + y)


class AttentionPool(nn.Module):
    """CLIP's QKV attention pooling: x [B, h, w, C] -> (y [B, out_dim], pooled [B, C]).

    Tokens are [mean over the grid, grid row-major] plus ``pos_embedding``; the mean
    token alone queries all tokens (its output is the only one CLIP uses), and
    ``pooled`` is that attention output before the ``out`` projection.
    ``grid`` is the (gh, gw) the posemb is stored for; other feature grids get a
    bilinearly resized grid posemb.
    """

    num_heads: int
    out_dim: int
    grid: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, h, w, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"attention pool width {c} is not divisible by {self.num_heads} heads")
        gh, gw = self.grid
        tokens = x.reshape(b, h * w, c)
        tokens = jnp.concatenate([jnp.mean(tokens, axis=1, keepdims=True), tokens], axis=1)
        pe = layers.learned_posemb(self, "pos_embedding", (1, 1 + gh * gw, c))
        pe = jnp.concatenate([pe[:, :1], layers.resize_posemb(pe[:, 1:], (gh, gw), (h, w))], axis=1)
        tokens = tokens + pe.astype(self.dtype)

        dh = c // self.num_heads
        std = c ** -0.5  # open_clip's init for these projections

        def proj(name):
            return nn.DenseGeneral(
                (self.num_heads, dh), dtype=self.dtype, name=name,
                kernel_init=layers.named_init(nn.initializers.normal(std), ("embed", "heads", "kv")),
                bias_init=layers.named_init(nn.initializers.zeros, ("heads", "kv")))

        q = proj("query")(tokens[:, :1])
        k, v = proj("key")(tokens), proj("value")(tokens)
        y = layers.dot_product_attention_f32(q, k, v, dtype=self.dtype)  # [B, 1, H, Dh]
        pooled = y[:, 0].reshape(b, c)
        y = nn.DenseGeneral(
            self.out_dim, axis=(-2, -1), dtype=self.dtype, name="out",
            kernel_init=layers.named_init(nn.initializers.normal(std), ("heads", "kv", "proj")),
            bias_init=layers.named_init(nn.initializers.zeros, ("proj",)))(y[:, 0])
        return y, pooled


class ClipModifiedResNet(nn.Module):
    """CLIP ModifiedResNet image tower.

    __call__(images float [B, H, W, 3], train=False) -> (x [B, out_dim], out):
      out["stem"]       [B, H/4, W/4, width]        after the stem's average pool
      out["stage1"]     [B, H/4, W/4, 4*width]
      out["stage2"]     [B, H/8, W/8, 8*width]
      out["stage3"]     [B, H/16, W/16, 16*width]
      out["stage4"]     [B, H/32, W/32, 32*width]   what the attention pool reads
      out["pre_logits"] [B, 32*width]               attention output before the projection
    Sizes use floor division at every pooling step, as torch does. ``num_heads`` None
    means 32 * width / 64. ``image_size`` sets the stored posemb grid (image_size / 32).
    """

    layers: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    out_dim: int = 1024
    num_heads: int | None = None
    image_size: int | Sequence[int] = 224
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    dtype: Any = jnp.float32

    @property
    def grid_size(self) -> tuple[int, int]:
        """Feature grid (gh, gw) at ``image_size``: the grid the pooling posemb is stored for."""
        ih, iw = _pair(self.image_size)
        if ih < TOTAL_STRIDE or iw < TOTAL_STRIDE:
            raise ValueError(f"CLIP ResNet image_size {(ih, iw)} must be at least {TOTAL_STRIDE}")
        return ih // TOTAL_STRIDE, iw // TOTAL_STRIDE

    @property
    def heads(self) -> int:
        """Attention-pool heads: ``num_heads`` or 32 * width / 64."""
        return int(self.num_heads) if self.num_heads else self.width * 32 // _HEAD_WIDTH

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False):
        if images.ndim != 4:
            raise ValueError(f"ClipModifiedResNet expects images [B, H, W, C], got {images.shape}")
        if len(self.layers) != 4:
            raise ValueError(f"ClipModifiedResNet layers must give 4 stages, got "
                             f"{tuple(self.layers)}")
        if images.shape[1] < TOTAL_STRIDE or images.shape[2] < TOTAL_STRIDE:
            raise ValueError(f"image size {images.shape[1:3]} is smaller than the ResNet's total "
                             f"stride {TOTAL_STRIDE}")
        out = {}
        x = jnp.asarray(images).astype(self.dtype)
        half = self.width // 2
        for i, (f, s) in enumerate(((half, 2), (half, 1), (self.width, 1))):
            x = _conv(f, 3, self.dtype, f"stem_conv_{i}", stride=s)(x)
            x = nn.relu(_batch_norm(train, self.bn_momentum, self.bn_eps, self.dtype,
                                    f"stem_bn_{i}")(x))
        x = _avg_pool(x, 2)
        out["stem"] = x
        for s, blocks in enumerate(self.layers, start=1):
            planes = self.width * 2 ** (s - 1)
            for j in range(int(blocks)):
                stride = 2 if (s > 1 and j == 0) else 1
                x = Bottleneck(planes, stride, self.bn_momentum, self.bn_eps, self.dtype,
                               name=f"stage{s}_block{j}")(x, train)
            out[f"stage{s}"] = x
        x, pooled = AttentionPool(self.heads, self.out_dim, self.grid_size, self.dtype,
                                  name="attnpool")(x)
        out["pre_logits"] = pooled
        return layers.constrain(x, ("batch", "embed")), out


def from_config(img: Mapping[str, Any], *, out_dim: int | None,
                dtype=jnp.float32) -> ClipModifiedResNet:
    """A ClipModifiedResNet from a plain dict of ``model.image`` fields (others are ignored).

    Keys read (absent or None -> from ``variant``):
      "variant"      "RN50" | "RN101" | "RN50x4" | "RN50x16" | "RN50x64" (``VARIANTS``), or
                     None when "layers" and "width" are both given
      "layers"       4 ints: bottleneck blocks per stage
      "width"        stem width (64 for RN50); the final feature width is 32 * width
      "num_heads"    attention-pool heads; None -> 32 * width / 64
      "image_size"   int or (h, w): size the pooling posemb is stored for; None -> variant's
      "bn_momentum"  flax BatchNorm momentum, default 0.9 (= torch's 0.1)
      "bn_eps"       BatchNorm epsilon, default 1e-5 (torch's)
    ``out_dim``: output width of the attention pool's projection (the shared embedding
    D); None -> the variant's embed_dim. ``dtype``: compute dtype (params stay float32).
    Raises ValueError naming the field at fault.
    """
    variant = img.get("variant")
    dec: dict = {}
    if variant is not None:
        try:
            dec = decode_variant(variant)
        except ValueError as e:
            raise ValueError(f"model.image.variant: {e}") from None
    kw = {}
    for key in ("layers", "width", "image_size"):
        v = img.get(key)
        v = dec.get(key) if v is None else v
        if v is None:
            raise ValueError(f"model.image.{key} is not set and model.image.variant={variant!r} "
                             "gives none (clip_resnet)")
        kw[key] = v
    kw["layers"] = tuple(int(n) for n in kw["layers"])
    size = kw["image_size"]
    kw["image_size"] = int(size) if np.isscalar(size) else tuple(int(n) for n in size)
    if len(kw["layers"]) != 4 or min(kw["layers"]) < 1:
        raise ValueError(f"model.image.layers={kw['layers']!r} must be 4 positive block counts")
    kw["width"] = int(kw["width"])
    if kw["width"] < 2 or kw["width"] % 2:
        raise ValueError(f"model.image.width={kw['width']} must be a positive even stem width")
    if out_dim is None:
        out_dim = dec.get("embed_dim")
        if out_dim is None:
            raise ValueError("clip_resnet needs out_dim (model.out_dim) without a variant")
    heads = img.get("num_heads")
    if heads is not None and (32 * kw["width"]) % int(heads):
        raise ValueError(f"model.image.num_heads={heads} does not divide the pooled width "
                         f"{32 * kw['width']}")
    return ClipModifiedResNet(
        layers=kw["layers"], width=kw["width"], out_dim=int(out_dim),
        num_heads=None if heads is None else int(heads), image_size=kw["image_size"],
        bn_momentum=_float_or(img.get("bn_momentum"), 0.9),
        bn_eps=_float_or(img.get("bn_eps"), 1e-5), dtype=dtype)


def _float_or(v, default: float) -> float:
    return default if v is None else float(v)
