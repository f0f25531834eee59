"""Convolutional image encoders: torchvision-layout ResNet and big_vision's BiT ResNet.

Three residual networks live here, all returning big_vision's ``(x, out)``:

``ResNet``      ResNet v1.5 with BatchNorm, laid out as torchvision's resnet18..152 and
                wide_resnet50_2 / 101_2 (the stride sits on the 3x3 conv of a
                bottleneck), so ``interop.torchvision`` maps its weights by renaming.
``BiTResNet``   Big Transfer (Kolesnikov et al. 2020): weight-standardised convolutions
                (``StdConv``) with GroupNorm(32). ``preact=True`` (default) is the
                paper's pre-activation ResNet v2 (big_vision ``bit_paper.py``, the
                public BiT-S/M checkpoints); ``preact=False`` is the post-activation
                v1 of big_vision ``bit.py``.
``hybrid_stem`` the v1 BiT root + stages in front of a ViT (Dosovitskiy et al. 2021,
                "R50+ViT-B/16"): used by ``ViT(stem="resnet")``.

Parameter names (all under the encoder's scope):

    ResNet      conv_root, bn_root, block{s}/unit{u}/{conv1,bn1,conv2,bn2[,conv3,bn3]
                [,conv_proj,bn_proj]}                                (s, u from 1)
                torch: conv1, bn1, layer{s}.{u-1}.{conv1,bn1,...,downsample.0,downsample.1}
    BiT v2      root_block/conv_root, block{s}/unit{u:02d}/{gn1,conv_proj,conv1,gn2,conv2,
                gn3,conv3}, norm-pre-head                   (big_vision bit_paper.py names)
    BiT v1      conv_root, gn_root, block{s}/unit{u}/{conv1,gn1,conv2,gn2,conv3,gn3,
                conv_proj,gn_proj}                  (big_vision bit.py / ViT-hybrid names)

Conv kernels [k, k, Cin, Cout] are named (None, None, "conv_in", "conv_out"), norm
scales and biases ("conv_out",) (see ``layers``). BatchNorm models carry a
"batch_stats" collection: train with ``apply(..., train=True, mutable=["batch_stats"])``.

``out`` holds "stem" (after the root's max-pool), "stage1".."stage4" ([B, h, w, C]
at strides 4, 4, 8, 16, 32 of the input) and "pre_logits" (what ``x`` is). Any
input size of at least 32x32 works, square or not: ResNet and BiT v2 pad explicitly
and follow torch's floor((n + 2p - k) / s) + 1 rule; BiT v1 pads "SAME" (ceil(n / s)).
No BiT checkpoint reader is included: big_vision's files store GroupNorm params as
[1, 1, 1, C] where ours are [C], otherwise the names above match.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.models import layers

Dtype = Any

# Blocks per stage. torchvision's resnet18/34 use basic blocks, 50+ bottlenecks.
RESNET_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                 152: (3, 8, 36, 3)}
# BiT depths (big_vision bit.get_block_desc; 26 is timm's).
BIT_DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3),
              200: (3, 24, 36, 3)}
POOL_TYPES = ("gap", "none")

# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
_KAIMING_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


ROOT_TYPES = ("imagenet", "small")


def decode_resnet_variant(variant: str | int) -> dict:
    """"18" | "34" | "50" | "101" | "152" -> {"stage_depths": (...), "bottleneck": bool}."""
    try:
        depth = int(str(variant))
    except ValueError:
        depth = None
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"Unknown ResNet variant {variant!r}; expected one of "
                         f"{[str(d) for d in RESNET_DEPTHS]}")
    return dict(stage_depths=RESNET_DEPTHS[depth], bottleneck=depth >= 50)


def decode_bit_variant(variant: str) -> dict:
    """"50x1" | "101x3" | ... (depth x width factor) -> {"stage_depths", "width_factor"}.

    Depths: 26, 50, 101, 152, 200; the width factor is a positive integer.
    """
    depth, _, wf = str(variant).partition("x")
    if not (depth.isdigit() and int(depth) in BIT_DEPTHS and wf.isdigit() and int(wf) > 0):
        raise ValueError(f"Unknown BiT variant {variant!r}: expected '<depth>x<width factor>' with "
                         f"depth in {sorted(BIT_DEPTHS)}, e.g. '50x1' or '101x3'")
    return dict(stage_depths=BIT_DEPTHS[int(depth)], width_factor=int(wf))


def _check_pool(pool_type: str, model: str) -> None:
    if pool_type not in POOL_TYPES:
        raise ValueError(f"{model} pool_type={pool_type!r} is not one of {POOL_TYPES}")


def _check_image(image, model: str) -> None:
    if image.ndim != 4:
        raise ValueError(f"{model} expects images [B, H, W, C], got shape {image.shape}")


def _max_pool(x, padding):
    # 3x3/2 max-pool of every ResNet root; flax pads with -inf like torch.
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=layers.conv_padding(padding))


def _pool(x, pool_type: str, out: dict):
    x = jnp.mean(x, axis=(1, 2)) if pool_type == "gap" else x
    out["pre_logits"] = x
    return x, out


# ---------------------------------------------------------------- torchvision ResNet (BatchNorm)

class BasicUnit(nn.Module):
    """torchvision BasicBlock: 3x3(stride) -> BN -> relu -> 3x3 -> BN, + shortcut, relu.

    x [B, H, W, Cin] -> [B, H/stride, W/stride, features]. The shortcut is a
    1x1(stride) conv + BN when the shape changes.
    """

    features: int
    strides: int = 1
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    zero_init_residual: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = dict(train=train, momentum=self.bn_momentum, eps=self.bn_eps, dtype=self.dtype)
        cv = dict(init=_KAIMING_OUT, dtype=self.dtype)
        residual = x
        if self.strides != 1 or x.shape[-1] != self.features:
            residual = layers.conv(self.features, 1, self.strides, padding=0, name="conv_proj",
                                   **cv)(x)
            residual = layers.batch_norm(name="bn_proj", **bn)(residual)
        y = layers.conv(self.features, 3, self.strides, padding=1, name="conv1", **cv)(x)
        y = nn.relu(layers.batch_norm(name="bn1", **bn)(y))
        y = layers.conv(self.features, 3, 1, padding=1, name="conv2", **cv)(y)
        y = layers.batch_norm(name="bn2", zero_init=self.zero_init_residual, **bn)(y)
        return nn.relu(residual + y)


class BottleneckUnit(nn.Module):
    """torchvision Bottleneck (v1.5): 1x1 -> BN -> relu -> 3x3(stride) -> BN -> relu -> 1x1 -> BN.

    x [B, H, W, Cin] -> [B, H/stride, W/stride, 4 * features]; the inner width is
    ``features * width_factor`` (2 for wide_resnet*_2). The shortcut is a
    1x1(stride) conv + BN when the shape changes.
    """

    features: int
    strides: int = 1
    width_factor: int = 1
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    zero_init_residual: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = dict(train=train, momentum=self.bn_momentum, eps=self.bn_eps, dtype=self.dtype)
        cv = dict(init=_KAIMING_OUT, dtype=self.dtype)
        nout, nmid = 4 * self.features, self.features * self.width_factor
        residual = x
        if self.strides != 1 or x.shape[-1] != nout:
            residual = layers.conv(nout, 1, self.strides, padding=0, name="conv_proj", **cv)(x)
            residual = layers.batch_norm(name="bn_proj", **bn)(residual)
        y = layers.conv(nmid, 1, 1, padding=0, name="conv1", **cv)(x)
        y = nn.relu(layers.batch_norm(name="bn1", **bn)(y))
        y = layers.conv(nmid, 3, self.strides, padding=1, name="conv2", **cv)(y)
        y = nn.relu(layers.batch_norm(name="bn2", **bn)(y))
        y = layers.conv(nout, 1, 1, padding=0, name="conv3", **cv)(y)
        y = layers.batch_norm(name="bn3", zero_init=self.zero_init_residual, **bn)(y)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """ResNet v1.5 with BatchNorm (torchvision layout).

    __call__(images [B, H, W, 3] float, train=False) -> (x, out): x [B, C] features
    (pool "gap"; C = 512 for basic blocks, 2048 for bottlenecks at width 64) or the
    final map [B, H/32, W/32, C] (pool "none"); out: "stem", "stage1".."stage4",
    "pre_logits" (module docstring). ``train`` uses batch statistics and updates
    "batch_stats" (pass mutable=["batch_stats"]).

    ``zero_init_residual`` (default True, as big_vision and as torchvision's opt-in
    ``zero_init_residual=True``; torchvision's own default is False) starts the last
    BN scale of every residual branch at 0, so each block starts as the identity.
    """

    stage_depths: Sequence[int] = (3, 4, 6, 3)
    bottleneck: bool = True
    width: int = 64            # channels of the root conv and of stage 1's "planes"
    width_factor: int = 1      # torchvision width_per_group / 64: bottleneck inner width only
    bn_momentum: float = 0.9   # flax convention: 0.9 == torch momentum 0.1
    bn_eps: float = 1e-5
    pool_type: str = "gap"
    zero_init_residual: bool = True
    # "imagenet": 7x7/2 conv + 3x3/2 max-pool (torchvision); "small": one 3x3/1 conv and
    # no pooling, the usual root for 32x32 images (CIFAR ResNets), stride 8 in all.
    root: str = "imagenet"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        _check_pool(self.pool_type, "ResNet")
        if self.root not in ROOT_TYPES:
            raise ValueError(f"ResNet root={self.root!r} is not one of {ROOT_TYPES}")
        _check_image(images, "ResNet")
        if not self.bottleneck and self.width_factor != 1:
            raise ValueError("ResNet width_factor != 1 needs bottleneck blocks (torchvision "
                             "wide ResNets are wide_resnet50_2 / wide_resnet101_2)")
        bn = dict(momentum=self.bn_momentum, eps=self.bn_eps, dtype=self.dtype)
        out = {}
        x = jnp.asarray(images).astype(self.dtype)
        if self.root == "small":
            x = layers.conv(self.width, 3, 1, padding=1, init=_KAIMING_OUT, dtype=self.dtype,
                            name="conv_root")(x)
            x = out["stem"] = nn.relu(layers.batch_norm(train=train, name="bn_root", **bn)(x))
        else:
            x = layers.conv(self.width, 7, 2, padding=3, init=_KAIMING_OUT, dtype=self.dtype,
                            name="conv_root")(x)
            x = nn.relu(layers.batch_norm(train=train, name="bn_root", **bn)(x))
            x = out["stem"] = _max_pool(x, 1)
        for s, depth in enumerate(self.stage_depths):
            x = _Stage(depth, self.width * 2 ** s, 1 if s == 0 else 2, self.bottleneck,
                       self.width_factor, self.bn_momentum, self.bn_eps, self.zero_init_residual,
                       self.dtype, name=f"block{s + 1}")(x, train)
            out[f"stage{s + 1}"] = x
        return _pool(x, self.pool_type, out)


class _Stage(nn.Module):
    """``depth`` units of one resolution ("unit1".."unitN"); the first one strides."""

    depth: int
    features: int
    strides: int
    bottleneck: bool
    width_factor: int
    bn_momentum: float
    bn_eps: float
    zero_init_residual: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(bn_momentum=self.bn_momentum, bn_eps=self.bn_eps,
                  zero_init_residual=self.zero_init_residual, dtype=self.dtype)
        if self.bottleneck:
            kw["width_factor"] = self.width_factor
        unit = BottleneckUnit if self.bottleneck else BasicUnit
        for u in range(self.depth):
            x = unit(self.features, self.strides if u == 0 else 1, name=f"unit{u + 1}",
                     **kw)(x, train)
        return x


# ---------------------------------------------------------------- BiT (GroupNorm + StdConv)

# BiT v2 (bit_paper.py): GN eps 1e-5, kernels standardised with eps 1e-10 under the root.
_V2_GN_EPS, _V2_STD = 1e-5, dict(eps=1e-10, eps_on_std=False)
# BiT v1 / ViT hybrid (bit.py, vision_transformer): flax's GN eps 1e-6, (w - m) / (std + 1e-5).
_V1_GN_EPS, _V1_STD = 1e-6, dict(eps=1e-5, eps_on_std=True)


def _std_conv(features, kernel, strides, padding, name, dtype, v1: bool):
    return layers.conv(features, kernel, strides, padding=padding, init=_KAIMING_OUT,
                       dtype=dtype, name=name, cls=layers.StdConv, **(_V1_STD if v1 else _V2_STD))


class PreActBottleneck(nn.Module):
    """BiT v2 unit: GN -> relu -> [shortcut from here] 1x1 -> GN -> relu -> 3x3(stride)
    -> GN -> relu -> 1x1, + shortcut. No activation after the sum.

    x [B, H, W, Cin] -> [B, H/stride, W/stride, 4 * features]. The shortcut is a
    1x1(stride) StdConv of the pre-activated input when the shape changes.
    """

    features: int
    strides: int = 1
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        nout, d = 4 * self.features, self.dtype
        gn = dict(eps=_V2_GN_EPS, dtype=d)
        residual = x
        x = nn.relu(layers.group_norm(self.groups, name="gn1", **gn)(x))
        if self.strides != 1 or residual.shape[-1] != nout:
            residual = _std_conv(nout, 1, self.strides, 0, "conv_proj", d, v1=False)(x)
        x = _std_conv(self.features, 1, 1, 0, "conv1", d, v1=False)(x)
        x = nn.relu(layers.group_norm(self.groups, name="gn2", **gn)(x))
        x = _std_conv(self.features, 3, self.strides, 1, "conv2", d, v1=False)(x)
        x = nn.relu(layers.group_norm(self.groups, name="gn3", **gn)(x))
        x = _std_conv(nout, 1, 1, 0, "conv3", d, v1=False)(x)
        return x + residual


class GNBottleneck(nn.Module):
    """BiT v1 unit (big_vision bit.py, ViT hybrid): StdConv 1x1 -> GN -> relu -> 3x3(stride)
    -> GN -> relu -> 1x1 -> GN (scale starts at 0), + shortcut, relu.

    x [B, H, W, Cin] -> [B, H/stride, W/stride, 4 * features]; "SAME" padding as
    in those codebases. The shortcut is StdConv 1x1(stride) + GN when the shape changes.
    """

    features: int
    strides: int = 1
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        nout, d = 4 * self.features, self.dtype
        gn = dict(eps=_V1_GN_EPS, dtype=d)
        residual = x
        if self.strides != 1 or x.shape[-1] != nout:
            residual = _std_conv(nout, 1, self.strides, "SAME", "conv_proj", d, v1=True)(x)
            residual = layers.group_norm(self.groups, name="gn_proj", **gn)(residual)
        y = _std_conv(self.features, 1, 1, "SAME", "conv1", d, v1=True)(x)
        y = nn.relu(layers.group_norm(self.groups, name="gn1", **gn)(y))
        y = _std_conv(self.features, 3, self.strides, "SAME", "conv2", d, v1=True)(y)
        y = nn.relu(layers.group_norm(self.groups, name="gn2", **gn)(y))
        y = _std_conv(nout, 1, 1, "SAME", "conv3", d, v1=True)(y)
        y = layers.group_norm(self.groups, name="gn3", zero_init=True, **gn)(y)
        return nn.relu(residual + y)


class _GNStage(nn.Module):
    """``depth`` BiT units; the first strides. Unit names: "unit01".. (v2) or "unit1".. (v1)."""

    depth: int
    features: int
    strides: int
    preact: bool
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for u in range(self.depth):
            s = self.strides if u == 0 else 1
            if self.preact:
                x = PreActBottleneck(self.features, s, self.groups, self.dtype,
                                     name=f"unit{u + 1:02d}")(x)
            else:
                x = GNBottleneck(self.features, s, self.groups, self.dtype,
                                 name=f"unit{u + 1}")(x)
        return x


def _v1_body(x, stage_depths: Sequence[int], width: int, dtype: Dtype, out: dict):
    """BiT v1 root (StdConv 7x7/2 -> GN -> relu -> max-pool 3x3/2) then the stages.

    Creates its modules in the *calling* module's scope (names conv_root, gn_root,
    block{s}), which is where the ViT-hybrid checkpoints keep them.
    """
    x = _std_conv(width, 7, 2, "SAME", "conv_root", dtype, v1=True)(x)
    x = nn.relu(layers.group_norm(32, eps=_V1_GN_EPS, dtype=dtype, name="gn_root")(x))
    x = out["stem"] = _max_pool(x, "SAME")
    for s, depth in enumerate(stage_depths):
        x = _GNStage(depth, width * 2 ** s, 1 if s == 0 else 2, preact=False, dtype=dtype,
                     name=f"block{s + 1}")(x)
        out[f"stage{s + 1}"] = x
    return x


class BiTResNet(nn.Module):
    """Big Transfer ResNet: StdConv + GroupNorm(32) bottlenecks, no BatchNorm.

    __call__(images [B, H, W, 3] float, train=False) -> (x, out): x [B, 2048 *
    width_factor] (pool "gap") or the final map (pool "none"); out: "stem",
    "stage1".."stage4", "pre_logits". ``train`` changes nothing (no dropout or BN).

    preact=True: ResNet v2 of the BiT paper (root conv 7x7/2 + max-pool without a
    norm, pre-activation units, a final GN + relu "norm-pre-head" before pooling).
    preact=False: big_vision's ``bit.py`` ResNet v1 (GN in the root, post-activation
    units whose last GN scale starts at 0, no pre-head norm).
    """

    stage_depths: Sequence[int] = (3, 4, 6, 3)
    width_factor: int = 1
    preact: bool = True
    pool_type: str = "gap"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        del train  # GroupNorm behaves the same in training and evaluation
        _check_pool(self.pool_type, "BiTResNet")
        _check_image(images, "BiTResNet")
        width = 64 * self.width_factor
        out = {}
        x = jnp.asarray(images).astype(self.dtype)
        if not self.preact:
            x = _v1_body(x, self.stage_depths, width, self.dtype, out)
            return _pool(x, self.pool_type, out)
        x = _BiTRoot(width, self.dtype, name="root_block")(x)
        out["stem"] = x
        for s, depth in enumerate(self.stage_depths):
            x = _GNStage(depth, width * 2 ** s, 1 if s == 0 else 2, preact=True, dtype=self.dtype,
                         name=f"block{s + 1}")(x)
            out[f"stage{s + 1}"] = x
        # Pre-activation units end on a sum: the stack needs one last norm + relu.
        x = nn.relu(layers.group_norm(32, eps=_V2_GN_EPS, dtype=self.dtype, name="norm-pre-head")(x))
        return _pool(x, self.pool_type, out)


class _BiTRoot(nn.Module):
    """BiT v2 root: StdConv 7x7/2 (pad 3) -> max-pool 3x3/2 (pad 1); no norm (the units pre-activate).

    The pool pads with -inf as big_vision's bit_paper.py does (the original TF BiT and
    timm pad with zeros, which differs at borders where all window values are negative).
    """

    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _std_conv(self.width, 7, 2, 3, "conv_root", self.dtype, v1=False)(x)
        return _max_pool(x, 1)


# ---------------------------------------------------------------- ViT hybrid stem

def hybrid_stem_stride(stage_depths: Sequence[int]) -> int:
    """Input pixels per output pixel of ``hybrid_stem``: 4 for the root, x2 per stage after the first."""
    return 4 * 2 ** max(len(stage_depths) - 1, 0)


def hybrid_stem(x, stage_depths: Sequence[int] = (3, 4, 9), *, width: int = 64,
                dtype: Dtype = jnp.float32):
    """The ResNet front of a hybrid ViT: [B, H, W, C] -> [B, H/s, W/s, 4 * width * 2**(n-1)].

    s = ``hybrid_stem_stride(stage_depths)`` (16 for the R50 stem (3, 4, 9), whose
    output has 1024 channels; with no stages only the root runs: stride 4, ``width``
    channels). BiT v1 layout (StdConv, GroupNorm(32)) as in the ViT paper's
    "R50+ViT-B/16". Call it inside a compact method: it creates conv_root, gn_root
    and block{s} in the caller's scope, the names of the published hybrid checkpoints.
    """
    return _v1_body(x, stage_depths, width, dtype, {})


# ---------------------------------------------------------------- config

def _get(img: Mapping, key: str, default):
    v = img.get(key, default) if hasattr(img, "get") else default
    return default if v is None else v


def from_config(img: Mapping, *, dtype: Dtype = jnp.float32) -> nn.Module:
    """A ResNet or BiTResNet from the plain dict (or ConfigDict) of ``model.image`` fields.

    Reads, with defaults:
      "type"               "resnet" (torchvision-layout, BatchNorm) | "bit"
      "variant"            "50" (resnet: 18/34/50/101/152) | "50x1" (bit: depth x width)
      "stage_depths"       None -> from the variant; a tuple overrides it
      "pool_type"          "gap" | "none"
    resnet only:
      "base_width"         64 (root and stage-1 channels)
      "width_factor"       1 (bottleneck inner width; 2 = wide_resnet*_2)
      "bn_momentum"        0.9 (flax convention, == torch 0.1)
      "bn_eps"             1e-5
      "zero_init_residual" True
      "root"               "imagenet" (7x7/2 + max-pool) | "small" (3x3/1, for 32x32 images)
    bit only (the width factor comes from the variant: "101x3" -> 3):
      "preact"             True (ResNet v2 as in the BiT paper) | False (big_vision bit.py v1)
    Other keys (ViT fields sharing the section) are ignored.
    """
    kind = _get(img, "type", "resnet")
    pool = _get(img, "pool_type", "gap")
    if kind == "resnet":
        v = decode_resnet_variant(_get(img, "variant", "50"))
        return ResNet(stage_depths=tuple(_get(img, "stage_depths", v["stage_depths"])),
                      bottleneck=v["bottleneck"], width=int(_get(img, "base_width", 64)),
                      width_factor=int(_get(img, "width_factor", 1)),
                      bn_momentum=float(_get(img, "bn_momentum", 0.9)),
                      bn_eps=float(_get(img, "bn_eps", 1e-5)), pool_type=pool,
                      zero_init_residual=bool(_get(img, "zero_init_residual", True)),
                      root=_get(img, "root", "imagenet"), dtype=dtype)
    if kind == "bit":
        v = decode_bit_variant(_get(img, "variant", "50x1"))
        return BiTResNet(stage_depths=tuple(_get(img, "stage_depths", v["stage_depths"])),
                         width_factor=v["width_factor"],
                         preact=bool(_get(img, "preact", True)), pool_type=pool, dtype=dtype)
    raise ValueError(f"model.image.type={kind!r}: resnet.from_config builds 'resnet' or 'bit'")
