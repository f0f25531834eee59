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

import os
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

  Detected from the environment jax itself understands: an explicit
  coordinator (JAX_COORDINATOR_ADDRESS), SLURM/Open MPI launches with more than
  one task, or a multi-host Cloud TPU slice. A single process does nothing.
  """
  env = os.environ
  multi = (
      "JAX_COORDINATOR_ADDRESS" in env
      or int(env.get("SLURM_NTASKS", "1")) > 1
      or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
      or "," in env.get("TPU_WORKER_HOSTNAMES", "")
  )
  if multi and not jax.distributed.is_initialized():
    logging.info("Multi-process launch detected: jax.distributed.initialize()")
    jax.distributed.initialize()
