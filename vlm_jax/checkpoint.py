"""Orbax checkpoints of the whole training state, and ``load()`` for notebooks.

A checkpoint under ``WORKDIR/checkpoints/<step>/`` holds two items:

  state  the TrainState pytree: step, params, optimizer state, RNG key
  data   the input pipeline's iterator state (JSON), so a resumed run reads
         exactly the batches an uninterrupted run would have read; a run of
         several processes stores every process's own state
         ({"per_process": [state of process 0, state of process 1, ...]})

Saves are asynchronous; a save is only visible once Orbax has finalised it
(atomic rename), so a run killed mid-save leaves the previous checkpoint intact.
The last ``config.keep_checkpoints`` checkpoints are kept, and with
``config.keep_best_metric`` (e.g. "zeroshot/top1") the best one by it as well.

Arrays are stored as global arrays, not per device, so a checkpoint written on one
mesh restores onto any other: ``Checkpointer.restore`` takes the target
shardings, ``load(workdir, mesh=...)`` places params by their logical axes.

    ckpt = vlm_jax.checkpoint.load("/tmp/shapes")          # latest, on one device
    ckpt.model.apply(ckpt.variables, images, method="encode_image")
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` for the train loop.

  Retention: the ``keep`` most recent checkpoints, plus (with ``best_metric``)
  the single best one by that metric, however old. The metrics of a save are
  written with it (Orbax's ``metrics`` item), so the best survives restarts.

  Args:
    workdir: the run's directory; checkpoints go to ``workdir/checkpoints``.
    keep: how many recent checkpoints to keep (None keeps all).
    best_metric: optional metric name (e.g. "zeroshot/top1"; ``config.keep_best_metric``);
      when set, the best checkpoint by it is kept as well as the last ``keep``.
      Checkpoints saved without that metric compete only as recent ones.
    best_mode: "max" or "min" for ``best_metric``.
    async_save: write in a background thread.
  """

  def __init__(self, workdir: str, *, keep: int | None = 3,
               best_metric: str | None = None, best_mode: str = "max",
               async_save: bool = True):
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
      raise ValueError(f"config.keep_checkpoints must be an int >= 1 or None, got {keep!r}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.best_metric = best_metric or None
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if self.best_metric:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: float(m[self.best_metric]),
          reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # best_fn makes Orbax store each save's metrics; the policy decides what stays.
        best_fn=(lambda m: float(m[self.best_metric])) if self.best_metric else None,
        best_mode=best_mode,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(
        checkpoint_dir(workdir), item_names=("state", "data"), options=options)

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints on disk, ascending."""
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The step of the best checkpoint by ``best_metric`` (None without one)."""
    return self.manager.best_step() if self.best_metric else None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None,
           metrics: dict | None = None, *, force: bool = True) -> None:
    """Starts an (async) save of ``state`` and the data iterator state.

    ``metrics``: the evaluation metrics of this step, if any; with ``best_metric``
    set they must contain it (ValueError naming ``config.keep_best_metric`` otherwise).
    """
    if self.best_metric and metrics:
      if self.best_metric not in metrics:
        raise ValueError(
            f"config.keep_best_metric={self.best_metric!r} is not among the evaluation "
            f"metrics {sorted(metrics)}")
      metrics = {self.best_metric: float(metrics[self.best_metric])}
    else:
      metrics = None
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_gather_data_states(data_state)),
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
    return restored["state"], _own_data_state(dict(restored["data"] or {}), step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


PER_PROCESS = "per_process"


def _gather_data_states(data_state: dict | None) -> dict:
  """The data item of a save: this state on one process; with several, every
  process's state in process order (a collective: every process calls it, as
  every process calls ``save``; Orbax writes JSON items from process 0 only)."""
  data_state = data_state or {}
  if jax.process_count() == 1:
    return data_state
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  blob = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int64)))
  sizes = sizes.reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return {PER_PROCESS: [json.loads(bytes(b[:n]).decode()) for b, n in zip(blobs, sizes)]}


def _own_data_state(data: dict, step: int) -> dict:
  """This process's data iterator state from a restored data item ({} to start the
  data afresh when the checkpoint was written by another number of processes)."""
  states = data.get(PER_PROCESS) if PER_PROCESS in data else ([data] if data else [])
  if not states:
    return {}
  if len(states) != jax.process_count():
    logging.warning(
        "The checkpoint at step %d was written by %d process(es), this run has %d: "
        "each process's input pipeline starts afresh instead of where it stopped.",
        step, len(states), jax.process_count())
    return {}
  return dict(states[jax.process_index()])


@contextlib.contextmanager
def _quiet_orbax():
  """Hides Orbax's warnings that a read-only manager is read-only (load() is, by design)."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _set_scan(config, value: bool) -> None:
  """Sets model.image.scan / model.text.scan where they apply (transformer towers)."""
  from vlm_jax import models  # pylint: disable=import-outside-toplevel
  model = config.model
  if model.image.get("type", "vit") in ("vit", "navit", "naflex"):
    model.image.scan = value
  if not models.is_captioner(model):
    model.text.scan = value


@dataclasses.dataclass
class LoadedCheckpoint:
  """What ``load()`` returns: everything an eval notebook needs."""
  config: ml_collections.ConfigDict
  model: Any
  params: Any
  step: int
  mesh: Any = None  # the mesh ``params`` are sharded on; None: one device
  # Non-parameter collections, e.g. {"batch_stats": ...} for BatchNorm models.
  model_state: dict = dataclasses.field(default_factory=dict)

  @property
  def variables(self):
    """{"params": ..., **model_state}: what ``model.apply`` takes."""
    return {"params": self.params, **self.model_state}


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config from ``workdir/config.json`` (written by the trainer)."""
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


