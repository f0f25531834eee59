"""What a run shows besides its checkpoints: the terminal and TensorBoard curves.

The terminal. ``python -m vlm_jax.train`` and ``python -m vlm_jax.evaluate`` print
their own lines (progress, evaluation results); libraries log through absl and
Python's ``logging`` (Orbax writes ~10 INFO lines per checkpoint, JAX reports the
backends it probed). ``quiet_libraries()`` lets only WARNING and above through,
unless the command line sets absl's ``--verbosity`` (``-v 0``: INFO, ``-v 1``:
DEBUG).

TensorBoard. ``TensorBoardWriter`` mirrors metrics.jsonl's rows as scalars into
``WORKDIR/events.out.tfevents.*`` (one file per start of the program), through
tensorboardX: no TensorFlow needed. ``tensorboard --logdir WORKDIR`` shows one
run, ``tensorboard --logdir runs`` every run under ``runs/`` by its directory name.
A resumed run starts its file with a restart mark at the step after its
checkpoint (tensorboardX's ``purge_step``), with which TensorBoard hides the
older files' events from that step on, as metrics.jsonl drops those rows;
metrics.jsonl stays the record (``python -m vlm_jax.plot`` reads it).
"""

from __future__ import annotations

import sys

import numpy as np
from absl import flags, logging


def quiet_libraries() -> None:
  """Shows library logs from WARNING up, unless ``--verbosity``/``-v`` was given.

  For a program's ``main`` (after absl parsed the flags, which sets INFO by default).
  Sets the levels of absl's logger and Python's root logger, which Orbax and JAX use.
  """
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _import_tensorboardx():
  # tensorboardX imports torch, where installed, only to accept torch tensors: ~3 s
  # and ~0.5 GB per process. We pass floats; torch stays unloaded unless it already is.
  block = "torch" not in sys.modules
  if block:
    sys.modules["torch"] = None  # "import torch" raises ImportError
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  finally:
    if block:
      del sys.modules["torch"]
  return tensorboardX


class TensorBoardWriter:
  """Writes metrics rows as TensorBoard scalars to ``logdir/events.out.tfevents.*``.

  Args:
    logdir: the run's directory.
    resume_step: the checkpoint step a resumed run starts from; TensorBoard hides
      older events at later steps. None (a fresh run): it hides all older events.
  """

  def __init__(self, logdir: str, resume_step: int | None = None):
    tbx = _import_tensorboardx()
    # Flushed at each checkpoint and at exit (and by tensorboardX every 2 minutes).
    self._writer = tbx.SummaryWriter(
        logdir, purge_step=0 if resume_step is None else resume_step + 1, flush_secs=120)

  def write(self, step: int, metrics: dict) -> None:
    """One scalar per numeric value of size 1 (python or numpy); others are skipped."""
    for key, value in metrics.items():
      value = np.asarray(value)
      if value.size == 1 and value.dtype.kind in "biuf":
        self._writer.add_scalar(key, float(value), int(step))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
