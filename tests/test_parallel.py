"""Sharded training on 8 simulated CPU devices: any mesh trains like one device.

One tiny SigLIP (configs/siglip_shapes.py:runlocal at 16 px, 8 tokens) is
initialised once; every test starts from those parameters and a batch of 16
from the real input pipeline. The optimizer in the comparisons is plain SGD,
so the updated parameters are ``params - lr * grads`` and differences in the
gradients show up (AdamW's first step is ~lr * sign(grad), blind to scale).
"""

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from recipes import get_config, override
from vlm_jax import losses, models, optim, parallel, train
from vlm_jax.data import pipeline
from vlm_jax.tasks import contrastive

BATCH = 16
LR = 0.5
SGD = optax.sgd(LR)
MESHES = [(8, 1, 1), (4, 2, 1), (2, 2, 2)]  # (data, fsdp, tensor)


def _config(**overrides) -> ml_collections.ConfigDict:
  c = get_config("siglip_shapes", "runlocal")
  c.batch_size = BATCH
  c.model.image.image_size = c.pp.image_size = 16
  c.model.text.max_len = c.tokenizer.max_len = 8
  c.data.num_threads = 0
  c.data.shapes.train_size = 1000
  c.optimizer.warmup_steps = 0
  return override(c, overrides)


def _mesh(shape=(1, 1, 1), axis_types="auto"):
  spec = list(zip(("data", "fsdp", "tensor"), shape))
  devices = jax.devices()[:1] if shape == (1, 1, 1) else None
  return parallel.make_mesh(spec, axis_types=axis_types, devices=devices)


# Compile time, not run time, dominates these tests: XLA's CPU backend
# optimisations are turned off (the SPMD partitioning under test is not).
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.lru_cache(maxsize=None)
def _initial():
  """(AdamW state created on the 2x2x2 mesh, host parameters, the host batch).

  The key is an "rbg" key: its init compiles several times faster on CPU than
  the default threefry's (the initial values are not under test).
  """
  c = _config()
  model = models.build(c.model)
  tx, _ = optim.build(c.optimizer, c.total_steps)
  state, shardings = train.create_train_state(
      c, model, tx, _mesh((2, 2, 2)), jax.random.key(0, impl="rbg"))
  params = jax.device_get(state.params)
  batch = next(iter(pipeline.train_dataset(c)))
  return state, shardings, params, batch


def _start_state(shardings):
  """A fresh SGD TrainState from the shared initial parameters, placed by ``shardings``."""
  params = _initial()[2]
  start = train.TrainState(step=np.zeros((), np.int32), params=params,
                           opt_state=SGD.init(params), rng=np.asarray(jax.random.PRNGKey(1)))
  return jax.device_put(start, shardings)  # fresh buffers: the step donates them


@functools.lru_cache(maxsize=None)
def _train_step(overrides, shape, axis_types):
  """(compiled SGD train step, state shardings, mesh) for ``_config(**dict(overrides))``."""
  config, mesh = _config(**dict(overrides)), _mesh(shape, axis_types)
  model = models.build(config.model)
  shardings = train.train_state_shardings(config, model, SGD, mesh)
  step = train.make_train_step(config, model, SGD, lambda _: LR, mesh, shardings)
  example = (_start_state(shardings), parallel.global_batch(_initial()[3], mesh))
  return step.lower(*example).compile(_FAST), shardings, mesh


def _step(shape=(1, 1, 1), axis_types="auto", batch=None, **overrides):
  """One SGD step from the shared initial parameters -> (host params, host metrics)."""
  step, shardings, mesh = _train_step(tuple(sorted(overrides.items())), shape, axis_types)
  batch = parallel.global_batch(_initial()[3] if batch is None else batch, mesh)
  new, metrics = step(_start_state(shardings), batch)
  return jax.device_get(new.params), jax.device_get(metrics)


@functools.lru_cache(maxsize=None)
def _reference(**overrides):
  """The step on a 1-device mesh (the chunked loss then has a single block)."""
  return _step(**overrides)


def _assert_same_step(actual, expected, rtol=1e-5, atol=1e-6):
  (p_a, m_a), (p_e, m_e) = actual, expected
  np.testing.assert_allclose(m_a["train/loss"], m_e["train/loss"], rtol=rtol)
  np.testing.assert_allclose(m_a["train/grad_norm"], m_e["train/grad_norm"], rtol=rtol)
  flat_a, flat_e = (flax.traverse_util.flatten_dict(p, sep="/") for p in (p_a, p_e))
  assert flat_a.keys() == flat_e.keys()
  for k in flat_e:
    np.testing.assert_allclose(flat_a[k], flat_e[k], rtol=rtol, atol=atol, err_msg=k)