def sharding_rules(config):
  """``config.sharding_rules`` as a tuple of (logical name, mesh axes) pairs, or the defaults."""
  from vlm_jax import parallel  # pylint: disable=import-outside-toplevel
  return parallel.rules_from_config(config)


def variable_shardings(model, config, mesh):
  """NamedShardings of all variables (params, batch_stats) on ``mesh`` from their
  logical axes (as in training)."""
  from vlm_jax import models, parallel  # pylint: disable=import-outside-toplevel
  specs = models.logical_specs(model, config)
  return parallel.logical_to_shardings(specs, mesh, sharding_rules(config))


def param_shardings(model, config, mesh):
  """NamedShardings of the params on ``mesh`` from their logical axes (as in training)."""
  return variable_shardings(model, config, mesh)["params"]


def _stored_params(workdir: str, step: int):
  """The params tree (of ArrayMetadata) of a saved train state, read from its metadata."""
  path = os.path.join(checkpoint_dir(workdir), str(step), "state")
  try:
    with _quiet_orbax():  # it warns that the item has no step-level metadata file
      tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  except (FileNotFoundError, ValueError, AttributeError):
    return None
  return tree.get("params") if isinstance(tree, dict) else None


def load(workdir: str, step: int | None = None, *, mesh=None,
         scan: bool | None = None) -> LoadedCheckpoint:
  """Loads a training run's checkpoint for evaluation.

  Works whatever mesh or device count the run was trained on: arrays are
  resharded on restore.

  Args:
    workdir: the directory given to ``python -m vlm_jax.train --workdir``.
    step: which checkpoint; the latest when None.
    mesh: optional ``jax.sharding.Mesh`` to place the params on, sharded by their
      logical axes and the run's ``sharding_rules`` (FSDP/TP for models that do
      not fit one device). None: everything on the first local device.
    scan: build the transformer towers with (True) or without (False) scan over
      layers (``models/scan.py``), whatever the run used; None: as the run's
      config. A checkpoint stored in the other layer layout than the model's
      (stacked ``encoderblock`` vs ``encoderblock_{i}``) is converted on load.

  Returns:
    LoadedCheckpoint with ``config`` (the run's config), ``model`` (the built
    flax module), ``params`` (float32 jax arrays; a LoRA run's factors merged
    into their kernels, ``finetune.merge_lora``), ``step`` and ``mesh``.
  Raises:
    FileNotFoundError: no config.json or no checkpoint in ``workdir``.
    ValueError: no checkpoint at ``step``.
  """
  # pylint: disable=import-outside-toplevel
  import flax.linen as nn
  from vlm_jax import finetune, models, parallel
  from vlm_jax.models import scan as scan_lib

  config = read_config(workdir)
  if scan is not None:
    _set_scan(config, bool(scan))
  with _quiet_orbax():
    manager = ocp.CheckpointManager(
        checkpoint_dir(workdir), item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints under {checkpoint_dir(workdir)}")
    if step is None:
      step = manager.latest_step()
    elif step not in steps:
      raise ValueError(f"no checkpoint at step {step} in {workdir}; have {sorted(steps)}")
    model = models.build(config.model)
    variables = dict(models.abstract_variables(model, config))
    lora = finetune.lora_rank(config) > 0
    if lora:  # a LoRA run stores its factors beside their kernels
      boxed = finetune.boxed_abstract(model, config)
      variables = dict(nn.unbox(boxed))
    if mesh is None:
      one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: one, variables)
    elif lora:
      shardings = parallel.logical_to_shardings(nn.get_partition_spec(boxed), mesh,
                                                sharding_rules(config))
    else:
      shardings = variable_shardings(model, config, mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), variables, shardings)
    # Restore only the params (and BatchNorm statistics: the train state's
    # model_state) subtrees, straight onto the target shardings.
    target = params = abstract.pop("params")
    stored = _stored_params(workdir, step)
    if stored is not None:  # restore in the stored layer layout, convert below
      params = scan_lib.match_layout(target, stored)
      if jax.tree.structure(params) == jax.tree.structure(target):
        params = target
    item = {"params": params, **({"model_state": abstract} if abstract else {})}
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item,
            restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                                      item),
            partial_restore=True)))
  finally:
    manager.close()
  state = restored["state"]
  if params is not target:
    state["params"] = jax.device_put(scan_lib.match_layout(state["params"], target),
                                     jax.tree.map(lambda x: x.sharding, target))
  # A LoRA run's factors are merged into their kernels: plain weights of config.model.
  return LoadedCheckpoint(config=config, model=model, params=finetune.merge_lora(state["params"]),
                          step=int(step), mesh=mesh,
                          model_state=dict(state.get("model_state") or {}))
