"""Checkpoints: retention (last K plus the best), and restoring onto other meshes."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recipes import get_config
from vlm_jax import checkpoint, models, optim, parallel, train
from vlm_jax.data import pipeline


def _steps_on_disk(workdir):
  return sorted(int(d) for d in os.listdir(checkpoint.checkpoint_dir(workdir)) if d.isdigit())


def _save_all(ckpt, metrics_by_step):
  state = {"w": jnp.arange(4.0)}
  for step, metrics in metrics_by_step:
    ckpt.save(step, state, {"pos": step}, metrics=metrics)
  ckpt.close()


def test_the_best_checkpoint_is_kept_alongside_the_last_k(tmp_path):
  wd = str(tmp_path)
  m = lambda v: {"zeroshot/top1": v, "retrieval/i2t_r1": 0.0}  # noqa: E731
  ckpt = checkpoint.Checkpointer(wd, keep=2, best_metric="zeroshot/top1")
  _save_all(ckpt, [(1, m(0.1)), (2, m(0.9)), (3, m(0.3)), (4, None), (5, m(0.2)), (6, m(0.4))])
  assert _steps_on_disk(wd) == [2, 5, 6]
  # The best is remembered across restarts (its metric is stored with it) ...
  ckpt = checkpoint.Checkpointer(wd, keep=2, best_metric="zeroshot/top1")
  assert ckpt.best_step() == 2
  _save_all(ckpt, [(7, m(0.5)), (8, None)])
  assert _steps_on_disk(wd) == [2, 7, 8]
  # ... until a better one arrives; the old best then goes like any old checkpoint.
  ckpt = checkpoint.Checkpointer(wd, keep=2, best_metric="zeroshot/top1")
  _save_all(ckpt, [(9, m(0.95)), (10, m(0.0)), (11, m(0.0))])
  assert _steps_on_disk(wd) == [9, 10, 11]


def test_keep_best_in_min_mode_and_without_a_metric(tmp_path):
  wd = str(tmp_path / "min")
  ckpt = checkpoint.Checkpointer(wd, keep=1, best_metric="loss", best_mode="min")
  _save_all(ckpt, [(1, {"loss": 3.0}), (2, {"loss": 1.0}), (3, {"loss": 2.0}), (4, {"loss": 5.0})])
  assert _steps_on_disk(wd) == [2, 4]
  wd = str(tmp_path / "plain")
  _save_all(checkpoint.Checkpointer(wd, keep=2), [(s, {"loss": -s}) for s in range(1, 5)])
  assert _steps_on_disk(wd) == [3, 4]


def test_metrics_without_the_best_metric_is_an_error_that_names_it(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, best_metric="zeroshot/top5")
  with pytest.raises(ValueError, match="keep_best_metric"):
    ckpt.save(1, {"w": jnp.zeros(2)}, {}, metrics={"zeroshot/top1": 0.5})
  ckpt.close()


def _tiny(**overrides):
  c = get_config("siglip_shapes", "runlocal")
  c.data.num_threads = 0
  for k, v in overrides.items():
    c[k] = v
  return c


def test_a_checkpoint_from_8_devices_restores_on_other_meshes_and_training_continues(
    tmp_path, capsys):
  wd = str(tmp_path / "run")
  c = _tiny(total_steps=4, checkpoint_every=2, eval_every=0, log_every=0)
  assert jax.device_count() == 8
  train.train_and_evaluate(c, wd)  # data-parallel over all 8 devices
  saved = checkpoint.load(wd)      # onto one device
  assert saved.step == 4
  saved_leaves = [np.asarray(x) for x in jax.tree.leaves(saved.params)]

  model = models.build(c.model)
  tx, lr = optim.build(c.optimizer, c.total_steps)
  meshes = {
      "2 devices": parallel.make_mesh([("data", 2)], devices=jax.devices()[:2]),
      "1 device": parallel.make_mesh([("data", 1)], devices=jax.devices()[:1]),
      "fsdp 4x2": parallel.make_mesh([("data", 4), ("fsdp", 2)]),
  }
  for name, mesh in meshes.items():
    shardings = train.train_state_shardings(c, model, tx, mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(lambda: train.create_train_state(
            c, model, tx, mesh, jax.random.PRNGKey(0))[0]), shardings)
    ckpt = checkpoint.Checkpointer(wd)
    state, data_state = ckpt.restore(4, abstract)
    ckpt.close()
    assert int(state.step) == 4, name
    for x, y in zip(jax.tree.leaves(state.params), saved_leaves):
      assert x.sharding.mesh.devices.size == mesh.devices.size, name
      np.testing.assert_array_equal(np.asarray(x), y, err_msg=name)
    if name == "fsdp 4x2":
      specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
      assert any("fsdp" in str(s) for s in specs), specs
    if name == "2 devices":
      # One more step on the 2-device mesh from the restored data position.
      it = iter(pipeline.train_dataset(c))
      it.set_state(data_state)
      step = train.make_train_step(c, model, tx, lr, mesh, shardings)
      state, metrics = step(state, parallel.global_batch(next(it), mesh))
      assert int(state.step) == 5 and np.isfinite(float(metrics["train/loss"]))

  # The training program itself resumes the 8-device run on an FSDP (4, 2) mesh.
  capsys.readouterr()
  c2 = _tiny(total_steps=6, checkpoint_every=2, eval_every=0, log_every=0,
             mesh=[("data", 4), ("fsdp", 2), ("tensor", 1)])
  train.train_and_evaluate(c2, wd)
  assert "from step 4" in capsys.readouterr().out
  # load() reads the FSDP-sharded checkpoint onto one device, or onto a mesh.
  assert checkpoint.load(wd).step == 6
  on_mesh = checkpoint.load(wd, mesh=meshes["2 devices"])
  assert all(x.sharding.mesh.devices.size == 2 for x in jax.tree.leaves(on_mesh.params))
  for x, y in zip(jax.tree.leaves(on_mesh.params), jax.tree.leaves(checkpoint.load(wd).params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
