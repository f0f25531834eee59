"""flax.linen models: ViT, text transformer and the image-text two-tower.

    config.model = vlm_jax.models.default_config()     # every field, locked
    model = vlm_jax.models.build(config.model)          # -> TwoTower
    model, variables = vlm_jax.models.init(config, rng) # plain (unboxed) float32 arrays
    specs = vlm_jax.models.logical_specs(model, config) # logical PartitionSpecs, same tree

Model config schema (``default_config()``; a recipe overrides fields, an unknown
key is an error):

    model.image.type           "vit"      image tower kind: "vit" | "navit" (packed, any size) |
                                          "naflex" (SigLIP 2: one image per row, resized
                                          learned 2-D posemb); see models/navit.py
    model.image.variant        "B/16"     size/patch, see vit.decode_variant
    model.image.width          None       explicit values override the variant
    model.image.depth          None
    model.image.mlp_dim        None
    model.image.num_heads      None
    model.image.patch_size     None       None -> from the variant ("B/16" -> 16)
    model.image.image_size     224        input size the learned posemb is stored for
    model.image.pool_type      "map"      "map" | "gap" | "tok" (CLS) | "none"
    model.image.posemb         "learn"    "learn" | "sincos2d"
    model.image.stem           "patch"    "patch" (conv kernel=stride=patch) | "conv"
    model.image.stem_features  (64, 128, 256)   conv stem: 3x3 conv widths
    model.image.stem_strides   (2, 2, 2)        conv stem: their strides; token grid is
                                                image_size / (prod(strides) * patch_size)
    model.image.head           False      True: Dense(width -> out_dim) after pooling
    model.image.head_bias      True
    model.image.patch_bias     True       bias of the patch-embedding conv
    model.image.pre_norm       False      LayerNorm before the encoder (CLIP)
    model.image.dropout        0.0
    model.image.act            "gelu_tanh"  "gelu_tanh" | "gelu" | "quick_gelu"
    model.image.ln_eps         1e-6
    model.image.remat          False      rematerialise each encoder block (= remat_policy "full")
    model.image.remat_policy   ""         what a block keeps for the backward pass: "none" |
                                          "full" | "dots_saveable" |
                                          "dots_with_no_batch_dims_saveable" | "offload"
                                          (models/scan.py); "" follows remat
    model.image.scan           False      run the encoder blocks as one nn.scan: params
                                          Transformer/encoderblock/... stacked [depth, ...]
                                          (big_vision's layout; faster compiles). Not with
                                          tome_r. ``models.scan.to_scanned`` / ``to_unrolled``
                                          convert params, and loaders convert as needed
    model.image.attention      "reference"  attention kernel of the ViT / NaViT blocks:
                                          "reference" (flax's einsums, float32 softmax) |
                                          "xla" | "cudnn" (fused flash attention, GPU only,
                                          bf16/fp16; other calls run xla) | "auto" (cudnn
                                          on a GPU, else xla):
                                          jax.nn.dot_product_attention backends
    model.image.stem_depths    (3, 4, 9)  stem "resnet" (hybrid ViT, R50+B/16): ResNet stages
    model.image.tome_r         0          Token Merging (models/tome.py): tokens merged per
                                          block, an int or a per-block tuple; 0 = plain ViT
                                          (type "vit" only; a tuple replaces the int default
                                          in a dict config or under ``ignore_type()``)
  CNN towers (type "resnet" | "bit" | "convnext" | "clip_resnet"; models/resnet.py,
  convnext.py, clip_resnet.py). They return pooled features; in a two-tower,
  model.image.head=True projects them to out_dim (clip_resnet's attention pool
  projects by itself). Every tower's ``out`` holds its per-stage features.
    model.image.variant        resnet "18|34|50|101|152", bit "50x1|101x3|...",
                               convnext "tiny|small|base|large",
                               clip_resnet "RN50|RN101|RN50x4|RN50x16|RN50x64"
    model.image.stage_depths   None       blocks per stage (None: from the variant)
    model.image.widths         None       convnext: channels per stage
    model.image.width          None       clip_resnet: stem width (64 for RN50)
    model.image.base_width     64         resnet: root / first-stage channels
    model.image.width_factor   1          resnet: bottleneck width multiplier (wide resnets)
    model.image.bn_momentum    0.9        BatchNorm running-average momentum (flax's
                                          convention; torch's 0.1)
    model.image.bn_eps         1e-5
    model.image.zero_init_residual True   resnet: last BatchNorm scale of each block = 0
    model.image.root           "imagenet" resnet: 7x7/2 conv + max-pool | "small": 3x3/1 conv
                                          (32x32 images)
    model.image.preact         True       bit: ResNet v2 (BiT paper) | False: v1 (big_vision bit.py)
    model.image.drop_path      0.0        convnext: stochastic depth rate of the last block
    model.image.layer_scale_init 1e-6     convnext: layer scale init
    model.image.pool_type      resnet, bit, convnext: "gap" (also for the ViT default "map")
                               | "none" (the last feature map)
  NaViT / NaFlex only (type "navit" | "naflex"):
    model.image.posemb         "learn" | "sincos" (factorized) | "naflex" (type naflex forces it)
    model.image.posemb_coords  "absolute"  "absolute" | "fractional" (factorized posembs)
    model.image.posemb_size    None       learned table side; None -> 64 (factorized) or
                                          image_size // patch_size (naflex grid)
    model.image.seq_len        256        tokens per packed sequence (inference default)
    model.image.max_images     16         image slots per sequence (naflex: always 1)
    model.text.variant         "B"        size, see text.decode_text_variant
    model.text.width/depth/mlp_dim/num_heads   None (override the variant)
    model.text.vocab_size      32000
    model.text.max_len         64
    model.text.pool_type       "last"     "last" | "eos" | "first" | "mean"
    model.text.causal          False      causal attention mask (CLIP)
    model.text.head_bias       True       False for CLIP's text projection
    model.text.dropout         0.0
    model.text.act             "gelu_tanh"
    model.text.ln_eps          1e-6
    model.text.remat           False
    model.text.remat_policy    ""         as model.image.remat_policy
    model.text.attention       "reference"  as model.image.attention
    model.text.scan            False      as model.image.scan (not for a captioner's decoder)
    model.num_classes          None       set: an ImageClassifier (image tower + Dense head,
                                          models/classifier.py) instead of a two-tower; the
                                          classification task fills it from the data
    model.head_init            "zeros"    classifier head init: "zeros" | "lecun"
    model.out_dim              None       shared embedding dim D; None -> text width.
                                          The text tower always ends in Dense(D); the
                                          image tower outputs D via its head, or its
                                          width (must then equal D).
    model.temperature_init     10.0       t is stored as log(t)
    model.bias_init            -10.0      None -> no bias param, b = 0 (CLIP)
    model.dtype                "float32"  compute dtype: "float32" | "bfloat16" | "float16";
                                          params are always float32
  Captioner (task "captioning", models/captioner.py; the decoder takes model.text's
  width / depth / mlp_dim / num_heads / vocab_size / max_len / dropout / act / ln_eps):
    model.captioner.mode       ""         "prefix" (LLaVA) | "cross" (Flamingo); "" = none
    model.captioner.tie_embeddings True   logits from the token embedding; False: a head
    model.captioner.cross_every 1         cross mode: cross-attention every k-th block
    model.captioner.gated      True       cross mode: tanh-gated cross-attention
    model.captioner.gate_init  0.0
    model.captioner.parallel_fraction 0.0 CapPa parallel prediction: rows that see only BOS
    model.connector            (models/connectors.py) type, out_dim (None: decoder width), ...

The default is SigLIP B/16 (203,155,970 params, as transformers' SiglipModel()).

``model.init(rng, *init_inputs(config.model))``: images and tokens for a
two-tower, images only for a classifier. BatchNorm towers add a
``batch_stats`` collection to the variables.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax.models import classifier, layers, navit, text, two_tower, vit
from vlm_jax.models.classifier import ImageClassifier
from vlm_jax.models.navit import NaViT
from vlm_jax.models.text import TextTransformer, decode_text_variant
from vlm_jax.models.two_tower import TwoTower, l2_normalize
from vlm_jax.models.vit import ViT, decode_variant

__all__ = [
    "default_config", "build", "init", "logical_specs", "abstract_variables", "dummy_inputs",
    "count_params", "resolve_config", "ViT", "TextTransformer", "TwoTower", "decode_variant",
    "decode_text_variant", "l2_normalize", "layers", "text", "two_tower", "vit", "navit", "NaViT",
    "IMAGE_TYPES", "ImageClassifier", "init_inputs", "is_classifier", "as_variables",
    "is_captioner",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_SHAPE_KEYS = ("width", "depth", "mlp_dim", "num_heads")
IMAGE_TYPES = ("vit", "navit", "naflex", "resnet", "bit", "convnext", "clip_resnet")
CNN_TYPES = ("resnet", "bit", "convnext", "clip_resnet")


def _defaults() -> dict:
    return dict(
        image=dict(
            type="vit", variant="B/16", width=None, depth=None, mlp_dim=None, num_heads=None,
            patch_size=None, image_size=224, pool_type="map", posemb="learn", stem="patch",
            stem_features=(64, 128, 256), stem_strides=(2, 2, 2), head=False, head_bias=True,
            patch_bias=True, pre_norm=False, dropout=0.0, act="gelu_tanh", ln_eps=1e-6,
            remat=False, posemb_coords="absolute", posemb_size=None, attention="reference",
            seq_len=256, max_images=16, stem_depths=(3, 4, 9), tome_r=0, scan=False,
            remat_policy="",
            # CNN towers (type resnet | bit | convnext | clip_resnet); None: from the variant.
            stage_depths=None, widths=None, base_width=64, width_factor=1, bn_momentum=0.9,
            bn_eps=1e-5, zero_init_residual=True, root="imagenet", preact=True, drop_path=0.0,
            layer_scale_init=1e-6),
        text=dict(
            variant="B", width=None, depth=None, mlp_dim=None, num_heads=None,
            vocab_size=32000, max_len=64, pool_type="last", causal=False, head_bias=True,
            dropout=0.0, act="gelu_tanh", ln_eps=1e-6, remat=False, scan=False,
            remat_policy="", attention="reference"),
        num_classes=None,
        head_init="zeros",
        out_dim=None,
        temperature_init=10.0,
        bias_init=-10.0,
        dtype="float32",
        # Captioner (task "captioning"; models/captioner.py): image tower (pool "none")
        # -> connector -> causal decoder shaped by model.text.
        captioner=dict(
            mode="",                   # "" (not a captioner) | "prefix" (LLaVA) | "cross" (Flamingo)
            tie_embeddings=True,       # logits = LN(x) @ token embedding^T; False: a head Dense
            cross_every=1,             # cross mode: cross-attention in blocks 0, k, 2k, ...
            gated=True,                # cross mode: tanh(gate) * cross-attention (Flamingo)
            gate_init=0.0,
            parallel_fraction=0.0,     # CapPa: fraction of training rows that see only BOS
        ),
        connector=_connector_defaults(),
    )


def _connector_defaults() -> dict:
    """model.connector: ``models.connectors.default_config()`` as a dict."""
    from vlm_jax.models import connectors  # pylint: disable=import-outside-toplevel
    return connectors.default_config().to_dict()


def _captioner_kwargs(cfg: dict) -> dict | None:
    """model.captioner -> ``captioner.from_resolved`` kwargs, or None when mode is ""."""
    cap = cfg["captioner"]
    if not cap["mode"]:
        return None
    from vlm_jax.models import captioner  # pylint: disable=import-outside-toplevel
    if cap["mode"] not in captioner.MODES:
        raise ValueError(f"model.captioner.mode={cap['mode']!r} is not one of "
                         f"{('',) + captioner.MODES}")
    if cfg["num_classes"] is not None:
        raise ValueError("model.num_classes and model.captioner.mode are both set; a model is "
                         "a classifier or a captioner")
    if not 0.0 <= float(cap["parallel_fraction"]) <= 1.0:
        raise ValueError(f"model.captioner.parallel_fraction must be in [0, 1], got "
                         f"{cap['parallel_fraction']!r}")
    if int(cap["cross_every"]) < 1:
        raise ValueError(f"model.captioner.cross_every must be >= 1, got {cap['cross_every']!r}")
    if cfg["text"]["scan"] or cfg["text"]["remat_policy"]:
        raise ValueError("model.text.scan / model.text.remat_policy shape a text encoder; a "
                         "captioner's decoder is unrolled (model.text.remat turns its remat on)")
    return dict(cap)


def is_captioner(model_config) -> bool:
    """True when ``model_config`` builds a ``Captioner`` (model.captioner.mode is set)."""
    cap = model_config.get("captioner") if hasattr(model_config, "get") else None
    return bool(cap and cap.get("mode"))


def default_config() -> ml_collections.ConfigDict:
    """Every model field with its default (SigLIP B/16), locked: unknown keys raise."""
    cfg = ml_collections.ConfigDict(_defaults())
    from vlm_jax.models import connectors  # pylint: disable=import-outside-toplevel
    cfg.connector = connectors.default_config()  # its field types (feature_layers: int | str | list)
    cfg.lock()
    return cfg


def _merge(defaults: dict, given: Mapping, path: str) -> dict:
    out = dict(defaults)
    for k, v in given.items():
        if k not in defaults:
            raise ValueError(f"Unknown model config key {path}.{k!s}; known keys: "
                             f"{sorted(defaults)}")
        if isinstance(defaults[k], dict):
            if not isinstance(v, Mapping):
                raise ValueError(f"{path}.{k} must be a dict of fields, got {v!r}")
            out[k] = _merge(defaults[k], v, f"{path}.{k}")
        else:
            out[k] = v
    return out


def _as_dict(cfg) -> dict:
    if isinstance(cfg, ml_collections.ConfigDict):
        return cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise ValueError(f"model config must be a ConfigDict or dict, got {type(cfg).__name__}")
    return {k: _as_dict(v) if isinstance(v, (Mapping, ml_collections.ConfigDict)) else v
            for k, v in cfg.items()}


def _shape(section: dict, decoded: dict, path: str) -> dict:
    out = {}
    for k in _SHAPE_KEYS:
        v = section[k] if section[k] is not None else decoded.get(k)
        if v is None:
            raise ValueError(f"{path}.{k} is not set and {path}.variant gives none")
        out[k] = int(v)
    return out


def resolve_config(model_config) -> dict:
    """Model config -> plain dict with variants decoded and every size explicit.

    Returns {"image": ViT (or NaViT) kwargs, "image_type": model.image.type,
    "text": TextTransformer kwargs, "temperature_init", "bias_init", "dtype",
    "num_classes", "head_init"}; raises ValueError naming the field at fault.
    """
    cfg = _merge(_defaults(), _as_dict(model_config), "model")
    captioner = _captioner_kwargs(cfg)
    if captioner is not None:  # the decoder takes the tower's tokens, not a pooled embedding
        cfg["image"] = dict(cfg["image"], pool_type="none", head=False)
    img, txt = cfg["image"], cfg["text"]
    if cfg["dtype"] not in _DTYPES:
        raise ValueError(f"model.dtype={cfg['dtype']!r} is not one of {sorted(_DTYPES)}")
    dtype = _DTYPES[cfg["dtype"]]
    if img["type"] not in IMAGE_TYPES:
        raise ValueError(f"model.image.type={img['type']!r} is not one of {IMAGE_TYPES}")

    num_classes = cfg["num_classes"]
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
        raise ValueError(f"model.num_classes must be a positive int or None, got {num_classes!r}")
    text_kw = _text_kwargs(txt, cfg["out_dim"], dtype)
    common = dict(image_type=img["type"], text=text_kw, out_dim=text_kw["head"],
                  temperature_init=float(cfg["temperature_init"]),
                  bias_init=None if cfg["bias_init"] is None else float(cfg["bias_init"]),
                  dtype=dtype, num_classes=None if num_classes is None else int(num_classes),
                  head_init=cfg["head_init"], image_head=bool(img["head"]),
                  explicit_out_dim=cfg["out_dim"],
                  image_head_bias=bool(img["head_bias"]),
                  captioner=captioner, connector=cfg["connector"])
    if img["type"] != "vit" and _tome_r(img["tome_r"]) != 0:
        raise ValueError(f"model.image.tome_r={img['tome_r']!r}: Token Merging needs "
                         f"model.image.type='vit', not {img['type']!r}")
    if img["type"] in CNN_TYPES:
        # The ViT default "map" has no CNN meaning: CNNs average-pool their last map.
        return dict(common, image=dict(img, pool_type="gap" if img["pool_type"] == "map"
                                       else img["pool_type"]))

    dec = decode_variant(img["variant"])
    image_kw = _shape(img, dec, "model.image")
    patch = img["patch_size"] if img["patch_size"] is not None else dec.get("patch_size")
    if patch is None:
        raise ValueError("model.image.patch_size is not set and model.image.variant "
                         f"{img['variant']!r} has no '/patch' suffix")
    out_dim = common["out_dim"]
    if img["type"] != "vit":
        image_kw = _navit_kwargs(img, image_kw, patch, out_dim, dtype)
    else:
        image_kw.update(
            patch_size=patch, image_size=img["image_size"], pool_type=img["pool_type"],
            posemb=img["posemb"], stem=img["stem"], stem_features=tuple(img["stem_features"]),
            stem_strides=tuple(img["stem_strides"]), stem_depths=tuple(img["stem_depths"]),
            head=out_dim if img["head"] else None,
            head_bias=bool(img["head_bias"]), patch_bias=bool(img["patch_bias"]),
            pre_norm=bool(img["pre_norm"]), dropout=float(img["dropout"]), act=img["act"],
            ln_eps=float(img["ln_eps"]), remat=bool(img["remat"]), dtype=dtype,
            tome_r=_tome_r(img["tome_r"]),
            attention_fn=_attention_fn(img["attention"], "model.image.attention"),
            **_layer_kwargs(img, "model.image"))
        if image_kw["scan"] and image_kw["tome_r"]:
            raise ValueError("model.image.scan=True cannot run Token Merging (tome_r="
                             f"{img['tome_r']!r}): each block changes the token count, which "
                             "a scan over layers cannot carry; set scan=False or tome_r=0")
    if num_classes is None and not img["head"] and captioner is None:
        d_img = image_kw["width"]
        if img["pool_type"] == "none":
            raise ValueError("model.image.pool_type='none' gives tokens, not one embedding "
                             "per image; use map/gap/tok for a two-tower model")
        if d_img != out_dim:
            raise ValueError(f"model.image.head is False, so the image embedding has the "
                             f"image width {d_img}, which differs from model.out_dim="
                             f"{out_dim}; set model.image.head=True")
    return dict(common, image=image_kw)


def _tome_r(value):
    """model.image.tome_r -> 0 (off), a non-negative int, or a tuple of them (per block)."""
    if value is None:
        return 0
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
                   for v in value):
            raise ValueError(f"model.image.tome_r={value!r}: a schedule needs ints >= 0")
        return tuple(int(v) for v in value) if any(value) else 0
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"model.image.tome_r must be an int >= 0 or a tuple of them, "
                         f"got {value!r}")
    return int(value)  # 0: off


def _text_kwargs(txt: dict, out_dim, dtype) -> dict:
    """TextTransformer kwargs from model.text; its head projects to out_dim (None: width)."""
    text_kw = _shape(txt, decode_text_variant(txt["variant"]), "model.text")
    out_dim = int(out_dim) if out_dim is not None else text_kw["width"]
    text_kw.update(
        vocab_size=int(txt["vocab_size"]), max_len=int(txt["max_len"]),
        pool_type=txt["pool_type"], causal=bool(txt["causal"]), head=out_dim,
        head_bias=bool(txt["head_bias"]), dropout=float(txt["dropout"]), act=txt["act"],
        ln_eps=float(txt["ln_eps"]), remat=bool(txt["remat"]), dtype=dtype,
        attention_fn=_attention_fn(txt["attention"], "model.text.attention"),
        **_layer_kwargs(txt, "model.text"))
    return text_kw


def _attention_fn(kind, path: str):
    """The ``attention_fn`` of a ViT / text tower for ``model.*.attention`` (None: flax's).

    "reference" keeps the default (``layers.dot_product_attention_f32``); "xla",
    "cudnn" and "auto" run ``jax.nn.dot_product_attention`` (``navit.attention_fn``).
    """
    try:
        fn = navit.attention_fn(kind)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return None if kind == "reference" else fn


def _layer_kwargs(section: dict, path: str) -> dict:
    """The encoder's ``scan`` / ``remat_policy`` kwargs of model.image or model.text (checked)."""
    from vlm_jax.models import scan  # pylint: disable=import-outside-toplevel
    policy = scan.remat_policy(bool(section["remat"]), section["remat_policy"],
                               f"{path}.remat_policy")
    if policy not in ("none", "full"):
        scan.checkpoint_policy(policy)  # fails early where the backend lacks it
    return dict(scan=bool(section["scan"]), remat_policy=section["remat_policy"] or "")


def _image_tower(r: dict) -> nn.Module:
    """The image tower of a resolved config (``resolve_config``)."""
    kind, img, dtype = r["image_type"], r["image"], r["dtype"]
    if kind == "vit":
        return ViT(**img)
    if kind in ("navit", "naflex"):
        return NaViT(**img)
    if kind == "clip_resnet":
        from vlm_jax.models import clip_resnet  # pylint: disable=import-outside-toplevel
        # Its attention pool projects to the shared width itself. A classifier takes
        # model.out_dim, else the variant's width, else the features' own (32 x width).
        out_dim = r["out_dim"]
        if r["num_classes"] is not None:
            out_dim = r["explicit_out_dim"]
            if out_dim is None and img["variant"] is None and img["width"]:
                out_dim = 32 * int(img["width"])
        return clip_resnet.from_config(dict(img, layers=img["stage_depths"]), dtype=dtype,
                                       out_dim=out_dim)
    if kind == "convnext":
        from vlm_jax.models import convnext  # pylint: disable=import-outside-toplevel
        tower = convnext.from_config(img, dtype=dtype)
    else:
        from vlm_jax.models import resnet  # pylint: disable=import-outside-toplevel
        tower = resnet.from_config(img, dtype=dtype)
    if r["num_classes"] is None and r["image_head"]:
        tower = two_tower.ProjectedTower(encoder=tower, dim=r["out_dim"],
                                         use_bias=r["image_head_bias"], dtype=dtype)
    return tower


def _navit_kwargs(img: dict, shape_kw: dict, patch, out_dim: int, dtype) -> dict:
    """NaViT constructor kwargs from model.image (type "navit" or "naflex")."""
    if not np.isscalar(patch):
        raise ValueError(f"model.image.patch_size must be one int for NaViT, got {patch!r}")
    patch = int(patch)
    size = img["image_size"]
    size = size if np.isscalar(size) else size[0]
    posemb = img["posemb"]
    if img["type"] == "naflex":
        posemb = "naflex"
    elif posemb == "sincos2d":
        posemb = "sincos"
    if posemb not in navit.POSEMB_TYPES:
        raise ValueError(f"model.image.posemb={img['posemb']!r} is not one of "
                         f"{navit.POSEMB_TYPES} (NaViT)")
    posemb_size = img["posemb_size"]
    if posemb_size is None:
        posemb_size = int(size) // patch if posemb == "naflex" else 64
    max_images = 1 if img["type"] == "naflex" else int(img["max_images"])
    if int(img["seq_len"]) < 1 or max_images < 1:
        raise ValueError(f"model.image.seq_len ({img['seq_len']}) and max_images "
                         f"({img['max_images']}) must be >= 1")
    if img["pool_type"] not in navit.POOL_TYPES:
        raise ValueError(f"model.image.pool_type={img['pool_type']!r} is not one of "
                         f"{navit.POOL_TYPES} (NaViT)")
    if img["stem"] != "patch" or img["pre_norm"]:
        raise ValueError("NaViT supports model.image.stem='patch' and pre_norm=False only")
    navit.attention_fn(img["attention"])  # fails early on a bad / unavailable backend
    kw = dict(shape_kw)
    kw.update(patch_size=patch, posemb=posemb, posemb_coords=img["posemb_coords"],
              posemb_size=int(posemb_size), pool_type=img["pool_type"],
              head=out_dim if img["head"] else None, head_bias=bool(img["head_bias"]),
              patch_bias=bool(img["patch_bias"]), dropout=float(img["dropout"]),
              act=img["act"], ln_eps=float(img["ln_eps"]), remat=bool(img["remat"]),
              attention=img["attention"], max_images=max_images, seq_len=int(img["seq_len"]),
              image_size=int(size), dtype=dtype, **_layer_kwargs(img, "model.image"))
    return kw


def build(model_config) -> TwoTower | ImageClassifier:
    """config.model (ConfigDict or dict; missing fields take defaults) -> unbound model.

    model.image.type "vit" -> ``ViT``; "navit" / "naflex" -> ``NaViT``.
    model.num_classes None -> a ``TwoTower``; set -> an ``ImageClassifier`` of the
    image tower (the text fields are then unused). model.captioner.mode "prefix" |
    "cross" -> a ``captioner.Captioner`` (image tower with pool "none", model.connector,
    a causal decoder shaped by model.text).
    """
    r = resolve_config(model_config)
    tower = _image_tower(r)
    if r["captioner"] is not None:
        from vlm_jax.models import captioner  # pylint: disable=import-outside-toplevel
        return captioner.from_resolved(r, tower)
    if r["num_classes"] is not None:
        return ImageClassifier(encoder=tower, num_classes=r["num_classes"],
                               head_init=r["head_init"], dtype=r["dtype"])
    return TwoTower(image=tower, text=TextTransformer(**r["text"]),
                    temperature_init=r["temperature_init"], bias_init=r["bias_init"],
                    dtype=r["dtype"])


def _model_config(config):
    if "model" not in config:
        raise ValueError("config has no 'model' field (pass the whole recipe config)")
    return config.model if hasattr(config, "model") else config["model"]


def dummy_inputs(model_config, batch_size: int = 1):
    """(images float32 [B, S, S, 3], tokens int32 [B, max_len]) zeros at the configured sizes."""
    r = resolve_config(model_config)
    s = r["image"]["image_size"]
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return (jnp.zeros((batch_size, h, w, 3), jnp.float32),
            jnp.zeros((batch_size, r["text"]["max_len"]), jnp.int32))


def is_classifier(model_config) -> bool:
    """True when ``model_config`` builds an ImageClassifier (model.num_classes is set)."""
    return (model_config.get("num_classes") if hasattr(model_config, "get") else None) is not None


def init_inputs(model_config, batch_size: int = 1) -> tuple:
    """The dummy arguments of ``model.init``: (images, tokens) for a two-tower, (images,)
    for a classifier (zeros at the configured sizes, see ``dummy_inputs``)."""
    images, tokens = dummy_inputs(model_config, batch_size)
    return (images,) if is_classifier(model_config) else (images, tokens)


def as_variables(tree) -> dict:
    """``{"params": ...}`` variables from either variables or a bare params tree.

    Variables hold a "params" collection and possibly others ("batch_stats");
    a bare params tree never has a top-level "params" key.
    """
    if isinstance(tree, Mapping) and "params" in tree:
        return dict(tree)
    return {"params": tree}


def _boxed_abstract(model: nn.Module, config):
    args = init_inputs(_model_config(config))
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    return jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), *shapes)


