"""Helpers for recipes: the `file.py:ARG` string and config validation.

Every recipe's ``get_config(arg=None)`` takes a string such as ``"runlocal"`` or
``"runlocal,res=64,batch_size=32"`` (big_vision's convention). ``parse_arg``
turns it into a ConfigDict of typed values, so recipes read
``arg.runlocal``, ``arg.res`` and so on.
"""

from __future__ import annotations

import ml_collections


def _parse_value(text: str, default):
  if isinstance(default, bool):
    low = text.lower()
    if low in ("1", "true", "yes", "t", "y", ""):
      return True
    if low in ("0", "false", "no", "f", "n"):
      return False
    raise ValueError(f"not a bool: {text!r}")
  if default is None:
    return text
  return type(default)(text)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"flag,key=value,..."`` against ``defaults`` (name -> default).

  A bare ``name`` sets a bool to True. Unknown names and values that do not
  parse as the default's type raise ValueError naming the key.
  """
  out = dict(defaults)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, eq, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
          f"Unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}")
    if not eq:
      if not isinstance(defaults[key], bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...)")
      out[key] = True
      continue
    try:
      out[key] = _parse_value(value.strip(), defaults[key])
    except (TypeError, ValueError) as e:
      raise ValueError(
          f"Config argument {key!r}: cannot parse {value!r} as "
          f"{type(defaults[key]).__name__}") from e
  return ml_collections.ConfigDict(out)


REQUIRED_TOP_LEVEL = (
    "seed", "total_steps", "batch_size", "checkpoint_every", "eval_every",
    "log_every", "model", "optimizer", "mesh", "data",
)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the fields every recipe must have and their ranges.

  Raises ValueError naming the first field at fault.
  """
  for key in REQUIRED_TOP_LEVEL:
    if key not in config:
      raise ValueError(f"config is missing the required field {key!r}")

  def _int(name, minimum):
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"config.{name} must be an int, got {value!r}")
    if value < minimum:
      raise ValueError(f"config.{name} must be >= {minimum}, got {value}")

  _int("seed", -(2**31))
  _int("total_steps", 1)
  _int("batch_size", 1)
  for name in ("checkpoint_every", "eval_every", "log_every"):
    _int(name, 0)
  mesh = list(config.mesh)
  if not mesh:
    raise ValueError("config.mesh must name at least one axis, e.g. [('data', -1)]")
  for entry in mesh:
    if len(entry) != 2 or not isinstance(entry[0], str) or not isinstance(entry[1], int):
      raise ValueError(f"config.mesh entries are (name, size) pairs, got {entry!r}")
  if sum(1 for _, size in mesh if size == -1) > 1:
    raise ValueError(f"config.mesh may have at most one axis of size -1: {mesh}")
  from vlm_jax import profiling  # pylint: disable=import-outside-toplevel
  profiling.parse_steps(config.get("profile_steps"))  # ValueError naming the field
  _validate_keep_best(config)
  from vlm_jax import finetune  # pylint: disable=import-outside-toplevel
  finetune.check_config(config)


def _validate_keep_best(config) -> None:
  """keep_best_metric must be an evaluator's metric, evaluated at checkpoint steps."""
  best = config.get("keep_best_metric")
  if not best:
    return
  from vlm_jax import evaluators  # pylint: disable=import-outside-toplevel
  names = evaluators.metric_names(config)
  if best not in names:
    raise ValueError(f"config.keep_best_metric={best!r} is not reported by the enabled "
                     f"evaluators (config.evals); they report {names}")
  every, ckpt = config.eval_every, config.checkpoint_every
  if every and (not ckpt or every % ckpt):
    raise ValueError(
        f"config.keep_best_metric needs every evaluation step to be a checkpoint step: "
        f"config.eval_every={every} must be a multiple of config.checkpoint_every={ckpt}")


def recipe(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The recipe file ``path``'s ``get_config(arg)``, for recipes built on another one
  (pass a path beside the calling recipe: ``os.path.dirname(__file__)``)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"{name}_recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def base_config() -> ml_collections.ConfigDict:
  """The shared base of every recipe: all top-level fields with their defaults.

  Recipes start here and override. Every field exists, so an override of a
  misspelt key (``--config.batch_sise=8``) is an error that names it.
  """
  # pylint: disable=import-outside-toplevel
  from vlm_jax import finetune, models, optim
  from vlm_jax.data import config as data_config
  from vlm_jax.tasks import classification

  c = data_config.default_config()       # data, pp, tokenizer, evals
  # The objective (a module in vlm_jax/tasks/): "contrastive" (image-text, SigLIP /
  # CLIP) | "classification" (labels; model.num_classes from the data) | "captioning"
  # (image -> connector -> causal decoder; model.captioner, model.connector).
  c.task = "contrastive"
  c.classification = classification.default_config()  # label smoothing, mixup, cutmix
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256                     # global, over all devices and hosts
  c.log_every = 50                       # 0 turns a periodic action off
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 3                 # most recent checkpoints kept
  c.keep_best_metric = ""                # e.g. "zeroshot/top1": also keep the best one
  # Train steps traced with jax.profiler into WORKDIR/profile (TensorBoard / Perfetto):
  # ints and "start:stop" strings, e.g. (5,) or ("10:13",); () = off. See vlm_jax/profiling.py.
  c.profile_steps = ()
  # On a CPU-only host with one CPU device, run XLA programs on the calling thread
  # and keep freed memory in the process (vlm_jax/cpu_runtime.py): ~15% faster CPU
  # train steps. Applied only before jax starts its backends; nothing on GPU/TPU hosts.
  c.tune_cpu = True
  # jax's persistent compilation cache: compiled programs are kept in this directory
  # and reused by any later process with the same program and devices, e.g. a run
  # resumed after a crash skips compiling its train step. "" = off. Shared by runs.
  c.compilation_cache_dir = ""
  c.model = models.default_config()
  c.optimizer = optim.default_config()
  c.loss = "sigmoid"                     # "sigmoid" (SigLIP) | "softmax" (CLIP)
  c.loss_impl = "chunked"                # "chunked" (ring) | "gather" | "dense"
  # Micro-batches per step: the gradient of the full batch_size-batch loss
  # (all B x B pairs) is accumulated over this many sequential micro-batches,
  # trading time for activation memory. batch_size must be divisible by
  # grad_accum_steps x the mesh's batch shards.
  c.grad_accum_steps = 1
  # Device mesh: axes and sizes, -1 = all remaining devices. The batch is split
  # over "data" and "fsdp"; params are split by the logical-axis rules
  # (vlm_jax.parallel.DEFAULT_RULES): "embed" over fsdp, "mlp"/"heads" over tensor.
  # A tuple of (name, size) pairs, so the command line can override it:
  #   --config.mesh="(('data', -1), ('fsdp', 8), ('tensor', 1))"
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  # Logical-axis rules, (logical name, mesh axis or axes) pairs; empty = the
  # defaults (vlm_jax.parallel.DEFAULT_RULES). E.g. (("embed", "fsdp"), ("mlp", "tensor")).
  c.sharding_rules = ()
  c.mesh_axis_types = "auto"             # "auto" | "explicit"
  # Starting from weights (init: a run's workdir, a transformers directory or a
  # big_vision .npz; read only when the run starts fresh) and what trains
  # (finetune: freeze regex, LoRA). See vlm_jax/finetune.py.
  c.init, c.finetune = finetune.default_config()
  return c
