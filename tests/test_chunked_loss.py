"""Sharded losses (ring-chunked and all-gather) equal the dense loss and open_clip on 8 CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from open_clip.loss import ClipLoss, SigLipLoss

from vlm_jax import losses

B, D = 64, 32
T, BIAS = 7.5, -4.0
AXIS_TYPES = [AxisType.Explicit, AxisType.Auto]

# (mesh shape, mesh axis names, batch_axes)
MESHES = [
    pytest.param((8,), ("data",), ("data",), id="8-data"),
    pytest.param((4, 2), ("data", "fsdp"), ("data", "fsdp"), id="4x2-data+fsdp"),
    pytest.param((4, 2), ("data", "fsdp"), ("data",), id="4x2-data"),
    pytest.param((4, 2, 1), ("data", "fsdp", "tensor"), ("fsdp", "data"), id="4x2x1-fsdp+data"),
]


def _rel_err(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


@functools.lru_cache(maxsize=None)
def _features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, B, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x[0], x[1]


@functools.lru_cache(maxsize=None)
def _open_clip_sigmoid():
    x, y = _features()
    args = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, y, T, BIAS)]
    loss = SigLipLoss()(*args)
    loss.backward()
    return loss.item(), tuple(a.grad.numpy() for a in args)


@functools.lru_cache(maxsize=None)
def _open_clip_softmax():
    x, y = _features()
    args = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, y, T)]
    loss = ClipLoss()(*args)
    loss.backward()
    return loss.item(), tuple(a.grad.numpy() for a in args)


@functools.lru_cache(maxsize=None)
def _dense_sigmoid():
    x, y = _features()
    return jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3))(x, y, T, BIAS)


def _sharded_inputs(mesh, batch_axes):
    x, y = _features()
    emb = NamedSharding(mesh, P(batch_axes, None))
    rep = NamedSharding(mesh, P())
    return (
        jax.device_put(x, emb),
        jax.device_put(y, emb),
        jax.device_put(jnp.float32(T), rep),
        jax.device_put(jnp.float32(BIAS), rep),
    ), (emb, emb, rep, rep)


def _assert_matches(result, reference, tol, what):
    loss, grads = result
    ref_loss, ref_grads = reference
    assert loss.dtype == jnp.float32
    assert _rel_err(loss, ref_loss) < tol, f"{what}: loss"
    for name, g, r in zip(("zimg", "ztxt", "t", "b"), grads, ref_grads):
        assert _rel_err(g, r) < tol, f"{what}: d/d{name}"


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda a: a.name)
@pytest.mark.parametrize("shape,names,batch_axes", MESHES)
@pytest.mark.parametrize("impl", ["chunked", "gather"])
def test_sharded_sigmoid_equals_dense_and_open_clip_in_jit(impl, shape, names, batch_axes, axis_type):
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))
    fn = losses.chunked_sigmoid_loss if impl == "chunked" else losses.gathered_sigmoid_loss
    inputs, shardings = _sharded_inputs(mesh, batch_axes)

    def loss(x, y, t, b):
        return fn(x, y, t, b, mesh=mesh, batch_axes=batch_axes)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), in_shardings=shardings)
    result = step(*inputs)
    _assert_matches(result, _dense_sigmoid(), 1e-4, "vs dense")
    _assert_matches(result, _open_clip_sigmoid(), 1e-4, "vs open_clip")
    # Gradients come back laid out like the inputs.
    assert result[1][0].sharding.is_equivalent_to(shardings[0], 2)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda a: a.name)
@pytest.mark.parametrize("shape,names,batch_axes", [MESHES[0], MESHES[3]])
def test_gathered_softmax_equals_open_clip_in_jit(shape, names, batch_axes, axis_type):
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))
    inputs, shardings = _sharded_inputs(mesh, batch_axes)

    def loss(x, y, t):
        return losses.gathered_softmax_loss(x, y, t, mesh=mesh, batch_axes=batch_axes)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), in_shardings=shardings[:3])
    loss_val, grads = step(*inputs[:3])
    ref_loss, ref_grads = _open_clip_softmax()
    assert _rel_err(loss_val, ref_loss) < 1e-4
    for g, r in zip(grads, ref_grads):
        assert _rel_err(g, r) < 1e-4


@pytest.mark.parametrize("impl", ["chunked", "gather"])
def test_sharded_sigmoid_gradients_follow_the_outer_function(impl):
    # The loss computes its gradients in its forward pass; the backward must scale
    # them by whatever cotangent arrives (here d sin(3 L) / dL), not assume 1.
    mesh = jax.make_mesh((8,), ("data",))
    fn = losses.get_loss_fn("sigmoid", impl, mesh=mesh, batch_axes=("data",))
    inputs, shardings = _sharded_inputs(mesh, ("data",))
    outer = lambda f: lambda x, y, t, b: jnp.sin(3.0 * f(x, y, t, b))  # noqa: E731
    grads = jax.jit(jax.grad(outer(fn), argnums=(0, 1, 2, 3)), in_shardings=shardings)(*inputs)
    x, y = _features()
    ref = jax.grad(outer(losses.sigmoid_loss), argnums=(0, 1, 2, 3))(x, y, T, BIAS)
    for name, g, r in zip(("zimg", "ztxt", "t", "b"), grads, ref):
        assert _rel_err(g, r) < 1e-5, name


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda a: a.name)
def test_chunked_loss_accepts_inputs_laid_out_differently(axis_type):
    # A train step may hand over embeddings replicated or sharded on other axes.
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(axis_type,) * 2)
    x, y = _features()
    sh = NamedSharding(mesh, P("fsdp", "data"))

    def loss(x, y, t, b):
        return losses.chunked_sigmoid_loss(x, y, t, b, mesh=mesh, batch_axes=("data", "fsdp"))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    result = step(jax.device_put(x, sh), jax.device_put(y, sh), T, BIAS)
    _assert_matches(result, _dense_sigmoid(), 1e-4, "vs dense")


def test_chunked_loss_never_gathers_the_batch():
    mesh = jax.make_mesh((8,), ("data",))
    inputs, shardings = _sharded_inputs(mesh, ("data",))

    def loss(x, y, t, b):
        return losses.chunked_sigmoid_loss(x, y, t, b, mesh=mesh, batch_axes=("data",))

    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(*inputs).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo


def _temp_bytes(impl, batch, width, masked=False):
    """Per-device temp memory of jit(value_and_grad) of a sigmoid loss on 8 devices."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    emb = jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    valid = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=NamedSharding(mesh, P("data")))
    fn = losses.get_loss_fn("sigmoid", impl, mesh=mesh, batch_axes=("data",))
    args = (emb, emb, scalar, scalar) + ((valid,) if masked else ())
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_sharded_losses_use_less_memory_than_the_plain_dense_loss():
    # The baseline is what a user would run anyway: sigmoid_loss under jit on
    # batch-sharded inputs, partitioned by GSPMD.
    temp = {impl: _temp_bytes(impl, 2048, 32) for impl in ("dense", "gather", "chunked")}
    assert temp["gather"] <= temp["dense"], temp
    assert 0 < 6 * temp["chunked"] < temp["dense"], temp


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_chunked_loss_holds_one_block_forward_and_backward(masked):
    # One b x b float32 block (each block's gradient is written over its logits)
    # plus the [b, D] arrays the ring carries: text chunk, its gradient, image gradient.
    batch, width = 2048, 32
    b = batch // 8
    block, row_chunk = 4 * b * b, 4 * b * width
    assert _temp_bytes("chunked", batch, width, masked) <= block + 4 * row_chunk


