"""ConvNeXt image encoder (Liu et al. 2022, "A ConvNet for the 2020s"), torchvision layout.

    stem   conv 4x4/4 (bias) -> LayerNorm                        [B, H/4, W/4, C1]
    stage  s = 1..4: (s > 1: LayerNorm -> conv 2x2/2, the downsampling) then blocks
    block  x + drop_path(gamma * Linear(GELU(Linear4x(LN(dwconv7x7(x))))))
    head   global average pool -> LayerNorm                      [B, C4]

All LayerNorms normalise channels with eps 1e-6; GELU is the exact erf form;
``gamma`` ("layer_scale", per channel) starts at ``layer_scale_init`` (1e-6).
Stochastic depth drops whole residual branches per example with a rate rising
linearly from 0 at the first block to ``drop_path`` at the last (torchvision's
schedule); it is active only with train=True and needs a "dropout" rng then.

Parameters (torchvision ``features.*`` key in brackets; F = features):

    stem_conv, stem_norm                         [F.0.0, F.0.1]
    stage{s}/downsample_norm, downsample_conv    [F.{2s-2}.0, F.{2s-2}.1]  (s >= 2)
    stage{s}/block{b}/conv_dw                    [F.{2s-1}.{b-1}.block.0]  depthwise 7x7
    stage{s}/block{b}/norm, mlp_fc1, mlp_fc2     [... .block.2, .block.3, .block.5]
    stage{s}/block{b}/layer_scale [C]            [F.{2s-1}.{b-1}.layer_scale] (C, 1, 1)
    norm_pre_head                                [classifier.0]

Logical axis names: see ``layers`` (conv kernels (None, None, "conv_in", "conv_out"),
depthwise kernels (None, None, None, "conv_out"), MLP ("conv_in", "mlp") /
("mlp", "conv_out"), norms, biases and layer_scale ("conv_out",)).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.models import layers

Dtype = Any

# (blocks per stage, channels per stage), torchvision's convnext_{tiny,small,base,large}.
VARIANTS = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
# torchvision's default stochastic_depth_prob per size (its ImageNet recipes).
TORCHVISION_DROP_PATH = {"tiny": 0.1, "small": 0.4, "base": 0.5, "large": 0.5}
POOL_TYPES = ("gap", "none")

# torchvision / the paper: trunc_normal(std=0.02) for every conv and linear weight.
_INIT = nn.initializers.truncated_normal(stddev=0.02)


def decode_variant(variant: str) -> dict:
    """"tiny" | "small" | "base" | "large" -> {"stage_depths": (...), "widths": (...)}."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown ConvNeXt variant {variant!r}; expected one of {list(VARIANTS)}")
    depths, widths = VARIANTS[variant]
    return dict(stage_depths=depths, widths=widths)


class ConvNeXtBlock(nn.Module):
    """One ConvNeXt block, [B, H, W, C] -> [B, H, W, C] (module docstring)."""

    drop_path: float = 0.0
    layer_scale_init: float = 1e-6
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        y = layers.conv(c, 7, 1, padding=3, groups=c, use_bias=True, init=_INIT, dtype=self.dtype,
                        name="conv_dw")(x)
        y = layers.channel_layer_norm(eps=self.ln_eps, dtype=self.dtype, name="norm")(y)
        y = nn.Dense(4 * c, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=layers.named_init(_INIT, ("conv_in", "mlp")),
                     bias_init=layers.named_init(nn.initializers.zeros, ("mlp",)),
                     name="mlp_fc1")(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=layers.named_init(_INIT, ("mlp", "conv_out")),
                     bias_init=layers.named_init(nn.initializers.zeros, ("conv_out",)),
                     name="mlp_fc2")(y)
        gamma = self.param("layer_scale",
                           layers.named_init(nn.initializers.constant(self.layer_scale_init),
                                             ("conv_out",)), (c,), jnp.float32)
        y = y * gamma.astype(y.dtype)
        # Stochastic depth: one keep/drop draw per example (mask broadcast over H, W, C),
        # kept branches scaled by 1 / (1 - rate) as torchvision's StochasticDepth("row").
        y = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3))(y, deterministic=not train)
        return x + y


