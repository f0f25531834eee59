"""big_vision .npz import: key layout (prefix, Encoder_0, scanned blocks), config inference,
position-embedding resampling for other resolutions, and mismatch errors.

The npz files are written here from our own random params in big_vision's flat
"/"-joined layout (text encoder under "txt/Encoder_0", as big_vision's
text_transformer names it), not with the code under test.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import vlm_jax.models as M
from vlm_jax.interop import CheckpointMismatchError, big_vision, flatten
from vlm_jax.models import layers

B = 2


def tiny_config():
    cfg = M.default_config()
    cfg.image.update(variant=None, width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=8,
                     image_size=32)
    cfg.text.update(variant=None, width=24, depth=2, mlp_dim=48, num_heads=2, vocab_size=50,
                    max_len=8)
    cfg.out_dim = 32
    return cfg


@pytest.fixture(scope="module")
def siglip():
    cfg = tiny_config()
    model = M.build(cfg)
    abstract = M.abstract_variables(model, ml_collections.ConfigDict({"model": cfg}))
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda a: rs.normal(0, 0.2, a.shape).astype(np.float32), abstract)["params"]
    return model, params


def big_vision_keys(params, prefix="params/"):
    flat = {}
    for k, v in flatten(params).items():
        flat[prefix + k.replace("txt/Transformer/", "txt/Encoder_0/")] = np.asarray(v)
    return flat


def scanned(flat):
    """Stack encoderblock_{i} into one "encoderblock" array per param (big_vision scan=True)."""
    out, stacks = {}, {}
    for k, v in flat.items():
        head, sep, tail = k.partition("/encoderblock_")
        if not sep:
            out[k] = v
            continue
        i, _, rest = tail.partition("/")
        stacks.setdefault(f"{head}/encoderblock/{rest}", {})[int(i)] = v
    for k, d in stacks.items():
        out[k] = np.stack([d[i] for i in sorted(d)])
    return out


def images(size, seed=0):
    return jnp.asarray(np.random.RandomState(seed).rand(B, size, size, 3).astype(np.float32) * 2 - 1)


def assert_same_params(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_npz_in_big_vision_layout_loads_to_the_same_model_and_params(siglip, tmp_path):
    model, params = siglip
    path = tmp_path / "siglip.npz"
    np.savez(path, **big_vision_keys(params), **{"opt/state/mu": np.zeros(3)})
    loaded, variables = big_vision.load_npz(str(path))
    assert loaded == model  # every size, pooling and head inferred from the shapes
    assert_same_params(variables["params"], params)


def test_scanned_layers_without_prefix_load_the_same(siglip, tmp_path):
    model, params = siglip
    flat = scanned(big_vision_keys(params, prefix=""))
    assert "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel" in flat
    path = tmp_path / "scanned.npz"
    np.savez(path, **flat)
    loaded, variables = big_vision.load_npz(str(path))
    assert loaded == model
    assert_same_params(variables["params"], params)


def corner_aligned_linear(grid, new_hw):
    """The formula of scipy.ndimage.zoom(order=1), written out: output cell i of n samples
    input coordinate i * (m - 1) / (n - 1) of m, linearly between its two neighbours."""
    def axis_weights(m, n):
        w = np.zeros((n, m))
        for i in range(n):
            x = i * (m - 1) / (n - 1) if n > 1 else 0.0
            lo = min(int(np.floor(x)), m - 1)
            hi = min(lo + 1, m - 1)
            w[i, lo] += 1 - (x - lo)
            w[i, hi] += x - lo
        return w
    wh = axis_weights(grid.shape[0], new_hw[0])
    ww = axis_weights(grid.shape[1], new_hw[1])
    return np.einsum("ih,jw,hwd->ijd", wh, ww, np.asarray(grid, np.float64))


def test_other_resolution_resamples_posemb_as_big_vision_does(siglip, tmp_path):
    """big_vision's loader zooms the posemb grid with scipy (order 1, corners aligned)."""
    model, params = siglip
    path = tmp_path / "siglip.npz"
    np.savez(path, **big_vision_keys(params))
    stored = np.asarray(params["img"]["pos_embedding"]).reshape(4, 4, 32)
    for size, grid in ((48, (6, 6)), (56, (7, 7)), (24, (3, 3))):
        hi, variables = big_vision.load_npz(str(path), {"image": {"image_size": size}})
        pe = np.asarray(variables["params"]["img"]["pos_embedding"])
        assert pe.shape == (1, grid[0] * grid[1], 32) and hi.image.image_size == size
        golden = corner_aligned_linear(stored, grid).reshape(1, -1, 32)
        np.testing.assert_allclose(pe, golden, rtol=1e-5, atol=1e-6)
        # Corner cells are kept exactly (half-pixel resizing would move them).
        g = pe.reshape(*grid, 32)
        np.testing.assert_allclose(g[0, 0], stored[0, 0], rtol=1e-6)
        np.testing.assert_allclose(g[-1, -1], stored[-1, -1], rtol=1e-6)
    # The run-time resize (half-pixel centres) is a different convention.
    runtime = layers.resize_posemb(params["img"]["pos_embedding"], (4, 4), (6, 6))
    _, variables = big_vision.load_npz(str(path), {"image": {"image_size": 48}})
    assert not np.allclose(variables["params"]["img"]["pos_embedding"], runtime, atol=1e-3)
    x = images(48)
    hi, variables = big_vision.load_npz(str(path), {"image": {"image_size": 48}})
    out = jax.jit(hi.apply, static_argnames="method")(variables, x, method="encode_image")
    assert np.all(np.isfinite(out)) and out.shape == (B, 32)


