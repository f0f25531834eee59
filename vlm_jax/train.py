r"""The training program: one loop for every task.

    python -m vlm_jax.train --config configs/siglip_shapes.py --workdir /tmp/run
    python -m vlm_jax.train --config configs/vit_cifar10.py:cpu --workdir /tmp/cifar \
        --config.data.source=folder --config.data.folder.path=/data/cifar10_folders

One batch's path: the task (``config.task``, a module in ``vlm_jax/tasks/``)
makes the data stream -> this process's numpy rows (contrastive: images and
caption tokens; classification: images and labels) -> ``parallel.global_batch``
puts them on the mesh, split over the batch axes -> ``train_step`` (one
jit-compiled pure function with explicit in/out shardings): the task's
``grad_fn`` runs the model and its loss (contrastive: the two towers and the
sigmoid / softmax loss, which never gathers the global batch; classification:
the classifier and softmax cross-entropy) and returns gradients and updated
BatchNorm statistics -> optax -> new state. Around it: metrics.jsonl, a
progress line, the task's evaluators every ``eval_every`` steps and an Orbax
checkpoint every ``checkpoint_every`` steps. A run resumes from the latest
checkpoint in ``--workdir``; SIGTERM saves and exits; a NaN loss stops the run
with the last good checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import logs
from vlm_jax import config_util, cpu_runtime, finetune, models, optim, parallel, profiling, tasks
from vlm_jax.tasks.common import check_batch_size

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file, e.g. configs/siglip_shapes.py[:runlocal].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree."""
  step: jax.Array      # int32 scalar: number of updates applied
  params: Any          # float32 parameters
  opt_state: Any       # optax state
  rng: jax.Array       # base PRNG key; step keys are fold_in(rng, step)
  # Non-parameter model collections, e.g. {"batch_stats": ...} (BatchNorm running
  # statistics, computed over the global batch); {} for models without any.
  model_state: Any = flax.struct.field(default_factory=dict)

  @property
  def variables(self) -> dict:
    """{"params": ..., **model_state}: what ``model.apply`` takes."""
    return {"params": self.params, **self.model_state}


# ----------------------------------------------------------------- setup ---

def _split_variables(variables) -> tuple[Any, dict]:
  variables = dict(variables)
  return variables.pop("params"), variables


def _abstract_state(config, model, tx, mesh) -> tuple[TrainState, TrainState]:
  """(shapes, shardings) of the TrainState, from one ``jax.eval_shape`` of the init."""
  rules = parallel.rules_for_mesh(mesh, parallel.rules_from_config(config))
  key = jax.random.PRNGKey(0)
  boxed = jax.eval_shape(  # with LoRA: the factors beside their kernels
      lambda k: finetune.init_variables(config, model, k, *models.init_inputs(config.model)), key)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  param_shardings, state_shardings = _split_variables(shardings)
  abstract_params, abstract_model_state = _split_variables(nn.unbox(boxed))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  repl = parallel.replicated(mesh)
  opt_shardings = optim.state_shardings(abstract_opt, param_shardings, repl)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                      opt_state=abstract_opt, rng=jax.ShapeDtypeStruct(key.shape, key.dtype),
                      model_state=abstract_model_state)
  return shapes, TrainState(step=repl, params=param_shardings, opt_state=opt_shardings,
                            rng=repl, model_state=state_shardings)


def train_state_shardings(config, model, tx, mesh) -> TrainState:
  """The TrainState's NamedShardings on ``mesh``, from shapes only (nothing is allocated).

  Parameters follow their logical axes through the rules (``config.sharding_rules``
  or ``parallel.DEFAULT_RULES``); optimizer moments follow their parameters;
  BatchNorm statistics follow their logical axes too (usually replicated);
  step, rng and other optimizer scalars are replicated.
  """
  return _abstract_state(config, model, tx, mesh)[1]


