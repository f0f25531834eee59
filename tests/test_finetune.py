"""Fine-tuning: init from weights, frozen parameters, LoRA (vlm_jax.finetune)."""
import copy
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recipes import get_config, override
from vlm_jax import checkpoint as ckpt_lib
from vlm_jax import config_util, finetune, interop, models, optim, parallel, tasks, train

RANK = 4


def _config(**overrides):
  c = get_config("siglip_shapes", "runlocal")
  c.data.num_threads = 0
  c.batch_size = 8
  c.optimizer.warmup_steps = 0
  c.optimizer.lr = 0.05
  return override(c, overrides)


def _flat(tree):
  return finetune._flat(jax.device_get(tree))  # pylint: disable=protected-access


def _state(c, mesh):
  """A fresh TrainState on ``mesh`` (eager init: no compile) and its shardings."""
  model = models.build(c.model)
  tx, lr = optim.build(c.optimizer, c.total_steps, trainable=finetune.trainable_fn(c))
  shardings = train.train_state_shardings(c, model, tx, mesh)
  variables = nn.unbox(finetune.init_variables(c, model, jax.random.PRNGKey(0),
                                               *models.init_inputs(c.model)))
  params = variables.pop("params")
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), rng=jax.random.PRNGKey(1),
                           model_state=variables)
  return model, tx, lr, jax.device_put(state, shardings), shardings


def _mesh(shape=(1, 1, 1)):
  devices = jax.devices()[:1] if shape == (1, 1, 1) else None
  return parallel.make_mesh(list(zip(("data", "fsdp", "tensor"), shape)), devices=devices)


def _steps(c, mesh, n, state_fn=None):
  model, tx, lr, state, shardings = _state(c, mesh)
  if state_fn is not None:
    state = jax.device_put(state_fn(state), shardings)
  start = jax.device_get(state)
  step = train.make_train_step(c, model, tx, lr, mesh, shardings)
  batch = parallel.global_batch(next(iter(tasks.get(c).train_dataset(c))), mesh)
  metrics = None
  for _ in range(n):
    state, metrics = step(state, batch)
  return model, tx, start, jax.device_get(state), jax.device_get(metrics), shardings


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ------------------------------------------------------------- freezing ---