class _Stage(nn.Module):
    """Optional downsampling (LN + conv 2x2/2) then ``len(drop_paths)`` blocks."""

    features: int
    drop_paths: Sequence[float]
    downsample: bool
    layer_scale_init: float
    ln_eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.downsample:
            x = layers.channel_layer_norm(eps=self.ln_eps, dtype=self.dtype,
                                          name="downsample_norm")(x)
            x = layers.conv(self.features, 2, 2, padding=0, use_bias=True, init=_INIT,
                            dtype=self.dtype, name="downsample_conv")(x)
        for b, rate in enumerate(self.drop_paths):
            x = ConvNeXtBlock(rate, self.layer_scale_init, self.ln_eps, self.dtype,
                              name=f"block{b + 1}")(x, train)
        return x


class ConvNeXt(nn.Module):
    """ConvNeXt encoder.

    __call__(images [B, H, W, 3] float, train=False) -> (x, out): x [B, widths[-1]]
    (pool "gap": mean over positions, then the final LayerNorm) or [B, H/32, W/32,
    widths[-1]] (pool "none": the final LayerNorm applied per position, so both pool
    types share one parameter tree); out: "stem" [B, H/4, W/4, C1], "stage{s}"
    [B, H/2^(s+1), W/2^(s+1), Cs] (s = 1..4), "pre_logits" (= x). Any input of at
    least 32x32 pixels; sizes not divisible by 32 are floored as in torch.
    ``drop_path``: stochastic-depth rate of the last block (0 at the first).
    """

    stage_depths: Sequence[int] = (3, 3, 9, 3)
    widths: Sequence[int] = (96, 192, 384, 768)
    drop_path: float = 0.0
    layer_scale_init: float = 1e-6
    ln_eps: float = 1e-6
    pool_type: str = "gap"
    dtype: Dtype = jnp.float32

    def drop_path_rates(self) -> list[list[float]]:
        """Per stage, per block: drop_path * (global block index) / (total blocks - 1)."""
        total = sum(self.stage_depths)
        rates, i = [], 0
        for depth in self.stage_depths:
            rates.append([self.drop_path * (i + j) / max(total - 1, 1) for j in range(depth)])
            i += depth
        return rates

    @nn.compact
    def __call__(self, images, train: bool = False):
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"ConvNeXt pool_type={self.pool_type!r} is not one of {POOL_TYPES}")
        if images.ndim != 4:
            raise ValueError(f"ConvNeXt expects images [B, H, W, C], got shape {images.shape}")
        if len(self.stage_depths) != len(self.widths):
            raise ValueError(f"ConvNeXt stage_depths {tuple(self.stage_depths)} and widths "
                             f"{tuple(self.widths)} must have the same length")
        out = {}
        x = jnp.asarray(images).astype(self.dtype)
        x = layers.conv(self.widths[0], 4, 4, padding=0, use_bias=True, init=_INIT,
                        dtype=self.dtype, name="stem_conv")(x)
        x = out["stem"] = layers.channel_layer_norm(eps=self.ln_eps, dtype=self.dtype,
                                                    name="stem_norm")(x)
        for s, (width, rates) in enumerate(zip(self.widths, self.drop_path_rates())):
            x = _Stage(width, tuple(rates), s > 0, self.layer_scale_init, self.ln_eps, self.dtype,
                       name=f"stage{s + 1}")(x, train)
            out[f"stage{s + 1}"] = x
        if self.pool_type == "gap":
            x = jnp.mean(x, axis=(1, 2))
        x = out["pre_logits"] = layers.channel_layer_norm(eps=self.ln_eps, dtype=self.dtype,
                                                          name="norm_pre_head")(x)
        return x, out


def from_config(img: Mapping, *, dtype: Dtype = jnp.float32) -> ConvNeXt:
    """A ConvNeXt from the plain dict (or ConfigDict) of ``model.image`` fields.

    Reads, with defaults: "variant" "tiny" (tiny/small/base/large), "stage_depths"
    None (from the variant), "widths" None (from the variant), "drop_path" 0.0 (the
    last block's stochastic-depth rate; torchvision trains with
    ``TORCHVISION_DROP_PATH``), "layer_scale_init" 1e-6, "pool_type" "gap" ("gap" |
    "none"). Other keys are ignored.
    """
    def get(key, default):
        v = img.get(key, default) if hasattr(img, "get") else default
        return default if v is None else v

    v = decode_variant(get("variant", "tiny"))
    return ConvNeXt(stage_depths=tuple(get("stage_depths", v["stage_depths"])),
                    widths=tuple(get("widths", v["widths"])),
                    drop_path=float(get("drop_path", 0.0)),
                    layer_scale_init=float(get("layer_scale_init", 1e-6)),
                    pool_type=get("pool_type", "gap"), dtype=dtype)
