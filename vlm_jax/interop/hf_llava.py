"""transformers LlavaForConditionalGeneration -> vlm_jax vision front-end (tower + projector).

    model, variables = hf.load("llava-dir")        # dispatched here by model_type "llava"
    feats = hf.image_features(model, variables, pixel_values=pv)
    # = LlavaForConditionalGeneration.get_image_features(pixel_values=pv).pooler_output:
    #   a list with one numpy array [N, d_llm] per image

What transformers 5.x computes (``LlavaModel.get_image_features``), and how it maps:

    vision tower   CLIPVisionModel (model_type "clip_vision_model") -> our ViT with a CLS
                   token, pre-norm, no patch bias; or SiglipVisionModel
                   ("siglip_vision_model") -> our ViT without CLS (its MAP head and the
                   towers' post-layernorm output are not used by LLaVA)
    features       hidden_states[vision_feature_layer] (int, default -2, or a list whose
                   states are concatenated on channels); hidden_states[0] is the encoder
                   input, [i] the output of block i - 1, none post-layernormed
    strategy       "default" drops the first token (even for SigLIP, which has no CLS),
                   "full" keeps all
    projector      linear_1 -> projector_hidden_act -> linear_2 (biases iff
                   multimodal_projector_bias) -> ``connectors.Projector(depth=2)``

Key layouts read (others raise CheckpointMismatchError):
    transformers 5.x save_pretrained  vision_tower.embeddings..., multi_modal_projector...
    in-memory 5.x names               model.vision_tower.embeddings...,
                                      model.multi_modal_projector...
    the hub's older layout            vision_tower.vision_model.embeddings...,
                                      multi_modal_projector...
The language model's tensors (language_model..., lm_head...) are never read.
"""

from __future__ import annotations

import functools
import re
from typing import ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.interop import CheckpointMismatchError, flatten, unflatten
from vlm_jax.interop.torch_layout import apply_rules, linear, read_safetensors
from vlm_jax.models.connectors import Projector
from vlm_jax.models.frontend import VisionFrontEnd
from vlm_jax.models.vit import ViT

HF_FAMILY = "hf_llava"
_TOWER_KINDS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
# LlavaConfig's vision tower when config.json gives no vision_config.
_LLAVA_VISION = dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024,
                     patch_size=14, image_size=336, num_hidden_layers=24, num_attention_heads=16)
_LLAMA_HIDDEN = 4096  # LlamaConfig's hidden_size default
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Vision-tower / projector keys in any known layout, and their canonical names.
_TOWER_RE = re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?")
_PROJ_RE = re.compile(r"^(?:model\.)?multi_modal_projector\.")
_SKIP_RE = re.compile(r"^head\.")  # SigLIP's MAP head: unused by the VLMs


class LlavaFrontEnd(VisionFrontEnd):
    """VisionFrontEnd (tower -> hidden state(s) -> Projector) of a LLaVA checkpoint."""

    hf_family: ClassVar[str] = HF_FAMILY


# ---------------------------------------------------------------- shared with hf_paligemma

def vision_config(hf_cfg: Mapping, default: Mapping) -> tuple[str, dict]:
    """(kind "clip" | "siglip", vision_config with transformers' defaults filled in)."""
    from vlm_jax.interop import hf

    vc = hf_cfg.get("vision_config")
    vc = dict(default) if vc is None else dict(vc)
    mt = vc.get("model_type", default.get("model_type"))
    if mt not in _TOWER_KINDS:
        raise ValueError(f"vision_config.model_type={mt!r}: only {sorted(_TOWER_KINDS)} vision "
                         "towers are supported")
    kind = _TOWER_KINDS[mt]
    given = {k: v for k, v in vc.items() if v is not None}
    return kind, {**hf.HF_DEFAULTS[kind]["vision"], **given}


