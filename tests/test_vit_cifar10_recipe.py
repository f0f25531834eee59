"""configs/vit_cifar10.py: every variant is a valid config, and ``:cpu`` (the small-data
CPU recipe) evaluates at its last step and trains on a class folder of mixed formats."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from recipes import get_config, override
from vlm_jax import config_util, train


@pytest.mark.parametrize("arg", [None, "cpu", "runlocal", "cpu,runlocal"])
def test_variants_are_valid_vit_classifiers(arg):
  c = get_config("vit_cifar10", arg)
  config_util.validate(c)
  assert c.task == "classification" and c.model.image.type == "vit"
  assert c.model.image.image_size == c.pp.image_size
  assert c.pp.image_size % c.model.image.patch_size == 0
  assert c.optimizer.warmup_steps < c.total_steps


def test_cpu_recipe_logs_its_final_accuracy_and_caches_the_data():
  c = get_config("vit_cifar10", "cpu")
  assert c.pp.image_size == 32
  # The last step is an evaluation (and a checkpoint) step, so the final val/top1
  # is in metrics.jsonl and nothing is trained after it.
  assert c.eval_every and c.total_steps % c.eval_every == 0
  assert c.checkpoint_every and c.total_steps % c.checkpoint_every == 0
  assert c.data.cache_decoded
  assert not c.pp.flip  # mirrored digits / letters are other classes


def _folder(root):
  """10 classes: 28x28 grayscale PNGs for training, 36x36 RGB JPEGs for validation."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 2), ("val", 1)):
    for k in range(10):
      d = root / split / f"c{k}"
      d.mkdir(parents=True)
      for i in range(n):
        if split == "train":
          Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(d / f"{i}.png")
        else:
          Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
  return str(root)


def test_cpu_recipe_trains_on_a_class_folder_and_logs_val_top1(tmp_path):
  c = get_config("vit_cifar10", "cpu")
  override(c, {"data.source": "folder", "data.folder.path": _folder(tmp_path / "d"),
               "total_steps": 2, "eval_every": 2, "checkpoint_every": 2, "log_every": 1,
               "batch_size": 16, "optimizer.warmup_steps": 1, "model.image.depth": 1})
  wd = str(tmp_path / "run")
  last = train.train_and_evaluate(c, wd)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if "val/top1" in r]
  assert [r["step"] for r in evals] == [2]
  assert 0.0 <= last["val/top1"] <= 1.0
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["model"]["num_classes"] == 10
  assert os.path.isfile(os.path.join(wd, "confusion", "step_2.png"))
