"""Where a ViT looks: attention maps, attention rollout and patch-text similarity.

    ckpt = vlm_jax.checkpoint.load(workdir)
    maps = attention_maps(ckpt.model, ckpt.variables, image)    # {"rollout": [gh, gw], ...}
    sim = similarity_map(ckpt.model, ckpt.variables, image, "a red circle")   # [gh, gw]
    rgb = overlay(image, maps["rollout"], path="rollout.png")   # uint8 [H, W, 3]

One image at a time, uint8 [H, W, 3] (or [H, W]) of any size, preprocessed as
``vlm_jax.inference`` does for a fixed-size ViT: squashed (PIL bilinear) to
``model.image.image_size`` and mapped onto ``value_range``. Every map lives on the
ViT's token grid (gh, gw) = image_size / total stride (patch size times the conv or
ResNet stem stride), row-major as the tokens are.

Where the numbers come from:

  attention weights  every attention layer sows its softmax probabilities
                     [B, H, Lq, Lk] into the "intermediates" collection
                     (``layers.sows_attention_weights``); the forward pass here makes
                     that collection mutable and reads them back. Towers whose
                     ``attention_fn`` cannot sow (fused kernels) are run with the
                     reference attention instead: the same function up to float error.
  MAP probe          pool_type "map": the learned probe's attention over the patches,
                     per head [H, gh, gw] (each sums to 1) and its head mean.
  rollout            Abnar & Zuidema 2020, "Quantifying Attention Flow in
                     Transformers": per layer the head-averaged attention A plus the
                     identity (the residual stream), rows renormalised:
                     Â = (A + I) / 2; the layers are multiplied from the input up,
                     R = Â_depth ··· Â_1, so R[i, j] is how much of output token i
                     flows from input token j. What is read out of R depends on the
                     pooling: the CLS row (pool "tok"), the mean of all rows (pool
                     "gap" / "none": the pooled vector is the tokens' mean), or the
                     probe's head-mean attention times R (pool "map": the probe has no
                     residual, so its attention is used as is).
  similarity         two-tower models: each patch token of the last layer (after the
                     encoder norm) is turned into an embedding the way the pooled
                     feature is, as if the image were that one patch: the pooling
                     head runs on a one-token sequence (MAP: the probe attends to that
                     token alone, so its value/output projection and the head's MLP
                     apply; GAP: the token itself), then the tower's ``head``
                     projection. The map is the cosine between these patch embeddings
                     and the caption's text embedding. For GAP towers this is exact
                     bookkeeping: the image embedding (before L2 normalisation) is the
                     mean of the patch embeddings. For MAP towers it is an
                     approximation: the real probe mixes the patches with per-head
                     weights before the (nonlinear) MLP. For CLS towers the CLS
                     token's projection is applied to patch tokens, which were never
                     trained to be read that way (the usual dense-CLIP approximation).

Heatmaps are float32 [gh, gw]; attention maps sum to 1 over the patches.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import inference
from vlm_jax.data import packing, preprocess
from vlm_jax.models import layers, scan
from vlm_jax.models.vit import ViT

__all__ = ["attention_maps", "attention_rollout", "patch_embeddings", "similarity_map",
           "overlay", "explain", "METHODS"]

METHODS = ("auto", "rollout", "map", "similarity")


# --------------------------------------------------------------------------- the tower


def _tower(model) -> tuple[ViT, str | None]:
  """(the ViT image tower, the name of its variables subtree or None for a bare ViT)."""
  if isinstance(model, ViT):
    return model, None
  tower = getattr(model, "image", None)
  if tower is None:
    tower = getattr(model, "encoder", None)
  if isinstance(tower, ViT):
    return tower, "img"  # TwoTower and ImageClassifier both store it as "img"
  raise ValueError(f"explain needs a ViT image tower (a ViT, or a TwoTower / ImageClassifier "
                   f"over one), got {type(model).__name__} with image tower "
                   f"{type(tower).__name__}")


def _tower_variables(variables, sub: str | None) -> dict:
  variables = nn.meta.unbox(dict(variables))  # as ``init`` gives them: logically boxed
  if sub is None:
    return variables
  if sub not in variables.get("params", {}):
    raise ValueError(f"variables['params'] has no {sub!r} subtree (keys: "
                     f"{sorted(variables.get('params', {}))}): pass the model's variables")
  return {k: v[sub] for k, v in variables.items() if sub in v}


def preprocess_image(tower: ViT, image: Any, value_range: Sequence[float] = (-1.0, 1.0)) -> np.ndarray:
  """uint8 (or float, already normalised) [H, W, 3] or [H, W] -> float32 [1, h, w, 3].

  (h, w) = ``tower.image_size``: squashed as ``inference.encode_images`` does.
  """
  arr = inference._check(image, "image")  # pylint: disable=protected-access
  size = tower.image_size
  hw = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
  if arr.dtype == np.uint8:
    arr = preprocess.normalize(preprocess.resize_crop(arr, hw, "resize"), value_range)
  else:
    arr = packing.resize_image(arr, hw)
  return arr[None].astype(np.float32)


@functools.lru_cache(maxsize=8)
def _forward(tower: ViT):
  """jit(variables, x) -> (output, out dict, intermediates) of a tower that sows attention."""
  run = tower.clone(remat=False, remat_policy="", dropout=0.0)
  if not layers.sows_attention_weights(run.attention_fn):
    run = run.clone(attention_fn=None)

  def fn(variables, x):
    (y, out), state = run.apply(variables, x, mutable=["intermediates"])
    return y, out, scan.to_unrolled(state["intermediates"])  # a scanned tower's: stacked
  return jax.jit(fn)


def _weights(tree: dict, *path: str) -> np.ndarray:
  node = tree
  for p in path:
    node = node[p]
  return np.asarray(node["MultiHeadDotProductAttention_0"]["attention_weights"][0], np.float32)


# --------------------------------------------------------------------------- attention


def attention_rollout(weights: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema 2020) through a stack of self-attention layers.

  Args:
    weights: depth x [H, L, L] (or [depth, H, L, L]) attention probabilities, first
      layer first; rows (queries) sum to 1.
  Returns:
    float64 [L, L] R = Â_depth ··· Â_1 with Â = rownorm(mean_h(A) + I): R[i, j] is the
    share of output token i that flows from input token j. Rows sum to 1.
  """
  rollout = None
  for a in weights:
    a = np.asarray(a, np.float64)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
      raise ValueError(f"attention weights must be [H, L, L] per layer, got {a.shape}")
    a = a.mean(axis=0) + np.eye(a.shape[-1])
    a = a / a.sum(axis=-1, keepdims=True)
    rollout = a if rollout is None else a @ rollout
  if rollout is None:
    raise ValueError("attention_rollout needs at least one layer")
  return rollout


