"""open_clip checkpoints (CLIP ResNets and ViTs) -> vlm_jax two-tower models.

    model, variables = open_clip.load("ViT-B-32-quickgelu", "open_clip_pytorch_model.bin")
    zimg, ztxt, out = model.apply(variables, images_nhwc, tokens)
        # zimg, ztxt = open_clip's encode_image(images_nchw, normalize=True),
        #              encode_text(tokens, normalize=True)

Which names load: open_clip's plain CLIP configs, i.e. ``RN50``, ``RN101``, ``RN50x4``,
``RN50x16``, ``RN50x64`` (ModifiedResNet, see models/clip_resnet.py) and
``ViT-{S,M,B,L,H,g,bigG,e}-{patch}[-plus][-{res}][-alt]`` (e.g. ViT-B-32, ViT-B-16,
ViT-L-14-336, ViT-H-14), each optionally with ``-quickgelu``. Towers built from timm or
transformers models (SigLIP, EVA, ConvNeXt, CoCa, MobileCLIP, ...) have other layouts
and are refused by name.

Activation: open_clip builds plain names with exact GELU (torch nn.GELU) and
``-quickgelu`` names with QuickGELU, x * sigmoid(1.702 x). OpenAI's weights (and
open_clip's yfcc15m / cc12m / laion400m releases) were trained with QuickGELU and give
the intended features only under a ``-quickgelu`` name (or ``force_quick_gelu=True``),
exactly as in open_clip. ResNet image towers use ReLU either way; the flag then
affects the text tower only.

What comes from where: widths, depths, MLP sizes, patch size, posemb grid (hence the
image size), context length, vocabulary and embedding dim are read from tensor
shapes; the name gives the tower kind, the activation and the ViT head width (64
channels per head, 80 for H, 88 for g, 104 for bigG, 112 for e). Text towers always
use 64-channel heads, as in every open_clip CLIP config.

How the layouts correspond (D width, H heads, Dh = D / H):

    visual.conv1.weight [D, 3, p, p]              -> img/embedding/kernel [p, p, 3, D] (no bias)
    visual.class_embedding [D] + positional_embedding[0] -> img/cls [1, 1, D]
    visual.positional_embedding[1:]               -> img/pos_embedding [1, N, D]
    visual.ln_pre / ln_post                       -> img/pre_norm / img/Transformer/encoder_norm
    visual.proj [D, E]                            -> img/head/kernel (no bias)
    *.resblocks.{i}.ln_1 / ln_2                   -> encoderblock_{i}/LayerNorm_0 / LayerNorm_1
    *.resblocks.{i}.attn.in_proj_weight [3D, D]   -> .../{query,key,value}/kernel [D, H, Dh]
    *.resblocks.{i}.attn.out_proj.weight [D, D]   -> .../out/kernel [H, Dh, D]
    *.resblocks.{i}.mlp.c_fc / c_proj             -> .../MlpBlock_0/Dense_0 / Dense_1
    token_embedding.weight, positional_embedding  -> txt/Embed_0/embedding, txt/pos_embedding
    ln_final, text_projection [D, E]              -> txt/Transformer/encoder_norm, txt/head/kernel
    logit_scale (log of the temperature)          -> t [1];  logit_bias (if present) -> b [1]
  ModifiedResNet (torch Conv2d [O, I, k, k] -> [k, k, I, O]; BatchNorm weight/bias ->
  params scale/bias, running_mean/var -> batch_stats mean/var):
    visual.conv{1,2,3}, bn{1,2,3}                 -> img/stem_conv_{0,1,2}, img/stem_bn_{0,1,2}
    visual.layer{s}.{j}.conv{k}, bn{k}            -> img/stage{s}_block{j}/conv{k}, bn{k}
    visual.layer{s}.{j}.downsample.0 / .1         -> .../downsample_conv / downsample_bn
    visual.attnpool.positional_embedding [1+N, C] -> img/attnpool/pos_embedding [1, 1+N, C]
    visual.attnpool.{q,k,v}_proj, c_proj          -> img/attnpool/{query,key,value}, out

Not weights (skipped): ``*.num_batches_tracked``, ``attn_mask``, and the
``input_resolution`` / ``context_length`` / ``vocab_size`` entries of OpenAI's
TorchScript archives. A ``module.`` prefix (DDP) and open_clip's "custom text"
layout (``text.transformer...``) are accepted. Anything else that does not fit raises
``CheckpointMismatchError`` with the missing, unexpected and wrongly shaped keys.
torch is imported only to read .pth / .bin / .pt files or torch tensors' values.
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import models
from vlm_jax.interop import CheckpointMismatchError, flatten, unflatten
from vlm_jax.interop.torch_layout import (Rule, add_batch, attention, drop_batch, layernorm,
                                          linear, one, packed_attention, read_safetensors)
from vlm_jax.models import clip_resnet, scan
from vlm_jax.models.two_tower import TwoTower

__all__ = ["load", "model_config", "read_state_dict", "parse_name", "CheckpointMismatchError"]

_VIT_RE = re.compile(r"^ViT-(?P<size>S|M|B|L|H|g|bigG|e)-(?P<patch>\d+)(?:-plus)?(?:-(?P<res>\d+))?"
                     r"(?:-alt)?$")
# Channels per attention head of open_clip's ViT image towers (its configs' head_width).
_VIT_HEAD_WIDTH = {"H": 80, "g": 88, "bigG": 104, "e": 112}
_HEAD_WIDTH = 64
# Names the pattern admits whose towers carry extra parameters (ViT-M-16-alt: LayerScale).
_REFUSED = {"ViT-M-16-alt": "LayerScale (ls_init_value)"}
_LN_EPS = 1e-5  # torch nn.LayerNorm default, used by every open_clip CLIP tower
_NOT_WEIGHTS = ("num_batches_tracked", "attn_mask", "input_resolution", "context_length",
                "vocab_size")
_TEXT_PREFIXES = ("token_embedding", "positional_embedding", "transformer", "ln_final",
                  "text_projection")


def parse_name(name: str, force_quick_gelu: bool = False) -> dict[str, Any]:
    """open_clip model name -> {"kind": "resnet" | "vit", "quick_gelu", "head_width", "variant"}.

    ``variant`` is the RN name ("RN50", ...) or the ViT size letter ("B", "bigG", ...).
    Raises ValueError for names whose towers have another layout.
    """
    if not isinstance(name, str):
        raise ValueError(f"open_clip model name must be a string, got {name!r}")
    base = name[:-len("-quickgelu")] if name.endswith("-quickgelu") else name
    quick = force_quick_gelu or base != name
    if base in clip_resnet.VARIANTS:
        return dict(kind="resnet", quick_gelu=quick, head_width=_HEAD_WIDTH, variant=base)
    m = _VIT_RE.match(base)
    if m and base not in _REFUSED:
        size = m.group("size")
        return dict(kind="vit", quick_gelu=quick, head_width=_VIT_HEAD_WIDTH.get(size, _HEAD_WIDTH),
                    variant=size)
    why = f" (it uses {_REFUSED[base]})" if base in _REFUSED else ""
    raise ValueError(
        f"open_clip model {name!r} is not supported{why}: vlm_jax loads the plain CLIP layouts "
        f"{sorted(clip_resnet.VARIANTS)} and ViT-<S|M|B|L|H|g|bigG|e>-<patch>[-plus][-<res>]"
        "[-alt], optionally with -quickgelu")


# ---------------------------------------------------------------- reading tensors

def _to_numpy(x) -> np.ndarray:
    """numpy / jax / torch (any dtype, CPU or not) -> numpy; floats become float32."""
    if hasattr(x, "detach"):  # a torch tensor; checked by duck type so torch is not imported
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()  # numpy has no bfloat16
        x = x.numpy()
    x = np.asarray(x)
    if x.dtype.kind == "f" or x.dtype.name == "bfloat16":
        x = x.astype(np.float32, copy=False)  # float32 tensors stay views of torch's memory
    return x


def _torch_file(path: str) -> Mapping:
    import torch

    try:
        with warnings.catch_warnings():  # torch names the TorchScript case itself; we handle it
            warnings.filterwarnings("ignore", message=".*TorchScript archive", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as e:  # OpenAI's original releases are TorchScript archives
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's own deprecation
                return torch.jit.load(path, map_location="cpu").state_dict()
        except RuntimeError:
            raise e from None


def read_state_dict(source) -> dict[str, np.ndarray]:
    """A state_dict as {name: float32 numpy array} with open_clip's plain CLIP names.

    ``source``: a mapping of names to numpy arrays or torch tensors, or a path to a
    .safetensors file (read without torch) or a torch .pth / .pt / .bin file
    (state_dict, {"state_dict": ...} training checkpoint, or TorchScript archive).
    A leading "module." on every key is dropped; "text.*" keys of open_clip's
    custom-text layout are renamed to the plain layout.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"open_clip checkpoint {path} does not exist")
        raw = read_safetensors(path) if path.endswith(".safetensors") else _torch_file(path)
    elif isinstance(source, Mapping):
        raw = source
    else:
        raise ValueError(f"state_dict must be a mapping or a file path, got "
                         f"{type(source).__name__}")
    if "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    keys = list(raw)
    strip = "module." if keys and all(k.startswith("module.") for k in keys) else ""
    out = {}
    for k, v in raw.items():
        k = k[len(strip):]
        if k.startswith("text.") and k[5:].startswith(_TEXT_PREFIXES):
            k = k[5:]
        out[k] = _to_numpy(v)
    return out


