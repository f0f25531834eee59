"""Multi-host for real: ``python -m vlm_jax.train`` as two processes x 4 CPU devices,
joined by jax.distributed (gloo collectives), trains like one process x 8 devices,
and resumes after one of its processes is killed.

The same :runlocal recipe runs (a) as one process with 8 simulated devices and (b)
as two processes with 4 each (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID). Process 1 of (b) is killed after the first checkpoint (process 0,
stuck in a collective or aborted by the lost peer, goes too, as a scheduler would
stop the job), then both are restarted and finish from that checkpoint. Every
step's loss (metrics.jsonl, written by process 0 only) and the final parameters
must equal (a)'s within float error: each process reads its own half of every
global batch (the same pairs as (a), in another order) and restores its own
input-pipeline state.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from recipes import ROOT, subprocess_env
from vlm_jax import checkpoint

STEPS, EVERY = 6, 2
# The recipe with a patch stem and average pooling: fewer ops, so each of the five
# processes compiles its programs faster.
ARGS = ["--config", "configs/siglip_shapes.py:runlocal", f"--config.total_steps={STEPS}",
        f"--config.checkpoint_every={EVERY}", "--config.log_every=1", "--config.eval_every=0",
        "--config.keep_checkpoints=10", "--config.data.num_threads=0",
        "--config.model.image.stem=patch", "--config.model.image.patch_size=8",
        "--config.model.image.pool_type=gap"]
TIMEOUT = 240  # seconds for any one phase; the whole test normally takes well under a minute


def _env(devices, **extra):
  # "rbg" keys: the initialisation compiles faster on CPU (both layouts use them).
  return subprocess_env(devices, JAX_DEFAULT_PRNG_IMPL="rbg", **extra)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class _Runs:
  """Started training processes; their output goes to files, shown when a check fails."""

  def __init__(self, tmp_path):
    self.tmp_path = tmp_path
    self.procs = []  # (name, Popen, log path)

  def start(self, name, workdir, env):
    log = self.tmp_path / f"{name}.log"
    with open(log, "w") as f:
      p = subprocess.Popen([sys.executable, "-m", "vlm_jax.train", *ARGS, "--workdir", workdir],
                           cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    self.procs.append((name, p, log))
    return p

  def start_pair(self, name, workdir):
    # No compilation cache: only process 0 would find its programs there (the keys
    # hold each process's devices), and gloo gives a process that waits for the
    # other at the first collective only 30 s.
    env = dict(JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", JAX_NUM_PROCESSES="2",
               JAX_ENABLE_COMPILATION_CACHE="false")
    return [self.start(f"{name}.p{i}", workdir, _env(4, JAX_PROCESS_ID=str(i), **env))
            for i in range(2)]

  def output(self, name) -> str:
    return next(log for n, _, log in self.procs if n == name).read_text()

  def wait(self, *procs):
    deadline = time.time() + TIMEOUT
    for p in procs:
      p.wait(timeout=max(deadline - time.time(), 1))
      name = next(n for n, q, _ in self.procs if q is p)
      assert p.returncode == 0, f"{name} exited with {p.returncode}:\n{self.tail(name)}"

  def tail(self, name, n=4000) -> str:
    return "".join(line for line in self.output(name).splitlines(True)
                   if "[Gloo]" not in line)[-n:]

  def kill_all(self):
    for _, p, _ in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture
def runs(tmp_path):
  r = _Runs(tmp_path)
  try:
    yield r
  finally:
    r.kill_all()  # never leave children behind, whatever failed


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _checkpoints(workdir) -> list[int]:
  ckdir = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in (os.listdir(ckdir) if os.path.isdir(ckdir) else []) if d.isdigit())


def test_two_processes_train_and_resume_like_one_process_with_8_devices(tmp_path, runs):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  single = runs.start("one", one, _env(8))
  pair = runs.start_pair("two", two)

  # Kill process 1 as soon as the first checkpoint is final (Orbax renames it into place).
  deadline = time.time() + TIMEOUT
  while not _checkpoints(two):
    assert time.time() < deadline and all(p.poll() is None for p in pair), (
        "no checkpoint from the two-process run:\n" + runs.tail("two.p0") + runs.tail("two.p1"))
    time.sleep(0.02)
  pair[1].send_signal(signal.SIGKILL)
  pair[1].wait()
  time.sleep(0.5)
  # Process 0 either waits in a collective or has already failed on the lost peer
  # (gloo's broken connection or the coordination service aborts it, SIGABRT); it
  # must not have finished the run.
  assert pair[0].poll() != 0, "process 0 finished although process 1 was killed"
  if pair[0].poll() is None:
    pair[0].send_signal(signal.SIGKILL)
  pair[0].wait()
  at_kill = _checkpoints(two)
  assert at_kill[-1] < STEPS, f"the run finished before the kill: {at_kill}"

  runs.wait(*runs.start_pair("again", two))
  assert f"Resumed from the checkpoint at step {at_kill[-1]}" in runs.output("again.p0")
  assert "on 8 device(s)" in runs.output("again.p0")
  runs.wait(single)

  # Same loss at every step: steps up to the kill's checkpoint from the first pair,
  # the rest from the restarted one (metrics.jsonl drops rows past the checkpoint).
  expected, actual = _losses(one), _losses(two)
  assert sorted(expected) == sorted(actual) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([actual[s] for s in sorted(actual)],
                             [expected[s] for s in sorted(expected)], rtol=2e-5)
  a, b = checkpoint.load(one), checkpoint.load(two)
  assert a.step == b.step == STEPS
  # Adam turns float-level differences of near-zero gradients into steps of up to
  # lr (1e-3): parameters agree to 1e-4 absolute, while training moved them by far more.
  # The attention key biases are left out: their gradient is zero in exact arithmetic
  # (softmax ignores a shift shared by a row's scores), so Adam moves them by float
  # noise alone, which differs with the order of the cross-process sums.
  moved, compared = 0.0, 0
  for (path, x), y, x0 in zip(jax.tree_util.tree_leaves_with_path(a.variables),
                              jax.tree.leaves(b.variables),
                              jax.tree.leaves(checkpoint.load(one, step=EVERY).variables)):
    name = jax.tree_util.keystr(path)
    if "'key'" in name and "'bias'" in name:
      continue
    compared += 1
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=1e-4, err_msg=name)
    moved = max(moved, float(np.max(np.abs(np.asarray(x) - np.asarray(x0)))))
  assert moved > 1e-3 and compared > 10, (moved, compared)

  # Each process saved its own input-pipeline state; one process saves a plain one.
  data = os.path.join(two, "checkpoints", str(STEPS), "data")
  with open(os.path.join(data, os.listdir(data)[0])) as f:
    saved = json.load(f)
  assert len(saved[checkpoint.PER_PROCESS]) == 2, saved
  data = os.path.join(one, "checkpoints", str(STEPS), "data")
  with open(os.path.join(data, os.listdir(data)[0])) as f:
    assert checkpoint.PER_PROCESS not in json.load(f)
