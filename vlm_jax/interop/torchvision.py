"""torchvision classification checkpoints (ResNet, wide ResNet, ConvNeXt) <-> vlm_jax.

    model, variables = torchvision.load("resnet50", "resnet50.pth")    # or .safetensors, or a dict
    logits = model.apply(variables, images)           # images float32 [B, H, W, 3], normalised
                                                      # as torchvision expects; -> [B, num_classes]
    sd = torchvision.to_state_dict("resnet50", variables)   # numpy dict for load_state_dict

``model`` is an ``ImageClassifier`` whose encoder is ``models.resnet.ResNet`` or
``models.convnext.ConvNeXt`` in torchvision's layout; ``variables`` holds "params"
and, for ResNets, "batch_stats" (the BatchNorm running statistics), as float32 jax
arrays. Outputs equal torchvision's ``model.eval()(images NCHW)``.

Torch is imported only for .pth / .pt files (``torch.load(weights_only=True)``);
torch tensors in a mapping are converted through their own methods and safetensors
files are read with the numpy API.

How the layouts correspond (our "/"-joined paths under "img/" unless noted):

    Conv2d weight [O, I/g, kh, kw]       -> conv kernel [kh, kw, I/g, O]
    Linear weight [O, I]                 -> Dense kernel [I, O]
    BatchNorm weight / bias              -> params .../scale, .../bias
    BatchNorm running_mean / running_var -> batch_stats .../mean, .../var
    BatchNorm num_batches_tracked        -> (skipped: a counter, not a weight)
    LayerNorm(2d) weight / bias          -> .../scale, .../bias
    ConvNeXt layer_scale [C, 1, 1]       -> .../layer_scale [C]

    resnet:   conv1, bn1 -> conv_root, bn_root; layer{s}.{u}.{conv,bn}{k} ->
              block{s}/unit{u+1}/{conv,bn}{k}; layer{s}.{u}.downsample.{0,1} ->
              block{s}/unit{u+1}/{conv,bn}_proj; fc -> head (outside "img/")
    convnext: see ``models.convnext``; classifier.0 -> norm_pre_head, classifier.2 -> head
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.interop import check_against, flatten, unflatten
from vlm_jax.models import convnext, resnet
from vlm_jax.models.classifier import ImageClassifier

__all__ = ["ARCHS", "build", "load", "to_state_dict", "read_state_dict", "torch_shapes"]

# arch name -> (family, encoder fields). Wide ResNets widen only the bottleneck's inner convs.
ARCHS: dict[str, tuple[str, dict]] = {
    **{f"resnet{d}": ("resnet", dict(depth=str(d))) for d in (18, 34, 50, 101, 152)},
    "wide_resnet50_2": ("resnet", dict(depth="50", width_factor=2)),
    "wide_resnet101_2": ("resnet", dict(depth="101", width_factor=2)),
    **{f"convnext_{v}": ("convnext", dict(variant=v)) for v in convnext.VARIANTS},
}
_HEAD_KEY = {"resnet": "fc.weight", "convnext": "classifier.2.weight"}
# Big enough that every stage keeps a pixel; only shapes are traced at this size.
_DUMMY_HW = 64


def _family(arch: str) -> tuple[str, dict]:
    if arch not in ARCHS:
        raise ValueError(f"Unknown torchvision arch {arch!r}; supported: {sorted(ARCHS)}")
    return ARCHS[arch]


def build(arch: str, *, num_classes: int = 1000, dtype: Any = jnp.float32) -> ImageClassifier:
    """The unbound vlm_jax classifier with torchvision ``arch``'s layout (random init via .init).

    ResNets use torchvision's defaults: BN eps 1e-5, momentum 0.1 (flax 0.9),
    zero_init_residual False. ConvNeXts carry torchvision's stochastic-depth rate
    (``convnext.TORCHVISION_DROP_PATH``), active only when applied with train=True.
    """
    family, kw = _family(arch)
    if family == "resnet":
        v = resnet.decode_resnet_variant(kw["depth"])
        encoder = resnet.ResNet(stage_depths=v["stage_depths"], bottleneck=v["bottleneck"],
                                width_factor=kw.get("width_factor", 1), zero_init_residual=False,
                                dtype=dtype)
    else:
        v = convnext.decode_variant(kw["variant"])
        encoder = convnext.ConvNeXt(drop_path=convnext.TORCHVISION_DROP_PATH[kw["variant"]],
                                    dtype=dtype, **v)
    return ImageClassifier(encoder=encoder, num_classes=num_classes, head_init="lecun", dtype=dtype)


# ---------------------------------------------------------------- names and layouts

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var", "layer_scale": "layer_scale"}
_CONVNEXT_BLOCK = {"conv_dw": 0, "norm": 2, "mlp_fc1": 3, "mlp_fc2": 5}

# (regex over our "collection/path" without the leaf, torch module prefix from the match).
_RULES: dict[str, list[tuple[str, Callable[[re.Match], str]]]] = {
    "resnet": [
        (r"img/conv_root", lambda m: "conv1"),
        (r"img/bn_root", lambda m: "bn1"),
        (r"img/block(\d+)/unit(\d+)/(conv|bn)_proj",
         lambda m: f"layer{m[1]}.{int(m[2]) - 1}.downsample.{0 if m[3] == 'conv' else 1}"),
        (r"img/block(\d+)/unit(\d+)/((?:conv|bn)\d)", lambda m: f"layer{m[1]}.{int(m[2]) - 1}.{m[3]}"),
        (r"head", lambda m: "fc"),
    ],
    "convnext": [
        (r"img/stem_(conv|norm)", lambda m: f"features.0.{0 if m[1] == 'conv' else 1}"),
        (r"img/stage(\d+)/downsample_(norm|conv)",
         lambda m: f"features.{2 * int(m[1]) - 2}.{0 if m[2] == 'norm' else 1}"),
        (r"img/stage(\d+)/block(\d+)", lambda m: f"features.{2 * int(m[1]) - 1}.{int(m[2]) - 1}"),
        (r"img/stage(\d+)/block(\d+)/(\w+)",
         lambda m: f"features.{2 * int(m[1]) - 1}.{int(m[2]) - 1}.block.{_CONVNEXT_BLOCK[m[3]]}"),
        (r"img/norm_pre_head", lambda m: "classifier.0"),
        (r"head", lambda m: "classifier.2"),
    ],
}


def _torch_key(family: str, path: str) -> str:
    """Our "img/.../leaf" path (collection dropped) -> the torchvision state_dict key."""
    prefix, _, leaf = path.rpartition("/")
    for pattern, fn in _RULES[family]:
        m = re.fullmatch(pattern, prefix)
        if m:
            return f"{fn(m)}.{_LEAF[leaf]}"
    raise KeyError(f"no torchvision name for parameter {path!r}")  # a bug in the rules, not the file


def _to_torch_layout(path: str, x: np.ndarray) -> np.ndarray:
    leaf = path.rpartition("/")[2]
    if leaf == "kernel" and x.ndim == 4:
        return np.transpose(x, (3, 2, 0, 1))
    if leaf == "kernel" and x.ndim == 2:
        return np.transpose(x)
    if leaf == "layer_scale":
        return np.reshape(x, (-1, 1, 1))
    return x


def _to_our_layout(path: str, x: np.ndarray) -> np.ndarray:
    leaf = path.rpartition("/")[2]
    if leaf == "kernel" and x.ndim == 4:
        return np.transpose(x, (2, 3, 1, 0))
    if leaf == "kernel" and x.ndim == 2:
        return np.transpose(x)
    if leaf == "layer_scale":
        return np.reshape(x, (-1,))
    return x


def _our_shapes(model: ImageClassifier) -> dict[str, tuple]:
    """{"params/img/...": shape, "batch_stats/img/...": shape} traced without computing."""
    x = jax.ShapeDtypeStruct((1, _DUMMY_HW, _DUMMY_HW, 3), jnp.float32)
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
    return {k: tuple(a.shape) for k, a in flatten(abstract).items()}


def _name_map(family: str, model: ImageClassifier) -> dict[str, tuple[str, tuple]]:
    """torch key -> (our "collection/path", our shape)."""
    out = {}
    for ours, shape in _our_shapes(model).items():
        _, _, path = ours.partition("/")
        out[_torch_key(family, path)] = (ours, shape)
    return out


def torch_shapes(arch: str, num_classes: int = 1000) -> dict[str, tuple]:
    """The torchvision state_dict keys and shapes of ``arch`` (without num_batches_tracked)."""
    family, _ = _family(arch)
    return {k: tuple(_to_torch_layout(p, np.empty(s, np.float32)).shape)
            for k, (p, s) in _name_map(family, build(arch, num_classes=num_classes)).items()}


# ---------------------------------------------------------------- reading tensors

def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor: converted through its methods, no torch import
        v = v.detach().cpu()
        if str(v.dtype) in ("torch.bfloat16", "torch.float16"):
            v = v.float()
        v = v.numpy()
    v = np.asarray(v)
    return v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v


def read_state_dict(source: str | os.PathLike | Mapping) -> dict[str, np.ndarray]:
    """A state_dict as {key: numpy array}: from a mapping, a .safetensors file or a .pth/.pt file.

    Floating tensors become float32. A checkpoint that wraps its weights in a
    "state_dict" or "model" entry is unwrapped, and a DataParallel "module." prefix
    on every key is dropped.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such checkpoint file")
        if path.endswith(".safetensors"):
            from vlm_jax.interop.torch_layout import read_safetensors  # numpy API; bf16 widened
            source = read_safetensors(path)
        elif path.endswith((".pth", ".pt", ".bin")):
            import torch  # only this path needs torch
            source = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"{path}: expected a .safetensors, .pth or .pt file")
    if not isinstance(source, Mapping):
        raise TypeError(f"state_dict must be a mapping or a file path, got {type(source).__name__}")
    for wrapper in ("state_dict", "model"):
        if isinstance(source.get(wrapper), Mapping) and not any(
                hasattr(v, "shape") for v in source.values()):
            source = source[wrapper]
    sd = {str(k): _as_numpy(v) for k, v in source.items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ---------------------------------------------------------------- public API

def load(arch: str, state_dict: str | os.PathLike | Mapping, *, dtype: Any = jnp.float32
         ) -> tuple[ImageClassifier, dict]:
    """torchvision weights -> (model, variables) whose apply equals torchvision's eval forward.

    arch: one of ``ARCHS`` ("resnet18|34|50|101|152", "wide_resnet50_2|101_2",
    "convnext_tiny|small|base|large"). state_dict: {key: numpy array or torch
    tensor}, or a .safetensors / .pth / .pt path. The class count is read from the
    head weight (1000 for ImageNet). ``dtype`` is the compute dtype; parameters
    stay float32. Returns the unbound ``ImageClassifier`` and {"params",
    "batch_stats" (ResNets only)} of float32 jax arrays. num_batches_tracked
    entries are skipped. Raises CheckpointMismatchError naming missing,
    unexpected and wrongly shaped torchvision keys.
    """
    family, _ = _family(arch)
    source = (f"torchvision {arch} checkpoint {os.fspath(state_dict)}"
              if isinstance(state_dict, (str, os.PathLike)) else f"torchvision {arch} state_dict")
    sd = {k: v for k, v in read_state_dict(state_dict).items()
          if not k.endswith("num_batches_tracked")}
    head = sd.get(_HEAD_KEY[family])
    num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 1000
    model = build(arch, num_classes=num_classes, dtype=dtype)
    names = _name_map(family, model)
    expected = {k: _to_torch_layout(p, np.empty(s, np.float32)).shape
                for k, (p, s) in names.items()}
    check_against(source, sd, expected)
    flat = {names[k][0]: _to_our_layout(names[k][0], np.asarray(v, np.float32))
            for k, v in sd.items()}
    return model, jax.tree.map(jnp.asarray, unflatten(flat))


def to_state_dict(arch: str, variables: Mapping) -> dict[str, np.ndarray]:
    """vlm_jax variables of a torchvision-layout classifier -> {torch key: numpy array}.

    ``variables``: {"params", ["batch_stats"]} as ``load`` returns (logical-axis
    boxes are removed). The result includes num_batches_tracked (0) for every
    BatchNorm, so ``torchvision.models.<arch>().load_state_dict({k: torch.from_numpy(v)})``
    accepts it strictly. Raises CheckpointMismatchError if the variables do not fit ``arch``.
    """
    family, _ = _family(arch)
    flat = {k: np.asarray(v) for k, v in flatten(nn.meta.unbox(dict(variables))).items()}
    head = flat.get("params/head/kernel")
    num_classes = int(head.shape[-1]) if head is not None else 1000
    names = _name_map(family, build(arch, num_classes=num_classes))
    ours_to_torch = {p: k for k, (p, _) in names.items()}
    check_against(f"variables for torchvision {arch}", flat,
                  {p: s for p, s in names.values()})
    # Writable C-ordered copies: torch.from_numpy refuses neither, and shares no jax buffer.
    sd = {ours_to_torch[p]: np.array(_to_torch_layout(p, v), order="C") for p, v in flat.items()}
    for k in [k for k in sd if k.endswith(".running_mean")]:
        sd[k[: -len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
    return sd
