"""CLIP ModifiedResNet tower: shapes, axis names, config, BatchNorm modes, posemb resizing.

Everything here is tiny and needs no torch; parity with open_clip's ModifiedResNet is
in test_interop_open_clip.py.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models import clip_resnet, layers
from vlm_jax.models.clip_resnet import ClipModifiedResNet

# Stage 2 has a second block, so both shortcut kinds (projection, identity) occur.
TINY = dict(layers=(1, 2, 1, 1), width=8, out_dim=24, image_size=64)


def random_variables(model, h, w, seed=0):
    """Variables of ``model`` filled from numpy (no jitted RNG, which compiles slowly on CPU).

    Kernels ~ N(0, 1/fan_in); vectors (biases, BatchNorm scales and stats) in [0.5, 1.5)
    so that running variances are positive and every bn3 is active (flax starts it at 0).
    """
    boxed = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                           jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))
    leaves, tree = jax.tree.flatten(nn.meta.unbox(boxed))
    rs = np.random.RandomState(seed)
    new = [rs.uniform(0.5, 1.5, l.shape) if len(l.shape) == 1 else
           rs.randn(*l.shape) / np.sqrt(np.prod(l.shape[:-1])) for l in leaves]
    return jax.tree.unflatten(tree, [jnp.asarray(x, jnp.float32) for x in new])


def images(h, w, b=2, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(b, h, w, 3).astype(np.float32))


def test_stage_shapes_follow_torch_floor_rules_for_odd_non_square_inputs():
    model = ClipModifiedResNet(**TINY)
    h, w = 77, 101
    variables = random_variables(model, h, w)
    y, out = jax.jit(model.apply)(variables, images(h, w))

    def down(n, k):  # torch: conv 3x3 stride 2 pad 1, then AvgPool2d(k) with floor
        return ((n + 2 - 3) // 2 + 1) // k

    sh, sw = down(h, 2), down(w, 2)
    width = TINY["width"]
    assert out["stem"].shape == (2, sh, sw, width)
    assert out["stage1"].shape == (2, sh, sw, 4 * width)
    for s in (2, 3, 4):
        sh, sw = sh // 2, sw // 2
        assert out[f"stage{s}"].shape == (2, sh, sw, 4 * width * 2 ** (s - 1))
    assert out["pre_logits"].shape == (2, 32 * width)
    assert y.shape == (2, TINY["out_dim"])
    assert np.all(np.isfinite(np.asarray(y)))


def test_every_param_has_logical_axis_names_convs_name_in_and_out_channels():
    model = ClipModifiedResNet(**TINY)
    boxed = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                           jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    specs = nn.get_partition_spec(boxed)["params"]
    flat = {"/".join(k): v for k, v in _items(specs)}
    assert flat, "no params"
    for path, spec in flat.items():
        assert isinstance(spec, jax.sharding.PartitionSpec), path
        assert len(spec) > 0, f"{path} has no logical axis names"
        if path.endswith("kernel") and "conv" in path:
            assert tuple(spec) == (None, None, "conv_in", "conv_out"), path
    pool = "attnpool"
    assert tuple(flat[f"{pool}/query/kernel"]) == ("embed", "heads", "kv")
    assert tuple(flat[f"{pool}/out/kernel"]) == ("heads", "kv", "proj")
    assert tuple(flat[f"{pool}/pos_embedding"]) == (None, None, "embed")
    assert "stage2_block1/downsample_conv/kernel" not in flat  # identity shortcut
    assert "stage2_block0/downsample_conv/kernel" in flat


def _items(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _items(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_from_config_reads_variants_and_explicit_fields_override_them():
    m = clip_resnet.from_config({"variant": "RN50x4", "image_size": None}, out_dim=None)
    blocks, width, embed, size = clip_resnet.VARIANTS["RN50x4"]
    assert (m.layers, m.width, m.out_dim, m.image_size) == (blocks, width, embed, size)
    assert m.heads == width * 32 // 64
    m = clip_resnet.from_config({"variant": "RN50", "layers": [1, 1, 1, 1], "width": 16,
                                 "image_size": 96, "num_heads": 4, "bn_momentum": 0.5,
                                 "bn_eps": 1e-3, "pool_type": "map"}, out_dim=12)
    assert (m.layers, m.width, m.out_dim, m.image_size, m.heads) == ((1, 1, 1, 1), 16, 12, 96, 4)
    assert (m.bn_momentum, m.bn_eps) == (0.5, 1e-3)
    assert m.grid_size == (3, 3)


@pytest.mark.parametrize("img, field", [
    ({"variant": "B/16"}, "model.image.variant"),
    ({"variant": None, "width": 8}, "model.image.layers"),
    ({"variant": "RN50", "layers": (1, 2, 3)}, "model.image.layers"),
    ({"variant": "RN50", "width": 7}, "model.image.width"),
    ({"variant": "RN50", "num_heads": 7}, "model.image.num_heads"),
])
def test_from_config_errors_name_the_field(img, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        clip_resnet.from_config(img, out_dim=8)


def test_train_mode_normalises_with_batch_stats_and_updates_them_with_momentum():
    model = ClipModifiedResNet(**TINY, bn_momentum=0.8)
    variables = random_variables(model, 64, 64)
    x = images(64, 64, b=3, seed=1) * 2.0 + 0.5

    train = jax.jit(functools.partial(model.apply, train=True, capture_intermediates=True,
                                      mutable=["batch_stats", "intermediates"]))
    (y_train, _), state = train(variables, x)
    conv0 = state["intermediates"]["stem_conv_0"]["__call__"][0]
    batch_mean = np.asarray(jnp.mean(conv0, axis=(0, 1, 2)))
    batch_var = np.asarray(jnp.var(conv0, axis=(0, 1, 2)))
    new = state["batch_stats"]["stem_bn_0"]
    old = variables["batch_stats"]["stem_bn_0"]
    np.testing.assert_allclose(new["mean"], 0.8 * old["mean"] + 0.2 * batch_mean,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.8 * old["var"] + 0.2 * batch_var,
                               rtol=1e-5, atol=1e-6)

    # Normalised with the batch's own statistics: per-channel mean = BN bias, std = scale.
    bn0 = np.asarray(state["intermediates"]["stem_bn_0"]["__call__"][0])
    p = variables["params"]["stem_bn_0"]
    np.testing.assert_allclose(bn0.mean(axis=(0, 1, 2)), p["bias"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn0.std(axis=(0, 1, 2)), p["scale"], rtol=1e-3)
    with pytest.raises(Exception, match="batch_stats"):  # train mode must be allowed to write
        jax.eval_shape(functools.partial(model.apply, train=True), variables, x)


def test_other_input_sizes_use_the_bilinearly_resized_grid_posemb_and_keep_the_mean_row():
    c = 64
    small = clip_resnet.AttentionPool(num_heads=4, out_dim=24, grid=(2, 2))  # stored for 2x2
    big = clip_resnet.AttentionPool(num_heads=4, out_dim=24, grid=(3, 4))
    x = jnp.asarray(np.random.RandomState(3).randn(2, 3, 4, c).astype(np.float32))  # a 3x4 map
    boxed = jax.eval_shape(small.init, jax.random.key(0),
                           jax.ShapeDtypeStruct((1, 2, 2, c), jnp.float32))
    rs = np.random.RandomState(2)
    v_small = jax.tree.map(lambda a: jnp.asarray(rs.randn(*a.shape), jnp.float32),
                           nn.meta.unbox(boxed))
    pe = v_small["params"]["pos_embedding"]
    resized = jnp.concatenate([pe[:, :1], layers.resize_posemb(pe[:, 1:], (2, 2), (3, 4))], axis=1)
    # The pool stored for 3x4 reads its posemb as is; the 2x2 one must resize its own.
    apply_big = jax.jit(big.apply)
    y_small, _ = jax.jit(small.apply)(v_small, x)
    y_big, _ = apply_big({"params": {**v_small["params"], "pos_embedding": resized}}, x)
    np.testing.assert_allclose(np.asarray(y_small), np.asarray(y_big), rtol=1e-5, atol=1e-5)
    # ... and the posemb matters: a plain repeat of one stored position gives other outputs.
    wrong = jnp.concatenate([pe[:, :1], jnp.tile(pe[:, 1:2], (1, 12, 1))], axis=1)
    y_wrong, _ = apply_big({"params": {**v_small["params"], "pos_embedding": wrong}}, x)
    assert not np.allclose(np.asarray(y_wrong), np.asarray(y_big), atol=1e-4)


def test_image_smaller_than_the_total_stride_is_refused():
    model = ClipModifiedResNet(**TINY)
    with pytest.raises(ValueError, match="total stride"):
        jax.eval_shape(model.init, jax.random.key(0),
                       jax.ShapeDtypeStruct((1, 16, 64, 3), jnp.float32))
