"""transformers PaliGemmaForConditionalGeneration -> vlm_jax vision front-end.

    model, variables = hf.load("paligemma-dir")    # dispatched here by model_type "paligemma"
    feats = hf.image_features(model, variables, pixel_values=pv)   # numpy [B, N, d_llm]
    # = PaliGemmaForConditionalGeneration.get_image_features(pv).pooler_output

What transformers 5.x computes (``PaliGemmaModel.get_image_features``):

    vision tower   SiglipVisionModel -> our ViT without CLS; the features are its
                   last_hidden_state, i.e. after the post-layernorm (our out["tokens"],
                   feature layer "final"), every token kept; the MAP head is not used
    projector      multi_modal_projector.linear: Dense(hidden -> projection_dim) with bias
                   -> ``connectors.Projector(depth=1)``; projection_dim is the top-level
                   config field (transformers copies it into vision_config)
    scaling        none in 5.x's get_image_features (4.x divided the projected features by
                   sqrt(text hidden_size) there; 5.x no longer does)

Key layouts: as hf_llava (5.x ``vision_tower.embeddings...``, the hub's older
``vision_tower.vision_model.embeddings...``, with or without a ``model.`` prefix);
the language model's tensors are never read.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import numpy as np

from vlm_jax.interop.hf_llava import (apply_fn, build_tower, expected_shapes, parse_overrides,
                                      pixels_nhwc, read_front_end, to_variables, vision_config)
from vlm_jax.interop.torch_layout import apply_rules, linear
from vlm_jax.models.connectors import Projector
from vlm_jax.models.frontend import VisionFrontEnd

HF_FAMILY = "hf_paligemma"
# PaliGemmaConfig's vision tower when config.json gives no vision_config.
_PALIGEMMA_VISION = dict(model_type="siglip_vision_model", intermediate_size=4096,
                         hidden_size=1152, patch_size=14, image_size=224, num_hidden_layers=27,
                         num_attention_heads=16)
_PROJECTION_DIM = 2048  # PaliGemmaConfig.projection_dim default


class PaliGemmaFrontEnd(VisionFrontEnd):
    """VisionFrontEnd (SigLIP tower -> post-layernormed tokens -> linear) of PaliGemma."""

    hf_family: ClassVar[str] = HF_FAMILY


def load(path: str, hf_cfg: Mapping, overrides: Mapping | None = None):
    """A PaliGemmaForConditionalGeneration directory -> (PaliGemmaFrontEnd, {"params": ...})."""
    from vlm_jax.interop import hf

    kw = parse_overrides(overrides)
    kind, vc = vision_config(hf_cfg, _PALIGEMMA_VISION)
    if kind != "siglip":
        raise ValueError(f"{path}: PaliGemma's vision tower must be a SigLIP vision model, got "
                         f"{vc.get('model_type')!r}")
    tower = build_tower(kind, vc, **kw)
    out_dim = int(hf_cfg.get("projection_dim") or _PROJECTION_DIM)
    connector = Projector(out_dim, depth=1, use_bias=True, dtype=kw["dtype"])
    model = PaliGemmaFrontEnd(tower=tower, connector=connector, feature_layers="final",
                              drop_cls=False)
    rules = hf.vision_rules(kind, tower, "vision_tower", "tower", head=False)
    rules += linear("multi_modal_projector.linear", "connector/Dense_0")
    flat = apply_rules(rules, read_front_end(path), expected_shapes(model, tower.image_size),
                       f"{path} (PaliGemmaForConditionalGeneration)")
    return model, to_variables(flat)


def image_features(model: PaliGemmaFrontEnd, variables: Mapping, pixel_values=None,
                   **unused) -> np.ndarray:
    """= transformers' ``get_image_features(pixel_values).pooler_output``: float32 numpy
    [B, N, projection_dim] (N = patches). pixel_values [B, C, H, W]."""
    if unused:
        raise ValueError(f"unexpected inputs {sorted(unused)} for a PaliGemma front-end")
    if pixel_values is None:
        raise ValueError("image_features needs pixel_values")
    return np.asarray(apply_fn(model)(variables["params"], pixels_nhwc(pixel_values)), np.float32)
