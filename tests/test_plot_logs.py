"""Training curves and a clean terminal: TensorBoard events equal metrics.jsonl, PNG
curves per metric family, and a training run that prints only our lines."""
import glob
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from recipes import ROOT, subprocess_env
from vlm_jax import logs, plot, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step SigLIP run of the program as a user starts it: train rows at steps 2
  and 4, evaluation and checkpoint at 4. Returns (workdir, CompletedProcess)."""
  workdir = str(tmp_path_factory.mktemp("plot_logs") / "run")
  # JAX_PLATFORMS unset, as on a user's machine: JAX probes (and reports) TPU and GPU.
  proc = subprocess.run(
      [sys.executable, "-m", "vlm_jax.train", "--config", "configs/siglip_shapes.py:runlocal",
       "--workdir", workdir, "--config.total_steps=4", "--config.log_every=2",
       "--config.eval_every=4", "--config.checkpoint_every=4", "--config.data.num_threads=0"],
      cwd=ROOT, env=subprocess_env(JAX_PLATFORMS=""), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir, proc


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _events(path):
  """The Event protos of one TensorBoard event file (TFRecord framing: uint64 length,
  uint32 length CRC, the record, uint32 record CRC)."""
  event_pb2 = logs._import_tensorboardx().proto.event_pb2  # pylint: disable=protected-access
  events = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
    pos += 12 + n + 4
  return events


def _scalars(events):
  return {(v.tag, e.step): v.simple_value
          for e in events if e.HasField("summary") for v in e.summary.value}


def test_tensorboard_scalars_equal_metrics_jsonl(run):
  run_dir, _ = run
  files = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
  assert len(files) == 1, files
  scalars = _scalars(_events(files[0]))
  expected = {(k, row["step"]): v for row in _rows(run_dir)
              for k, v in row.items() if k != "step"}
  assert {k for k, _ in expected} >= {"train/loss", "train/lr", "zeroshot/top1"}
  assert scalars.keys() == expected.keys()
  for key, value in expected.items():  # TensorBoard stores float32
    assert scalars[key] == np.float32(value), key


def test_resumed_run_hides_later_tensorboard_steps_and_other_processes_write_none(tmp_path):
  resumed = tmp_path / "resumed"
  log = train.MetricsLog(str(resumed), resume_step=6)
  log.write(7, {"train/loss": 1.5, "train/hist": [1.0, 2.0], "note": "text"})
  log.close()
  events = _events(glob.glob(str(resumed / "events.out.tfevents.*"))[0])
  # TensorBoard drops older events from this step on (its restart rule).
  starts = [e.step for e in events if e.session_log.status == e.session_log.START]
  assert starts == [7]
  assert _scalars(events) == {("train/loss", 7): 1.5}  # non-scalars skipped
  other = tmp_path / "process1"
  other.mkdir()
  train.MetricsLog(str(other), resume_step=None, enabled=False).close()
  assert not os.listdir(other)


def test_plot_writes_one_png_per_metric_family(run, tmp_path):
  run_dir, _ = run
  families = {k.split("/")[0] for row in _rows(run_dir) for k in row if k != "step"}
  assert {"train", "zeroshot", "retrieval"} <= families
  paths = plot.main([run_dir, run_dir, "--out", str(tmp_path / "all")])  # two runs overlaid
  assert sorted(os.path.basename(p) for p in paths) == sorted(f"{f}.png" for f in families)
  assert plot.default_figures(["train/t", "train/lr", "train/loss"])["train"] == [
      "train/loss", "train/lr", "train/t"]
  paths += plot.plot([run_dir], str(tmp_path / "keys"), keys=["train/loss", "zeroshot/top1"])
  assert os.path.basename(paths[-1]) == "curves.png"
  for path in paths:
    with open(path, "rb") as f:
      head = f.read(8)
    assert head == PNG_MAGIC and os.path.getsize(path) > 5000, path
  with pytest.raises(ValueError, match="val/top1"):
    plot.plot([run_dir], str(tmp_path / "bad"), keys=["val/top1"])


def test_training_terminal_shows_our_lines_and_no_library_info(run):
  workdir, proc = run
  assert "Training contrastive for 4 steps from step 0" in proc.stdout
  assert re.search(r"^step +4/4 \| loss ", proc.stdout, re.M), proc.stdout
  assert re.search(r"^step +4 \| zeroshot/top1 ", proc.stdout, re.M), proc.stdout
  info = [line for line in proc.stderr.splitlines() if re.match(r"I\d{4} ", line)]
  assert not info, "\n".join(info[:5])
  for noise in ("checkpoint_manager", "libtpu", "Unable to initialize backend"):
    assert noise not in proc.stderr, proc.stderr[-2000:]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