def test_non_square_resample_follows_each_axis(siglip, tmp_path):
    _, params = siglip
    path = tmp_path / "siglip.npz"
    np.savez(path, **big_vision_keys(params))
    _, variables = big_vision.load_npz(str(path), {"image": {"image_size": (40, 24)}})
    stored = np.asarray(params["img"]["pos_embedding"]).reshape(4, 4, 32)
    np.testing.assert_allclose(variables["params"]["img"]["pos_embedding"],
                               corner_aligned_linear(stored, (5, 3)).reshape(1, 15, 32),
                               rtol=1e-5, atol=1e-6)


def sincos_params(patch):
    cfg = tiny_config()
    cfg.image.update(posemb="sincos2d", patch_size=patch, image_size=patch * 4)
    model = M.build(cfg)
    abstract = M.abstract_variables(model, ml_collections.ConfigDict({"model": cfg}))
    rs = np.random.RandomState(1)
    return model, jax.tree.map(lambda a: rs.normal(0, 0.2, a.shape).astype(np.float32),
                               abstract)["params"]


def test_sincos_checkpoint_with_patch_not_dividing_224_loads_without_override(tmp_path):
    model, params = sincos_params(6)
    path = tmp_path / "sincos.npz"
    np.savez(path, **big_vision_keys(params))
    loaded, variables = big_vision.load_npz(str(path))
    assert loaded.image.posemb == "sincos2d" and loaded.image.patch_size == 6
    assert loaded.image.image_size % 6 == 0 and abs(loaded.image.image_size - 224) <= 3
    x = images(24)  # any multiple of the patch works: sincos2d follows the input grid
    ours = jax.jit(loaded.apply, static_argnames="method")(variables, x, method="encode_image")
    ref = jax.jit(model.apply, static_argnames="method")({"params": params}, x,
                                                         method="encode_image")
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_image_size_that_the_patch_does_not_divide_names_the_override(tmp_path):
    _, params = sincos_params(6)
    path = tmp_path / "sincos.npz"
    np.savez(path, **big_vision_keys(params))
    with pytest.raises(ValueError, match="image_size"):
        big_vision.load_npz(str(path), {"image": {"image_size": 224}})


def test_shorter_text_max_len_truncates_text_posemb(siglip, tmp_path):
    _, params = siglip
    path = tmp_path / "siglip.npz"
    np.savez(path, **big_vision_keys(params))
    model, variables = big_vision.load_npz(str(path), {"text": {"max_len": 5}})
    assert model.text.max_len == 5
    np.testing.assert_array_equal(variables["params"]["txt"]["pos_embedding"],
                                  params["txt"]["pos_embedding"][:, :5])


def test_bad_npz_error_lists_missing_unexpected_and_shape_mismatches(siglip, tmp_path):
    _, params = siglip
    flat = big_vision_keys(params)
    del flat["params/txt/Encoder_0/encoderblock_1/LayerNorm_0/scale"]
    flat["params/img/extra/kernel"] = np.zeros(3, np.float32)
    flat["params/b"] = np.zeros((2,), np.float32)
    path = tmp_path / "bad.npz"
    np.savez(path, **flat)
    with pytest.raises(CheckpointMismatchError) as e:
        big_vision.load_npz(str(path))
    assert e.value.missing == ["txt/Transformer/encoderblock_1/LayerNorm_0/scale"]
    assert e.value.unexpected == ["img/extra/kernel"]
    assert e.value.mismatched == [("b", (2,), (1,))]
    assert "txt/Transformer/encoderblock_1/LayerNorm_0/scale" in str(e.value)


def test_config_that_contradicts_the_weights_is_reported(siglip, tmp_path):
    _, params = siglip
    path = tmp_path / "siglip.npz"
    np.savez(path, **big_vision_keys(params))
    with pytest.raises(CheckpointMismatchError) as e:
        big_vision.load_npz(str(path), {"image": {"mlp_dim": 80}})
    assert ("img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel", (32, 64), (32, 80)) \
        in e.value.mismatched
    flat = big_vision_keys(params)
    del flat["params/txt/Embed_0/embedding"]
    np.savez(path, **flat)
    with pytest.raises(CheckpointMismatchError, match="txt/Embed_0/embedding"):
        big_vision.load_npz(str(path))