# ---------------------------------------------------------------- config from shapes

def _count(tensors: Mapping, prefix: str) -> int:
    """Number of consecutive ``prefix{i}.`` blocks present (0, 1, ... without gaps)."""
    found = {int(m.group(1)) for k in tensors
             for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    n = 0
    while n in found:
        n += 1
    return n


def _grid(tokens: int, stride: tuple[int, int], image_size, key: str) -> tuple[int, int]:
    """Token count of a posemb (without the class / mean token) -> its (gh, gw) grid."""
    if image_size is not None:
        h, w = (image_size, image_size) if np.isscalar(image_size) else image_size
        gh, gw = int(h) // stride[0], int(w) // stride[1]
        if gh * gw != tokens:
            raise ValueError(f"image_size={image_size!r} gives a {gh}x{gw} grid but {key} has "
                             f"{tokens} grid positions")
        return gh, gw
    g = math.isqrt(tokens)
    if g * g != tokens or g == 0:
        raise ValueError(f"{key} has {tokens} grid positions, not a square grid; pass "
                         "image_size=(height, width)")
    return g, g


def model_config(name: str, tensors: Mapping[str, np.ndarray], *, image_size=None,
                 force_quick_gelu: bool = False, dtype: str = "float32") -> dict:
    """The vlm_jax model config (plain dict) of an open_clip checkpoint.

    ``tensors``: as ``read_state_dict`` returns. ViT names give a config that
    ``models.build`` accepts (image.type "vit", CLS pooling, pre-norm, bias-free patch
    conv and projection); ResNet names give image.type "clip_resnet" with the fields
    ``clip_resnet.from_config`` reads. ``image_size`` (int or (h, w)) is needed only
    when the posemb grid is not square. Raises CheckpointMismatchError when a tensor
    needed to read the shapes is absent.
    """
    info = parse_name(name, force_quick_gelu)
    act = "quick_gelu" if info["quick_gelu"] else "gelu"
    need = ["token_embedding.weight", "positional_embedding", "text_projection",
            "transformer.resblocks.0.mlp.c_fc.weight"]
    if info["kind"] == "vit":
        need += ["visual.conv1.weight", "visual.positional_embedding",
                 "visual.transformer.resblocks.0.mlp.c_fc.weight"]
    else:
        need += ["visual.conv3.weight", "visual.attnpool.positional_embedding",
                 "visual.attnpool.c_proj.weight"]
    absent = [k for k in need if k not in tensors]
    if absent:
        hint = ""
        if info["kind"] == "vit" and "visual.attnpool.c_proj.weight" in tensors:
            hint = " (it looks like a ModifiedResNet checkpoint: use an RN name)"
        elif info["kind"] == "resnet" and "visual.class_embedding" in tensors:
            hint = " (it looks like a ViT checkpoint: use a ViT name)"
        raise CheckpointMismatchError(f"open_clip {name} state_dict{hint}", missing=absent)

    s = {k: np.shape(v) for k, v in tensors.items()}
    vocab, text_width = s["token_embedding.weight"]
    text = dict(variant=None, width=int(text_width),
                depth=_count(tensors, "transformer.resblocks."),
                mlp_dim=int(s["transformer.resblocks.0.mlp.c_fc.weight"][0]),
                num_heads=max(int(text_width) // _HEAD_WIDTH, 1), vocab_size=int(vocab),
                max_len=int(s["positional_embedding"][0]), pool_type="eos", causal=True,
                head_bias=False, act=act, ln_eps=_LN_EPS)
    out_dim = int(s["text_projection"][-1])
    if info["kind"] == "vit":
        width, _, ph, pw = s["visual.conv1.weight"]
        gh, gw = _grid(s["visual.positional_embedding"][0] - 1, (ph, pw), image_size,
                       "visual.positional_embedding")
        image = dict(type="vit", variant=None, width=int(width),
                     depth=_count(tensors, "visual.transformer.resblocks."),
                     mlp_dim=int(s["visual.transformer.resblocks.0.mlp.c_fc.weight"][0]),
                     num_heads=max(int(width) // info["head_width"], 1),
                     patch_size=(int(ph), int(pw)) if ph != pw else int(ph),
                     image_size=(gh * int(ph), gw * int(pw)) if gh != gw else gh * int(ph),
                     pool_type="tok", posemb="learn", stem="patch", head=True, head_bias=False,
                     patch_bias=False, pre_norm=True, act=act, ln_eps=_LN_EPS)
    else:
        width = int(s["visual.conv3.weight"][0])
        stride = clip_resnet.TOTAL_STRIDE
        gh, gw = _grid(s["visual.attnpool.positional_embedding"][0] - 1, (stride, stride),
                       image_size, "visual.attnpool.positional_embedding")
        blocks = tuple(_count(tensors, f"visual.layer{i}.") for i in range(1, 5))
        known = clip_resnet.VARIANTS[info["variant"]][:2] == (blocks, width)
        image = dict(type="clip_resnet", variant=info["variant"] if known else None,
                     stage_depths=blocks, width=width, num_heads=width * 32 // _HEAD_WIDTH,
                     image_size=(gh * stride, gw * stride) if gh != gw else gh * stride,
                     bn_momentum=0.9, bn_eps=1e-5)
    scale = float(np.reshape(tensors.get("logit_scale", np.log(1 / 0.07)), (-1,))[0])
    bias = tensors.get("logit_bias")
    return dict(image=image, text=text, out_dim=out_dim, temperature_init=float(np.exp(scale)),
                bias_init=None if bias is None else float(np.reshape(bias, (-1,))[0]), dtype=dtype)


# ---------------------------------------------------------------- weight layout

def _conv(src: str, ours: str) -> Rule:
    return one(f"{src}.weight", f"params/{ours}/kernel",
                lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))


def _bn(src: str, ours: str) -> list[Rule]:
    return [one(f"{src}.weight", f"params/{ours}/scale"),
            one(f"{src}.bias", f"params/{ours}/bias"),
            one(f"{src}.running_mean", f"batch_stats/{ours}/mean"),
            one(f"{src}.running_var", f"batch_stats/{ours}/var")]


def _transformer(src: str, ours: str, depth: int, heads: int) -> list[Rule]:
    rules = []
    for i in range(depth):
        h, o = f"{src}.resblocks.{i}", f"params/{ours}/encoderblock_{i}"
        rules += layernorm(f"{h}.ln_1", f"{o}/LayerNorm_0")
        rules += packed_attention(f"{h}.attn", f"{o}/MultiHeadDotProductAttention_0", heads)
        rules += layernorm(f"{h}.ln_2", f"{o}/LayerNorm_1")
        rules += linear(f"{h}.mlp.c_fc", f"{o}/MlpBlock_0/Dense_0")
        rules += linear(f"{h}.mlp.c_proj", f"{o}/MlpBlock_0/Dense_1")
    return rules


def _resnet_rules(img: clip_resnet.ClipModifiedResNet) -> list[Rule]:
    rules = []
    for i in range(3):
        rules += [_conv(f"visual.conv{i + 1}", f"img/stem_conv_{i}"),
                  *_bn(f"visual.bn{i + 1}", f"img/stem_bn_{i}")]
    for s, blocks in enumerate(img.layers, start=1):
        for j in range(blocks):
            src, ours = f"visual.layer{s}.{j}", f"img/stage{s}_block{j}"
            for k in (1, 2, 3):
                rules += [_conv(f"{src}.conv{k}", f"{ours}/conv{k}"),
                          *_bn(f"{src}.bn{k}", f"{ours}/bn{k}")]
            if j == 0:  # open_clip gives every stage's first block a projection shortcut
                rules += [_conv(f"{src}.downsample.0", f"{ours}/downsample_conv"),
                          *_bn(f"{src}.downsample.1", f"{ours}/downsample_bn")]
    a, o, heads = "visual.attnpool", "params/img/attnpool", img.heads
    rules.append(one(f"{a}.positional_embedding", f"{o}/pos_embedding", add_batch, drop_batch))
    return rules + attention(a, o, heads, out="c_proj")


def _vit_rules(img) -> list[Rule]:
    def cls_to_ours(xs):
        c, pe = xs
        return [(c + pe[0])[None, None], pe[1:][None]]

    def cls_to_torch(ys):
        cls, pe = ys
        return [cls.reshape(-1), np.concatenate([np.zeros_like(pe[0, :1]), pe[0]], axis=0)]

    return [
        _conv("visual.conv1", "img/embedding"),
        Rule(("visual.class_embedding", "visual.positional_embedding"),
              ("params/img/cls", "params/img/pos_embedding"), cls_to_ours, cls_to_torch),
        *layernorm("visual.ln_pre", "params/img/pre_norm"),
        *_transformer("visual.transformer", "img/Transformer", img.depth, img.num_heads),
        *layernorm("visual.ln_post", "params/img/Transformer/encoder_norm"),
        one("visual.proj", "params/img/head/kernel"),  # already [in, out]: used as x @ proj
    ]


def _rules(model: TwoTower) -> list[Rule]:
    img, txt = model.image, model.text
    is_resnet = isinstance(img, clip_resnet.ClipModifiedResNet)
    rules = _resnet_rules(img) if is_resnet else _vit_rules(img)
    rules += [
        one("token_embedding.weight", "params/txt/Embed_0/embedding"),
        one("positional_embedding", "params/txt/pos_embedding", add_batch, lambda y: y[0]),
        *_transformer("transformer", "txt/Transformer", txt.depth, txt.num_heads),
        *layernorm("ln_final", "params/txt/Transformer/encoder_norm"),
        one("text_projection", "params/txt/head/kernel"),
        one("logit_scale", "params/t", lambda x: np.reshape(x, (1,)), lambda y: np.reshape(y, ())),
    ]
    if model.bias_init is not None:
        rules.append(one("logit_bias", "params/b", lambda x: np.reshape(x, (1,)),
                          lambda y: np.reshape(y, ())))
    return rules


def expected_shapes(model: TwoTower) -> dict[str, tuple]:
    """{"params/..." | "batch_stats/...": shape} of ``model.init``'s variables (none allocated),
    in the unrolled layout the weight rules use (``models/scan.py``)."""
    abstract = scan.to_unrolled(nn.meta.unbox(abstract_variables(model)))
    return {k: tuple(a.shape) for k, a in flatten(abstract).items()}


def abstract_variables(model: TwoTower) -> dict:
    """``model.init``'s variables as boxed ShapeDtypeStructs (nothing allocated)."""
    img = model.image
    size = img.image_size
    h, w = (size, size) if np.isscalar(size) else size
    images = jax.ShapeDtypeStruct((1, int(h), int(w), 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, model.text.max_len), jnp.int32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          images, tokens)


def _convert(model: TwoTower, tensors: Mapping[str, np.ndarray], source: str) -> dict:
    expected = expected_shapes(model)
    flat, missing, mismatched, used = {}, [], [], set()
    rules = _rules(model)
    for rule in rules:
        absent = [k for k in rule.hf if k not in tensors]
        if absent:
            missing += absent
            continue
        used.update(rule.hf)
        xs = [np.asarray(tensors[k], np.float32) for k in rule.hf]
        try:
            ys = rule.to_ours(xs)
        except ValueError:  # e.g. a head split that does not fit
            ys = None
        for i, path in enumerate(rule.ours):
            want = expected.get(path)
            if ys is None or ys[i].shape != want:
                j = min(i, len(xs) - 1)
                mismatched.append((f"{rule.hf[j]} (-> {path})", tuple(xs[j].shape), want))
            else:
                flat[path] = ys[i]
    unexpected = [k for k in tensors if k not in used and k.rsplit(".", 1)[-1] not in _NOT_WEIGHTS]
    not_covered = set(expected) - {p for r in rules for p in r.ours}
    if missing or unexpected or mismatched or not_covered:
        raise CheckpointMismatchError(source, missing + [f"(vlm_jax) {p}" for p in not_covered],
                                      unexpected, mismatched)
    return flat


# ---------------------------------------------------------------- public API

def load(name: str, state_dict, *, image_size=None, force_quick_gelu: bool = False,
         dtype: str = "float32", scan_layers: bool = False) -> tuple[TwoTower, dict]:
    """An open_clip checkpoint as a vlm_jax ``TwoTower`` -> (model, variables).

    name: open_clip model name, e.g. "RN50", "RN101", "RN50x4", "ViT-B-32", "ViT-B-16",
      "ViT-L-14", "ViT-L-14-336", or any of them with "-quickgelu" (see the module doc).
    state_dict: mapping of names to numpy arrays or torch tensors, or a path to a
      .safetensors / .pth / .pt / .bin file (``read_state_dict``).
    image_size: int or (h, w); only needed for a ViT whose posemb grid is not square.
    force_quick_gelu: QuickGELU whatever the name says (open_clip's option of that name).
    dtype: compute dtype "float32" | "bfloat16" | "float16"; variables stay float32.
    scan_layers: build the transformer towers with model.{image,text}.scan (stacked
      ``encoderblock`` params, see ``models/scan.py``); the outputs are the same.

    Returns the unbound model and {"params": ...} (+ "batch_stats" for ResNets: the
    BatchNorm running statistics) of float32 jax arrays.
    ``model.apply(variables, images [B, H, W, 3], tokens int [B, L<=context])`` runs in
    inference mode and gives (zimg, ztxt, out) equal to open_clip's
    ``encode_image(images NCHW, normalize=True)`` / ``encode_text(tokens, normalize=True)``;
    out["t"] = exp(logit_scale). Images are what open_clip's model receives
    (normalised with its mean/std), channels last.
    Raises CheckpointMismatchError listing missing / unexpected / wrongly shaped keys,
    ValueError for unsupported names.
    """
    info = parse_name(name, force_quick_gelu)  # fail on the name before reading a large file
    source = state_dict if isinstance(state_dict, (str, os.PathLike)) else "state_dict"
    tensors = read_state_dict(state_dict)
    cfg = model_config(name, tensors, image_size=image_size,
                       force_quick_gelu=info["quick_gelu"], dtype=dtype)
    if scan_layers:
        cfg["text"]["scan"] = True
        if cfg["image"]["type"] == "vit":
            cfg["image"]["scan"] = True
    model = models.build(cfg)
    flat = _convert(model, tensors, f"open_clip {name} {source}")
    variables = jax.tree.map(jnp.asarray, unflatten(flat))
    return model, scan.match_layout(variables, nn.meta.unbox(abstract_variables(model)))