def build_tower(kind: str, vc: Mapping, dtype=jnp.float32, remat: bool = False) -> ViT:
    """Our ViT for a transformers CLIP / SigLIP vision config (no pooling head)."""
    from vlm_jax.interop import hf

    common = dict(
        width=int(vc["hidden_size"]), depth=int(vc["num_hidden_layers"]),
        mlp_dim=int(vc["intermediate_size"]), num_heads=int(vc["num_attention_heads"]),
        patch_size=hf._square(vc["patch_size"], "vision_config.patch_size"),
        image_size=hf._square(vc["image_size"], "vision_config.image_size"),
        act=hf._act(vc["hidden_act"], "vision_config.hidden_act"),
        ln_eps=float(vc["layer_norm_eps"]), posemb="learn", remat=remat, dtype=dtype)
    if kind == "clip":
        return ViT(**common, pool_type="tok", pre_norm=True, patch_bias=False)
    return ViT(**common, pool_type="none", pre_norm=False, patch_bias=True)


def parse_overrides(overrides: Mapping | None) -> dict:
    """{"dtype": "float32" | "bfloat16" | "float16", "remat": bool} -> build kwargs."""
    out = {"dtype": jnp.float32, "remat": False}
    for k, v in dict(overrides or {}).items():
        if k == "dtype":
            if v not in _DTYPES:
                raise ValueError(f"overrides dtype={v!r} is not one of {sorted(_DTYPES)}")
            out["dtype"] = _DTYPES[v]
        elif k == "remat":
            out["remat"] = bool(v)
        else:
            raise ValueError(f"unknown override {k!r} for a VLM front-end; supported: dtype, remat")
    return out


def read_front_end(path: str) -> dict[str, np.ndarray]:
    """Vision-tower and projector tensors, renamed to ``vision_tower.*`` /
    ``multi_modal_projector.*`` whatever the layout; nothing else is read."""
    def keep(k):
        m = _TOWER_RE.match(k)
        if m:
            return not _SKIP_RE.match(k[m.end():])
        return bool(_PROJ_RE.match(k))

    out = {}
    for k, v in read_safetensors(path, keep=keep).items():
        m = _TOWER_RE.match(k)
        name = ("vision_tower." + k[m.end():]) if m else _PROJ_RE.sub("multi_modal_projector.", k)
        if name in out:
            raise CheckpointMismatchError(path, unexpected=[f"{k} (a second copy of {name})"])
        out[name] = v
    return out


def expected_shapes(model: nn.Module, image_size) -> dict[str, tuple]:
    h, w = (image_size, image_size) if np.isscalar(image_size) else image_size
    x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    return {k: tuple(a.shape) for k, a in flatten(nn.meta.unbox(abstract)["params"]).items()}


def to_variables(flat: Mapping[str, np.ndarray]) -> dict:
    return {"params": jax.tree.map(jnp.asarray, unflatten(dict(flat)))}


def pixels_nhwc(pixel_values) -> np.ndarray:
    """pixel_values [B, C, H, W] (numpy / jax / torch) -> float32 [B, H, W, C]."""
    if hasattr(pixel_values, "detach"):
        pixel_values = pixel_values.detach().cpu()
    x = np.asarray(pixel_values, np.float32)
    if x.ndim != 4:
        raise ValueError(f"pixel_values must be [B, C, H, W], got shape {x.shape}")
    return np.transpose(x, (0, 2, 3, 1))


@functools.lru_cache(maxsize=16)
def apply_fn(model: nn.Module):
    return jax.jit(lambda params, x: model.apply({"params": params}, x))


# ---------------------------------------------------------------- LLaVA

def _check_layers(layer):
    if isinstance(layer, (list, tuple)):
        if not layer:
            raise ValueError("vision_feature_layer is an empty list")
        return tuple(int(i) for i in layer)
    return int(layer)


def _strategy(s) -> bool:
    if s not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={s!r} is not 'default' or 'full'")
    return s == "default"


