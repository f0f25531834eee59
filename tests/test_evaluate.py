"""python -m vlm_jax.evaluate: reproduces training's evaluation from the checkpoint."""
import json
import os

import jax
import pytest

from recipes import ROOT, get_config, shared_run
from vlm_jax import evaluate, models


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A runlocal run of 6 steps, evaluated (zero-shot + retrieval) at steps 3 and 6."""
  return shared_run(tmp_path_factory, "eval")


def _logged(workdir, step):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  row = [r for r in rows if r["step"] == step and "zeroshot/top1" in r]
  assert len(row) == 1, rows
  return row[0]


def test_evaluate_reproduces_the_metrics_logged_in_training(run_dir):
  logged = _logged(run_dir, 6)
  row = evaluate.cli(["evaluate", "--workdir", run_dir])
  assert row["step"] == 6
  metric_keys = sorted(k for k in logged if k != "step")
  assert "zeroshot/top1" in metric_keys and "retrieval/t2i_r10" in metric_keys
  assert sorted(k for k in row if k != "step") == metric_keys
  for k in metric_keys:
    assert row[k] == pytest.approx(logged[k], abs=1e-6), k
  assert any(row[k] > 0 for k in metric_keys)
  with open(os.path.join(run_dir, "eval_6.json")) as f:
    assert json.load(f) == row
  # An earlier checkpoint gives that step's logged numbers, which differ.
  row3 = evaluate.cli(["evaluate", "--workdir", run_dir, "--step", "3"])
  logged3 = _logged(run_dir, 3)
  assert all(row3[k] == pytest.approx(logged3[k], abs=1e-6) for k in metric_keys)
  assert any(row3[k] != row[k] for k in metric_keys)


def test_config_overrides_pick_evaluators_and_their_settings(run_dir, tmp_path):
  out = str(tmp_path / "lp.json")
  row = evaluate.cli(["evaluate", "--workdir", run_dir, "--output", out,
                      "--config.evals.linear_probe.enabled=True",
                      "--config.evals.linear_probe.num_train", "64",
                      "--config.evals.linear_probe.num_test=32",
                      "--config.evals.retrieval.ks=(1,2)",
                      "--config.evals.zeroshot.enabled=false"])
  assert sorted(row) == ["linear_probe/top1", "retrieval/i2t_r1", "retrieval/i2t_r2",
                         "retrieval/t2i_r1", "retrieval/t2i_r2", "step"]
  with open(out) as f:
    assert json.load(f) == row


@pytest.mark.parametrize("arg,match", [
    ("--config.evals.retrieval.num_exampels=5", "num_exampels"),
    ("--config.evals.retrieval.num_examples=many", "num_examples"),
    ("--config.evalz.zeroshot.enabled=True", "evalz"),
])
def test_bad_override_is_an_error_that_names_the_key(run_dir, arg, match):
  with pytest.raises(ValueError, match=match):
    evaluate.cli(["evaluate", "--workdir", run_dir, arg])


def test_older_config_without_new_evaluator_sections_still_evaluates(run_dir, tmp_path):
  import shutil
  old = str(tmp_path / "old")
  shutil.copytree(run_dir, old)
  path = os.path.join(old, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  del cfg["evals"]["retrieval"], cfg["evals"]["linear_probe"], cfg["evals"]["zeroshot"]["enabled"]
  with open(path, "w") as f:
    json.dump(cfg, f)
  row = evaluate.cli(["evaluate", "--workdir", old])
  assert sorted(row) == ["step", "zeroshot/top1"]
  assert row["zeroshot/top1"] == pytest.approx(_logged(run_dir, 6)["zeroshot/top1"], abs=1e-6)


def test_hf_weights_evaluate_like_the_same_weights_in_vlm_jax(tmp_path):
  hf = pytest.importorskip("vlm_jax.interop.hf")
  c = get_config("siglip_b16", "runlocal")
  c.evals.zeroshot.num_examples = 48
  c.evals.retrieval.num_examples = 48
  model, variables = models.init(c, jax.random.PRNGKey(1))
  hf.save(model, variables, str(tmp_path / "hf"))
  mesh = evaluate.eval_mesh(c)
  expected = evaluate.evaluate(c, model, variables["params"], mesh=mesh)
  row = evaluate.cli(["evaluate", "--hf", str(tmp_path / "hf"),
                      "--config", os.path.join(ROOT, "configs", "siglip_b16.py:runlocal"),
                      "--config.evals.zeroshot.num_examples=48",
                      "--config.evals.retrieval.num_examples=48"])
  assert row["step"] == -1
  for k, v in expected.items():
    assert row[k] == pytest.approx(v, abs=1e-6), k
