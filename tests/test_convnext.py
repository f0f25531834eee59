"""ConvNeXt: parity with torchvision, stochastic depth, layer scale, features, axis names.

The parity reference is torchvision's convnext_tiny with random weights, random
LayerNorm affine parameters and random layer_scale values (torch CPU, fixed seed).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tv = pytest.importorskip("torchvision")

from vlm_jax.interop import torchvision as tvi  # noqa: E402
from vlm_jax.models import convnext  # noqa: E402

torch.set_num_threads(1)
RTOL = 1e-5  # max |ours - torch| / max |torch|


def rel_err(got, ref):
    return float(np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref)))


def random_variables(model, x, seed=0):
    """Variables filled with numpy noise (shapes from eval_shape: no init compile).

    Norm scales ~ 1 + N(0, 0.1), layer_scale ~ U(0.5, 1) (large enough that every
    block matters), everything else ~ N(0, 0.1).
    """
    rs = np.random.RandomState(seed)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x))

    def fill(path, a):
        name = jax.tree_util.keystr(path)
        if name.endswith("['layer_scale']"):
            return rs.uniform(0.5, 1.0, a.shape).astype(np.float32)
        base = 1.0 if name.endswith("['scale']") else 0.0
        return (base + 0.1 * rs.randn(*a.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_logits_match_torchvision_square_and_non_square():
    tm = tv.models.convnext_tiny()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
            elif p.ndim == 1:  # LayerNorm affine and biases
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + float(name.endswith("weight")))
    tm.eval()
    model, variables = tvi.load("convnext_tiny", tm.state_dict())
    assert set(variables) == {"params"}  # no BatchNorm, no batch_stats
    apply = jax.jit(model.apply)
    rs = np.random.RandomState(0)
    for shape in ((2, 3, 64, 64), (1, 3, 61, 96)):
        x = rs.randn(*shape).astype(np.float32)
        with torch.no_grad():
            ref = tm(torch.from_numpy(x)).numpy()
        got = apply(variables, x.transpose(0, 2, 3, 1))
        assert got.shape == ref.shape == (shape[0], 1000)
        assert rel_err(got, ref) < RTOL, (shape, rel_err(got, ref))


def test_drop_path_schedule_matches_torchvision():
    with torch.device("meta"):
        tm = tv.models.convnext_tiny(stochastic_depth_prob=0.3)
    ref = [m.stochastic_depth.p for m in tm.modules() if type(m).__name__ == "CNBlock"]
    ours = convnext.ConvNeXt(drop_path=0.3).drop_path_rates()
    assert [len(r) for r in ours] == [3, 3, 9, 3]
    np.testing.assert_allclose(sum(ours, []), ref, rtol=1e-12)
    assert ours[0][0] == 0.0 and ours[-1][-1] == pytest.approx(0.3)


def _eval_nodp_train(module, x):
    """One compiled function: (eval output, output with drop_path 0, training output for ``key``)."""
    no_dp = module.clone(drop_path=0.0)

    def f(variables, key):
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        return (first(module.apply(variables, x)), first(no_dp.apply(variables, x)),
                first(module.apply(variables, x, train=True, rngs={"dropout": key})))
    return jax.jit(f)


def test_stochastic_depth_drops_whole_branches_in_training_only():
    block = convnext.ConvNeXtBlock(drop_path=0.5)
    x = jax.random.normal(jax.random.key(0), (64, 4, 4, 8))
    variables = random_variables(block, x)
    run = _eval_nodp_train(block, x)
    eval_out, no_dp, train1 = run(variables, jax.random.key(1))
    np.testing.assert_allclose(eval_out, no_dp, atol=1e-6)  # identity at eval
    kept_branch = (eval_out - x) / 0.5  # what a kept example adds in training
    dropped = np.all(np.isclose(train1, x, atol=1e-6), axis=(1, 2, 3))
    kept = np.all(np.isclose(train1, x + kept_branch, atol=1e-5), axis=(1, 2, 3))
    assert np.all(dropped ^ kept)  # each example: the whole branch, or none of it
    assert 0.2 < dropped.mean() < 0.8
    np.testing.assert_array_equal(run(variables, jax.random.key(1))[2], train1)  # same rng
    assert not np.array_equal(run(variables, jax.random.key(2))[2], train1)
    with pytest.raises(Exception, match="dropout"):  # training needs the "dropout" rng
        jax.eval_shape(lambda: block.apply(variables, x, train=True))


def test_model_is_deterministic_at_eval_and_random_in_training():
    m = convnext.ConvNeXt(stage_depths=(1, 2), widths=(8, 16), drop_path=0.5)
    x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
    variables = random_variables(m, x)
    run = _eval_nodp_train(m, x)
    e1, no_dp, t1 = run(variables, jax.random.key(1))
    e2, _, t2 = run(variables, jax.random.key(2))
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_allclose(e1, no_dp, atol=1e-6)  # eval ignores the rate entirely
    assert not np.allclose(t1, e1) and not np.allclose(t1, t2)


def test_features_shapes_non_square_and_pool_none():
    m = convnext.ConvNeXt(**convnext.decode_variant("tiny"))
    x = jnp.zeros((2, 64, 96, 3))
    variables = jax.eval_shape(m.init, jax.random.key(0), x)
    y, out = jax.eval_shape(lambda v: m.apply(v, x), variables)
    assert out["stem"].shape == (2, 16, 24, 96)
    assert [out[f"stage{s}"].shape for s in (1, 2, 3, 4)] == [
        (2, 16, 24, 96), (2, 8, 12, 192), (2, 4, 6, 384), (2, 2, 3, 768)]
    assert y.shape == out["pre_logits"].shape == (2, 768)
    y, _ = jax.eval_shape(lambda v: m.clone(pool_type="none").apply(v, x), variables)
    assert y.shape == (2, 2, 3, 768)
    with pytest.raises(ValueError, match="pool_type"):
        jax.eval_shape(m.clone(pool_type="tok").init, jax.random.key(0), x)


def test_layer_scale_starts_at_its_init_value_per_channel():
    m = convnext.ConvNeXt(stage_depths=(1, 1), widths=(8, 16), layer_scale_init=1e-6)
    x = jnp.zeros((1, 32, 32, 3))
    params = nn.meta.unbox(jax.jit(m.init)(jax.random.key(0, impl="unsafe_rbg"), x))["params"]
    for s, c in ((1, 8), (2, 16)):
        np.testing.assert_array_equal(params[f"stage{s}"]["block1"]["layer_scale"],
                                      np.full((c,), 1e-6, np.float32))
    dw = params["stage2"]["block1"]["conv_dw"]["kernel"]
    assert dw.shape == (7, 7, 1, 16)  # depthwise


def test_every_param_has_logical_axis_names():
    m = convnext.ConvNeXt(stage_depths=(1, 1), widths=(8, 16), dtype=jnp.bfloat16)
    params = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    specs = jax.tree.leaves(nn.get_partition_spec(params),
                            is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params))
    assert len(specs) == len(leaves) > 0
    for (path, leaf), spec in zip(leaves, specs):
        assert len(spec) == leaf.ndim, (jax.tree_util.keystr(path), spec)
        assert leaf.dtype == jnp.float32


def test_from_config_and_variants():
    m = convnext.from_config({"variant": "small", "drop_path": 0.2, "pool_type": "none",
                              "width": 768, "layer_scale_init": 0.1}, dtype=jnp.bfloat16)
    assert m.stage_depths == (3, 3, 27, 3) and m.widths == (96, 192, 384, 768)
    assert (m.drop_path, m.pool_type, m.layer_scale_init, m.dtype) == (0.2, "none", 0.1, jnp.bfloat16)
    assert convnext.from_config({}).widths == (96, 192, 384, 768)
    assert convnext.decode_variant("large")["widths"][-1] == 1536
    with pytest.raises(ValueError, match="huge"):
        convnext.decode_variant("huge")
