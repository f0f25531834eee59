"""Idefics3 / SmolVLM vision front-ends from transformers directories (model_type "idefics3").

    model, variables = hf.load("smolvlm-dir")     # Idefics3ForConditionalGeneration / Idefics3Model
    feats = hf.image_features(model, variables, pixel_values=pv, pixel_attention_mask=pam)
        # = transformers' get_image_features(pv, pam).pooler_output, as numpy

What is built (``models/idefics_vision.py``): ``Idefics3FrontEnd`` = the Idefics3
vision transformer (patch conv with bias, bucketed fractional position ids into a
G x G table, encoder whose attention hides padding patches, post_layernorm) and
the connector (``pixel_shuffle`` by config.scale_factor, then
``modality_projection.proj``, a Linear without bias). The language model's
tensors are never read.

Key layouts (both accepted; P is "model." or ""):

    P vision_model.embeddings.patch_embedding.{weight [D, C, p, p], bias}
                                              -> tower/embedding/{kernel [p, p, C, D], bias}
    P vision_model.embeddings.position_embedding.weight [G*G, D]
                                              -> tower/pos_embedding [G*G, D]
    P vision_model.encoder.layers.{i}...      -> tower/Transformer/encoderblock_{i}/...
    P vision_model.post_layernorm             -> tower/Transformer/encoder_norm
    P connector.modality_projection.proj.weight [d_llm, D*s*s]
                                              -> connector/proj/kernel [D*s*s, d_llm]

P = "model." is what transformers 5.x ``Idefics3ForConditionalGeneration.save_pretrained``
writes (and the hub's SmolVLM / Idefics3 checkpoints use); P = "" is a saved
``Idefics3Model`` (the base model without lm_head), which from_pretrained also
loads into the generation class.
"""

from __future__ import annotations

import functools
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.interop import flatten, unflatten
from vlm_jax.interop.torch_layout import (
    apply_rules, hf_encoder, layernorm, linear, one, read_safetensors)
from vlm_jax.models.idefics_vision import Idefics3FrontEnd, IdeficsVisionTower
from vlm_jax.models.pixel_shuffle import PixelShuffleProjector, grid_side

__all__ = ["load", "image_features", "build", "VISION_DEFAULTS", "DEFAULTS", "prepare_images"]

# Defaults of transformers' Idefics3VisionConfig / Idefics3Config (a config.json may omit them).
VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=16, num_channels=3, image_size=224, patch_size=32,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
DEFAULTS = dict(scale_factor=2)
_TEXT_HIDDEN_DEFAULT = 4096  # the default text config is Llama's (hidden_size 4096)

_PREFIXES = ("model.", "")
_PARTS = ("vision_model.", "connector.")


def _dtype(v):
    return jnp.dtype(v) if isinstance(v, str) else v


def build(hf_cfg: Mapping, overrides: Mapping | None = None) -> Idefics3FrontEnd:
    """The ``Idefics3FrontEnd`` for a transformers Idefics3 config dict.

    ``overrides`` (fields that do not change the weights): "dtype" (e.g.
    "bfloat16"), "remat" (bool), "bucket_lanes" (see
    ``idefics_vision.bucket_boundaries``), also accepted inside an "image" dict
    as ``hf.load`` documents. Unknown keys raise ValueError.
    """
    from vlm_jax.interop.hf import _act, _square

    vc = {**VISION_DEFAULTS, **{k: v for k, v in (hf_cfg.get("vision_config") or {}).items()
                                if v is not None}}
    tc = hf_cfg.get("text_config") or {}
    scale = hf_cfg.get("scale_factor")
    scale = DEFAULTS["scale_factor"] if scale is None else scale
    out_dim = tc.get("hidden_size") or _TEXT_HIDDEN_DEFAULT
    ov = dict(overrides or {})
    image = ov.pop("image", None) or {}  # hf.load's {"image": {"remat": True}} form
    ov.update({k: v for k, v in dict(image).items()})
    unknown = sorted(set(ov) - {"dtype", "remat", "bucket_lanes"})
    if unknown:
        raise ValueError(f"unknown Idefics3 override(s) {unknown}; supported: dtype, remat, "
                         "bucket_lanes")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"config scale_factor={scale!r} must be a positive int")
    dtype = _dtype(ov.get("dtype", jnp.float32))
    patch = _square(vc["patch_size"], "vision_config.patch_size")
    size = _square(vc["image_size"], "vision_config.image_size")
    if size < patch:
        raise ValueError(f"vision_config.image_size={size} is smaller than patch_size={patch}")
    tower = IdeficsVisionTower(
        width=int(vc["hidden_size"]), depth=int(vc["num_hidden_layers"]),
        mlp_dim=int(vc["intermediate_size"]), num_heads=int(vc["num_attention_heads"]),
        patch_size=patch, image_size=size, act=_act(vc["hidden_act"], "vision_config.hidden_act"),
        ln_eps=float(vc["layer_norm_eps"]), remat=bool(ov.get("remat", False)),
        bucket_lanes=ov.get("bucket_lanes"), dtype=dtype)
    return Idefics3FrontEnd(tower=tower, connector=PixelShuffleProjector(
        out_dim=int(out_dim), scale=scale, use_bias=False, dtype=dtype))


