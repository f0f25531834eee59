"""Training a NaViT SigLIP on packed batches (navit_b16:runlocal) on 8 simulated devices."""

import json
import os

import numpy as np

from recipes import get_config
from vlm_jax import train


def test_a_few_navit_training_steps_lower_the_loss_and_evaluate(tmp_path):
  c = get_config("navit_b16", "runlocal")
  c.total_steps, c.log_every, c.eval_every = 16, 1, 16
  train.train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == 16 and np.all(np.isfinite(losses))
  assert np.mean(losses[-4:]) < losses[0] - 0.5, losses
  # Every step packs a varying number of images into the 8 sequences.
  assert all(r["train/num_images"] > 8 for r in rows if "train/loss" in r)
  top1 = [r["zeroshot/top1"] for r in rows if "zeroshot/top1" in r]
  assert len(top1) == 1 and 0.0 <= top1[0] <= 1.0
