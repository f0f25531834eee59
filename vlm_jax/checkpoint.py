"""Orbax checkpoints of the whole training state, and ``load()`` for notebooks.

A checkpoint under ``WORKDIR/checkpoints/<step>/`` holds two items:

  state  the TrainState pytree: step, params, optimizer state, RNG key
  data   the input pipeline's iterator state (JSON), so a resumed run reads
         exactly the batches an uninterrupted run would have read

Saves are asynchronous; a save is only visible once Orbax has finalised it
(atomic rename), so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` for the train loop.

  Args:
    workdir: the run's directory; checkpoints go to ``workdir/checkpoints``.
    keep: how many recent checkpoints to keep (None keeps all).
    best_metric: optional metric name (e.g. "zeroshot/top1"); when set, the
      best checkpoint by it is kept as well as the last ``keep``.
    best_mode: "max" or "min" for ``best_metric``.
    async_save: write in a background thread.
  """

  def __init__(self, workdir: str, *, keep: int | None = 3,
               best_metric: str | None = None, best_mode: str = "max",
               async_save: bool = True):
    self.best_metric = best_metric
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        best_fn=(lambda m: m[best_metric]) if best_metric else None,
        best_mode=best_mode,
        keep_checkpoints_without_metrics=True,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(
        checkpoint_dir(workdir), item_names=("state", "data"), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None,
           metrics: dict | None = None, *, force: bool = True) -> None:
    """Starts an (async) save of ``state`` and the data iterator state."""
    metrics = metrics if self.best_metric and metrics and self.best_metric in metrics else None
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
        ),
        metrics=metrics, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto ``abstract_state``'s shapes and shardings (any mesh)."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
        ))
    return restored["state"], dict(restored["data"] or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


@dataclasses.dataclass
class LoadedCheckpoint:
  """What ``load()`` returns: everything an eval notebook needs."""
  config: ml_collections.ConfigDict
  model: Any
  params: Any
  step: int

  @property
  def variables(self):
    return {"params": self.params}


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a vlm_jax workdir?")
  with open(path) as f:
    return _to_config(json.load(f))


def _to_config(obj):
  if isinstance(obj, dict):
    return ml_collections.ConfigDict({k: _to_config(v) for k, v in obj.items()})
  if isinstance(obj, list):
    return [_to_config(v) for v in obj]
  return obj


def load(workdir: str, step: int | None = None) -> LoadedCheckpoint:
  """Loads a training run's checkpoint for evaluation.

  Args:
    workdir: the directory given to ``python -m vlm_jax.train --workdir``.
    step: which checkpoint; the latest when None.

  Returns:
    LoadedCheckpoint with ``config`` (the run's config), ``model`` (the built
    flax module), ``params`` (float32 numpy-backed jax arrays on the default
    device) and ``step``.
  """
  from vlm_jax import models  # pylint: disable=import-outside-toplevel

  config = read_config(workdir)
  manager = ocp.CheckpointManager(
      checkpoint_dir(workdir), item_names=("state", "data"),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoints under {checkpoint_dir(workdir)}")
  if step is None:
    step = manager.latest_step()
  elif step not in steps:
    raise ValueError(f"no checkpoint at step {step} in {workdir}; have {sorted(steps)}")
  model = models.build(config.model)
  # Restore the params subtree only, onto the local default device.
  meta = manager.item_metadata(step)["state"]
  param_meta = meta["params"] if isinstance(meta, dict) else meta.params
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), param_meta)
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item={"params": abstract},
          restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding),
                                    {"params": abstract}),
          partial_restore=True)))
  manager.close()
  return LoadedCheckpoint(config=config, model=model,
                          params=restored["state"]["params"], step=int(step))