def _to_map(x: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return (x / max(x.sum(), 1e-30)).reshape(grid).astype(np.float32)


def attention_maps(model, variables, image: Any, *,
                   value_range: Sequence[float] = (-1.0, 1.0)) -> dict[str, Any]:
  """Attention heatmaps of a ViT image tower for one image.

  Args:
    model: a ``vit.ViT``, or a ``TwoTower`` / ``ImageClassifier`` over one
      (plain patch, conv or ResNet-hybrid stem).
    variables: the model's variables ({"params": ...}), e.g. ``ckpt.variables``.
    image: uint8 [H, W, 3] or [H, W] of any size (or float, already normalised).
    value_range: where uint8 pixels are mapped (the run's ``pp.value_range``).
  Returns:
    dict with
      "grid": (gh, gw) the token grid;
      "rollout": float32 [gh, gw], attention rollout read out for the tower's
        pooling (see the module docstring), summing to 1;
      "map": float32 [gh, gw], the MAP probe's attention averaged over heads
        (pool_type "map" only), summing to 1;
      "map_heads": float32 [H, gh, gw], the probe's attention per head (pool "map"
        only), each head summing to 1;
      "attention": float32 [depth, H, L, L], the raw per-layer probabilities
        (L = gh * gw, plus 1 for the CLS token of pool "tok", which comes first).
  """
  tower, sub = _tower(model)
  x = preprocess_image(tower, image, value_range)
  _, out, inter = _forward(tower)(_tower_variables(variables, sub), x)
  grid = tuple(int(v) for v in out["stem"].shape[1:3])
  n = grid[0] * grid[1]
  att = np.stack([_weights(inter, "Transformer", f"encoderblock_{i}")[0]
                  for i in range(tower.depth)])                        # [depth, H, L, L]
  rollout = attention_rollout(att)                                      # [L, L]
  result: dict[str, Any] = {"grid": grid, "attention": att}
  if tower.pool_type == "map":
    probe = _weights(inter, "MAPHead_0")[0, :, 0, :]                    # [H, N]
    result["map_heads"] = np.stack([_to_map(p, grid) for p in probe])
    result["map"] = _to_map(probe.mean(axis=0), grid)
    result["rollout"] = _to_map(probe.mean(axis=0) @ rollout, grid)
  elif tower.pool_type == "tok":
    result["rollout"] = _to_map(rollout[0, 1:], grid)
  else:
    result["rollout"] = _to_map(rollout.mean(axis=0)[-n:], grid)
  return result


# --------------------------------------------------------------------------- similarity


def _pool_and_project(tower: ViT, params: dict, tokens: jax.Array) -> jax.Array:
  """The tower's pooling and ``head`` on final-normed tokens [B, L, D] -> [B, D'].

  pool "tok"/"none" use the first token / the mean (the CLS token itself is not
  part of ``tokens`` here).
  """
  if tower.pool_type == "map":
    x = layers.MAPHead(mlp_dim=tower.mlp_dim, num_heads=tower.num_heads, act=tower.act,
                       ln_eps=tower.ln_eps, dtype=tower.dtype).apply(
                           {"params": params["MAPHead_0"]}, tokens)
  elif tower.pool_type == "tok":
    x = tokens[:, 0]
  else:
    x = jnp.mean(tokens, axis=1)
  if tower.head is not None:
    head = params["head"]
    x = x @ head["kernel"].astype(x.dtype)
    if "bias" in head:
      x = x + head["bias"].astype(x.dtype)
  return x.astype(jnp.float32)


@functools.lru_cache(maxsize=8)
def _patch_embed_fn(tower: ViT):
  def fn(params, tokens):                              # [N, D] -> [N, D']
    return _pool_and_project(tower, params, tokens[:, None, :])
  return jax.jit(fn)


def patch_embeddings(model, variables, image: Any, *,
                     value_range: Sequence[float] = (-1.0, 1.0)) -> np.ndarray:
  """Per-patch embeddings in the image embedding's space, for one image.

  Each final-normed patch token goes through the tower's pooling head as a one-token
  sequence, then its ``head`` projection (see the module docstring for what this
  means per pool type). Args as ``attention_maps``.
  Returns: float32 [gh, gw, D] (not normalised), D the tower's output width.
  """
  tower, sub = _tower(model)
  if tower.pool_type == "none":
    raise ValueError("patch_embeddings needs a pooling tower; pool_type='none' has no embedding")
  tvars = _tower_variables(variables, sub)
  x = preprocess_image(tower, image, value_range)
  _, out, _ = _forward(tower)(tvars, x)
  grid = tuple(int(v) for v in out["stem"].shape[1:3])
  tokens = out["encoded"][0]                                            # [N, width]
  z = np.asarray(_patch_embed_fn(tower)(tvars["params"], tokens), np.float32)
  return z.reshape(*grid, z.shape[-1])


def similarity_map(model, variables, image: Any, text: str | np.ndarray, *,
                   tokenizer: Any = None, value_range: Sequence[float] = (-1.0, 1.0)) -> np.ndarray:
  """Cosine similarity of every patch to a caption, for a two-tower model.

  Args:
    model, variables, image, value_range: as ``attention_maps``; ``model`` must be
      a ``TwoTower`` with a ViT image tower.
    text: the caption (a string, embedded by the text tower), or a text-space
      embedding float [D] (e.g. a zero-shot class embedding averaged over prompts).
    tokenizer: for a string ``text``: as ``inference.encode_texts`` (default the
      byte tokenizer).
  Returns:
    float32 [gh, gw] cosine similarities in [-1, 1] between ``patch_embeddings`` and
    the text embedding.
  """
  if not hasattr(model, "text"):
    raise ValueError(f"similarity_map needs an image-text TwoTower, got {type(model).__name__}")
  variables = nn.meta.unbox(dict(variables))
  z = patch_embeddings(model, variables, image, value_range=value_range)
  if isinstance(text, str):
    t = inference.encode_texts(model, variables, [text], tokenizer=tokenizer)[0]
  else:
    t = np.asarray(text, np.float32).reshape(-1)
  if t.shape[-1] != z.shape[-1]:
    raise ValueError(f"text embedding has D={t.shape[-1]}, the patch embeddings D={z.shape[-1]}")
  z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  t = t / max(float(np.linalg.norm(t)), 1e-12)
  return (z @ t).astype(np.float32)


# --------------------------------------------------------------------------- pictures


def _ramp(x: np.ndarray) -> np.ndarray:
  """A built-in colour map for x in [0, 1]: black -> purple -> red -> yellow -> white."""
  stops = np.array([[0, 0, 0], [90, 20, 140], [220, 40, 40], [250, 200, 40], [255, 255, 255]],
                   np.float32) / 255.0
  pos = np.clip(x, 0.0, 1.0) * (len(stops) - 1)
  i = np.minimum(pos.astype(np.int64), len(stops) - 2)
  f = (pos - i)[..., None]
  return stops[i] * (1 - f) + stops[i + 1] * f


def _colour(x: np.ndarray, cmap: str) -> np.ndarray:
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    return np.asarray(matplotlib.colormaps[cmap](x), np.float32)[..., :3]
  except ImportError:
    return _ramp(x)


def overlay(image: Any, heatmap: np.ndarray, path: str | None = None, alpha: float = 0.5,
            cmap: str = "inferno") -> np.ndarray:
  """Blends a heatmap over an image.

  Args:
    image: uint8 [H, W, 3] or [H, W] (floats are min-max scaled to 0-255 for display).
    heatmap: float [gh, gw], any range: min-max scaled to [0, 1] (a constant map is 0),
      upsampled bilinearly (PIL) to H x W and coloured with matplotlib's ``cmap``
      (a built-in black-red-yellow ramp when matplotlib is not installed).
    path: also write the result there as PNG.
    alpha: weight of the heatmap colour (0: the image only, 1: the heatmap only).
  Returns: uint8 [H, W, 3].
  """
  img = inference._check(image, "image")  # pylint: disable=protected-access
  if img.dtype != np.uint8:
    lo, hi = float(img.min()), float(img.max())
    img = np.round((img - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8)
  heat = np.asarray(heatmap, np.float32)
  if heat.ndim != 2:
    raise ValueError(f"heatmap must be [gh, gw], got shape {heat.shape}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  heat = np.nan_to_num(heat - heat.min())
  heat = heat / heat.max() if heat.max() > 0 else heat
  heat = packing.resize_image(heat[..., None], img.shape[:2])[..., 0]
  rgb = _colour(heat, cmap) * 255.0
  blended = (1.0 - alpha) * img.astype(np.float32) + alpha * rgb
  result = np.clip(np.round(blended), 0, 255).astype(np.uint8)
  if path is not None:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    Image.fromarray(result).save(path, format="PNG")
  return result


def explain(model, variables, image: Any, text: str | np.ndarray | None = None,
            method: str = "auto", **kw) -> np.ndarray:
  """One heatmap for one image: the entry point of ``python -m vlm_jax.predict --explain``.

  Args:
    model, variables, image: as ``attention_maps``.
    text: a caption (or text embedding [D]) for "similarity".
    method: "rollout", "map" (the MAP probe's head-mean attention), "similarity"
      (needs ``text`` and a two-tower model) or "auto": "similarity" when ``text`` is
      given to a two-tower model, else "map" for MAP-pooled towers, else "rollout".
    **kw: passed on (``value_range``; ``tokenizer`` for "similarity").
  Returns: float32 [gh, gw].
  """
  if method not in METHODS:
    raise ValueError(f"explain method={method!r} is not one of {METHODS}")
  tower, _ = _tower(model)
  if method == "auto":
    if text is not None and hasattr(model, "text"):
      method = "similarity"
    else:
      method = "map" if tower.pool_type == "map" else "rollout"
  if method == "similarity":
    if text is None:
      raise ValueError("explain method='similarity' needs a text")
    return similarity_map(model, variables, image, text, **kw)
  maps = attention_maps(model, variables, image, value_range=kw.get("value_range", (-1.0, 1.0)))
  if method == "map" and "map" not in maps:
    raise ValueError(f"explain method='map' needs pool_type='map', the tower has "
                     f"{tower.pool_type!r}")
  return maps[method]
