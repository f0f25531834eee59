"""big_vision two-tower (SigLIP) .npz checkpoints -> vlm_jax.

    model, variables = big_vision.load_npz("webli_en_b16_224.npz")
    model, variables = big_vision.load_npz(path, {"image": {"image_size": 384}})  # posemb resampled

Our parameter names follow big_vision's, so loading is mostly renaming:

    "params/" prefix (training checkpoints)        dropped; other top-level groups ("opt/...") ignored
    txt/Encoder_0/...                              -> txt/Transformer/...
    .../encoderblock/... stacked [depth, ...]      -> .../encoderblock_{i}/...   (scanned layers)
    {img,txt}/Transformer/pos_embedding (old)      -> added to {img,txt}/pos_embedding
    img/pos_embedding with g*g + 1 rows and a cls  -> row 0 added to cls (old ViT layout)

The model config is inferred from the tensor shapes (widths, depths, MLP dims,
heads, patch size, image size, pooling, heads/biases); big_vision's defaults
fill the rest (tanh-GELU, LayerNorm eps 1e-6, last-token text pooling). Pass
``config`` to override any field; a different image size resamples the learned
2-D position embedding the way big_vision's own loader does
(``resample_posemb``: ``scipy.ndimage.zoom(order=1)``, corner-aligned linear
interpolation), so a checkpoint loaded at 384 px here equals the one big_vision
fine-tunes from. Checkpoints with sincos2d position embeddings store no
posemb; their image size is inferred as the multiple of the patch size nearest
224 (only init's dummy images use it: sincos2d is computed for every input grid).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax import models
from vlm_jax.interop import CheckpointMismatchError, check_against, flatten, unflatten
from vlm_jax.models import scan
from vlm_jax.models.two_tower import TwoTower

__all__ = ["load_npz", "read_npz", "infer_config", "resample_posemb"]

_BLOCK = re.compile(r"^(img|txt)/Transformer/encoderblock_(\d+)/")


def read_npz(path: str) -> dict[str, np.ndarray]:
    """A big_vision .npz -> flat {"img/...": array} in vlm_jax's naming (see module doc)."""
    with np.load(path, allow_pickle=False) as z:
        flat = {k: np.asarray(z[k]) for k in z.files}
    if any(k.startswith("params/") for k in flat):
        flat = {k[len("params/"):]: v for k, v in flat.items() if k.startswith("params/")}
    flat = {re.sub(r"^txt/Encoder_0/", "txt/Transformer/", k): v for k, v in flat.items()}
    out = flatten(scan.to_unrolled(unflatten(flat)))  # scanned layers: stacked [depth, ...]
    for tower in ("img", "txt"):
        old = out.pop(f"{tower}/Transformer/pos_embedding", None)
        if old is not None:
            pe = out.get(f"{tower}/pos_embedding")
            out[f"{tower}/pos_embedding"] = old if pe is None else pe + old
    pe, cls = out.get("img/pos_embedding"), out.get("img/cls")
    if pe is not None and cls is not None:
        g = math.isqrt(pe.shape[1] - 1) if pe.shape[1] > 1 else 0
        if g * g + 1 == pe.shape[1] and math.isqrt(pe.shape[1]) ** 2 != pe.shape[1]:
            out["img/cls"] = cls + pe[:, :1]
            out["img/pos_embedding"] = pe[:, 1:]
    for k in ("t", "b"):
        if k in out and out[k].size == 1:
            out[k] = out[k].reshape(1)
    return out


def resample_posemb(posemb: np.ndarray, old_hw: tuple[int, int],
                    new_hw: tuple[int, int]) -> np.ndarray:
    """A learned posemb [1, gh*gw, D] on grid ``old_hw`` resampled to ``new_hw``, as big_vision.

    big_vision's checkpoint loader (``models/vit.py``, ``resample_posemb``) zooms the
    grid with ``scipy.ndimage.zoom(order=1)``: linear interpolation with the grid's
    corner cells kept exactly (output cell i samples input coordinate
    i * (old - 1) / (new - 1)). The ViT's run-time resize (``layers.resize_posemb``,
    ``jax.image.resize``) uses half-pixel centres instead; the two differ by up to
    ~15% of the posemb's scale, so imports use this one to equal big_vision.
    """
    import scipy.ndimage  # pylint: disable=import-outside-toplevel  (jax depends on scipy)

    (oh, ow), (nh, nw) = tuple(old_hw), tuple(new_hw)
    d = posemb.shape[-1]
    if posemb.shape[-2] != oh * ow:
        raise ValueError(f"posemb has {posemb.shape[-2]} positions, not the {oh}x{ow} grid")
    if (oh, ow) == (nh, nw):
        return np.asarray(posemb)
    grid = np.asarray(posemb, np.float32).reshape(oh, ow, d)
    grid = scipy.ndimage.zoom(grid, (nh / oh, nw / ow, 1), order=1)
    if grid.shape[:2] != (nh, nw):  # zoom rounds the output shape
        raise AssertionError(f"zoom gave grid {grid.shape[:2]}, expected {(nh, nw)}")
    return grid.reshape(1, nh * nw, d)


def _need(flat, key, source):
    if key not in flat:
        raise CheckpointMismatchError(f"{source} (inferring the model config)", missing=[key])
    return flat[key]