def _init_fn(config, model, tx):
  """``make(init_key, state_rng) -> TrainState``: a fresh state at step 0."""
  args = models.init_inputs(config.model)

  def make(init_key, state_rng):
    params, model_state = _split_variables(
        nn.unbox(finetune.init_variables(config, model, init_key, *args)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng, model_state=model_state)
  return make


def abstract_train_state(config, model, tx, mesh) -> tuple[TrainState, TrainState]:
  """(state, state_shardings): the TrainState as ShapeDtypeStructs carrying their
  shardings, from shapes only. A restore target: resuming needs no random init,
  so it neither compiles nor runs the initialiser, nor holds a second copy of
  the state while the checkpoint is read."""
  shapes, shardings = _abstract_state(config, model, tx, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return abstract, shardings


def create_train_state(config, model, tx, mesh, rng):
  """Initialises the TrainState directly sharded on ``mesh``.

  ``jax.jit`` with ``out_shardings`` from the logical-axis rules
  (``train_state_shardings``): no device ever holds the whole unsharded model.

  Returns:
    (state, state_shardings)
  """
  init_rng, state_rng = jax.random.split(rng)
  shardings = train_state_shardings(config, model, tx, mesh)
  # No mesh context here: flax's boxed DenseGeneral init would apply logical
  # constraints to kernels before their final reshape; out_shardings suffice.
  state = jax.jit(_init_fn(config, model, tx), out_shardings=shardings)(init_rng, state_rng)
  return state, shardings


def make_train_step(config, model, tx, lr_fn, mesh, state_shardings):
  """Returns the jit-compiled ``train_step(state, batch) -> (state, metrics)``.

  ``batch``: the task's global batch (``tasks.get(config).batch_shardings``),
  split over the mesh's batch axes. The state buffers are donated. Metrics:
  "train/loss", "train/grad_norm", "train/param_norm", "train/lr" and the
  task's own (e.g. "train/t", "train/accuracy").

  Raises:
    ValueError: ``config.batch_size`` not divisible by grad_accum_steps x the batch shards.
  """
  task = tasks.get(config)
  grad_fn = task.make_grad_fn(config, model, mesh, state_shardings.params)

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    with parallel.activation_rules(mesh, parallel.rules_from_config(config)):
      loss, grads, model_state, task_metrics = grad_fn(state.params, state.model_state, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train/loss": loss,
        "train/grad_norm": optax.tree.norm(grads),
        "train/param_norm": optax.tree.norm(params),
        "train/lr": lr_fn(state.step),
        **task_metrics,
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state)
    return new_state, metrics

  # Parameter and batch shardings are explicit; activations are pinned by their
  # logical axes (parallel.activation_rules; not flax's rules context, whose
  # constraints reject DenseGeneral's boxed kernel inits re-run at flattened shape).
  return jax.jit(step_fn, in_shardings=(state_shardings, task.batch_shardings(config, mesh)),
                 out_shardings=(state_shardings, parallel.replicated(mesh)),
                 donate_argnums=(0,))


# --------------------------------------------------------------- logging ---

class MetricsLog:
  """Appends one JSON object per line to ``workdir/metrics.jsonl``, and its scalars
  to TensorBoard event files in ``workdir`` (``logs.TensorBoardWriter``).

  On resume from step S, lines with step > S (written after the checkpoint the
  run resumed from) are dropped, so the file reads as one uninterrupted run.
  """

  def __init__(self, workdir: str, resume_step: int | None, *, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self.tensorboard = logs.TensorBoardWriter(workdir, resume_step) if enabled else None
    if enabled and os.path.exists(self.path):
      keep = []
      with open(self.path) as f:
        for line in f:
          try:
            row = json.loads(line)
          except json.JSONDecodeError:
            continue  # a torn last line from a killed run
          if resume_step is not None and row.get("step", 0) <= resume_step:
            keep.append(line if line.endswith("\n") else line + "\n")
      with open(self.path, "w") as f:
        f.writelines(keep)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _to_py(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    self.tensorboard.write(step, metrics)

  def flush(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.flush()

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()


def _to_py(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# ------------------------------------------------------------ preemption ---

class _StopSignal:
  """Turns SIGTERM (preemption) into a flag the loop checks between steps."""

  def __init__(self):
    self.received = None
    if jax.process_count() > 1:  # jax's preemption service takes it: parallel.agreed_stop
      return
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. called from a notebook)
      pass

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = signum


# ------------------------------------------------------------------ main ---

def use_compilation_cache(directory: str, min_compile_secs: float = 1.0) -> None:
  """Points jax's persistent compilation cache at ``directory`` ("" leaves it as is).

  Every program that took at least ``min_compile_secs`` to compile is written
  there, keyed by its HLO, devices, flags and jax version, and later processes
  load it instead of compiling. A cache already in use elsewhere is re-pointed.
  """
  if not directory:
    return
  from jax.experimental import compilation_cache as cc  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    cc.compilation_cache.reset_cache()  # a cache opened before follows the new directory
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

  Returns the last logged metrics (a dict of python floats).
  """
  if config.get("tune_cpu", True):
    cpu_runtime.tune()  # before anything starts jax's backends
  config_util.validate(config)
  use_compilation_cache(config.get("compilation_cache_dir", ""))
  task = tasks.get(config)
  task.prepare_config(config)  # e.g. classification's num_classes, before config.json
  parallel.maybe_initialize_distributed()
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = parallel.make_mesh(config.mesh, axis_types=config.get("mesh_axis_types", "auto"))
  check_batch_size(config, mesh)
  logging.info("Task %s; mesh %s on %d devices, %d processes", task.NAME, dict(mesh.shape),
               jax.device_count(), jax.process_count())

  model = models.build(config.model)
  tx, lr_fn = optim.build(config.optimizer, config.total_steps,
                          trainable=finetune.trainable_fn(config))
  ckpt = ckpt_lib.Checkpointer(
      workdir, keep=config.get("keep_checkpoints", 3),
      best_metric=config.get("keep_best_metric") or None)
  latest = ckpt.latest_step()
  if latest is None:
    state, state_shardings = create_train_state(
        config, model, tx, mesh, jax.random.PRNGKey(config.seed))
  else:  # the checkpoint holds every value: no random init to compile and run
    state, state_shardings = abstract_train_state(config, model, tx, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Model has %s parameters", f"{n_params:,}")

  data_iter = iter(task.train_dataset(
      config, process_index=jax.process_index(), process_count=jax.process_count()))
  start_step = 0
  if latest is not None:
    state, data_state = ckpt.restore(latest, state)
    if data_state:
      data_iter.set_state(data_state)
    start_step = int(state.step)
    if is_main:
      print(f"Resumed from the checkpoint at step {start_step} in "
            f"{ckpt_lib.checkpoint_dir(workdir)}", flush=True)
  elif finetune.has_init(config):  # a fresh run starts from config.init's weights
    params, model_state, report = finetune.load_init(config, state.params, state.model_state)
    state = state.replace(params=params, model_state=model_state)
    logging.info("%s", report)
    if is_main:
      print(report, flush=True)
  log = MetricsLog(workdir, start_step if latest is not None else None, enabled=is_main)

  prof = profiling.StepProfiler(config.get("profile_steps"), workdir, start_step)
  train_step = prof.wrap(make_train_step(config, model, tx, lr_fn, mesh, state_shardings))
  evaluator = task.build_evaluators(config, model, mesh=mesh, workdir=workdir) or None
  stop = _StopSignal()

  def periodic(every, step):
    return every and (step % every == 0 or step == config.total_steps)

  last = {}
  step = start_step
  t_start = t_log = time.time()
  n_images, pending = [], []  # device scalars, read only when needed
  print(f"Training {task.NAME} for {config.total_steps} steps from step {start_step} "
        f"({n_params:,} params, mesh {dict(mesh.shape)} on {jax.device_count()} device(s))",
        flush=True)
  try:
    while step < config.total_steps:
      batch = parallel.global_batch(next(data_iter), mesh)
      state, metrics = train_step(state, batch)
      step += 1
      if step == start_step + 1:  # the first step compiles: rates count from its end
        jax.block_until_ready(metrics)
        t_start = t_log = time.time()
      else:
        n_images.append(metrics.get("train/num_images", config.batch_size))

      # Losses are read without stalling the device every step: at each log,
      # eval and checkpoint step, so no checkpoint ever holds a NaN state.
      pending.append((step, metrics["train/loss"]))
      # A signal read once per step: one arriving after this point stops the next step.
      stopping = parallel.agreed_stop(step, stop.received)
      saving = periodic(config.checkpoint_every, step) or stopping
      if saving or periodic(config.log_every, step) or periodic(config.eval_every, step):
        for s, value in pending:
          if not math.isfinite(float(value)):
            ckpt.wait()
            raise FloatingPointError(
                f"Non-finite loss {float(value)} at step {s}; stopping. The last good "
                f"checkpoint (step {ckpt.latest_step()}) in {workdir} is intact.")
        pending = []

      if periodic(config.log_every, step):
        now = time.time()
        rate = sum(float(n) for n in n_images) / max(now - t_log, 1e-9)
        done = max(step - start_step - 1, 1) / max(now - t_start, 1e-9)
        eta = (config.total_steps - step) / done
        row = {k: float(v) for k, v in metrics.items()}
        row["train/images_per_sec"] = rate
        row["data/skipped"] = int(getattr(data_iter, "num_skipped", 0))
        log.write(step, row)
        last.update(row)
        if is_main:
          print(f"step {step:>7d}/{config.total_steps} | loss {row['train/loss']:.4f} | "
                f"{rate:,.0f} img/s | ETA {_fmt_time(eta)}", flush=True)
        t_log, n_images = time.time(), []

      eval_metrics = {}
      if evaluator is not None and periodic(config.eval_every, step):
        t_eval = time.time()
        eval_metrics = evaluator.run(finetune.merge_lora(state.variables), step=step)
        log.write(step, eval_metrics)
        last.update(eval_metrics)
        if is_main:
          print(f"step {step:>7d} | " + " | ".join(
              f"{k} {v:.4f}" for k, v in eval_metrics.items()), flush=True)
        # Evaluation time counts neither against images/s nor the ETA.
        t_log += time.time() - t_eval
        t_start += time.time() - t_eval

      if saving:
        ckpt.save(step, state, data_iter.get_state(), metrics=eval_metrics or None)
        log.flush()
      if stopping:
        print(f"Received signal {stopping}: saved a checkpoint at step {step}, exiting.",
              flush=True)
        break
  finally:
    prof.close()  # a trace still open (config.profile_steps)
    ckpt.close()  # waits for async saves, also when the run raises
    log.close()
  return last


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  logs.quiet_libraries()  # our progress lines, and library logs from WARNING up
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
