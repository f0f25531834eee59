r"""Starting from weights, and fine-tuning: init from a run or an import, freezing, LoRA.

    python -m vlm_jax.train --config configs/finetune.py:lora --workdir /tmp/ft \
        --config.init.workdir=/tmp/shapes

One fine-tuning run's path: ``train`` creates the state fresh (with LoRA on,
``add_lora`` puts factors A, B beside every targeted Dense kernel) ->
``load_init`` overwrites it with the weights of ``config.init`` (a vlm_jax
workdir, a transformers directory or a big_vision .npz), matching "/"-joined
paths; what the source lacks (a new head, the LoRA factors) stays fresh ->
every step, the task runs the model on ``view(config)(params)``: frozen leaves
behind ``stop_gradient`` and each LoRA kernel merged, W + (alpha / r) A @ B
(with ``finetune.lora.dropout`` > 0 the factors stay apart and ``interceptor``
computes W x + (alpha / r) B A dropout(x) inside each targeted layer) ->
the optimizer (``optim.build(..., trainable=trainable_fn(config))``) updates
only the trainable leaves and holds no moments for the rest. A resumed run
restores its own checkpoint (factors and all) and never re-reads ``config.init``.

What trains (``trainable``): without LoRA, every parameter; with
``finetune.lora.rank > 0``, only the LoRA factors, plus the parameters that
match ``finetune.train`` (e.g. "^(t|b)$" or a new head). ``finetune.freeze``
then removes whatever it matches (LoRA factors included): freezing wins.

LoRA representation: for a kernel ``.../kernel`` of shape in_shape + out_shape
(Dense [in, out]; attention q/k/v [D, H, Dh]; attention out [H, Dh, D]) the
params hold ``.../kernel_lora_a`` (in_shape + (r,), random), ``.../kernel_lora_b``
((r,) + out_shape, zeros, so training starts at the base model) and
``.../kernel_lora_scale`` (a float32 scalar alpha / r, never trained, so
``merge_lora(params)`` needs nothing else). A and B carry the kernel's logical
axes on their kernel-side dims, so they shard like it. ``merge_lora`` folds
them in and gives the base model's tree (``checkpoint.load`` does that for a
LoRA run, so what it returns is plain, exportable weights).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import scan

LORA_A, LORA_B, LORA_SCALE = "_lora_a", "_lora_b", "_lora_scale"
_LORA_SUFFIXES = (LORA_A, LORA_B, LORA_SCALE)
# Both towers' attention projections and MLP layers (the MAP head's too).
DEFAULT_TARGETS = r"(MultiHeadDotProductAttention_\d+/(query|key|value|out)|MlpBlock_\d+/Dense_\d+)/kernel$"
_INIT_SOURCES = ("workdir", "hf", "big_vision")


# ---------------------------------------------------------------- config ---

def default_config():
  """(init, finetune) sections of ``config_util.base_config``, every field None / off."""
  from ml_collections import config_dict  # pylint: disable=import-outside-toplevel
  init = config_dict.ConfigDict(dict(
      workdir=config_dict.placeholder(str),     # a vlm_jax run's directory
      hf=config_dict.placeholder(str),          # a transformers save_pretrained directory
      big_vision=config_dict.placeholder(str),  # a big_vision SigLIP .npz
      step=config_dict.placeholder(int),        # init.workdir's checkpoint; None: latest
      skip=config_dict.placeholder(str),        # regex: target params left fresh even if present
  ))
  ft = config_dict.ConfigDict(dict(
      freeze=config_dict.placeholder(str),  # regex over "/"-joined param paths: not trained
      train=config_dict.placeholder(str),   # with LoRA: params trained beside the factors
      lora=config_dict.ConfigDict(dict(
          rank=0,               # 0: off
          alpha=16.0,           # the update is (alpha / rank) A @ B
          dropout=0.0,          # dropout on the LoRA branch's input (training only)
          targets=DEFAULT_TARGETS,  # regex over Dense kernel paths
      )),
  ))
  return init, ft


def _section(config, name):
  sec = config.get(name) if hasattr(config, "get") else None
  return sec if sec is not None else {}


def lora_rank(config) -> int:
  """``config.finetune.lora.rank`` (0 when the config has no finetune section)."""
  lora = _section(_section(config, "finetune"), "lora")
  return int(lora.get("rank", 0) or 0)


def check_config(config) -> None:
  """Checks the finetune and init sections; ValueError naming the field."""
  ft = _section(config, "finetune")
  for name in ("freeze", "train"):
    if ft.get(name):
      try:
        re.compile(ft[name])
      except re.error as e:
        raise ValueError(f"config.finetune.{name}={ft[name]!r} is not a regex: {e}") from None
  lora = _section(ft, "lora")
  rank = lora.get("rank", 0)
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
    raise ValueError(f"config.finetune.lora.rank must be an int >= 0, got {rank!r}")
  if rank:
    model = config.get("model") or {}
    scanned = [f"model.{t}.scan" for t in ("image", "text") if (model.get(t) or {}).get("scan")]
    if scanned:
      raise ValueError(f"config.finetune.lora.rank > 0 needs unrolled encoder blocks: set "
                       f"{' and '.join(scanned)} to False (LoRA factors are per layer)")
    if not float(lora.get("alpha", 0)) > 0:
      raise ValueError(f"config.finetune.lora.alpha must be > 0, got {lora.get('alpha')!r}")
    rate = lora.get("dropout", 0.0) or 0.0
    if not 0.0 <= float(rate) < 1.0:
      raise ValueError(f"config.finetune.lora.dropout must be in [0, 1), got {rate!r}")
  init = _section(config, "init")
  given = [k for k in _INIT_SOURCES if init.get(k)]
  if len(given) > 1:
    raise ValueError(f"config.init: set at most one of {_INIT_SOURCES}, got {given}")


# --------------------------------------------------------------- paths ---

def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _flat(tree: Mapping) -> dict[str, Any]:
  """Nested dict -> {"a/b/c": leaf}; a ``nn.Partitioned`` box is a leaf."""
  return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat: Mapping[str, Any]) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def is_lora(path: str) -> bool:
  """True for a LoRA leaf path (``.../kernel_lora_a``, ``_lora_b``, ``_lora_scale``)."""
  return path.endswith(_LORA_SUFFIXES)


# ---------------------------------------------------------------- LoRA ---

def _in_ndim(key: str, shape, names) -> int:
  """How many leading dims of a Dense kernel are inputs (attention out: [H, Dh, D] -> 2)."""
  if len(shape) == 2:
    return 1
  if len(shape) == 3:
    if names is not None:
      return 2 if names[0] == "heads" else 1
    return 2 if key.endswith("/out/kernel") else 1
  raise ValueError(f"config.finetune.lora.targets matches {key} of shape {tuple(shape)}: "
                   "LoRA applies to Dense kernels (2-D, or 3-D attention kernels) only")


def add_lora(config, variables: Mapping, key: jax.Array) -> dict:
  """Adds LoRA factors beside the targeted kernels of ``variables["params"]``.

  ``variables``: {"params": ..., ...} as ``model.init`` returns it, boxed
  (``nn.Partitioned``, names kept) or plain; works under ``jax.eval_shape``.
  For each kernel whose path matches ``config.finetune.lora.targets``: A
  (in_shape + (r,), normal with std 1/sqrt(fan_in)), B ((r,) + out_shape,
  zeros) and the scale alpha / r (float32 []). A's logical names are the
  kernel's input names + (None,), B's (None,) + its output names. Returns
  ``variables`` unchanged when ``config.finetune.lora.rank`` is 0.

  Raises:
    ValueError naming config.finetune.lora.targets when it matches no kernel
    or a kernel that is not a Dense one.
  """
  rank = lora_rank(config)
  if not rank:
    return variables
  lora = config.finetune.lora
  rx = re.compile(lora.targets)
  flat = _flat(variables["params"])
  targets = sorted(k for k in flat if rx.search(k) and not is_lora(k))
  if not targets:
    raise ValueError(f"config.finetune.lora.targets={lora.targets!r} matches no parameter")
  key = jax.random.fold_in(key, 0x10FA)  # apart from the model's own init keys
  for i, path in enumerate(targets):
    leaf = flat[path]
    boxed = isinstance(leaf, nn.Partitioned)
    value, names = (leaf.value, leaf.names) if boxed else (leaf, None)
    n_in = _in_ndim(path, value.shape, names)
    in_shape, out_shape = tuple(value.shape[:n_in]), tuple(value.shape[n_in:])
    a = jax.random.normal(jax.random.fold_in(key, i), in_shape + (rank,), value.dtype)
    a = a / math.sqrt(math.prod(in_shape))
    b = jnp.zeros((rank,) + out_shape, value.dtype)
    s = jnp.full((), float(lora.alpha) / rank, jnp.float32)
    if boxed:
      a = nn.Partitioned(a, names=tuple(names[:n_in]) + (None,))
      b = nn.Partitioned(b, names=(None,) + tuple(names[n_in:]))
      s = nn.Partitioned(s, names=())
    flat[path + LORA_A], flat[path + LORA_B], flat[path + LORA_SCALE] = a, b, s
  return {**variables, "params": _unflat(flat)}


def merge_lora(tree: Mapping) -> dict:
  """Folds every LoRA factor pair into its kernel: W + scale * A @ B.

  ``tree``: params (or variables {"params": ..., "batch_stats": ...}) holding
  ``.../kernel_lora_a`` [*in, r], ``_lora_b`` [r, *out] and ``_lora_scale`` []
  beside ``.../kernel`` [*in, *out]. Returns the same tree without the LoRA
  leaves: the base model's tree, for ``model.apply`` or ``interop.hf.save``.
  A tree without LoRA leaves comes back as it is (a new dict). Jax or numpy leaves.
  """
  flat = _flat(tree)
  if not any(is_lora(k) for k in flat):
    return _unflat(flat)
  out = {k: v for k, v in flat.items() if not is_lora(k)}
  for k in flat:
    if k.endswith(LORA_A):
      base = k[:-len(LORA_A)]
      a, b, s = flat[k], flat[base + LORA_B], flat[base + LORA_SCALE]
      w = out[base]
      delta = jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST)
      out[base] = (w + (s * delta).astype(w.dtype)).astype(w.dtype)
  return _unflat(out)


# ------------------------------------------------------------- freezing ---

def trainable(config, params) -> Any:
  """A tree like ``params`` of bools: True where the optimizer updates the leaf.

  Without LoRA everything trains; with it, the LoRA factors and what matches
  ``config.finetune.train``. ``config.finetune.freeze`` then turns off what it
  matches. LoRA scales never train.

  Raises:
    ValueError: ``finetune.freeze`` / ``finetune.train`` matches no parameter,
      or nothing is left to train.
  """
  ft = _section(config, "finetune")
  freeze, train = ft.get("freeze"), ft.get("train")
  lora = lora_rank(config) > 0
  paths = [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for name, rx in (("freeze", freeze), ("train", train)):
    if rx and not any(re.search(rx, p) for p in paths):
      raise ValueError(f"config.finetune.{name}={rx!r} matches no parameter; paths look "
                       f"like {paths[:3]}")

  def one(path, _):
    p = _path_str(path)
    if p.endswith(LORA_SCALE):
      return False
    on = (not lora and not train) or p.endswith((LORA_A, LORA_B)) or bool(
        train and re.search(train, p))
    return on and not (freeze and re.search(freeze, p))

  mask = jax.tree_util.tree_map_with_path(one, params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"config.finetune leaves nothing to train (freeze={freeze!r}, "
                     f"train={train!r}, lora.rank={lora_rank(config)})")
  return mask


def trainable_fn(config) -> Callable | None:
  """``params -> trainable(config, params)`` for ``optim.build``; None when all train."""
  ft = _section(config, "finetune")
  if not (ft.get("freeze") or ft.get("train") or lora_rank(config)):
    return None
  check_config(config)
  return lambda params: trainable(config, params)


def view(config) -> Callable:
  """``params -> params`` that the task runs the model on, inside its gradient.

  Frozen leaves go behind ``stop_gradient`` (no weight gradients are computed
  for them) and LoRA kernels are merged (``merge_lora``), so the model sees
  its own tree. The identity when nothing is frozen and LoRA is off. With LoRA
  dropout the factors are not merged: run the model under ``interceptor(config)``.
  """
  fn = trainable_fn(config)
  if fn is None:
    return lambda params: params
  merge = not lora_dropout(config)

  def apply(params):
    mask = fn(params)
    params = jax.tree.map(lambda m, x: x if m else jax.lax.stop_gradient(x), mask, params)
    return merge_lora(params) if merge else params
  return apply


def lora_dropout(config) -> float:
  """``config.finetune.lora.dropout`` when LoRA is on, else 0."""
  if not lora_rank(config):
    return 0.0
  return float(_section(_section(config, "finetune"), "lora").get("dropout", 0.0) or 0.0)


def interceptor(config) -> Callable | None:
  """A flax method interceptor for training with LoRA dropout (None without it).

  Around every Dense / DenseGeneral call whose params hold LoRA factors it
  returns base(x) + scale * (dropout(x) . A) . B, where base uses the unmerged
  kernel, and dropout (rate ``finetune.lora.dropout``, inverted scaling) draws
  from the "dropout" rng. Used as ``nn.intercept_methods(interceptor(config))``
  around the training apply, on params from ``view(config)`` (factors apart).
  """
  rate = lora_dropout(config)
  if not rate:
    return None

  def intercept(next_fun, args, kwargs, context):
    mod = context.module
    y = next_fun(*args, **kwargs)
    if (context.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.DenseGeneral))
        or not mod.has_variable("params", "kernel" + LORA_A)):
      return y
    a = mod.get_variable("params", "kernel" + LORA_A)
    b = mod.get_variable("params", "kernel" + LORA_B)
    scale = mod.get_variable("params", "kernel" + LORA_SCALE)
    x = args[0]
    keep = jax.random.bernoulli(mod.make_rng("dropout"), 1.0 - rate, x.shape)
    x = jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
    delta = jnp.tensordot(jnp.tensordot(x, a.astype(x.dtype), axes=a.ndim - 1),
                          b.astype(x.dtype), axes=1)
    return y + (scale * delta).astype(y.dtype)
  return intercept


def init_variables(config, model, key, *args) -> dict:
  """``model.init(key, *args)`` (boxed) with the LoRA factors of ``config`` added."""
  return add_lora(config, model.init(key, *args), key)


# ------------------------------------------------------- init from weights ---

@dataclasses.dataclass
class InitReport:
  """What ``load_init`` did: keys are "/"-joined, "params/..." or "batch_stats/..."."""
  source: str
  loaded: list[str]           # copied from the source
  num_loaded: int             # their elements
  fresh: list[str]            # the model has them, the source does not (e.g. a new head)
  unused: list[str]           # the source has them, the model does not
  resampled: list[str]        # learned position embeddings resampled to the new grid
  skipped: list[str]          # matched config.init.skip: left fresh
  lora: int = 0               # LoRA leaves (fresh by design)

  def __str__(self) -> str:
    def few(keys):
      return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
    lines = [f"Init from {self.source}: loaded {len(self.loaded)} tensors "
             f"({self.num_loaded:,} values)"]
    for title, keys in (("left fresh", self.fresh), ("skipped (init.skip)", self.skipped),
                        ("resampled", self.resampled), ("not used", self.unused)):
      if keys:
        lines.append(f"  {title} ({len(keys)}): {few(keys)}")
    if self.lora:
      lines.append(f"  LoRA leaves (fresh): {self.lora}")
    return "\n".join(lines)


def has_init(config) -> bool:
  """True when ``config.init`` names a source of weights."""
  init = _section(config, "init")
  return any(init.get(k) for k in _INIT_SOURCES)


def _read_source(config) -> tuple[str, str, dict[str, Any]]:
  """-> (kind, "config.init.X=PATH", {"params/...": array, "batch_stats/...": array})."""
  init = config.init
  kind = next(k for k in _INIT_SOURCES if init.get(k))
  where = f"config.init.{kind}={init[kind]!r}"
  # pylint: disable=import-outside-toplevel
  if kind == "workdir":
    from vlm_jax import checkpoint
    loaded = checkpoint.load(init.workdir, step=init.get("step"))  # LoRA runs come merged
    variables = {"params": loaded.params, **loaded.model_state}
  elif kind == "hf":
    from vlm_jax.interop import hf
    _, variables = hf.load(init.hf)
  else:
    from vlm_jax.interop import big_vision
    _, variables = big_vision.load_npz(init.big_vision)
  return kind, where, _flat(variables)


def _resample(kind: str, key: str, value, want_shape):
  """A learned 2-D position embedding [1, g*g, D] on another square grid, or None."""
  shape = tuple(np.shape(value))
  if not key.endswith("pos_embedding") or key.startswith("params/txt/") or len(shape) != 3:
    return None
  if shape[0] != want_shape[0] or shape[2] != want_shape[2]:
    return None
  old, new = math.isqrt(shape[1]), math.isqrt(want_shape[1])
  if old * old != shape[1] or new * new != want_shape[1]:
    return None
  # Each source's own convention (see vlm_jax.interop): big_vision zooms with
  # corners aligned; our ViT (workdir, hf) resizes bilinearly with half-pixel centres.
  # pylint: disable=import-outside-toplevel
  if kind == "big_vision":
    from vlm_jax.interop import big_vision
    return big_vision.resample_posemb(np.asarray(value), (old, old), (new, new))
  from vlm_jax.models import layers
  return layers.resize_posemb(jnp.asarray(value), (old, old), (new, new))


def load_init(config, params, model_state) -> tuple[Any, dict, InitReport]:
  """Overwrites ``params`` / ``model_state`` with the weights of ``config.init``.

  ``params``, ``model_state``: a freshly created train state's trees (jax arrays,
  any sharding; LoRA leaves are kept fresh). Source tensors are matched by
  "/"-joined path; each loaded one is placed on its target's sharding in the
  target's dtype. A learned image position embedding [1, g*g, D] on another
  square grid is resampled; keys matching ``config.init.skip`` stay fresh.
  A source in the other layer layout (scanned ``encoderblock`` stacks vs
  ``encoderblock_{i}``; ``models/scan.py``) is converted to the model's first.

  Returns:
    (params, model_state, report): the trees and an ``InitReport`` (printable).
  Raises:
    interop.CheckpointMismatchError naming every key whose shape does not fit,
    with both shapes.
  """
  from vlm_jax import interop  # pylint: disable=import-outside-toplevel
  check_config(config)
  kind, where, source = _read_source(config)
  skip = config.init.get("skip")
  tree = {"params": params, **dict(model_state or {})}
  # Scanned (stacked) vs unrolled encoder blocks: the source follows the model's layout.
  source = _flat(scan.match_layout(_unflat(source), tree))
  target = _flat(tree)
  out, loaded, fresh, skipped, resampled, mismatched = {}, [], [], [], [], []
  n_loaded = n_lora = 0
  for key, t in target.items():
    out[key] = t
    if is_lora(key):
      n_lora += 1
      continue
    if skip and re.search(skip, key):
      skipped.append(key)
      continue
    if key not in source:
      fresh.append(key)
      continue
    value = source[key]
    if tuple(np.shape(value)) != tuple(t.shape):
      value = _resample(kind, key, value, t.shape)
      if value is None:
        mismatched.append((key, tuple(np.shape(source[key])), tuple(t.shape)))
        continue
      resampled.append(key)
    sharding = getattr(t, "sharding", None)
    value = jnp.asarray(value, t.dtype)
    out[key] = jax.device_put(value, sharding) if sharding is not None else value
    loaded.append(key)
    n_loaded += int(np.prod(t.shape))
  if mismatched:
    raise interop.CheckpointMismatchError(
        f"{where} (config.init.skip=REGEX leaves such keys fresh)", mismatched=mismatched)
  unused = sorted(set(source) - set(target))
  tree = _unflat(out)
  new_params = tree.pop("params")
  report = InitReport(source=where, loaded=loaded, num_loaded=n_loaded, fresh=fresh,
                      unused=unused, resampled=resampled, skipped=skipped, lora=n_lora)
  return new_params, tree, report


def boxed_abstract(model, config) -> dict:
  """Boxed ShapeDtypeStructs of ``model``'s variables, LoRA factors included (no allocation)."""
  from vlm_jax import models  # pylint: disable=import-outside-toplevel
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in models.init_inputs(config.model)]
  return jax.eval_shape(lambda k, *xs: init_variables(config, model, k, *xs),
                        jax.random.PRNGKey(0), *args)