def load(path: str, hf_cfg: Mapping, overrides: Mapping | None = None):
    """A LlavaForConditionalGeneration directory -> (LlavaFrontEnd, {"params": ...}).

    Reads only the vision tower and projector tensors (see the module docstring).
    ``overrides``: {"dtype": ..., "remat": ...}.
    """
    kw = parse_overrides(overrides)
    kind, vc = vision_config(hf_cfg, _LLAVA_VISION)
    tower = build_tower(kind, vc, **kw)
    layer = _check_layers(hf_cfg.get("vision_feature_layer", -2))
    drop = _strategy(hf_cfg.get("vision_feature_select_strategy", "default"))
    text_hidden = int((hf_cfg.get("text_config") or {}).get("hidden_size") or _LLAMA_HIDDEN)
    from vlm_jax.interop import hf
    act = hf._act(hf_cfg.get("projector_hidden_act", "gelu"), "projector_hidden_act")
    bias = bool(hf_cfg.get("multimodal_projector_bias", True))
    connector = Projector(text_hidden, hidden_dim=text_hidden, depth=2, act=act, use_bias=bias,
                          dtype=kw["dtype"])
    model = LlavaFrontEnd(tower=tower, connector=connector, feature_layers=layer, drop_cls=drop)
    rules = hf.vision_rules(kind, tower, "vision_tower", "tower", head=False)
    rules += linear("multi_modal_projector.linear_1", "connector/Dense_0", bias=bias)
    rules += linear("multi_modal_projector.linear_2", "connector/Dense_1", bias=bias)
    flat = apply_rules(rules, read_front_end(path), expected_shapes(model, tower.image_size),
                       f"{path} (LlavaForConditionalGeneration)")
    return model, to_variables(flat)


def image_features(model: LlavaFrontEnd, variables: Mapping, pixel_values=None, image_sizes=None,
                   vision_feature_layer=None, vision_feature_select_strategy=None,
                   **unused) -> list[np.ndarray]:
    """= transformers' ``get_image_features(...).pooler_output``: a list of float32 numpy
    arrays, one [N, d_llm] per image (N = patches, +1 with strategy "full" on CLIP).

    pixel_values [B, C, H, W]; vision_feature_layer / vision_feature_select_strategy
    override the checkpoint's (a different number of layers does not fit the
    projector). image_sizes [B, 2] (transformers then splits the features of a
    single-row batch into per-image chunks of (h // patch) * (w // patch) tokens):
    supported for B == 1 as transformers does.
    """
    if unused:
        raise ValueError(f"unexpected inputs {sorted(unused)} for a LLaVA front-end")
    if pixel_values is None:
        raise ValueError("image_features needs pixel_values")
    changes = {}
    if vision_feature_layer is not None:
        changes["feature_layers"] = _check_layers(vision_feature_layer)
    if vision_feature_select_strategy is not None:
        changes["drop_cls"] = _strategy(vision_feature_select_strategy)
    if changes:
        model = model.clone(**changes)
    x = pixels_nhwc(pixel_values)
    y = np.asarray(apply_fn(model)(variables["params"], x), np.float32)
    if image_sizes is None:
        return list(y)
    if hasattr(image_sizes, "detach"):
        image_sizes = image_sizes.detach().cpu()
    sizes = np.asarray(image_sizes)
    if y.shape[0] != 1:
        raise ValueError(f"image_sizes needs a batch of one row (as transformers splits "
                         f"features.squeeze(0)); got {y.shape[0]} rows")
    p = model.tower.total_stride
    counts = [int((int(h) // p[0]) * (int(w) // p[1])) for h, w in sizes.reshape(-1, 2)]
    if sum(counts) != y.shape[1]:
        raise ValueError(f"image_sizes give {sum(counts)} tokens but the features have "
                         f"{y.shape[1]}")
    return list(np.split(y[0], np.cumsum(counts)[:-1]))