def test_chunked_loss_bf16_inputs_give_float32_loss():
    mesh = jax.make_mesh((8,), ("data",))
    x, y = _features()
    sh = NamedSharding(mesh, P("data", None))
    xb, yb = (jax.device_put(jnp.asarray(v, jnp.bfloat16), sh) for v in (x, y))

    def loss(x, y):
        return losses.chunked_sigmoid_loss(x, y, T, BIAS, mesh=mesh)

    val, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(xb, yb)
    assert val.dtype == jnp.float32
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    assert _rel_err(val, losses.sigmoid_loss(xb, yb, T, BIAS)) < 1e-5


@pytest.mark.parametrize("fn", [losses.chunked_sigmoid_loss, losses.gathered_sigmoid_loss])
def test_batch_not_divisible_by_devices_is_a_clear_error(fn):
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    x, y = _features()
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        fn(x[:60], y[:60], T, BIAS, mesh=mesh, batch_axes=("data", "fsdp"))
    with pytest.raises(ValueError, match="not axes of the mesh"):
        fn(x, y, T, BIAS, mesh=mesh, batch_axes=("batch",))


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
@pytest.mark.parametrize("impl", ["dense", "gather", "chunked"])
def test_get_loss_fn_implementations_agree(name, impl):
    mesh = jax.make_mesh((8,), ("data",))
    inputs, shardings = _sharded_inputs(mesh, ("data",))
    fn = losses.get_loss_fn(name, impl, mesh=mesh, batch_axes=("data",))
    dense = losses.get_loss_fn(name, "dense")
    x, y = _features()
    val = jax.jit(fn, in_shardings=shardings)(*inputs)
    assert _rel_err(val, dense(x, y, T, BIAS)) < 1e-5


def test_get_loss_fn_rejects_unknown_names():
    with pytest.raises(ValueError, match="loss name"):
        losses.get_loss_fn("hinge", "dense")
    with pytest.raises(ValueError, match="loss impl"):
        losses.get_loss_fn("sigmoid", "ring")
    with pytest.raises(ValueError, match="mesh is required"):
        losses.get_loss_fn("sigmoid", "chunked", mesh=None)