def test_the_step_changes_the_parameters():
  # Guards the comparisons below against a no-op step (e.g. a zero learning rate).
  params, metrics = _reference()
  start = _initial()[2]
  assert metrics["train/grad_norm"] > 1e-3
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, start)
  assert moved["t"] > 1e-6 and moved["b"] > 1e-6
  assert moved["img"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"] > 1e-6


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_a_step_on_a_mesh_equals_the_step_on_one_device(shape):
  _assert_same_step(_step(shape), _reference())


def test_the_gathered_sigmoid_loss_trains_like_one_device():
  _assert_same_step(_step((4, 2, 1), loss_impl="gather"), _reference())


def test_the_softmax_loss_trains_like_one_device():
  _assert_same_step(_step((2, 2, 2), loss="softmax"), _reference(loss="softmax"))


def test_an_explicit_axes_mesh_trains_like_one_device():
  assert all(t == jax.sharding.AxisType.Explicit
             for t in _mesh((2, 2, 2), axis_types="explicit").axis_types)
  _assert_same_step(_step((2, 2, 2), axis_types="explicit"), _reference())


def test_parameters_and_optimizer_state_are_sharded_by_the_logical_rules():
  state, shardings, host_params, batch = _initial()
  mesh = _mesh((2, 2, 2))
  mlp = ("img", "Transformer", "encoderblock_0", "MlpBlock_0")
  # Per layers.py: Dense_0 kernel ("embed", "mlp"), Dense_1 kernel ("mlp", "embed").
  expected = {
      mlp + ("Dense_0", "kernel"): ("fsdp", "tensor"),
      mlp + ("Dense_1", "kernel"): ("tensor", "fsdp"),
      mlp + ("Dense_0", "bias"): ("tensor",),
      ("txt", "Embed_0", "embedding"): ("tensor", "fsdp"),  # ("vocab", "embed")
      ("t",): (None,),
  }
  params = flax.traverse_util.flatten_dict(state.params)
  mu = flax.traverse_util.flatten_dict(state.opt_state[1][0].mu)  # clip, then adamw's Adam
  for path, spec in expected.items():
    for tree in (params, mu):
      x = tree[path]
      assert tuple(x.sharding.spec) == spec, (path, x.sharding.spec)
      assert x.sharding.mesh.shape == mesh.shape
      full = flax.traverse_util.flatten_dict(host_params)[path]
      n_split = [mesh.shape[a] if a else 1 for a in spec]
      local = tuple(d // n for d, n in zip(full.shape, n_split))
      shards = x.addressable_shards
      assert len(shards) == 8 and all(s.data.shape == local for s in shards), path
      if tree is params:  # each device holds exactly its slice of the whole
        for s in shards:
          np.testing.assert_array_equal(np.asarray(s.data), full[s.index])
  # The step counter and rng are replicated; the batch is split 4 ways (data x fsdp).
  assert tuple(state.step.sharding.spec) == () and tuple(state.rng.sharding.spec) == ()
  images = parallel.global_batch(batch, mesh)["image"]
  assert {s.data.shape for s in images.addressable_shards} == {(BATCH // 4, 16, 16, 3)}


# ------------------------------------------------------------ accumulation ---

def test_four_accumulated_micro_batches_equal_one_big_batch_on_one_device():
  _assert_same_step(_step(grad_accum_steps=4), _reference())


def test_four_accumulated_micro_batches_equal_one_big_batch_on_a_mesh():
  # 16 rows / 4 micro-batches / 4 batch shards: one row per device per micro-batch.
  _assert_same_step(_step((2, 2, 2), grad_accum_steps=4), _reference())


def test_accumulation_uses_each_micro_batchs_dropout_key_in_both_passes():
  """With dropout on, M=4 accumulation is the exact gradient of the full-batch
  loss whose micro-batch m (rows m, m+4, ...) is embedded with key fold_in(rng, m)."""
  accum = 4
  c = _config(grad_accum_steps=accum, **{"model.image.dropout": 0.2, "model.text.dropout": 0.2})
  model = models.build(c.model)
  params, batch = _initial()[2], _initial()[3]

  def reference(params, batch, rng):
    def loss_fn(p):
      def embed(img, tok, m):
        zi, zt, out = model.apply({"params": p}, img, tok, train=True,
                                  rngs={"dropout": jax.random.fold_in(rng, m)})
        return zi, zt, out["t"], out["b"]
      split = lambda x: jnp.stack([x[m::accum] for m in range(accum)])  # noqa: E731
      zi, zt, t, b = jax.vmap(embed)(split(batch["image"]), split(batch["tokens"]),
                                     jnp.arange(accum))
      merge = lambda z: jnp.swapaxes(z, 0, 1).reshape(BATCH, -1)  # noqa: E731
      return losses.sigmoid_loss(merge(zi), merge(zt), t[0], b[0])
    return jax.value_and_grad(loss_fn)(params)

  rng = jax.random.PRNGKey(3)
  args = (params, batch, rng)
  grad_fn = jax.jit(contrastive.make_grad_fn(c, model, _mesh())).lower(
      params, {}, batch, rng).compile(_FAST)
  reference = jax.jit(reference).lower(*args).compile(_FAST)
  loss, grads, _, _ = grad_fn(params, {}, batch, rng)
  ref_loss, ref_grads = reference(*args)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6),
               grads, ref_grads)
  # Dropout is really on: another key gives another loss.
  other = reference(params, batch, jax.random.PRNGKey(4))[0]
  assert abs(float(other) - float(ref_loss)) > 1e-4


def test_accumulation_needs_less_temporary_memory():
  # The scan keeps one micro-batch's activations alive at a time.
  overrides = {1: (), 4: (("grad_accum_steps", 4),)}  # the steps compiled above
  temp = {m: _train_step(o, (1, 1, 1), "auto")[0].memory_analysis() for m, o in overrides.items()}
  if any(v is None for v in temp.values()):
    pytest.skip("this backend gives no memory analysis")
  temp = {m: v.temp_size_in_bytes for m, v in temp.items()}
  assert temp[4] < 0.6 * temp[1], temp


# ---------------------------------------------------------------- errors ---

def test_a_batch_size_not_divisible_by_the_batch_shards_names_the_field(tmp_path):
  c = _config(batch_size=12)  # 8 data shards
  with pytest.raises(ValueError, match=r"config\.batch_size=12 .*8 batch shards"):
    train.train_and_evaluate(c, str(tmp_path))


def test_micro_batches_not_divisible_by_the_batch_shards_name_both_fields():
  c = _config(grad_accum_steps=4)  # 16 / 4 = 4 rows per micro-batch, 8 shards
  mesh = _mesh((8, 1, 1))
  model = models.build(c.model)
  shardings = train.train_state_shardings(c, model, SGD, mesh)
  with pytest.raises(ValueError, match=r"config\.batch_size=16 .*config\.grad_accum_steps=4"):
    train.make_train_step(c, model, SGD, lambda _: LR, mesh, shardings)
  with pytest.raises(ValueError, match=r"config\.grad_accum_steps must be an int >= 1"):
    contrastive.make_grad_fn(_config(grad_accum_steps=0), model, mesh)


# ------------------------------------------------------------ multi-host ---

def test_two_processes_read_together_the_batch_one_process_reads():
  """Each step, the local batches of processes 0 and 1 of 2, laid side by side
  as ``global_batch`` assembles them (process p on the p-th block of the
  batch-sharded devices), hold the rows of the single-process batch: the same
  image-caption pairs, reordered, so the train step is the same."""
  c = _config()
  one = iter(pipeline.train_dataset(c))
  parts = [iter(pipeline.train_dataset(c, process_index=p, process_count=2)) for p in range(2)]
  for i in range(3):
    single = next(one)
    local = [next(it) for it in parts]
    assert all(x["image"].shape[0] == BATCH // 2 for x in local)
    joined = {k: np.concatenate([x[k] for x in local]) for k in single}
    where = {im.tobytes(): r for r, im in enumerate(single["image"])}
    order = np.array([where.get(im.tobytes(), -1) for im in joined["image"]])
    assert sorted(order) == list(range(BATCH)), order  # a permutation of the rows
    np.testing.assert_array_equal(joined["tokens"], single["tokens"][order])
    # (Today the stream is strided over processes: process p's row j is row 2j + p.)
    if i == 0:
      np.testing.assert_array_equal(single["image"], _initial()[3]["image"])
      first = joined
  # The loss is a function of the set of pairs, so the step does not change.
  _assert_same_step(_step(batch=first), _reference())