def test_a_frozen_param_gets_no_update_and_no_optimizer_state():
  c = _config(**{"finetune.freeze": "^img/"})
  model = models.build(c.model)
  params = jax.tree.map(lambda x: np.ones(x.shape, x.dtype),
                        models.abstract_variables(model, c)["params"])
  tx, _ = optim.build(c.optimizer, c.total_steps, trainable=finetune.trainable_fn(c))
  full_tx, _ = optim.build(c.optimizer, c.total_steps)
  flat = finetune._flat(params)  # pylint: disable=protected-access
  trained = {k: v for k, v in flat.items() if not k.startswith("img/")}
  assert 0 < len(trained) < len(flat)
  # Adam's two moments exist for the trained params only.
  assert _nbytes(jax.eval_shape(tx.init, params)) == pytest.approx(2 * _nbytes(trained), abs=64)
  assert _nbytes(jax.eval_shape(full_tx.init, params)) == pytest.approx(2 * _nbytes(flat), abs=64)
  grads = jax.tree.map(lambda x: np.full(x.shape, 0.5, x.dtype), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for k, u in _flat(updates).items():
    assert (np.abs(u).max() == 0) == k.startswith("img/"), k
  with pytest.raises(ValueError, match="config.finetune.freeze"):
    finetune.trainable(_config(**{"finetune.freeze": "^nothing/"}), params)


# ------------------------------------------------------------------ LoRA ---

# The LoRA run of these tests: factors on both towers, the text tower's frozen
# (so they show freezing inside a real step too); random B factors, so that A
# gets gradients from the first step. Adam's first step divides each gradient
# by its size: a larger eps keeps gradients that are ~0 up to summation order
# from deciding the mesh comparison.
LORA = {"finetune.lora.rank": RANK, "finetune.freeze": "^txt/", "optimizer.eps": 1e-3}


def _nudge(state):
  rs = np.random.RandomState(0)
  flat = {k: (v + 0.05 * rs.randn(*v.shape).astype(np.float32) if k.endswith("_lora_b") else v)
          for k, v in _flat(state.params).items()}
  return state.replace(params=finetune._unflat(flat))  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def lora_run():
  c = _config(**LORA)
  return c, _steps(c, _mesh(), 2, _nudge)


def test_lora_trains_only_unfrozen_factors_and_holds_state_for_them_only(lora_run):
  c, (_, _, start, end, metrics, shardings) = lora_run
  assert metrics["train/grad_norm"] > 0
  before, after = _flat(start.params), _flat(end.params)
  changed = {k for k in before if not np.array_equal(after[k], before[k])}
  factors = {k for k in before if k.endswith(("_lora_a", "_lora_b")) and k.startswith("img/")}
  assert changed == factors  # base weights and the frozen text factors bit-identical
  mask = _flat(finetune.trainable(c, start.params))
  assert {k for k, m in mask.items() if m} == factors
  n_train = sum(before[k].size for k in factors)
  assert 0 < n_train < 0.2 * sum(v.size for v in before.values())  # rank 4 of width 32
  assert _nbytes(end.opt_state) == pytest.approx(2 * 4 * n_train, abs=64)
  # The state's shardings cover the masked optimizer state leaf for leaf.
  assert jax.tree.structure(shardings.opt_state) == jax.tree.structure(end.opt_state)
  # The factors follow their kernel's logical axes.
  specs = nn.get_partition_spec(finetune.boxed_abstract(models.build(c.model), c))["params"]
  att = specs["img"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  assert tuple(att["out"]["kernel_lora_a"]) == ("heads", "kv", None)
  assert tuple(att["query"]["kernel_lora_b"]) == (None, "heads", "kv")
  with pytest.raises(ValueError, match="config.finetune.lora.dropout"):
    finetune.check_config(_config(**{"finetune.lora.rank": RANK, "finetune.lora.dropout": 1.0}))


def test_lora_dropout_drops_the_branch_input_only_in_training(lora_run):
  """With dropout the factors stay apart: W x + s (drop(x) A) B inside each layer."""
  c, (model, _, start, _, _, _) = lora_run
  mesh = _mesh()
  batch = parallel.global_batch(next(iter(tasks.get(c).train_dataset(c))), mesh)
  params = jax.tree.map(jnp.asarray, start.params)

  fns = {}

  def run(rate, seed):
    if rate not in fns:  # one compile per rate; the seed is an argument
      cc = override(copy.deepcopy(c), {"finetune.lora.dropout": rate})
      fns[rate] = jax.jit(tasks.get(cc).make_grad_fn(cc, model, mesh))
    loss, grads, _, _ = fns[rate](params, {}, batch, jax.random.PRNGKey(seed))
    return float(loss), _flat(grads)

  merged_loss, merged = run(0.0, 0)
  # A rate that rounds to keep-everything in float32 runs the unmerged branch:
  # same loss and gradients as the merged kernels.
  tiny_loss, tiny = run(1e-9, 0)
  assert tiny_loss == pytest.approx(merged_loss, rel=1e-5)
  for k, g in merged.items():
    np.testing.assert_allclose(tiny[k], g, rtol=1e-3, atol=1e-5, err_msg=k)
  loss_a, grads_a = run(0.5, 0)
  loss_b, _ = run(0.5, 1)
  assert loss_a != pytest.approx(merged_loss, rel=1e-4)  # the branch's input is dropped
  assert loss_a != loss_b  # ... with the step's dropout key
  assert loss_a == run(0.5, 0)[0]
  frozen = [k for k in grads_a if not k.endswith(("_lora_a", "_lora_b")) or k.startswith("txt/")]
  assert all(np.abs(grads_a[k]).max() == 0 for k in frozen)  # base weights stay frozen
  assert max(np.abs(grads_a[k]).max() for k in grads_a if k.endswith("_lora_a")) > 0


def test_merged_lora_has_the_base_tree_and_the_unmerged_forward(lora_run):
  c, (model, _, start, end, _, _) = lora_run
  merged = finetune.merge_lora(end.params)
  base = models.abstract_variables(model, c)["params"]
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  assert finetune.merge_lora(base) == base  # nothing to merge
  # x @ merged == x @ W + scale * (x @ A) @ B, for an MLP kernel [in, out] and
  # the attention kernels (q/k/v [D, H, Dh]; out [H, Dh, D]: two input dims).
  block = end.params["img"]["Transformer"]["encoderblock_0"]
  merged_block = merged["img"]["Transformer"]["encoderblock_0"]
  for name, n_in in (("MultiHeadDotProductAttention_0/out", 2),
                     ("MultiHeadDotProductAttention_0/query", 1), ("MlpBlock_0/Dense_0", 1)):
    p, m = block, merged_block
    for part in name.split("/"):
      p, m = p[part], m[part]
    x = np.random.RandomState(0).randn(5, *p["kernel"].shape[:n_in]).astype(np.float32)
    dims = (tuple(range(1, n_in + 1)), tuple(range(n_in)))
    plain = np.tensordot(x, p["kernel"], dims)
    lora = p["kernel_lora_scale"] * np.tensordot(np.tensordot(x, p["kernel_lora_a"], dims),
                                                 p["kernel_lora_b"], 1)
    assert np.abs(lora).max() > 1e-3, name  # the factors do change the layer
    np.testing.assert_allclose(np.tensordot(x, m["kernel"], dims), plain + lora, atol=1e-5,
                               err_msg=name)


def test_a_lora_checkpoint_restores_exactly_and_loads_merged(lora_run, tmp_path):
  c, (_, _, _, end, _, shardings) = lora_run
  wd = str(tmp_path / "lora")
  os.makedirs(wd)
  with open(os.path.join(wd, "config.json"), "w") as f:
    f.write(c.to_json_best_effort())
  ck = ckpt_lib.Checkpointer(wd, async_save=False)
  ck.save(2, jax.device_put(end, shardings), {})
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          end, shardings)
  restored, _ = ck.restore(2, abstract)
  ck.close()
  for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(end)):
    np.testing.assert_array_equal(a, b)
  loaded = ckpt_lib.load(wd)
  want = _flat(finetune.merge_lora(end.params))
  got = _flat(loaded.params)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=k)


