"""The training program: real steps, metrics, config handling, checkpoints."""
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recipes import ROOT, get_config, override, subprocess_env
from vlm_jax import checkpoint, config_util, models, optim, parallel, tasks, train
from vlm_jax.data import pipeline


def _tiny(**overrides):
  c = get_config("siglip_shapes", "runlocal")
  c.data.num_threads = 0
  return override(c, overrides)


def _env():
  return subprocess_env()  # one CPU device, like a user's laptop


def _run(args, **kw):
  return subprocess.run([sys.executable, "-m", "vlm_jax.train", *args], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=600, **kw)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_steps_lower_the_loss_on_a_fixed_batch():
  c = _tiny()
  c.optimizer.warmup_steps = 0
  c.optimizer.decay = "constant"
  mesh = parallel.make_mesh(c.mesh, devices=jax.devices()[:1])
  model = models.build(c.model)
  tx, lr = optim.build(c.optimizer, 100)
  state, shardings = train.create_train_state(c, model, tx, mesh, jax.random.PRNGKey(0))
  step = train.make_train_step(c, model, tx, lr, mesh, shardings)
  batch = next(iter(pipeline.train_dataset(c)))
  batch = parallel.global_batch(batch, mesh)
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch)
    losses.append(float(metrics["train/loss"]))
  assert int(state.step) == 15
  assert losses[-1] < 0.7 * losses[0], losses


