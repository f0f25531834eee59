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


def test_other_resolution_resamples_posemb_and_matches_runtime_resize(siglip, tmp_path):
    model, params = siglip
    path = tmp_path / "siglip.npz"
    np.savez(path, **big_vision_keys(params))
    hi, variables = big_vision.load_npz(str(path), {"image": {"image_size": 48}})
    pe = variables["params"]["img"]["pos_embedding"]
    assert pe.shape == (1, 36, 32) and hi.image.image_size == 48
    # Bilinear over the 2-D grid: corners of a 4x4 -> 6x6 upsampling stay close to the
    # originals, and the result is what the 32px model itself does at 48px.
    np.testing.assert_allclose(pe, layers.resize_posemb(params["img"]["pos_embedding"], (4, 4), (6, 6)),
                               rtol=1e-6, atol=1e-6)
    grid = np.asarray(pe).reshape(6, 6, 32)
    assert not np.allclose(grid[0, 0], grid[0, 1])
    x = images(48)
    ours = jax.jit(hi.apply, static_argnames="method")(variables, x, method="encode_image")
    ref = jax.jit(model.apply, static_argnames="method")({"params": params}, x, method="encode_image")
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


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
