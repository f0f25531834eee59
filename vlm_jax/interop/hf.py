"""transformers checkpoints (SiglipModel, Siglip2Model, CLIPModel) <-> vlm_jax.

    model, variables = hf.load("google-siglip-dir")   # save_pretrained output: config.json + *.safetensors
    hf.save(model, variables, "out-dir")               # <Arch>Model.from_pretrained("out-dir") works
    zi = hf.image_features(model, variables, **image_processor(images, return_tensors="np"))
    zt = hf.text_features(model, variables, input_ids, attention_mask)

Neither path imports torch: tensors go through safetensors' numpy API
(bfloat16 files are read via ml_dtypes and widened to float32).

How the layouts correspond (D width, H heads, Dh = D / H):

    torch Linear weight [out, in]       -> Dense kernel [in, out] (transpose)
    q/k/v_proj weight [D, D]            -> attention query/key/value kernel [D, H, Dh]; bias [H, Dh]
    out_proj weight [D, D]              -> attention out kernel [H, Dh, D]
    MAP head in_proj_weight [3D, D]     -> query / key / value (split in three)
    patch Conv2d weight [D, C, p, p]    -> embedding kernel [p, p, C, D]
    Siglip2 patch Linear [D, p*p*C]     -> NaFlex embedding kernel [p*p*C, D]
    Siglip2 position_embedding [G*G, D] -> NaFlex pos_embedding [1, G*G, D] (posemb_size G)
    position_embedding.weight [N, D]    -> pos_embedding [1, N, D]
    LayerNorm weight / bias             -> scale / bias
    CLIP class_embedding [D] + position_embedding[0]  -> cls [1, 1, D]
    CLIP position_embedding[1:]                       -> pos_embedding [1, N, D]
    CLIP logit_scale []  / SigLIP logit_scale [1]     -> t [1];  SigLIP logit_bias [1] -> b [1]

On export, a CLIP ``cls`` goes entirely into class_embedding and row 0 of
position_embedding is zero, which gives the same outputs.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import warnings
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax import models
from vlm_jax.interop import CheckpointMismatchError, flatten, unflatten
from vlm_jax.interop.torch_layout import (  # noqa: F401  (read_safetensors: public here too)
    T, Rule, add_batch, apply_rules, drop_batch, hf_encoder, layernorm, linear, one,
    packed_attention, read_safetensors, write_safetensors)
from vlm_jax.models import layers, scan
from vlm_jax.models.text import TextTransformer
from vlm_jax.models.two_tower import TwoTower
from vlm_jax.models.navit import NaViT
from vlm_jax.models.vit import ViT

__all__ = ["load", "save", "image_features", "text_features", "read_config", "model_config",
           "vision_rules",
           "hf_config", "read_safetensors", "naflex_batch", "CheckpointMismatchError",
           "HF_DEFAULTS"]

# transformers' hidden_act names <-> ours.
_ACT_FROM_HF = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
                "quick_gelu": "quick_gelu"}
_ACT_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}

# Defaults of transformers' config classes: a config.json omits fields left at their default.
HF_DEFAULTS = {
    "siglip": {
        "text": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=64,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, projection_size=None),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True),
        "top": {},
    },
    "clip": {
        "text": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5, eos_token_id=49407),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5),
        "top": dict(projection_dim=512, logit_scale_init_value=2.6592),
    },
    "siglip2": {
        "text": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=64,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, projection_size=None),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, patch_size=16, num_patches=256,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True),
        "top": {},
    },
}
_ARCH_NAMES = {"siglip": "SiglipModel", "clip": "CLIPModel", "siglip2": "Siglip2Model"}
# Vision front-ends of VLMs (vision tower + connector): one module per family,
# ``vlm_jax/interop/hf_<family>.py``, found by config.json's model_type. Each defines
#   load(path, hf_cfg, overrides=None) -> (model, variables)   (reads no language-model weights)
#   image_features(model, variables, **processor_outputs)      (= transformers' get_image_features)
# and its models carry the class attribute ``hf_family`` (the module's name), by which
# ``image_features`` finds the module again.
_FAMILIES = {
    "llava": "hf_llava",
    "paligemma": "hf_paligemma",
    "blip-2": "hf_blip2",
    "blip_2_qformer": "hf_blip2",
    "idefics3": "hf_idefics3",
    "idefics2": "hf_idefics2",
    "idefics2_perceiver": "hf_idefics2",
}


def _family(name: str):
    return importlib.import_module(f"vlm_jax.interop.{name}")


# Buffers older transformers versions wrote into checkpoints; they carry no weights.
_IGNORED_SUFFIXES = ("position_ids",)


# ---------------------------------------------------------------- configs

def read_config(path: str) -> dict:
    """config.json of a save_pretrained directory as a dict (sub-configs merged as transformers does)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} not found: expected a transformers save_pretrained directory")
    with open(file) as f:
        cfg = json.load(f)
    for sub in ("text", "vision"):  # very old CLIP configs carry *_config_dict overrides
        if isinstance(cfg.get(f"{sub}_config_dict"), Mapping):
            cfg[f"{sub}_config"] = {**(cfg.get(f"{sub}_config") or {}), **cfg[f"{sub}_config_dict"]}
    return cfg


