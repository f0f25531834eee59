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


def test_uint8_batches_train_exactly_as_host_normalised_ones():
  """The default uint8 packed batches are mapped onto pp.value_range inside the
  train step: same loss and gradients as float32 batches normalised on the host."""
  import jax

  from vlm_jax import models, parallel
  from vlm_jax.data import navit_pipeline
  from vlm_jax.tasks import contrastive

  c = get_config("navit_b16", "runlocal")
  c.batch_size, c.navit.window, c.model.image.depth = 2, 16, 1
  batches = {}
  for dtype in ("uint8", "float32"):
    c.navit.patch_dtype = dtype
    batches[dtype] = next(iter(navit_pipeline.train_dataset(c)))
  assert batches["uint8"]["image"]["patches"].dtype == np.uint8
  model = models.build(c.model)
  rng = np.random.default_rng(0)   # random parameters of the right shapes (no init compile)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                        models.abstract_variables(model, c)["params"])
  mesh = parallel.make_mesh([("data", 1)], devices=jax.devices()[:1])
  grad_fn = jax.jit(contrastive.make_grad_fn(c, model, mesh))
  out = {k: grad_fn(params, {}, b, jax.random.PRNGKey(1)) for k, b in batches.items()}
  (loss8, grads8, *_), (loss32, grads32, *_) = out["uint8"], out["float32"]
  assert np.isfinite(float(loss32))
  np.testing.assert_allclose(float(loss8), float(loss32), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads8, grads32)
  # Without the mapping the model would see pixels 0-255: another loss.
  raw = dict(batches["float32"], image=dict(batches["float32"]["image"],
                                            patches=batches["uint8"]["image"]["patches"].astype(np.float32)))
  assert abs(float(grad_fn(params, {}, raw, jax.random.PRNGKey(1))[0]) - float(loss32)) > 1e-3
