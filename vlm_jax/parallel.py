"""Device meshes, logical-axis sharding rules and multi-host start-up.

Model parameters and activations carry *logical* axis names ("embed", "mlp",
"heads", "batch", ...). A rules table maps each logical name to a mesh axis (or
None, replicated). Data parallelism, FSDP and tensor parallelism are then a
change of ``config.mesh`` and ``config.sharding_rules``:

  DP    mesh=(("data", -1),)
  FSDP  mesh=(("data", 2), ("fsdp", -1))       params split on "embed"
  TP    mesh=(("data", -1), ("tensor", 4))     "mlp"/"heads" split

The batch is split over every mesh axis listed in ``batch_axes(mesh)`` (those
named "data" or "fsdp"), so FSDP ranks also read different examples.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

# Logical name -> mesh axis (or tuple of axes, or None). Names missing from
# the mesh are dropped, so one table serves every mesh shape.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("length", None),
    ("conv_in", None),
    ("conv_out", None),
    ("layers", None),  # the stacked [depth, ...] dim of scanned encoder params (models/scan.py)
)

BATCH_AXIS_NAMES = ("data", "fsdp")


def make_mesh(spec: Sequence[tuple[str, int]], *, axis_types: str = "auto",
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a mesh from ``[(name, size), ...]``; one size may be -1 (the rest).

  Args:
    spec: axis names and sizes, e.g. ``[("data", -1), ("fsdp", 1), ("tensor", 1)]``.
    axis_types: "auto" or "explicit" (jax's sharding-in-types mode).
    devices: defaults to all of ``jax.devices()``.
  """
  devices = list(devices if devices is not None else jax.devices())
  names = [str(n) for n, _ in spec]
  sizes = [int(s) for _, s in spec]
  if len(set(names)) != len(names):
    raise ValueError(f"config.mesh repeats an axis name: {names}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh sizes must be positive or -1: {list(spec)}")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
          f"config.mesh {list(spec)}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
        f"config.mesh {list(spec)} needs {int(np.prod(sizes))} devices, found {len(devices)}")
  kinds = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
  if axis_types not in kinds:
    raise ValueError(f"config.mesh_axis_types must be 'auto' or 'explicit', got {axis_types!r}")
  return jax.make_mesh(tuple(sizes), tuple(names),
                       axis_types=(kinds[axis_types],) * len(names), devices=devices)


def is_explicit(mesh: jax.sharding.Mesh) -> bool:
  """True when any mesh axis uses jax's Explicit (sharding-in-types) mode."""
  return any(t == AxisType.Explicit for t in mesh.axis_types)


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  """The mesh axes the global batch is split over ("data" and "fsdp" if present)."""
  return tuple(a for a in mesh.axis_names if a in BATCH_AXIS_NAMES)


