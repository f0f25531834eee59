"""Contrastive losses with a validity mask (empty NaViT slots): equal the loss of the
batch with the invalid rows removed; the sharded (ring, gather) versions agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from vlm_jax import losses

B, D, T, BIAS = 32, 16, 7.5, -4.0


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, B, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    valid = rng.random(B) < 0.6
    valid[0] = True
    return x[0], x[1], valid


def _grads(fn, x, y):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(jnp.asarray(x), jnp.asarray(y), T, BIAS)


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_masked_loss_equals_the_loss_without_the_invalid_rows(name):
    x, y, valid = _data()
    if name == "sigmoid":
        masked = lambda a, c, t, b: losses.sigmoid_loss(a, c, t, b, valid=valid)  # noqa: E731
        plain = lambda a, c, t, b: losses.sigmoid_loss(a, c, t, b)  # noqa: E731
    else:
        masked = lambda a, c, t, b: losses.softmax_loss(a, c, t, valid=valid)  # noqa: E731
        plain = lambda a, c, t, b: losses.softmax_loss(a, c, t)  # noqa: E731
    (v1, g1), (v2, g2) = _grads(masked, x, y), _grads(plain, x[valid], y[valid])
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g1[0])[valid], g2[0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(g1[1])[valid], g2[1], atol=1e-6)
    assert np.all(np.asarray(g1[0])[~valid] == 0) and np.all(np.asarray(g1[1])[~valid] == 0)
    np.testing.assert_allclose(g1[2], g2[2], rtol=1e-5)
    # An all-valid mask changes nothing.
    ones = np.ones(B, bool)
    full = (losses.sigmoid_loss(x, y, T, BIAS, valid=ones) if name == "sigmoid"
            else losses.softmax_loss(x, y, T, valid=ones))
    np.testing.assert_allclose(full, plain(x, y, T, BIAS), rtol=1e-6)


@pytest.mark.parametrize("impl", ["chunked", "gather"])
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_sharded_masked_sigmoid_equals_dense(impl, axis_type):
    x, y, valid = _data(1)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    fn = losses.get_loss_fn("sigmoid", impl, mesh=mesh, batch_axes=("data",))
    sharded = jax.jit(jax.value_and_grad(lambda a, c, t, b: fn(a, c, t, b, valid=valid),
                                         argnums=(0, 1, 2, 3)))
    with jax.set_mesh(mesh):
        v1, g1 = sharded(jnp.asarray(x), jnp.asarray(y), T, BIAS)
    v2, g2 = _grads(lambda a, c, t, b: losses.sigmoid_loss(a, c, t, b, valid=valid), x, y)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_valid_with_the_wrong_shape_is_a_clear_error():
    x, y, _ = _data()
    with pytest.raises(ValueError, match="valid must be"):
        losses.sigmoid_loss(x, y, T, BIAS, valid=np.ones(B + 1, bool))