def _tower_shape(flat, tower, source) -> dict:
    depth = len({int(m.group(2)) for k in flat if (m := _BLOCK.match(k)) and m.group(1) == tower})
    if depth == 0:
        raise CheckpointMismatchError(f"{source} (inferring the model config)",
                                      missing=[f"{tower}/Transformer/encoderblock_0/..."])
    blk = f"{tower}/Transformer/encoderblock_0"
    return dict(depth=depth,
                mlp_dim=int(_need(flat, f"{blk}/MlpBlock_0/Dense_0/kernel", source).shape[1]),
                num_heads=int(_need(flat, f"{blk}/MultiHeadDotProductAttention_0/query/kernel",
                                    source).shape[1]))


def infer_config(flat: Mapping[str, np.ndarray], source: str = "checkpoint") -> dict:
    """Model-config dict (``models.default_config`` fields) from ``read_npz`` tensors' shapes."""
    kernel = _need(flat, "img/embedding/kernel", source)
    ph, pw = int(kernel.shape[0]), int(kernel.shape[1])
    img = dict(variant=None, width=int(kernel.shape[-1]), patch_size=ph if ph == pw else (ph, pw),
               **_tower_shape(flat, "img", source))
    if "img/pos_embedding" in flat:
        n = flat["img/pos_embedding"].shape[1]
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"{source}: img/pos_embedding has {n} positions, not a square grid; "
                             "pass config={'image': {'image_size': ...}} for the stored grid")
        img.update(posemb="learn", image_size=g * ph if ph == pw else (g * ph, g * pw))
    else:
        # No stored posemb: any multiple of the patch size fits; take the one nearest
        # 224 (the size of init's dummy images; sincos2d follows every input's grid).
        img["posemb"] = "sincos2d"
        img["image_size"] = (max(1, round(224 / ph)) * ph if ph == pw else
                             (max(1, round(224 / ph)) * ph, max(1, round(224 / pw)) * pw))
    img["pool_type"] = ("map" if "img/MAPHead_0/probe" in flat else
                        "tok" if "img/cls" in flat else "gap")
    img["head"] = "img/head/kernel" in flat
    if img["head"]:
        img["head_bias"] = "img/head/bias" in flat
    img["patch_bias"] = "img/embedding/bias" in flat
    img["pre_norm"] = "img/pre_norm/scale" in flat

    emb = _need(flat, "txt/Embed_0/embedding", source)
    txt = dict(variant=None, vocab_size=int(emb.shape[0]), width=int(emb.shape[1]),
               max_len=int(_need(flat, "txt/pos_embedding", source).shape[1]),
               head_bias="txt/head/bias" in flat, **_tower_shape(flat, "txt", source))
    out_dim = int(_need(flat, "txt/head/kernel", source).shape[1])
    return dict(image=img, text=txt, out_dim=out_dim,
                bias_init=-10.0 if "b" in flat else None)


def _overlay(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, (Mapping, ml_collections.ConfigDict)) and isinstance(out.get(k), dict):
            out[k] = _overlay(out[k], dict(v.items()))
        else:
            out[k] = v
    return out


def load_npz(path: str, config: Mapping | ml_collections.ConfigDict | None = None
             ) -> tuple[TwoTower, dict]:
    """big_vision SigLIP checkpoint (.npz) -> (model, variables {"params": float32 jax arrays}).

    config: optional model config (ConfigDict or a partial dict) whose fields
    override those inferred from the tensor shapes, e.g. {"image": {"image_size": 384}}
    (the learned posemb is then resampled bilinearly from the stored square grid
    to the new grid) or {"text": {"max_len": 16}} (text posemb truncated), or
    {"image": {"scan": True}, "text": {"scan": True}} (stacked layers, big_vision's
    own layout; the params come in the model's layout either way).
    Raises CheckpointMismatchError listing missing / unexpected keys and shape
    mismatches when the tensors do not fit the model.
    """
    flat = read_npz(path)
    cfg = infer_config(flat, path)
    if config is not None:
        if isinstance(config, ml_collections.ConfigDict):
            config = config.to_dict()
        cfg = _overlay(cfg, config)
    model = models.build(cfg)
    try:
        model.image.grid_size  # pylint: disable=pointless-statement  (checks image_size)
    except ValueError as e:
        raise ValueError(f"{path}: {e}. Pass config={{'image': {{'image_size': N}}}} with N a "
                         f"multiple of the patch size {model.image.patch_size}") from None
    recipe = ml_collections.ConfigDict({"model": cfg})
    abstract = models.abstract_variables(model, recipe)["params"]
    expected = {k: tuple(a.shape) for k, a in flatten(scan.to_unrolled(abstract)).items()}

    pe, want = flat.get("img/pos_embedding"), expected.get("img/pos_embedding")
    if pe is not None and want is not None and pe.shape != want and pe.shape[-1] == want[-1]:
        g = math.isqrt(pe.shape[1])
        if g * g == pe.shape[1]:
            flat["img/pos_embedding"] = resample_posemb(pe, (g, g), model.image.grid_size)
    pe, want = flat.get("txt/pos_embedding"), expected.get("txt/pos_embedding")
    if pe is not None and want is not None and pe.shape[1] > want[1] and pe.shape[2] == want[2]:
        flat["txt/pos_embedding"] = pe[:, :want[1]]

    check_against(path, flat, expected)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), unflatten(flat))
    return model, {"params": scan.match_layout(params, abstract)}