def rules_from_config(config):
  """``config.sharding_rules`` as (logical name, mesh axes) pairs; the defaults if empty.

  Lists (as read back from config.json) become tuples.
  """
  rules = config.get("sharding_rules")
  if not rules:
    return DEFAULT_RULES
  return tuple((str(k), tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in rules)


def rules_for_mesh(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """Drops mesh axes a rule names that ``mesh`` lacks (or that have size 1)."""
  out = []
  for logical, target in rules:
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    kept = tuple(t for t in targets if t in mesh.shape and mesh.shape[t] > 1)
    out.append((logical, kept if len(kept) > 1 else (kept[0] if kept else None)))
  return tuple(out)


def logical_to_shardings(logical_specs, mesh, rules=DEFAULT_RULES):
  """Maps a tree of logical PartitionSpecs to NamedShardings on ``mesh``."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules_for_mesh(mesh, rules))


# (mesh, rules) while a train step is traced (``activation_rules``), else None.
_ACTIVATION_RULES: contextvars.ContextVar = contextvars.ContextVar("activation_rules",
                                                                   default=None)


@contextlib.contextmanager
def activation_rules(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """Within it, ``constrain_activation`` pins activations to ``mesh`` by ``rules``.

  The train step traces its model under it: without constraints XLA's sharding
  propagation is free to split activations the way FSDP splits the weights
  (on "embed") and all-reduce partial sums of whole-batch activations, instead
  of gathering the weights. Unlike flax's ``nn.logical_axis_rules`` this leaves
  parameter boxes alone (flax re-evaluates boxed inits during apply).
  """
  token = _ACTIVATION_RULES.set((mesh, rules_for_mesh(mesh, rules)))
  try:
    yield
  finally:
    _ACTIVATION_RULES.reset(token)


def constrain_activation(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on activation ``x`` from its logical axis ``names``.

  Under ``activation_rules``: the rules' mesh axes (a mesh axis is used once, by
  the first name that claims it, so ("batch", "length", "embed") under FSDP is
  split on the batch only). Otherwise flax's ``nn.with_logical_constraint`` (a
  no-op without ``nn.logical_axis_rules``).
  """
  active = _ACTIVATION_RULES.get()
  if active is None:
    return nn.with_logical_constraint(x, tuple(names))
  mesh, rules = active
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  if is_explicit(mesh):
    # Inside ``jax.sharding.auto_axes`` (how the tasks run towers on Explicit
    # meshes) the context mesh has Auto axes: constrain on that one.
    context = jax.sharding.get_abstract_mesh()
    if context.empty or is_explicit(context):
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(context, spec))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch array: dimension 0 over the batch axes, rest replicated."""
  axes = batch_axes(mesh)
  lead = axes if len(axes) > 1 else (axes[0] if axes else None)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: jax.sharding.Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)] or [1]))


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Assembles each process's local numpy batch into global sharded jax.Arrays.

  ``local_batch`` holds this process's rows (global batch / process count);
  on one host it is the whole batch.
  """
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(put, local_batch)


def maybe_initialize_distributed() -> None:
  """Calls ``jax.distributed.initialize()`` when launched as several processes.

  Detected from the environment: an explicit coordinator (JAX_COORDINATOR_ADDRESS,
  with JAX_NUM_PROCESSES and JAX_PROCESS_ID where no cluster manager supplies
  them), SLURM/Open MPI launches with more than one task, or a multi-host Cloud
  TPU slice (whose hosts jax finds by itself). A single process does nothing.
  On CPU, processes exchange collectives through gloo.

  Raises:
    ValueError: JAX_NUM_PROCESSES / JAX_PROCESS_ID are not integers, or one is set
      without the other or without JAX_COORDINATOR_ADDRESS.
  """
  env = os.environ
  num, pid = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
  kwargs = {}
  for name, value, key in (("JAX_NUM_PROCESSES", num, "num_processes"),
                           ("JAX_PROCESS_ID", pid, "process_id")):
    if value is not None:
      try:
        kwargs[key] = int(value)
      except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
  if (num is None) != (pid is None) or (kwargs and "JAX_COORDINATOR_ADDRESS" not in env):
    raise ValueError("A multi-process launch by hand sets JAX_COORDINATOR_ADDRESS (host:port of "
                     "process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID together; got "
                     f"JAX_NUM_PROCESSES={num}, JAX_PROCESS_ID={pid}, "
                     f"JAX_COORDINATOR_ADDRESS={env.get('JAX_COORDINATOR_ADDRESS')}")
  multi = (
      "JAX_COORDINATOR_ADDRESS" in env
      or int(env.get("SLURM_NTASKS", "1")) > 1
      or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
      or "," in env.get("TPU_WORKER_HOSTNAMES", "")
  )
  if multi and not jax.distributed.is_initialized():
    logging.info("Multi-process launch detected: jax.distributed.initialize(%s)", kwargs)
    if not jax.config.jax_cpu_collectives_implementation:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def agreed_stop(step: int, local_signal: int | None) -> int | None:
  """The signal to stop on after ``step``, the same on every process (None: go on).

  One process: ``local_signal`` (the trainer's SIGTERM flag). Several: a SIGTERM
  to any of them reaches jax's preemption service (``jax.distributed``), and all
  processes stop after the same step (``reached_preemption_sync_point``), so
  they save the same checkpoint together. Call it after every step.
  """
  if jax.process_count() == 1:
    return local_signal
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(step) else None