def test_a_lora_step_on_a_mesh_equals_one_device(lora_run):
  c, (_, _, _, one, one_metrics, _) = lora_run
  _, _, _, sharded, metrics, _ = _steps(c, _mesh((2, 2, 2)), 2, _nudge)
  np.testing.assert_allclose(metrics["train/loss"], one_metrics["train/loss"], rtol=1e-5)
  fa, fb = _flat(one.params), _flat(sharded.params)
  for k in fa:
    np.testing.assert_allclose(fb[k], fa[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ------------------------------------------------------- init from weights ---

def _write_workdir(tmp_path, c, params):
  wd = str(tmp_path / "src")
  os.makedirs(wd, exist_ok=True)
  with open(os.path.join(wd, "config.json"), "w") as f:
    f.write(c.to_json_best_effort())
  ck = ckpt_lib.Checkpointer(wd, async_save=False)
  ck.save(3, {"step": np.int32(3), "params": params}, {})  # what load() reads of a TrainState
  ck.close()
  return wd


def _target(c):
  model = models.build(c.model)
  variables = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                           nn.unbox(finetune.boxed_abstract(model, c)))
  return variables.pop("params"), variables


def test_init_from_a_workdir_loads_what_matches_and_reports_a_new_head_fresh(tmp_path):
  src = _config()
  model = models.build(src.model)
  params = jax.tree.map(lambda x: np.random.RandomState(x.size % 91).randn(*x.shape)
                        .astype(np.float32), models.abstract_variables(model, src)["params"])
  wd = _write_workdir(tmp_path, src, params)
  c = _config(**{"init.workdir": wd, "model.image.head": True, "finetune.lora.rank": RANK})
  got, _, report = finetune.load_init(c, *_target(c))
  flat_src, flat_got = finetune._flat(params), _flat(got)  # pylint: disable=protected-access
  assert len(report.loaded) == len(flat_src) and report.unused == []
  for k, v in flat_src.items():
    np.testing.assert_array_equal(flat_got[k], v, err_msg=k)
  assert report.fresh == ["params/img/head/bias", "params/img/head/kernel"]
  assert report.lora > 0 and "left fresh (2)" in str(report)
  # Another image size: the learned posemb is resampled (4x4 -> 8x8 grid).
  c = _config(**{"init.workdir": wd, "model.image.image_size": 64, "pp.image_size": 64})
  got, _, report = finetune.load_init(c, *_target(c))
  assert report.resampled == ["params/img/pos_embedding"]
  assert got["img"]["pos_embedding"].shape == (1, 64, 32)
  # Any other shape mismatch names the key and both shapes.
  c = _config(**{"init.workdir": wd, "model.out_dim": 16, "model.image.head": True})
  with pytest.raises(interop.CheckpointMismatchError,
                     match=r"params/txt/head/kernel: \(32, 32\) vs \(32, 16\)") as e:
    finetune.load_init(c, *_target(c))
  assert "config.init.workdir" in str(e.value)
  c.init.skip = "head/"
  _, _, report = finetune.load_init(c, *_target(c))
  assert "params/txt/head/kernel" in report.skipped


def test_config_errors_name_their_fields():
  c = _config(**{"init.workdir": "/x", "init.hf": "/y"})
  with pytest.raises(ValueError, match="config.init"):
    finetune.check_config(c)
  assert not finetune.has_init(_config())
  assert json.loads(_config().to_json_best_effort())["finetune"]["lora"]["rank"] == 0


@pytest.mark.parametrize("arg", ["freeze_vision,runlocal", "lora,runlocal", "full", "lora"])
def test_finetune_recipes_keep_the_demo_model_and_shift_the_data(arg):
  c = get_config("finetune", arg)
  config_util.validate(c)
  demo = get_config("siglip_shapes", "runlocal" if "runlocal" in arg else None)
  assert c.model.to_dict() == demo.model.to_dict()  # init.workdir's tensors all fit
  assert c.data.shapes.image_size != demo.data.shapes.image_size
  params = models.abstract_variables(models.build(c.model), c)["params"]
  if "lora" in arg:
    params = finetune.boxed_abstract(models.build(c.model), c)["params"]
    params = jax.tree.map(lambda x: x.value, params, is_leaf=lambda x: hasattr(x, "names"))
  mask = _flat(jax.tree.map(bool, finetune.trainable(c, params)))
  trained = {k for k, m in mask.items() if m}
  if arg.startswith("freeze_vision"):
    assert trained and not any(k.startswith("img/") for k in trained)
  elif arg.startswith("lora"):
    assert trained - {"t", "b"} and all(finetune.is_lora(k) for k in trained - {"t", "b"})
  else:
    assert trained == set(mask)
  with pytest.raises(ValueError, match="choose one"):
    get_config("finetune", "lora,full")