def init(config, rng: jax.Array) -> tuple[TwoTower | ImageClassifier, dict]:
    """Build config.model and initialise it -> (model, variables {"params": ...}).

    ``config`` is a whole recipe config; ``rng`` a PRNG key. Inputs are zeros at
    model.image.image_size / model.text.max_len. Leaves are plain float32 arrays.
    BatchNorm towers add variables["batch_stats"].
    """
    if (hasattr(config, "get") and config.get("task") == "classification"
            and _model_config(config).get("num_classes") is None):
        raise ValueError("config.model.num_classes is not set: set it, or let the task fill it "
                         "from the data: vlm_jax.tasks.get(config).prepare_config(config)")
    model = build(_model_config(config))
    args = init_inputs(_model_config(config))
    variables = jax.jit(functools.partial(model.init, train=False))(rng, *args)
    return model, nn.meta.unbox(variables)


def abstract_variables(model: nn.Module, config) -> dict:
    """Shapes/dtypes (jax.ShapeDtypeStruct) of ``init``'s variables, with no allocation."""
    return nn.meta.unbox(_boxed_abstract(model, config))


def logical_specs(model: nn.Module, config) -> dict:
    """Logical-axis PartitionSpecs of the variables, same tree as ``init``'s ``variables``.

    E.g. specs["params"]["img"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]
    ["kernel"] == PartitionSpec("embed", "mlp"). Names are listed in ``layers``.
    """
    return nn.get_partition_spec(_boxed_abstract(model, config))


def count_params(tree) -> int:
    """Total number of elements over the array (or ShapeDtypeStruct) leaves of ``tree``."""
    return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree))
