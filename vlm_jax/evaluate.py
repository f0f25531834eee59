r"""Standalone evaluation of a training run's checkpoint (or of transformers weights).

    python -m vlm_jax.evaluate --workdir /tmp/shapes
    python -m vlm_jax.evaluate --workdir /tmp/shapes --step 800 \
        --config.evals.linear_probe.enabled=True --config.evals.retrieval.num_examples=1000
    python -m vlm_jax.evaluate --hf /path/to/siglip --config configs/siglip_b16.py \
        --config.tokenizer.model_path=/path/to/spiece.model --output /tmp/siglip_eval.json

With ``--workdir`` the checkpoint is read with ``checkpoint.load`` and evaluated
with the run's own config (``DIR/config.json``): the evaluators enabled there
(``config.evals.*.enabled``), on its mesh, so the numbers equal the ones
training logged at that step. ``--config.KEY=VALUE`` overrides any config field
(evaluator sections missing from an older run's config are added, disabled).
The metrics are printed and written to ``DIR/eval_<step>.json`` (or ``--output``):
one JSON object with "step" and the metric names, like a metrics.jsonl row.
Evaluation data is streamed in batches, each process reading its share, so an
ImageNet-sized split needs no more host memory than a small one.

With ``--hf PATH`` the weights come from a transformers ``save_pretrained``
directory (``vlm_jax.interop.hf.load``); data, preprocessing, tokenizer and
evaluators come from ``--config RECIPE.py[:ARG]`` (default: the base config),
with ``pp.image_size`` and ``tokenizer.max_len`` set to the model's unless
overridden. The tokenizer must match the checkpoint's (e.g. SigLIP's
SentencePiece model via ``--config.tokenizer.model_path``).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
from absl import app, flags, logging

from vlm_jax import checkpoint, config_util, cpu_runtime, evaluators, logs, models, parallel, tasks

# Its own FlagValues: vlm_jax.train defines --workdir/--config too, and both modules
# may be imported in one process (tests, notebooks).
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "Training run directory to evaluate.", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
flags.DEFINE_string("hf", None, "A transformers save_pretrained directory to evaluate instead "
                    "of a workdir checkpoint.", flag_values=FLAGS)
flags.DEFINE_string("config", None, "Recipe file (configs/NAME.py[:ARG]) giving data, "
                    "tokenizer and evaluators for --hf (default: the base config).",
                    flag_values=FLAGS)
flags.DEFINE_string("output", None, "Where to write the metrics JSON (default: "
                    "WORKDIR/eval_<step>.json; with --hf and no --workdir: not written).",
                    flag_values=FLAGS)

# "--config.KEY=VALUE" arguments, taken out of argv before absl parses it (the base
# config is only known once --workdir / --config are read).
_OVERRIDES: list[str] = []


# ----------------------------------------------------------------- config ---

def load_recipe(spec: str) -> ml_collections.ConfigDict:
  """``"path/to/recipe.py[:ARG]"`` -> the recipe's ``get_config(ARG)``."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {spec!r}: no such recipe file {path!r}")
  mod_spec = importlib.util.spec_from_file_location("vlm_jax_recipe", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def with_eval_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the ``evals`` fields a run's config lacks (older runs): missing evaluator
  sections are added disabled, missing fields of present sections take their defaults."""
  from vlm_jax.data import config as data_config  # pylint: disable=import-outside-toplevel
  defaults = data_config.default_config().evals
  if config.get("evals") is None:
    config.evals = ml_collections.ConfigDict()
  for name, section in defaults.items():
    if name not in config.evals or config.evals[name] is None:
      config.evals[name] = section
      config.evals[name].enabled = False
      continue
    for key, value in section.items():
      if key not in config.evals[name]:
        config.evals[name][key] = value
  return config


def _parse_value(text: str, current, key: str):
  def literal():
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  try:
    if isinstance(current, bool):
      return config_util._parse_value(text, current)  # pylint: disable=protected-access
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (list, tuple)):
      value = literal()
      if not isinstance(value, (list, tuple)):
        value = (value,)
      return type(current)(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"--config.{key}: cannot parse {text!r} as "
                     f"{type(current).__name__}") from e
  return literal()  # None / placeholder: a Python literal, else the string


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]
                    ) -> ml_collections.ConfigDict:
  """Applies ``"KEY=VALUE"`` overrides (KEY dotted, e.g. ``evals.retrieval.enabled``).

  VALUE is parsed as the field's current type (bool, int, float, str, tuple/list as
  a Python literal). Raises ValueError naming an unknown key or a bad value.
  """
  for item in overrides:
    key, eq, text = item.partition("=")
    if not eq:
      raise ValueError(f"--config.{item}: expected --config.KEY=VALUE")
    node = config
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ValueError(f"--config.{key}: config has no field "
                         f"{'.'.join(parents[:i + 1])!r}")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      where = ".".join(parents) or "config"
      known = sorted(node) if isinstance(node, ml_collections.ConfigDict) else []
      raise ValueError(f"--config.{key}: {where} has no field {leaf!r}; known: {known}")
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise ValueError(f"--config.{key} is a section; override its fields")
    value = _parse_value(text, node[leaf], key)
    with node.unlocked():
      node[leaf] = value
  return config


# --------------------------------------------------------------- running ---

def eval_mesh(config) -> jax.sharding.Mesh:
  """The run's mesh on this machine's devices, or all devices on "data" when it does
  not fit (e.g. an 8-device run evaluated on a laptop)."""
  try:
    return parallel.make_mesh(config.mesh, axis_types=config.get("mesh_axis_types", "auto"))
  except ValueError as e:
    logging.warning("config.mesh %s does not fit %d devices (%s); evaluating on a "
                    "data-parallel mesh", list(config.mesh), jax.device_count(), e)
    return parallel.make_mesh([("data", -1)])


def evaluate(config, model, params, *, mesh=None, names=None, workdir=None,
             step=None) -> dict:
  """Builds the evaluators of ``config``'s task and runs them on ``params``.

  Returns the merged metrics {name: float}. ``params``: params or whole variables
  (with BatchNorm statistics); ``names``: which evaluators (None: the task's
  enabled ones); ``mesh``: the mesh ``params`` live on (None: one device);
  ``workdir``/``step``: where evaluators write files (the confusion matrix).
  """
  task = tasks.get(config)
  if names is None:
    names = evaluators.enabled_names(config, task.EVALUATORS)
  evals = evaluators.build_evaluators(config, model, mesh=mesh, names=names, workdir=workdir)
  if not evals:
    raise ValueError(f"no evaluator of task {task.NAME!r} is enabled; enable one of "
                     f"{task.EVALUATORS}, e.g. --config.evals.{task.EVALUATORS[0]}.enabled=True")
  metrics = evals.run(params, step=step)
  logging.info("Evaluator wall times (s): %s", evals.seconds)
  skipped = {k: v for k, v in evals.skipped.items() if v}
  if skipped:
    logging.warning("Corrupt evaluation examples left out: %s", skipped)
  return metrics


def _hf_model(path: str, config):
  try:
    from vlm_jax.interop import hf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise RuntimeError(f"--hf needs vlm_jax.interop.hf, which failed to import: {e}") from e
  model, variables = hf.load(path)
  config.model = hf.model_config(hf.read_config(path))
  return model, variables["params"]


def run(workdir: str | None = None, *, step: int | None = None, hf: str | None = None,
        recipe: str | None = None, overrides: Sequence[str] = (),
        output: str | None = None) -> dict:
  """``python -m vlm_jax.evaluate`` as a function; returns the written row.

  Args:
    workdir: a training run's directory (its checkpoint and config).
    step: the checkpoint step (None: the latest).
    hf: a transformers directory to evaluate instead of the workdir's checkpoint.
    recipe: ``--config`` for ``hf`` mode.
    overrides: ``"KEY=VALUE"`` config overrides.
    output: the JSON path (None: ``workdir/eval_<step>.json``; nothing with only ``hf``).
  Returns:
    {"step": int (-1 for --hf), metric name: float, ...}.
  """
  if not workdir and not hf:
    raise app.UsageError("--workdir or --hf is required")
  t0 = time.time()
  if hf:
    if step is not None:
      raise app.UsageError("--step applies to --workdir checkpoints, not to --hf")
    config = load_recipe(recipe) if recipe else config_util.base_config()
    config.unlock()
    model, params = _hf_model(hf, config)
    config.pp.image_size = config.model.image.image_size
    config.tokenizer.max_len = config.model.text.max_len
    config = apply_overrides(with_eval_defaults(config), overrides)
    mesh = eval_mesh(config)
    params = jax.device_put(params, checkpoint.param_shardings(model, config, mesh))
    step_out, source = -1, hf
  else:
    if recipe:
      raise app.UsageError("--config RECIPE is for --hf; a workdir evaluates with its own "
                           "config.json (override fields with --config.KEY=VALUE)")
    config = apply_overrides(with_eval_defaults(checkpoint.read_config(workdir)), overrides)
    mesh = eval_mesh(config)
    ckpt = checkpoint.load(workdir, step, mesh=mesh)
    # Built from the overridden config (e.g. --config.model.dtype=bfloat16); same params.
    model, params, step_out, source = (models.build(config.model), ckpt.variables, ckpt.step,
                                       workdir)
  metrics = evaluate(config, model, params, mesh=mesh, workdir=workdir,
                     step=step_out if not hf else None)
  row = {"step": int(step_out), **{k: float(v) for k, v in metrics.items()}}
  if output is None and workdir:
    name = f"eval_{step_out}.json" if not hf else "eval_hf.json"
    output = os.path.join(workdir, name)
  if output and jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
      json.dump(row, f, indent=2)
  print(f"Evaluated {source} at step {step_out} in {time.time() - t0:.1f}s"
        + (f" -> {output}" if output else ""), flush=True)
  for k, v in metrics.items():
    print(f"  {k:24s} {v:.4f}", flush=True)
  return row


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl ``flags_parser``: takes the ``--config.KEY=VALUE`` items out of ``argv``
  (into ``_OVERRIDES``), parses this program's flags, then absl's own (logging, ...)
  from the rest; returns the leftover arguments."""
  rest, overrides = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      item = arg[len("--config."):]
      if "=" not in item:  # "--config.KEY VALUE"
        if i + 1 >= len(argv):
          raise app.UsageError(f"{arg} needs a value")
        item = f"{item}={argv[i + 1]}"
        i += 1
      overrides.append(item)
    else:
      rest.append(arg)
    i += 1
  _OVERRIDES[:] = overrides
  if any(a in ("-h", "--help", "--helpshort", "-?") for a in rest[1:]):
    print(__doc__ + "\nFlags:\n" + FLAGS.get_help()
          + "\n  --config.KEY=VALUE: override a config field (e.g. "
          "--config.evals.linear_probe.enabled=True)")
    sys.exit(0)
  try:
    rest = FLAGS(rest, known_only=True)
    return flags.FLAGS(rest)
  except flags.Error as e:
    raise app.UsageError(str(e)) from e


def _cli_flags_parser(argv):
  try:
    return parse_flags(argv)
  except app.UsageError as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --help to see the flags.\n")
    sys.exit(1)


def _run_flags(argv) -> dict:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  return run(FLAGS.workdir, step=FLAGS.step, hf=FLAGS.hf, recipe=FLAGS.config,
             overrides=list(_OVERRIDES), output=FLAGS.output)


def main(argv):
  cpu_runtime.tune()  # a CPU-only host: synchronous dispatch, memory kept (no-op elsewhere)
  logs.quiet_libraries()  # the printed results, and library logs from WARNING up
  _run_flags(argv)


def cli(argv: Sequence[str]) -> dict:
  """Runs the command line ``argv`` (``argv[0]`` the program name) in-process, e.g. from
  a test or a notebook; flags not given take their defaults. Returns ``run``'s row."""
  FLAGS.unparse_flags()
  return _run_flags(parse_flags(argv))


if __name__ == "__main__":
  app.run(main, flags_parser=_cli_flags_parser)