def _rules(model: Idefics3FrontEnd, prefix: str):
    t, v = model.tower, f"{prefix}vision_model"
    patch = (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
    return [
        one(f"{v}.embeddings.patch_embedding.weight", "tower/embedding/kernel", *patch),
        one(f"{v}.embeddings.patch_embedding.bias", "tower/embedding/bias"),
        one(f"{v}.embeddings.position_embedding.weight", "tower/pos_embedding"),
        *hf_encoder(f"{v}.encoder", "tower/Transformer", t.depth, t.num_heads),
        *layernorm(f"{v}.post_layernorm", "tower/Transformer/encoder_norm"),
        *linear(f"{prefix}connector.modality_projection.proj", "connector/proj", bias=False),
    ]


def _expected_shapes(model: Idefics3FrontEnd, channels: int) -> dict[str, tuple]:
    # The smallest square image the connector accepts: scale x scale patches.
    n = model.connector.scale * model.tower.patch_size
    images = jax.ShapeDtypeStruct((1, n, n, channels), jnp.float32)
    abstract = jax.eval_shape(lambda im: model.init(jax.random.key(0), im), images)
    return {k: tuple(a.shape) for k, a in flatten(nn.meta.unbox(abstract)["params"]).items()}


def _vision_key(k: str) -> bool:
    return any(k.startswith(p + part) for p in _PREFIXES for part in _PARTS)


def load(path: str, hf_cfg: Mapping, overrides: Mapping | None = None):
    """An Idefics3 directory -> (``Idefics3FrontEnd``, {"params": ...}) of float32 jax arrays.

    Reads only the vision_model / connector tensors (with or without the "model."
    prefix; see the module docstring). CheckpointMismatchError when they do not
    fit the config; ValueError when the file mixes both layouts.
    """
    model = build(hf_cfg, overrides)
    tensors = read_safetensors(path, keep=_vision_key)
    found = sorted({p for k in tensors for p in _PREFIXES
                    if any(k.startswith(p + part) for part in _PARTS)})
    if len(found) > 1:
        raise ValueError(f"{path}: vision tensors in both key layouts ('model.vision_model...' "
                         "and 'vision_model...'); expected one")
    prefix = found[0] if found else "model."
    vc = {**VISION_DEFAULTS, **(hf_cfg.get("vision_config") or {})}
    expected = _expected_shapes(model, int(vc["num_channels"] or 3))
    flat = apply_rules(_rules(model, prefix), tensors, expected,
                       f"{path} (Idefics3ForConditionalGeneration vision side)")
    return model, {"params": jax.tree.map(jnp.asarray, unflatten(flat))}


def _numpy(x) -> np.ndarray:
    """numpy / jax / CPU torch arrays (bfloat16 widened to float32) -> numpy, without torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
    return np.asarray(x)


def prepare_images(model: Idefics3FrontEnd, pixel_values, pixel_attention_mask=None):
    """Processor outputs -> (images [n, H, W, C] float32, patch_mask [n, H/p, W/p] bool, counts [B]).

    pixel_values [B, N, C, H, W]; pixel_attention_mask [B, N, H, W] (1 = real pixel)
    or None (all real). See ``split_frames``; in Idefics3 a patch is real when any
    of its pixels is.
    """
    return split_frames(model.tower.patch_size, pixel_values, pixel_attention_mask, "any")


def split_frames(patch_size: int, pixel_values, pixel_attention_mask=None,
                 real_patch: str = "any"):
    """Idefics-style image batches -> (images [n, H, W, C] float32, patch_mask [n, H/p, W/p]
    bool, counts [B]).

    Images whose pixels are all exactly 0 are padding frames and are dropped;
    ``counts`` is the number of real images per sample. A patch is real when
    ``real_patch`` ("any": Idefics3; "all": Idefics2) of its pixels are real in
    pixel_attention_mask (extra rows / columns beyond a multiple of the patch size
    are ignored, as the patch conv does).
    """
    pv = _numpy(pixel_values).astype(np.float32)
    if pv.ndim != 5:
        raise ValueError(f"pixel_values must be [B, N_images, C, H, W] (Idefics processor "
                         f"output), got shape {pv.shape}")
    b, n, c, h, w = pv.shape
    flat = pv.reshape(b * n, c, h, w)
    real = ~np.all(flat == 0.0, axis=(1, 2, 3))
    counts = real.reshape(b, n).sum(axis=1)
    images = np.transpose(flat[real], (0, 2, 3, 1))
    p = int(patch_size)
    if h < p or w < p:
        raise ValueError(f"images {h}x{w} are smaller than one {p}x{p} patch")
    if pixel_attention_mask is None:
        pmask = np.ones((images.shape[0], h // p, w // p), bool)
    else:
        m = _numpy(pixel_attention_mask)
        if m.shape != (b, n, h, w):
            raise ValueError(f"pixel_attention_mask shape {m.shape} != [B, N_images, H, W] = "
                             f"{(b, n, h, w)}")
        m = m.reshape(b * n, h, w)[real][:, :h // p * p, :w // p * p] != 0
        blocks = m.reshape(-1, h // p, p, w // p, p)
        pmask = blocks.all(axis=(2, 4)) if real_patch == "all" else blocks.any(axis=(2, 4))
    return images, pmask, counts


@functools.lru_cache(maxsize=16)
def _features_fn(model: Idefics3FrontEnd):
    return jax.jit(lambda params, x, m: model.apply({"params": params}, x, m)[0])


# Other outputs of Idefics3Processor / Idefics3ImageProcessor: not inputs of get_image_features.
_IGNORED_INPUTS = ("input_ids", "attention_mask", "rows", "cols")


def image_features(model: Idefics3FrontEnd, variables: Mapping, pixel_values=None,
                   pixel_attention_mask=None, **processor_outputs) -> list[np.ndarray]:
    """What transformers' ``Idefics3ForConditionalGeneration.get_image_features`` returns as
    ``pooler_output``: a list with one float32 numpy array per sample, [n_b * M, d_llm],
    the M = (H/p)(W/p) / scale**2 tokens of each of the sample's n_b real images in order
    (padding frames dropped; a sample with none gets a [0, d_llm] array).

    pixel_values [B, N_images, C, H, W] and pixel_attention_mask [B, N_images, H, W]
    (optional) as the Idefics3 image processor returns them (numpy or torch).
    H/p x W/p must be a square grid whose side the connector's scale divides.
    The processor's text outputs (input_ids, attention_mask) and rows / cols are
    ignored; any other keyword raises ValueError.
    """
    unknown = sorted(set(processor_outputs) - set(_IGNORED_INPUTS))
    if unknown:
        raise ValueError(f"unexpected inputs {unknown} for an Idefics3 front-end (it takes "
                         "pixel_values and pixel_attention_mask)")
    if pixel_values is None:
        raise ValueError("Idefics3 image_features needs pixel_values [B, N_images, C, H, W]")
    images, pmask, counts = prepare_images(model, pixel_values, pixel_attention_mask)
    h, w = pmask.shape[1:]
    if h != w:
        raise ValueError(f"the patch grid {h}x{w} is not square; Idefics3's pixel shuffle "
                         "needs square images")
    grid_side(h * w, model.connector.scale)  # clear error before tracing
    d = model.connector.out_dim
    if images.shape[0] == 0:
        return [np.zeros((0, d), np.float32) for _ in counts]
    feats = np.asarray(_features_fn(model)(variables["params"], images, pmask), np.float32)
    splits = np.cumsum(counts)[:-1]
    return [f.reshape(-1, d) for f in np.split(feats, splits)]
