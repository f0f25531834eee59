"""The losses keep float32 precision against float64 references (open_clip's, in torch
float64), value and every gradient, dL/dt included, on embeddings aligned the way a
trained model aligns its pairs.

There the softmax loss sits near its optimum in t: dL/dt is a small difference of
large sums, and it stays within 1e-5 only when the matching-pair logits are the
very entries of the logits matrix that the softmaxes see (with them recomputed
apart, as t * <x_i, y_i>, it was off by ~1e-4)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P
from open_clip.loss import ClipLoss, SigLipLoss

from vlm_jax import losses

B, D = 48, 24
T = 1 / 0.07  # CLIP's initial temperature
TOL = 1e-5


def _rel_err(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


@functools.lru_cache(maxsize=None)
def _aligned(seed=0, noise=0.7):
    """Unit rows, text i = image i plus noise: matching pairs have cosine ~0.8."""
    rng = np.random.default_rng(seed)
    x, e = rng.normal(size=(2, B, D))
    y = x + noise * e
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y /= np.linalg.norm(y, axis=-1, keepdims=True)
    return x.astype(np.float32), y.astype(np.float32)


def _invalid_rows():
    valid = np.ones(B, bool)
    valid[[3, 17, 18, 40]] = False
    return valid


def _torch64(loss_fn, *args):
    """open_clip loss and its gradients wrt every argument, in float64."""
    args = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in args]
    loss = loss_fn(*args)
    loss.backward()
    return loss.item(), [a.grad.numpy() for a in args]


def _assert_close(result, reference, names):
    (loss, grads), (ref_loss, ref_grads) = result, reference
    assert loss.dtype == jnp.float32
    errors = {"value": _rel_err(loss, ref_loss)}
    errors.update({f"d/d{n}": _rel_err(g, r) for n, g, r in zip(names, grads, ref_grads)})
    assert max(errors.values()) < TOL, errors


def test_the_data_puts_the_softmax_loss_near_its_optimum_in_t():
    # Guards the test data: dL/dt must be small against the loss for the checks below
    # to probe the cancellation (random pairs give dL/dt ~ 0.4, any rounding passes).
    x, y = _aligned()
    loss, (_, _, dt) = _torch64(ClipLoss(), x, y, T)
    assert abs(dt) < 0.25 * loss


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "all-valid-mask"])
def test_softmax_loss_matches_float64_including_dt(masked):
    x, y = _aligned()
    valid = np.ones(B, bool) if masked else None
    fn = lambda a, c, t: losses.softmax_loss(a, c, t, valid=valid)  # noqa: E731
    result = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(x, y, jnp.float32(T))
    _assert_close(result, _torch64(ClipLoss(), x, y, T), ("zimg", "ztxt", "t"))


def test_masked_softmax_loss_matches_float64_of_the_valid_rows():
    x, y = _aligned()
    valid = _invalid_rows()
    fn = lambda a, c, t: losses.softmax_loss(a, c, t, valid=valid)  # noqa: E731
    loss, (gx, gy, gt) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(x, y, jnp.float32(T))
    assert not np.any(np.asarray(gx)[~valid]) and not np.any(np.asarray(gy)[~valid])
    reference = _torch64(ClipLoss(), x[valid], y[valid], T)
    result = (loss, (np.asarray(gx)[valid], np.asarray(gy)[valid], gt))
    _assert_close(result, reference, ("zimg", "ztxt", "t"))


def _sharded(mesh):
    x, y = _aligned()
    emb = NamedSharding(mesh, P("data", None))
    return jax.device_put(x, emb), jax.device_put(y, emb)


def test_gathered_softmax_loss_matches_float64_including_dt_on_8_devices():
    mesh = jax.make_mesh((8,), ("data",))
    x, y = _aligned()

    def loss(a, c, t):
        return losses.gathered_softmax_loss(a, c, t, mesh=mesh, batch_axes=("data",))

    result = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*_sharded(mesh), jnp.float32(T))
    _assert_close(result, _torch64(ClipLoss(), x, y, T), ("zimg", "ztxt", "t"))


@pytest.mark.parametrize("impl", ["dense", "gather", "chunked"])
def test_sigmoid_losses_match_float64_including_dt(impl):
    mesh = jax.make_mesh((8,), ("data",))
    x, y = _aligned()
    t, b = 10.0, -10.0  # SigLIP's initial temperature and bias
    fn = losses.get_loss_fn("sigmoid", impl, mesh=mesh, batch_axes=("data",))
    step = jax.jit(jax.value_and_grad(lambda a, c, t, b: fn(a, c, t, b), argnums=(0, 1, 2, 3)))
    result = step(*_sharded(mesh), jnp.float32(t), jnp.float32(b))
    _assert_close(result, _torch64(SigLipLoss(), x, y, t, b), ("zimg", "ztxt", "t", "b"))