def test_training_program_writes_metrics_config_and_checkpoints(tmp_path):
  workdir = str(tmp_path / "run")
  c = _tiny(total_steps=6, log_every=2, eval_every=6, checkpoint_every=3, profile_steps=(4,))
  last = train.train_and_evaluate(c, workdir)
  # config.profile_steps: a jax.profiler trace of step 4 only (vlm_jax/profiling.py)
  assert [os.path.basename(p) for p in glob.glob(os.path.join(workdir, "profile", "*"))] == [
      "step_4"] and glob.glob(os.path.join(workdir, "profile", "step_4", "**", "*.xplane.pb"),
                              recursive=True)
  rows = _rows(workdir)
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4, 6]
  for r in train_rows:
    assert np.isfinite(r["train/loss"]) and r["train/images_per_sec"] > 0
    assert r["data/skipped"] == 0
  zs = [r for r in rows if "zeroshot/top1" in r]
  assert [r["step"] for r in zs] == [6] and 0.0 <= zs[0]["zeroshot/top1"] <= 1.0
  assert last["zeroshot/top1"] == zs[0]["zeroshot/top1"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["total_steps"] == 6
  ck = checkpoint.load(workdir)
  assert ck.step == 6 and ck.config.total_steps == 6
  images = jnp.zeros((2, 32, 32, 3))
  z = ck.model.apply({"params": ck.params}, images, method="encode_image")
  assert z.shape == (2, c.model.out_dim)
  assert checkpoint.load(workdir, step=3).step == 3
  with pytest.raises(ValueError, match="no checkpoint at step 4"):
    checkpoint.load(workdir, step=4)


# Every task trains through the same loop: resume, SIGTERM and NaN handling are checked
# for each (contrastive: the SigLIP demo; classification: the ViT-from-scratch recipe).
TASK_RECIPES = ["siglip_shapes", "vit_cifar10"]


@pytest.mark.parametrize("recipe", TASK_RECIPES)
def test_killed_run_resumes_bit_identically(tmp_path, recipe):
  """kill -9 after the second checkpoint, rerun: same final params as uninterrupted."""
  args = ["--config", f"configs/{recipe}.py:runlocal",
          "--config.total_steps=24", "--config.checkpoint_every=4",
          "--config.eval_every=0", "--config.log_every=4",
          "--config.keep_checkpoints=10"]
  straight = str(tmp_path / "straight")
  proc = _run(args + ["--workdir", straight])
  assert proc.returncode == 0, proc.stderr[-3000:]

  killed = str(tmp_path / "killed")
  ckdir = os.path.join(killed, "checkpoints")
  p = subprocess.Popen([sys.executable, "-m", "vlm_jax.train", *args, "--workdir", killed,
                        "--config.data.num_threads=0"], cwd=ROOT, env=_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline:
    done = [d for d in (os.listdir(ckdir) if os.path.isdir(ckdir) else []) if d.isdigit()]
    if len(done) >= 2 or p.poll() is not None:
      break
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  steps_at_kill = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
  assert steps_at_kill and steps_at_kill[-1] < 24, f"run finished before the kill: {steps_at_kill}"
  proc = _run(args + ["--workdir", killed])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"from step {steps_at_kill[-1]}" in proc.stdout
  a, b = checkpoint.load(straight), checkpoint.load(killed)
  assert a.step == b.step == 24
  for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# The signal and NaN handling live in the task-independent loop: one recipe covers them
# (the killed-run resume above runs every task).
@pytest.mark.parametrize("recipe", TASK_RECIPES[:1])
def test_sigterm_saves_a_checkpoint_before_exit(tmp_path, recipe):
  workdir = str(tmp_path / "run")
  p = subprocess.Popen(
      [sys.executable, "-m", "vlm_jax.train", "--config", f"configs/{recipe}.py:runlocal",
       "--workdir", workdir, "--config.total_steps=100000", "--config.checkpoint_every=0",
       "--config.eval_every=0", "--config.log_every=1"],
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  timer = threading.Timer(300, p.kill)  # never hang the suite on a stuck child
  timer.start()
  for line in p.stdout:
    if line.startswith("step") and "/100000" in line and int(line.split()[1].split("/")[0]) >= 3:
      break
  timer.cancel()
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 0
  assert "saved a checkpoint" in out
  ck = checkpoint.load(workdir)
  assert 3 <= ck.step < 100000


@pytest.mark.parametrize("recipe", TASK_RECIPES[:1])
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, recipe):
  workdir = str(tmp_path / "run")
  real = pipeline.train_dataset

  class Poisoned:
    def __init__(self, ds):
      self.ds = ds

    def __iter__(self):
      it = iter(self.ds)
      outer = self

      class It:
        n = 0
        num_skipped = 0

        def __next__(self):
          b = next(it)
          self.n += 1
          if self.n == 4:
            b["image"] = np.full_like(b["image"], np.nan)
          return b

        def get_state(self):
          return it.get_state()

        def set_state(self, s):
          it.set_state(s)
      del outer
      return It()

  monkeypatch.setattr(pipeline, "train_dataset", lambda *a, **k: Poisoned(real(*a, **k)))
  c = get_config(recipe, "runlocal")
  c.data.num_threads = 0
  c = override(c, {"total_steps": 10, "checkpoint_every": 1, "eval_every": 0})
  with pytest.raises(FloatingPointError, match="step 4"):
    train.train_and_evaluate(c, workdir)
  ck = checkpoint.load(workdir)
  assert ck.step == 3
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ck.params))

  # Resuming restores into shapes: the random initialiser is neither compiled nor run.
  def no_init(*a, **k):
    raise AssertionError("resume ran the random initialiser")
  monkeypatch.setattr(train, "create_train_state", no_init)
  last = train.train_and_evaluate(override(c, {"total_steps": 3}), workdir)
  assert last == {} or last.get("step", 3) == 3
  restored = checkpoint.load(workdir)
  assert restored.step == 3
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(ck.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_config_key_is_an_error_that_names_it(tmp_path):
  proc = _run(["--config", "configs/siglip_shapes.py:runlocal", "--workdir", str(tmp_path),
               "--config.batch_sise=8"])
  assert proc.returncode != 0 and "batch_sise" in proc.stderr


def test_malformed_value_is_an_error_that_names_the_key(tmp_path):
  proc = _run(["--config", "configs/siglip_shapes.py:runlocal", "--workdir", str(tmp_path),
               "--config.total_steps=many"])
  assert proc.returncode != 0 and "total_steps" in proc.stderr


def test_mesh_and_sharding_rules_can_be_overridden_on_the_command_line(tmp_path):
  workdir = str(tmp_path / "run")
  env = subprocess_env(devices=4)
  proc = subprocess.run(
      [sys.executable, "-m", "vlm_jax.train", "--config", "configs/siglip_shapes.py:runlocal",
       "--workdir", workdir, "--config.total_steps=2", "--config.log_every=1",
       "--config.eval_every=0", "--config.optimizer.warmup_steps=1",
       "--config.mesh=(('data', 2), ('fsdp', 2), ('tensor', 1))",
       "--config.sharding_rules=(('embed', 'fsdp'), ('mlp', None))"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "'data': 2, 'fsdp': 2" in proc.stdout
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["mesh"] == [["data", 2], ["fsdp", 2], ["tensor", 1]]
  assert cfg["sharding_rules"] == [["embed", "fsdp"], ["mlp", None]]


def test_override_reaches_the_run(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _run(["--config", "configs/siglip_shapes.py:runlocal", "--workdir", workdir,
               "--config.total_steps=2", "--config.log_every=1", "--config.eval_every=0",
               "--config.optimizer.lr=0.5", "--config.optimizer.warmup_steps=1"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["total_steps"] == 2 and cfg["optimizer"]["lr"] == 0.5
  assert [r["step"] for r in _rows(workdir)] == [1, 2]


def test_recipe_arguments_are_checked():
  with pytest.raises(ValueError, match="bogus"):
    get_config("siglip_shapes", "bogus")
  with pytest.raises(ValueError, match="res"):
    get_config("siglip_b16", "res=big")
  assert get_config("siglip_b16", "res=256,batch_size=64").model.image.image_size == 256


@pytest.mark.parametrize("field,value,match", [
    ("batch_size", 0, "batch_size"),
    ("total_steps", -1, "total_steps"),
    ("log_every", -5, "log_every"),
])
def test_validate_names_bad_fields(field, value, match):
  c = _tiny(**{field: value})
  with pytest.raises(ValueError, match=match):
    config_util.validate(c)


def test_batch_not_divisible_by_shards_names_batch_size(tmp_path):
  c = _tiny(batch_size=12)  # 8 simulated devices on the data axis
  with pytest.raises(ValueError, match="batch_size"):
    train.train_and_evaluate(c, str(tmp_path / "run"))


@pytest.mark.parametrize("name,arg", [("siglip_shapes", "runlocal"), ("siglip_b16", "runlocal"),
                                      ("navit_b16", "runlocal"), ("navit_b16", "runlocal,naflex"),
                                      ("vit_cifar10", "runlocal")])
def test_every_recipe_has_runlocal_and_the_required_fields(name, arg):
  c = get_config(name, arg)
  config_util.validate(c)
  tasks.get(c).prepare_config(c)  # classification: num_classes from the data
  model, variables = models.init(c, jax.random.PRNGKey(0))
  assert models.count_params(variables) < 2_000_000


def test_siglip_b16_recipe_has_the_reference_parameter_count():
  c = get_config("siglip_b16")
  model = models.build(c.model)
  assert models.count_params(models.abstract_variables(model, c)) == 203_155_970