def _arch_of_hf(cfg: Mapping, source: str) -> str:
    mt = cfg.get("model_type")
    if mt in HF_DEFAULTS:
        return mt
    archs = cfg.get("architectures") or []
    for kind, name in _ARCH_NAMES.items():
        if name in archs:
            return kind
    raise ValueError(f"{source}: model_type={mt!r} / architectures={archs!r} is not one of "
                     f"{sorted(_ARCH_NAMES.values())} (model_type {sorted(HF_DEFAULTS)})")


def _act(name: str, field: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ValueError(f"{field}={name!r} has no vlm_jax counterpart; supported: "
                         f"{sorted(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


def _square(v, field: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{field}={v!r}: only square sizes are supported")
        v = v[0]
    return int(v)


def model_config(hf_cfg: Mapping | str) -> ml_collections.ConfigDict:
    """transformers config (dict, or a directory / config.json path) -> vlm_jax model config.

    Returns ``models.default_config()`` with every field set for the checkpoint's
    architecture (SigLIP: MAP pooling, last-token text pooling, logit bias;
    SigLIP2: the same with image.type "naflex", posemb_size = sqrt(num_patches);
    CLIP: pre-norm, CLS pooling, causal EOS-pooled text, bias-free projections, no bias).
    """
    source = hf_cfg if isinstance(hf_cfg, str) else "transformers config"
    if isinstance(hf_cfg, str):
        hf_cfg = read_config(hf_cfg)
    kind = _arch_of_hf(hf_cfg, source)
    d = HF_DEFAULTS[kind]
    top = {**d["top"], **{k: v for k, v in hf_cfg.items() if k in d["top"] and v is not None}}
    tc = {**d["text"], **{k: v for k, v in (hf_cfg.get("text_config") or {}).items() if v is not None}}
    vc = {**d["vision"], **{k: v for k, v in (hf_cfg.get("vision_config") or {}).items()
                           if v is not None}}
    cfg = models.default_config()
    img, txt = cfg.image, cfg.text
    img.variant = txt.variant = None
    for sec, hc, name in ((img, vc, "vision_config"), (txt, tc, "text_config")):
        sec.width = int(hc["hidden_size"])
        sec.depth = int(hc["num_hidden_layers"])
        sec.mlp_dim = int(hc["intermediate_size"])
        sec.num_heads = int(hc["num_attention_heads"])
        sec.act = _act(hc["hidden_act"], f"{name}.hidden_act")
        sec.ln_eps = float(hc["layer_norm_eps"])
    img.patch_size = _square(vc["patch_size"], "vision_config.patch_size")
    if kind == "siglip2":
        grid = math.isqrt(int(vc["num_patches"]))
        if grid * grid != int(vc["num_patches"]):
            raise ValueError(f"{source}: vision_config.num_patches={vc['num_patches']} is not a "
                             "square number (the NaFlex posemb is a square grid)")
        img.type, img.posemb, img.posemb_size = "naflex", "naflex", grid
        img.image_size = grid * img.patch_size  # only the size of init's dummy images
    else:
        img.image_size = _square(vc["image_size"], "vision_config.image_size")
    txt.vocab_size = int(tc["vocab_size"])
    txt.max_len = int(tc["max_position_embeddings"])

    if kind in ("siglip", "siglip2"):
        if not vc["vision_use_head"]:
            raise ValueError(f"{source}: vision_config.vision_use_head=False gives no image "
                             "embedding; only SigLIP models with the MAP head are supported")
        img.pool_type = "map"
        cfg.out_dim = int(tc["projection_size"] or tc["hidden_size"])
        if cfg.out_dim != img.width:
            raise ValueError(f"{source}: text_config.projection_size={cfg.out_dim} differs from "
                             f"vision_config.hidden_size={img.width}; SigLIP has no image projection")
        cfg.temperature_init, cfg.bias_init = 10.0, -10.0
    else:  # clip
        img.update(pool_type="tok", pre_norm=True, patch_bias=False, head=True, head_bias=False)
        txt.update(causal=True, pool_type="eos", head_bias=False)
        cfg.out_dim = int(top["projection_dim"])
        cfg.temperature_init = float(math.exp(top["logit_scale_init_value"]))
        cfg.bias_init = None
        eos = tc.get("eos_token_id")
        if eos not in (2, txt.vocab_size - 1):
            warnings.warn(
                f"{source}: text_config.eos_token_id={eos!r}: transformers pools the text at the "
                "first EOS token while vlm_jax pools at the largest token id; pass "
                f"eos_token_id={eos!r} to hf.text_features to pool as transformers does",
                stacklevel=2)
    return cfg


def _arch_of_model(model: TwoTower) -> str:
    """Which transformers architecture ``model`` fits; ValueError listing what does not fit."""
    if not isinstance(model, TwoTower):
        raise ValueError(f"expected a vlm_jax TwoTower model, got {type(model).__name__}")
    img, txt = model.image, model.text
    if not isinstance(img, (ViT, NaViT)) or not isinstance(txt, TextTransformer):
        raise ValueError(f"model towers {type(img).__name__}/{type(txt).__name__} have no "
                         "transformers counterpart (ViT or NaViT + TextTransformer are supported)")
    siglip_text = dict(causal=False, pool_type="last", head_bias=True)
    if isinstance(img, NaViT):
        bad = [f"image.{k}={getattr(img, k)!r} (needs {v!r})"
               for k, v in dict(posemb="naflex", pool_type="map", head=None, patch_bias=True).items()
               if getattr(img, k) != v]
        bad += [f"text.{k}={getattr(txt, k)!r} (needs {v!r})" for k, v in siglip_text.items()
                if getattr(txt, k) != v]
        if model.bias_init is None:
            bad.append("bias_init=None (needs a value)")
        if bad:
            raise ValueError("model has no transformers counterpart:\n  as Siglip2Model: "
                             + "; ".join(bad))
        return "siglip2"
    common = dict(posemb="learn", stem="patch")
    wants = {
        "siglip": ({**common, "pool_type": "map", "head": None, "patch_bias": True,
                    "pre_norm": False},
                   dict(causal=False, pool_type="last", head_bias=True), True),
        "clip": ({**common, "pool_type": "tok", "head_bias": False, "patch_bias": False,
                  "pre_norm": True},
                 dict(causal=True, pool_type="eos", head_bias=False), False),
    }
    problems = {}
    for kind, (wi, wt, has_bias) in wants.items():
        bad = [f"image.{k}={getattr(img, k)!r} (needs {v!r})" for k, v in wi.items()
               if getattr(img, k) != v]
        bad += [f"text.{k}={getattr(txt, k)!r} (needs {v!r})" for k, v in wt.items()
                if getattr(txt, k) != v]
        if kind == "clip" and img.head is None:
            bad.append("image.head=None (needs a projection)")
        if (model.bias_init is not None) != has_bias:
            bad.append(f"bias_init={model.bias_init!r} (needs {'a value' if has_bias else 'None'})")
        if not bad:
            return kind
        problems[kind] = bad
    raise ValueError("model has no transformers counterpart:\n" + "\n".join(
        f"  as {_ARCH_NAMES[k]}: " + "; ".join(v) for k, v in problems.items()))


def hf_config(model: TwoTower, *, num_channels: int = 3, bos_token_id: int | None = None,
              eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict:
    """The transformers config.json dict for ``model`` (SiglipModel, Siglip2Model or CLIPModel).

    Token ids are only metadata for SigLIP (it pools the last position); for CLIP
    the EOS id decides the pooled position in transformers and defaults to
    vocab_size - 1, which matches vlm_jax's argmax pooling when EOS is the largest id.
    """
    kind = _arch_of_model(model)
    img, txt = model.image, model.text
    out_dim = txt.head
    shared = lambda m: dict(  # noqa: E731
        hidden_size=m.width, intermediate_size=m.mlp_dim, num_hidden_layers=m.depth,
        num_attention_heads=m.num_heads, hidden_act=_ACT_TO_HF[m.act],
        layer_norm_eps=m.ln_eps, attention_dropout=0.0)
    vision = dict(shared(img), num_channels=num_channels,
                  patch_size=_square(img.patch_size, "model.image.patch_size"))
    text = dict(shared(txt), vocab_size=txt.vocab_size, max_position_embeddings=txt.max_len)
    if kind in ("siglip", "siglip2"):
        text.update(model_type=f"{kind}_text_model", projection_size=out_dim,
                    bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        vision.update(model_type=f"{kind}_vision_model", vision_use_head=True)
        if kind == "siglip":
            vision["image_size"] = _square(img.image_size, "model.image.image_size")
        else:
            vision["num_patches"] = img.posemb_size ** 2
            vision["num_channels"] = img.channels
        return dict(architectures=[_ARCH_NAMES[kind]], model_type=kind, dtype="float32",
                    initializer_factor=1.0, text_config=text, vision_config=vision)
    vision["image_size"] = _square(img.image_size, "model.image.image_size")
    eos = txt.vocab_size - 1 if eos_token_id is None else eos_token_id
    if eos not in (2, txt.vocab_size - 1):
        warnings.warn(f"eos_token_id={eos}: transformers' CLIP pools at the first EOS token, "
                      "vlm_jax at the largest token id; outputs agree only where they coincide",
                      stacklevel=2)
    text.update(model_type="clip_text_model", projection_dim=out_dim, eos_token_id=eos,
                bos_token_id=txt.vocab_size - 2 if bos_token_id is None else bos_token_id,
                pad_token_id=pad_token_id)
    vision.update(model_type="clip_vision_model", projection_dim=out_dim)
    return dict(architectures=["CLIPModel"], model_type="clip", dtype="float32",
                initializer_factor=1.0, projection_dim=out_dim,
                logit_scale_init_value=float(math.log(model.temperature_init)),
                text_config=text, vision_config=vision)


# ---------------------------------------------------------------- weight layout

def _map_head(hf: str, ours: str, heads: int) -> list[Rule]:
    """The MAP head's torch.nn.MultiheadAttention packs q/k/v into one in_proj."""
    rules = packed_attention(f"{hf}.attention", f"{ours}/MultiHeadDotProductAttention_0", heads)
    rules.append(one(f"{hf}.probe", f"{ours}/probe"))
    rules += layernorm(f"{hf}.layernorm", f"{ours}/LayerNorm_0")
    rules += linear(f"{hf}.mlp.fc1", f"{ours}/MlpBlock_0/Dense_0")
    rules += linear(f"{hf}.mlp.fc2", f"{ours}/MlpBlock_0/Dense_1")
    return rules


def vision_rules(kind: str, tower, hf: str = "vision_model", ours: str = "img",
                 head: bool = True) -> list[Rule]:
    """Tensor correspondences of a transformers SigLIP / SigLIP2 / CLIP vision tower.

    ``hf``: the torch key prefix of the vision model ("vision_model" inside SiglipModel /
    CLIPModel; "" for the keys of a bare SiglipVisionModel / CLIPVisionModel as
    transformers 5.x saves them inside a VLM); ``ours``: the '/'-joined path of our
    tower (a ViT, or a NaViT for "siglip2"). ``head``: include SigLIP's MAP head
    (our tower then has pool_type "map"). Used by the VLM family modules as well.
    """
    v = f"{hf}." if hf else ""
    if kind == "siglip2":  # NaFlex: Linear on flattened (row, col, channel) patches
        patch = (T, T)
    else:  # Conv2d [D, C, p, p] <-> [p, p, C, D]
        patch = (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
    rules = [
        one(f"{v}embeddings.patch_embedding.weight", f"{ours}/embedding/kernel", *patch),
        *hf_encoder(f"{v}encoder", f"{ours}/Transformer", tower.depth, tower.num_heads),
        *layernorm(f"{v}post_layernorm", f"{ours}/Transformer/encoder_norm"),
    ]
    if kind in ("siglip", "siglip2"):
        rules += [
            one(f"{v}embeddings.patch_embedding.bias", f"{ours}/embedding/bias"),
            one(f"{v}embeddings.position_embedding.weight", f"{ours}/pos_embedding",
                 add_batch, drop_batch),
        ]
        if head:
            rules += _map_head(f"{v}head", f"{ours}/MAPHead_0", tower.num_heads)
    elif kind == "clip":
        def cls_to_ours(xs):
            c, pe = xs
            return [(c + pe[0])[None, None], pe[1:][None]]

        def cls_to_hf(ys):
            cls, pe = ys
            return [cls.reshape(-1), np.concatenate([np.zeros_like(pe[0, :1]), pe[0]], axis=0)]

        rules += [
            Rule((f"{v}embeddings.class_embedding", f"{v}embeddings.position_embedding.weight"),
                  (f"{ours}/cls", f"{ours}/pos_embedding"), cls_to_ours, cls_to_hf),
            *layernorm(f"{v}pre_layrnorm", f"{ours}/pre_norm"),
        ]
    else:
        raise NotImplementedError(f"no weight layout for {kind!r}")
    return rules


def _rules(kind: str, model: TwoTower) -> list[Rule]:
    """Every tensor correspondence for ``model`` laid out as transformers' ``kind``."""
    txt = model.text
    t = "text_model"
    rules = [
        *vision_rules(kind, model.image, "vision_model", "img"),
        one(f"{t}.embeddings.token_embedding.weight", "txt/Embed_0/embedding"),
        one(f"{t}.embeddings.position_embedding.weight", "txt/pos_embedding",
             add_batch, drop_batch),
        *hf_encoder(f"{t}.encoder", "txt/Transformer", txt.depth, txt.num_heads),
        *layernorm(f"{t}.final_layer_norm", "txt/Transformer/encoder_norm"),
    ]
    if kind in ("siglip", "siglip2"):
        rules += [
            *linear(f"{t}.head", "txt/head"),
            one("logit_scale", "t"),
            one("logit_bias", "b"),
        ]
    else:  # clip
        rules += [
            *linear("visual_projection", "img/head", bias=False),
            *linear("text_projection", "txt/head", bias=False),
            one("logit_scale", "t", lambda x: np.reshape(x, (1,)), lambda y: np.reshape(y, ())),
        ]
    return rules


def _abstract_params(model: TwoTower, cfg) -> dict:
    recipe = ml_collections.ConfigDict({"model": cfg})
    return models.abstract_variables(model, recipe)["params"]


def _expected_shapes(abstract: Mapping) -> dict[str, tuple]:
    """{path: shape} in the unrolled layout the weight rules use (``models/scan.py``)."""
    return {k: tuple(a.shape) for k, a in flatten(scan.to_unrolled(abstract)).items()}


def _to_ours(kind: str, model: TwoTower, tensors: Mapping[str, np.ndarray],
             expected: Mapping[str, tuple], source: str) -> dict[str, np.ndarray]:
    return apply_rules(_rules(kind, model), tensors, expected, f"{source} ({_ARCH_NAMES[kind]})",
                       ignored_suffixes=_IGNORED_SUFFIXES)


# ---------------------------------------------------------------- public API

def load(path: str, *, overrides: Mapping | None = None) -> tuple[TwoTower, dict]:
    """Read a transformers save_pretrained directory -> (model, variables).

    path: directory with config.json and model.safetensors (or sharded
    model.safetensors.index.json) of a SiglipModel, Siglip2Model (-> a NaFlex
    image tower, model.image.type "naflex") or CLIPModel; or of a VLM whose
    vision front-end a family module reads (see ``_FAMILIES``: LLaVA, PaliGemma,
    BLIP-2, Idefics2, Idefics3, and standalone Q-Former / Perceiver Resampler).
    overrides: model-config fields to change that do not affect the weights,
    e.g. {"dtype": "bfloat16", "image": {"remat": True, "scan": True}}.
    Returns an unbound ``TwoTower`` and {"params": ...} of float32 jax arrays, in
    the model's layer layout (scanned stacks with model.*.scan; see models/scan.py).
    Raises CheckpointMismatchError (missing / unexpected keys, shape mismatches)
    when the tensors do not fit the architecture described by config.json.
    """
    hf_cfg = read_config(path)
    if hf_cfg.get("model_type") in _FAMILIES:
        return _family(_FAMILIES[hf_cfg["model_type"]]).load(path, hf_cfg, overrides=overrides)
    kind = _arch_of_hf(hf_cfg, path)
    cfg = model_config(hf_cfg)
    if overrides:
        cfg = ml_collections.ConfigDict(_merged(cfg, overrides))
    model = models.build(cfg)
    tensors = read_safetensors(path)
    abstract = _abstract_params(model, cfg)
    flat = _to_ours(kind, model, tensors, _expected_shapes(abstract), path)
    params = scan.match_layout(jax.tree.map(jnp.asarray, unflatten(flat)), abstract)
    return model, {"params": params}


def _merged(cfg: ml_collections.ConfigDict, overrides: Mapping) -> dict:
    out = cfg.to_dict()

    def merge(dst, src, where):
        for k, v in src.items():
            if k not in dst:
                raise ValueError(f"unknown model config key {where}{k}")
            if isinstance(dst[k], dict):
                merge(dst[k], v, f"{where}{k}.")
            else:
                dst[k] = v
    merge(out, dict(overrides), "model.")
    return out


def save(model: TwoTower, variables: Mapping, path: str, **token_ids) -> str:
    """Write ``model``'s weights as a transformers save_pretrained directory; returns ``path``.

    Writes path/config.json and path/model.safetensors (float32) in the
    SiglipModel (MAP-pooled ViT, last-token text, logit bias), Siglip2Model
    (the same with a NaFlex tower) or CLIPModel (pre-norm CLS ViT with
    projection, causal EOS-pooled text, no bias) layout, whichever the model
    fits; any other model raises ValueError naming the fields that do not fit.
    Params that do not fit the model raise CheckpointMismatchError.
    ``token_ids``: optional bos_token_id / eos_token_id / pad_token_id for the
    text config (see ``hf_config``). ``AutoModel.from_pretrained(path)`` then
    gives the same features and logits. Scanned (stacked) encoders are unstacked.
    """
    kind = _arch_of_model(model)
    params = scan.to_unrolled(variables["params"] if "params" in variables else variables)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
    channels = 3
    if kind != "siglip2" and "img/embedding/kernel" in flat:
        channels = int(flat["img/embedding/kernel"].shape[2])
    cfg = hf_config(model, num_channels=channels, **token_ids)
    expected = _abstract_shapes(model, channels)
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    wrong = [(k, flat[k].shape, expected[k]) for k in sorted(set(flat) & set(expected))
             if flat[k].shape != expected[k]]
    if missing or extra or wrong:
        raise CheckpointMismatchError("variables passed to hf.save", missing, extra, wrong)
    tensors = {}
    for rule in _rules(kind, model):
        tensors.update(zip(rule.hf, rule.to_hf([flat[p] for p in rule.ours])))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    write_safetensors(tensors, os.path.join(path, "model.safetensors"))
    return path


def _abstract_shapes(model: TwoTower, channels: int) -> dict[str, tuple]:
    """{path: shape} of the params ``model.init`` creates (traced, nothing allocated)."""
    img = model.image
    size = img.image_size
    h, w = (size, size) if np.isscalar(size) else size
    images = jax.ShapeDtypeStruct((1, h, w, channels), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, model.text.max_len), jnp.int32)
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                              images, tokens)
    params = scan.to_unrolled(nn.meta.unbox(abstract)["params"])
    return {k: tuple(a.shape) for k, a in flatten(params).items()}


def _numpy(x) -> np.ndarray:
    """numpy / jax / (CPU) torch arrays -> numpy, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)


@functools.lru_cache(maxsize=16)
def _image_fn(model: TwoTower):
    def run(params, x):
        y = model.apply({"params": params}, x, method="encode_image")
        return y[:, 0] if y.ndim == 3 else y  # NaFlex: one image slot per row
    return jax.jit(run)


def naflex_batch(pixel_values, pixel_attention_mask, spatial_shapes) -> dict[str, np.ndarray]:
    """Siglip2 image-processor outputs -> a packed NaViT batch with one image per row.

    pixel_values [B, N, P*P*C] (patches row-major over each image's grid, then
    padding), pixel_attention_mask [B, N] (1 = patch), spatial_shapes [B, 2]
    (patch rows, cols) -> {"patches", "segment_ids", "positions", "grid_sizes"}.
    """
    x = _numpy(pixel_values).astype(np.float32)
    mask = _numpy(pixel_attention_mask).astype(bool)
    shapes = _numpy(spatial_shapes).astype(np.int32)
    if x.ndim != 3 or mask.shape != x.shape[:2] or shapes.shape != (x.shape[0], 2):
        raise ValueError(f"SigLIP2 inputs must be pixel_values [B, N, P*P*C], "
                         f"pixel_attention_mask [B, N], spatial_shapes [B, 2]; got "
                         f"{x.shape}, {mask.shape}, {shapes.shape}")
    n_valid = mask.sum(1)
    if np.any(n_valid != shapes.prod(1)):
        raise ValueError(f"pixel_attention_mask counts {n_valid.tolist()} patches but "
                         f"spatial_shapes give {shapes.prod(1).tolist()}")
    idx = np.arange(x.shape[1])[None]
    cols = np.maximum(shapes[:, 1:2], 1)
    positions = np.stack([idx // cols, idx % cols], -1) * mask[..., None]
    return {"patches": x, "segment_ids": mask.astype(np.int32),
            "positions": positions.astype(np.int32), "grid_sizes": shapes[:, None, :]}


def image_features(model: TwoTower, variables: Mapping, pixel_values=None,
                   pixel_attention_mask=None, spatial_shapes=None, **processor_outputs):
    """Image embeddings [B, D] (float32, not normalised) = transformers' get_image_features.

    Takes what the transformers image processor returns (numpy or torch):
    SigLIP / CLIP: pixel_values float [B, C, H, W]. Sizes other than the model's
    image_size work (the learned posemb is resized bilinearly, where transformers
    would need interpolate_pos_encoding and resizes bicubically).
    SigLIP2 (NaFlex tower): pixel_values [B, N, P*P*C], pixel_attention_mask [B, N]
    and spatial_shapes [B, 2] (see ``naflex_batch``).
    A VLM front-end (LLaVA, PaliGemma, BLIP-2, Idefics3, ...) returns what its
    family's module computes: what the language model receives for the images.
    """
    family = getattr(model, "hf_family", None)
    if family is not None:
        kw = {k: v for k, v in (("pixel_values", pixel_values),
                                ("pixel_attention_mask", pixel_attention_mask),
                                ("spatial_shapes", spatial_shapes)) if v is not None}
        return _family(family).image_features(model, variables, **kw, **processor_outputs)
    if processor_outputs:
        raise ValueError(f"unexpected inputs {sorted(processor_outputs)} for a "
                         f"{type(model).__name__}")
    if pixel_values is None:
        raise ValueError("image_features needs pixel_values")
    if isinstance(model.image, NaViT):
        if pixel_attention_mask is None or spatial_shapes is None:
            raise ValueError("a NaFlex (SigLIP2) model needs pixel_values, pixel_attention_mask "
                             "and spatial_shapes, as the Siglip2 image processor returns them")
        batch = naflex_batch(pixel_values, pixel_attention_mask, spatial_shapes)
        return np.asarray(_image_fn(model)(variables["params"], batch), np.float32)
    if pixel_attention_mask is not None or spatial_shapes is not None:
        raise ValueError("pixel_attention_mask / spatial_shapes are SigLIP2 inputs, but this "
                         "model has a fixed-size ViT image tower")
    x = _numpy(pixel_values)
    if x.ndim != 4:
        raise ValueError(f"pixel_values must be [B, C, H, W], got shape {x.shape}")
    x = np.transpose(x, (0, 2, 3, 1)).astype(np.float32)
    return np.asarray(_image_fn(model)(variables["params"], x), np.float32)


def _masked_attention(key_mask, inner):
    """attention_fn that also hides padded keys (key_mask [B, L], True = token)."""
    def fn(query, key, value, mask=None, dtype=None):
        pad = key_mask[:, None, None, :]
        mask = pad if mask is None else jnp.logical_and(mask, pad)
        return inner(query, key, value, mask=mask, dtype=dtype)
    return fn


@functools.lru_cache(maxsize=16)
def _text_fn(model: TwoTower, masked: bool, eos_token_id: int | None):
    txt = model.text

    def run(params, ids, key_mask):
        tower = txt
        if masked:
            tower = txt.clone(attention_fn=_masked_attention(
                key_mask, txt.attention_fn or layers.dot_product_attention_f32))
        x, out = tower.apply({"params": params}, ids)
        if eos_token_id is None:
            return x
        # transformers' CLIP: first occurrence of eos_token_id (0 when absent).
        pos = jnp.argmax(ids == eos_token_id, axis=-1)
        pooled = out["encoded"][jnp.arange(ids.shape[0]), pos]
        head = params["head"]
        y = pooled @ head["kernel"].astype(pooled.dtype)
        return y + head["bias"].astype(y.dtype) if "bias" in head else y

    return jax.jit(run)


def text_features(model: TwoTower, variables: Mapping, input_ids, attention_mask=None, *,
                  eos_token_id: int | None = None) -> np.ndarray:
    """Text embeddings [B, D] (float32, not normalised) = transformers' get_text_features.

    input_ids int [B, L] (L <= max_len); attention_mask [B, L] (1 = token, 0 =
    padding) hides padded keys as transformers does. ``eos_token_id``: for CLIP
    checkpoints whose EOS is not the largest token id, pool at its first
    occurrence (transformers' rule) instead of at the largest id.
    """
    ids = _numpy(input_ids).astype(np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {ids.shape}")
    mask = None if attention_mask is None else _numpy(attention_mask).astype(bool)
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    masked = mask is not None and not mask.all()
    if eos_token_id is not None and (model.text.pool_type != "eos" or eos_token_id == 2):
        eos_token_id = None  # transformers pools by argmax / position then, as vlm_jax does
    fn = _text_fn(model, masked, eos_token_id)
    km = mask if masked else np.ones_like(ids, bool)
    return np.asarray(fn(variables["params"]["txt"], ids, km), np.float32)
