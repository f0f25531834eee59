"""Dense sigmoid (SigLIP) and softmax (CLIP) losses match open_clip's reference losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss, SigLipLoss

from vlm_jax import losses

B, D = 48, 24


def _features(seed, batch=B, width=D):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, batch, width)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x[0], x[1]


def _rel_err(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def _torch_sigmoid(x, y, t, b):
    """open_clip SigLipLoss value and grads (x, y, t, b), in float64."""
    tx, ty = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, y))
    tt, tb = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (t, b))
    loss = SigLipLoss()(tx, ty, tt, tb)
    loss.backward()
    return loss.item(), [v.grad.numpy() for v in (tx, ty, tt, tb)]


def _torch_clip(x, y, t):
    tx, ty = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, y))
    tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    loss = ClipLoss()(tx, ty, tt)
    loss.backward()
    return loss.item(), [v.grad.numpy() for v in (tx, ty, tt)]


@pytest.mark.parametrize("t,b", [(10.0, -10.0), (3.7, 0.5)])
def test_sigmoid_loss_value_and_grads_match_open_clip(t, b):
    x, y = _features(0)
    ref_loss, ref_grads = _torch_sigmoid(x, y, t, b)
    loss, grads = jax.jit(jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3)))(
        jnp.asarray(x), jnp.asarray(y), jnp.float32(t), jnp.float32(b)
    )
    assert loss.dtype == jnp.float32
    assert _rel_err(loss, ref_loss) < 1e-5
    for name, g, r in zip(("zimg", "ztxt", "t", "b"), grads, ref_grads):
        assert _rel_err(g, r) < 1e-5, name


@pytest.mark.parametrize("t", [1.0, 14.3])
def test_softmax_loss_value_and_grads_match_open_clip(t):
    x, y = _features(1)
    ref_loss, ref_grads = _torch_clip(x, y, t)
    loss, grads = jax.jit(jax.value_and_grad(losses.softmax_loss, argnums=(0, 1, 2)))(
        jnp.asarray(x), jnp.asarray(y), jnp.float32(t)
    )
    assert loss.dtype == jnp.float32
    assert _rel_err(loss, ref_loss) < 1e-5
    for name, g, r in zip(("zimg", "ztxt", "t"), grads, ref_grads):
        assert _rel_err(g, r) < 1e-5, name


def test_sigmoid_loss_positives_are_the_diagonal():
    # Swapping two texts moves two positives off the diagonal: the loss must change.
    x, y = _features(2)
    base = losses.sigmoid_loss(x, y, 10.0, -10.0)
    y_swapped = y.copy()
    y_swapped[[0, 1]] = y_swapped[[1, 0]]
    assert abs(float(losses.sigmoid_loss(x, y_swapped, 10.0, -10.0)) - float(base)) > 1e-3


@pytest.mark.parametrize("fn", ["sigmoid", "softmax"])
def test_bf16_inputs_give_float32_loss_close_to_float32(fn):
    x, y = _features(3)
    f = (lambda a, c: losses.sigmoid_loss(a, c, 10.0, -10.0)) if fn == "sigmoid" else (
        lambda a, c: losses.softmax_loss(a, c, 10.0)
    )
    lo = f(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
    assert lo.dtype == jnp.float32
    assert _rel_err(lo, f(jnp.asarray(x), jnp.asarray(y))) < 2e-2
    grads = jax.grad(f, argnums=(0, 1))(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
    assert all(g.dtype == jnp.bfloat16 for g in grads)


@pytest.mark.parametrize("fn", [lambda x, y: losses.sigmoid_loss(x, y, 1.0, 0.0), lambda x, y: losses.softmax_loss(x, y, 1.0)])
def test_shape_mismatch_is_a_clear_error(fn):
    x, y = _features(4)
    with pytest.raises(ValueError, match="same shape"):
        fn(x, y[:-1])
    with pytest.raises(ValueError, match=r"zimg must be \[B, D\]"):
        fn(x[None], y[None])


def test_non_scalar_temperature_is_a_clear_error():
    x, y = _features(5)
    with pytest.raises(ValueError, match="t must be a scalar"):
        losses.sigmoid_loss(x, y, jnp.ones(3), 0.0)
