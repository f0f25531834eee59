r"""The training program.

    python -m vlm_jax.train --config configs/siglip_shapes.py --workdir /tmp/run
    python -m vlm_jax.train --config configs/siglip_b16.py:runlocal --workdir /tmp/b16 \
        --config.total_steps=20 --config.batch_size=16

One batch's path: ``data.pipeline.train_dataset`` yields this process's numpy
rows -> ``parallel.global_batch`` puts them on the mesh, split over the batch
axes -> ``train_step`` (one jit-compiled pure function with explicit in/out
shardings): the two-tower model embeds images and texts -> the contrastive loss
(``losses``; the sigmoid loss never gathers the global batch) -> optax AdamW ->
new state. Around it: metrics.jsonl, a progress line, zero-shot evaluation every
``eval_every`` steps and an Orbax checkpoint every ``checkpoint_every`` steps.
A run resumes from the latest checkpoint in ``--workdir``.
NaViT recipes (``model.image.type`` "navit" / "naflex") read packed batches from
``data.navit_pipeline`` instead; the loss then skips empty image slots.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
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
from vlm_jax import config_util, losses, models, optim, parallel
from vlm_jax.data import navit_pipeline, pipeline
from vlm_jax import evaluators

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


# ----------------------------------------------------------------- setup ---

def train_state_shardings(config, model, tx, mesh) -> TrainState:
  """The TrainState's NamedShardings on ``mesh``, from shapes only (nothing is allocated).

  Parameters follow their logical axes through the rules (``config.sharding_rules``
  or ``parallel.DEFAULT_RULES``); optimizer moments follow their parameters;
  step, rng and other optimizer scalars are replicated.
  """
  images, tokens = models.dummy_inputs(config.model)
  rules = parallel.rules_for_mesh(mesh, parallel.rules_from_config(config))
  key = jax.random.PRNGKey(0)
  boxed = jax.eval_shape(lambda k: model.init(k, images, tokens), key)
  logical = nn.get_partition_spec(boxed)["params"]
  param_shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
  abstract_params = nn.unbox(boxed)["params"]
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  repl = parallel.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: repl)
  return TrainState(step=repl, params=param_shardings, opt_state=opt_shardings, rng=repl)


def create_train_state(config, model, tx, mesh, rng):
  """Initialises the TrainState directly sharded on ``mesh``.

  ``jax.jit`` with ``out_shardings`` from the logical-axis rules
  (``train_state_shardings``): no device ever holds the whole unsharded model.

  Returns:
    (state, state_shardings)
  """
  images, tokens = models.dummy_inputs(config.model)
  init_rng, state_rng = jax.random.split(rng)
  shardings = train_state_shardings(config, model, tx, mesh)

  def make(key):
    params = nn.unbox(model.init(key, images, tokens))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng)

  # No mesh context here: flax's boxed DenseGeneral init would apply logical
  # constraints to kernels before their final reshape; out_shardings suffice.
  state = jax.jit(make, out_shardings=shardings)(init_rng)
  return state, shardings


def check_batch_size(config, mesh) -> int:
  """Checks ``config.batch_size`` against the mesh and ``config.grad_accum_steps``.

  The global batch must split into ``grad_accum_steps`` micro-batches that each
  split evenly over the mesh's batch shards (``parallel.num_batch_shards``).

  Returns:
    M = config.grad_accum_steps (an int >= 1).
  Raises:
    ValueError naming ``config.batch_size`` / ``config.grad_accum_steps``.
  """
  accum = config.get("grad_accum_steps", 1)
  if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
    raise ValueError(f"config.grad_accum_steps must be an int >= 1, got {accum!r}")
  shards = parallel.num_batch_shards(mesh)
  if config.batch_size % (accum * shards):
    where = (f"the {shards} batch shards of mesh {dict(mesh.shape)} (axes "
             f"{parallel.batch_axes(mesh)})")
    if accum > 1:
      where = (f"config.grad_accum_steps={accum} x {where} = {accum * shards}; every "
               f"micro-batch must split evenly over the batch shards")
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by {where}")
  return accum


def _constrain(x, sharding):
  """Pins ``x`` to ``sharding``: a reshard on Explicit meshes, a hint on Auto ones."""
  if parallel.is_explicit(sharding.mesh):
    return jax.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def _split_micro(x, accum: int):
  """[B, ...] -> [M, B/M, ...]; micro-batch m holds rows m, m+M, m+2M, ...

  Taking every M-th row (not a contiguous block) keeps each micro-batch evenly
  spread over the batch shards: a device's contiguous block of B/n rows holds
  B/(n*M) rows of every micro-batch, so the split moves no data.
  """
  b = x.shape[0]
  return jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)


def _merge_micro(x):
  """Inverse of ``_split_micro``: [M, B/M, ...] -> [B, ...] in the original row order."""
  accum, micro = x.shape[:2]
  return jnp.swapaxes(x, 0, 1).reshape(accum * micro, *x.shape[2:])


def _once(x, first):
  """``x`` in value; its gradient flows only where ``first`` is True."""
  x = jnp.asarray(x)
  frozen = jax.lax.stop_gradient(x)
  return frozen + first.astype(x.dtype) * (x - frozen)


def is_packed(config) -> bool:
  """True when the image tower takes packed NaViT batches (model.image.type navit/naflex)."""
  return config.model.image.get("type", "vit") in ("navit", "naflex")


def _packed_batch_shardings(mesh):
  """Shardings of a NaViT batch (navit_pipeline): every array split on its first axis."""
  bs = functools.partial(parallel.batch_sharding, mesh)
  return {"image": {"patches": bs(3), "segment_ids": bs(2), "positions": bs(3),
                    "grid_sizes": bs(3)},
          "tokens": bs(3), "valid": bs(2)}


def make_grad_fn(config, model, mesh, param_shardings=None):
  """Returns ``grad_fn(params, batch, rng) -> (loss, grads, aux)``, pure, not jitted.

  ``batch``: {"image": float32 [B,H,W,3], "tokens": int32 [B,L]} (the global
  batch); ``rng``: the step's dropout key; ``loss``: float32 scalar, the
  contrastive loss of the whole batch; ``grads``: like ``params``;
  ``aux``: {"t": temperature, "b": bias} (float32 scalars).

  NaViT (``is_packed(config)``): ``batch`` is {"image": packed dict [S, ...],
  "tokens": int32 [S, M, L], "valid": bool [S, M]} (``data.navit_pipeline``);
  the model flattens the S x M slots and the loss ignores empty ones (the
  model's ``img/valid``); ``aux`` adds "num_images". grad_accum_steps must be 1.

  With ``config.grad_accum_steps = M > 1`` the batch is split into M
  micro-batches (rows m, m+M, ...; see ``_split_micro``) and the loss still
  sees all B x B pairs, as open_clip's ``accum_freq``: a first pass embeds
  every micro-batch without gradients (a [B, D] cache per tower); then, for
  each micro-batch, its embeddings are recomputed with gradients, put into the
  cache in place of their cached copy, and the full-batch loss is
  differentiated; the parameter gradients are summed. Their sum is the
  gradient of the full-batch loss, because each embedding enters the loss once.
  The temperature and bias enter every one of the M losses, so their gradient
  is kept from the first only. Micro-batch m uses dropout key
  ``fold_in(rng, m)`` in both passes, so recomputed and cached embeddings
  agree. ``lax.scan`` runs the micro-batches one after another: only one
  micro-batch's activations are live at a time (at the price of M + 1 forward
  and M backward passes, and M evaluations of the B x B loss).
  """
  accum = check_batch_size(config, mesh)
  loss_fn = losses.get_loss_fn(
      config.get("loss", "sigmoid"), config.get("loss_impl", "chunked"),
      mesh=mesh, batch_axes=parallel.batch_axes(mesh))

  def embed(params, images, tokens, key):
    zimg, ztxt, out = model.apply(
        {"params": params}, images, tokens, train=True, rngs={"dropout": key})
    return zimg, ztxt, out["t"], out["b"]

  if parallel.is_explicit(mesh):
    # On Explicit meshes every op must have an unambiguous output sharding;
    # the towers (embedding gathers, convolutions, FSDP matmuls) leave that to
    # the partitioner, so they run with Auto axes and only their outputs are
    # typed: embeddings split on the batch, t and b replicated. The sharded
    # losses take Explicit inputs as they are.
    emb = parallel.batch_sharding(mesh, 2)
    rep = parallel.replicated(mesh)
    embed = jax.sharding.auto_axes(embed, out_sharding=(emb, emb, rep, rep))

  if is_packed(config):
    if accum != 1:
      raise ValueError(f"config.grad_accum_steps={accum}: gradient accumulation is not "
                       "supported for packed NaViT batches (model.image.type "
                       f"{config.model.image.type!r}); use 1")

    def embed_packed(params, images, tokens, key):
      zimg, ztxt, out = model.apply(
          {"params": params}, images, tokens, train=True, rngs={"dropout": key})
      return zimg, ztxt, out["t"], out["b"], out["img/valid"]

    if parallel.is_explicit(mesh):
      embed_packed = jax.sharding.auto_axes(
          embed_packed, out_sharding=(emb, emb, rep, rep, parallel.batch_sharding(mesh, 1)))

    def grad_fn(params, batch, rng):
      def compute_loss(p):
        zimg, ztxt, t, b, valid = embed_packed(p, batch["image"], batch["tokens"], rng)
        return loss_fn(zimg, ztxt, t, b, valid=valid), (t, b, valid)

      (loss, (t, b, valid)), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
      return loss, grads, {"t": t, "b": b, "num_images": jnp.sum(valid.astype(jnp.int32))}
    return grad_fn

  if accum == 1:
    def grad_fn(params, batch, rng):
      def compute_loss(p):
        zimg, ztxt, t, b = embed(p, batch["image"], batch["tokens"], rng)
        return loss_fn(zimg, ztxt, t, b), (t, b)

      (loss, (t, b)), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
      return loss, grads, {"t": t, "b": b}
    return grad_fn

  def micro_sharding(ndim):
    return parallel.batch_sharding(mesh, ndim)

  def grad_fn(params, batch, rng):
    images = _split_micro(batch["image"], accum)      # [M, B/M, H, W, 3]
    tokens = _split_micro(batch["tokens"], accum)     # [M, B/M, L]
    index = jnp.arange(accum)

    def micro(xs):
      img, tok, i = xs
      img = _constrain(img, micro_sharding(img.ndim))
      tok = _constrain(tok, micro_sharding(tok.ndim))
      return img, tok, jax.random.fold_in(rng, i)

    def cache_step(_, xs):
      img, tok, key = micro(xs)
      zimg, ztxt, _, _ = embed(params, img, tok, key)
      return None, (zimg, ztxt)

    # [M, B/M, D] each; constants for the gradient pass.
    _, (cache_img, cache_txt) = jax.lax.scan(cache_step, None, (images, tokens, index))
    cache_img = jax.lax.stop_gradient(cache_img)
    cache_txt = jax.lax.stop_gradient(cache_txt)

    def grad_step(acc, xs):
      img, tok, key = micro(xs)
      i = xs[2]

      def compute_loss(p):
        zimg, ztxt, t, b = embed(p, img, tok, key)
        first = i == 0
        t, b = _once(t, first), _once(b, first)
        full_img = _merge_micro(jax.lax.dynamic_update_index_in_dim(
            cache_img, zimg.astype(cache_img.dtype), i, 0))
        full_txt = _merge_micro(jax.lax.dynamic_update_index_in_dim(
            cache_txt, ztxt.astype(cache_txt.dtype), i, 0))
        full_img = _constrain(full_img, micro_sharding(2))
        full_txt = _constrain(full_txt, micro_sharding(2))
        return loss_fn(full_img, full_txt, t, b), (t, b)

      (loss, (t, b)), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
      acc = jax.tree.map(jnp.add, acc, grads)
      if param_shardings is not None:
        acc = jax.tree.map(_constrain, acc, param_shardings)
      return acc, (loss, t, b)

    zeros = jax.tree.map(jnp.zeros_like, params)
    if param_shardings is not None:
      zeros = jax.tree.map(_constrain, zeros, param_shardings)
    grads, (loss, t, b) = jax.lax.scan(grad_step, zeros, (images, tokens, index))
    # Every micro-step evaluates the same full-batch loss; report the first.
    return loss[0], grads, {"t": t[0], "b": b[0]}

  return grad_fn


def make_train_step(config, model, tx, lr_fn, mesh, state_shardings):
  """Returns the jit-compiled ``train_step(state, batch) -> (state, metrics)``.

  ``batch``: {"image": float32 [B,H,W,3], "tokens": int32 [B,L]}, global arrays
  split over the mesh's batch axes. The state buffers are donated. With
  ``config.grad_accum_steps = M > 1`` the gradient is accumulated over M
  micro-batches without losing any of the B x B loss pairs (``make_grad_fn``).

  Raises:
    ValueError: ``config.batch_size`` not divisible by M x the batch shards.
  """
  grad_fn = make_grad_fn(config, model, mesh, state_shardings.params)

  def step_fn(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, grads, aux = grad_fn(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train/loss": loss,
        "train/grad_norm": optax.tree.norm(grads),
        "train/param_norm": optax.tree.norm(params),
        "train/lr": lr_fn(state.step),
        "train/t": aux["t"],
        "train/b": aux["b"],
    }
    if "num_images" in aux:  # NaViT: images in the step's packed sequences
      metrics["train/num_images"] = aux["num_images"]
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  batch_shardings = {"image": parallel.batch_sharding(mesh, 4),
                     "tokens": parallel.batch_sharding(mesh, 2)}
  if is_packed(config):
    batch_shardings = _packed_batch_shardings(mesh)
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, parallel.replicated(mesh)),
                   donate_argnums=(0,))

  # Parameter and batch shardings are explicit; XLA propagates the rest. (No
  # logical-rules context while tracing: flax's DenseGeneral re-runs boxed
  # kernel inits at their flattened shape, which such constraints reject.)
  return jitted


# --------------------------------------------------------------- logging ---

class MetricsLog:
  """Appends one JSON object per line to ``workdir/metrics.jsonl``.

  On resume from step S, lines with step > S (written after the checkpoint the
  run resumed from) are dropped, so the file reads as one uninterrupted run.
  """

  def __init__(self, workdir: str, resume_step: int | None, *, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
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
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. called from a notebook)
      pass

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = signum


# ------------------------------------------------------------------ main ---

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

  Returns the last logged metrics (a dict of python floats).
  """
  config_util.validate(config)
  parallel.maybe_initialize_distributed()
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = parallel.make_mesh(config.mesh, axis_types=config.get("mesh_axis_types", "auto"))
  check_batch_size(config, mesh)
  logging.info("Mesh %s on %d devices, %d processes", dict(mesh.shape),
               jax.device_count(), jax.process_count())

  model = models.build(config.model)
  tx, lr_fn = optim.build(config.optimizer, config.total_steps)
  state, state_shardings = create_train_state(
      config, model, tx, mesh, jax.random.PRNGKey(config.seed))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Model has %s parameters", f"{n_params:,}")

  ckpt = ckpt_lib.Checkpointer(
      workdir, keep=config.get("keep_checkpoints", 3),
      best_metric=config.get("keep_best_metric") or None)
  data = (navit_pipeline if is_packed(config) else pipeline).train_dataset(
      config, process_index=jax.process_index(), process_count=jax.process_count())
  data_iter = iter(data)
  start_step = 0
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, state_shardings)
    state, data_state = ckpt.restore(latest, abstract)
    if data_state:
      data_iter.set_state(data_state)
    start_step = int(state.step)
    logging.info("Resumed from checkpoint at step %d", start_step)
  log = MetricsLog(workdir, start_step if latest is not None else None, enabled=is_main)

  train_step = make_train_step(config, model, tx, lr_fn, mesh, state_shardings)
  evaluator = evaluators.build_evaluators(config, model, mesh=mesh) or None
  stop = _StopSignal()

  def periodic(every, step):
    return every and (step % every == 0 or step == config.total_steps)

  last = {}
  step = start_step
  t_start = t_log = time.time()
  n_images, pending = [], []  # device scalars, read only when needed
  print(f"Training {config.total_steps} steps from step {start_step} "
        f"({n_params:,} params, mesh {dict(mesh.shape)})", flush=True)
  try:
    while step < config.total_steps:
      local = next(data_iter)
      batch = parallel.global_batch(local, mesh)
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
      saving = periodic(config.checkpoint_every, step) or stop.received
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
        eval_metrics = evaluator.run(state.params)
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
      if stop.received:
        print(f"Received signal {stop.received}: saved a checkpoint at step {step}, exiting.",
              flush=True)
        break
  finally:
    ckpt.close()  # waits for async saves, also when the run raises
  return last


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
