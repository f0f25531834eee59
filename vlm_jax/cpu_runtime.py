"""Host settings that make XLA:CPU runs faster, applied before jax starts its backends.

Each execution of an XLA:CPU program allocates its temporary buffer anew: 2.6 GB
for a SigLIP B/16 train step at batch 8. glibc serves an allocation that large
with a fresh ``mmap`` and gives it back with ``munmap``, so every step
page-faults the whole buffer in again (about 650,000 minor faults and 3 s of
system time per step on a 2-core VM). ``tune()`` stops that:

- ``jax_cpu_enable_async_dispatch=False``: programs run on the calling thread,
  whose allocations come from glibc's main heap. (With asynchronous dispatch
  they run on a worker thread, whose heap arena cannot hold them, so glibc maps
  them whatever its settings.) Host code that overlaps with the device, such as
  input prefetching, runs in threads of its own and is not affected.
- ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, SIZE_MAX)``: large
  allocations come from the heap, and freed memory stays in the process for the
  next step instead of going back to the OS. The process therefore keeps its
  peak memory until it exits.

Together: the SigLIP B/16 train step takes 9.1-9.7 s instead of 10.6-11.7 s on
that VM, with zero page faults after the first step (experiments/cpu_speed.md).
The compiled programs and their results are unchanged.

``tune()`` does nothing on a host that may run an accelerator (a GPU or TPU
plugin installed, or ``JAX_PLATFORMS`` naming anything but cpu), nor once jax's
backends are running (the dispatch mode is fixed when the CPU client is made),
nor with several simulated CPU devices (``--xla_force_host_platform_device_count``,
as the tests use): it was measured on one CPU device, and runs over several
keep jax's defaults.
The train program calls it first (``config.tune_cpu``, default True).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import platform
import re

import jax

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied: list[str] = []


def backends_started() -> bool:
  """Whether jax has made its backends (clients) in this process already."""
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # an unknown jax: assume the worst
    return True


def accelerator_possible(platforms: str | None = None) -> bool:
  """Whether jax could pick a non-CPU backend here, judged without starting one.

  True when ``platforms`` (default: ``jax_platforms``, i.e. ``JAX_PLATFORMS``)
  names any platform but cpu, or, with it empty, when a PJRT plugin (the
  ``jax_plugins`` namespace or entry points, e.g. the CUDA plugins), libtpu or
  ``PJRT_NAMES_AND_LIBRARY_PATHS`` is present.
  """
  if platforms is None:
    platforms = jax.config.jax_platforms or ""
  platforms = [p.strip() for p in platforms.split(",") if p.strip()]
  if platforms:
    return any(p != "cpu" for p in platforms)
  if os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
    return True
  if importlib.util.find_spec("libtpu") is not None:
    return True
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def cpu_device_count() -> int:
  """CPU devices jax will make: ``jax_num_cpu_devices``, else XLA_FLAGS'
  ``--xla_force_host_platform_device_count``, else 1."""
  n = int(jax.config.jax_num_cpu_devices or -1)
  if n > 0:
    return n
  found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  return int(found[-1]) if found else 1


def _glibc():
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") else None
  except OSError:
    return None


def keep_freed_memory() -> bool:
  """glibc only: large allocations from the heap, freed memory kept for reuse.

  ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, SIZE_MAX)``; process-wide,
  for every library in the process. Returns whether it was applied.
  """
  libc = _glibc()
  if libc is None:
    return False
  libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1


def tune() -> list[str]:
  """Applies the CPU-host settings above where they apply; returns what was set.

  Returns ``[]`` (and changes nothing) on accelerator hosts, with several CPU
  devices, or when jax's backends are already running. Safe to call more than once.
  """
  if _applied:
    return list(_applied)
  if backends_started() or accelerator_possible() or cpu_device_count() > 1:
    return []
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  _applied.append("jax_cpu_enable_async_dispatch=False")
  if keep_freed_memory():
    _applied.append("mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=SIZE_MAX)")
  logging.info("CPU host settings: %s", ", ".join(_applied))
  return list(_applied)
