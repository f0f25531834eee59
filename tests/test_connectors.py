"""Connectors, multi-layer / multi-scale features, the vision front-end and prompt splicing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import splice as sp
from vlm_jax.models import connectors
from vlm_jax.models.frontend import VisionFrontEnd
from vlm_jax.models.vit import ViT

B, N, D = 2, 12, 20


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.RandomState(0).randn(B, N, D), jnp.float32)


def _random_params(module, *args, seed=0):
    """Random variables of ``module``'s structure, without compiling its init."""
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.3 * rng.randn(*a.shape), a.dtype), shapes)


def _init_apply(module, *args):
    variables = _random_params(module, *args)
    return variables, jax.jit(module.apply)(variables, *args)


def test_projector_linear_and_mlp(tokens):
    v, y = _init_apply(connectors.Projector(36, depth=1), tokens)
    p = v["params"]
    assert y.shape == (B, N, 36) and set(p) == {"Dense_0"}
    np.testing.assert_allclose(y, tokens @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"],
                               rtol=1e-5, atol=1e-6)
    boxed = jax.eval_shape(connectors.Projector(36, depth=1).init, jax.random.key(0), tokens)
    assert boxed["params"]["Dense_0"]["kernel"].names == ("embed", "proj")
    v, y = _init_apply(connectors.Projector(36, hidden_dim=28, act="gelu"), tokens)
    p = v["params"]
    assert p["Dense_0"]["kernel"].shape == (D, 28) and p["Dense_1"]["kernel"].shape == (28, 36)
    h = jax.nn.gelu(tokens @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], approximate=False)
    np.testing.assert_allclose(y, h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"],
                               rtol=1e-5, atol=1e-6)
    boxed = jax.eval_shape(connectors.Projector(36).init, jax.random.key(0), tokens)
    assert boxed["params"]["Dense_1"]["kernel"].names == ("mlp", "embed")
    v = _random_params(connectors.Projector(36, use_bias=False), tokens)
    assert "bias" not in v["params"]["Dense_0"]


def test_attention_pool_shapes_and_mask(tokens):
    pool = connectors.AttentionPool(num_probes=3, num_heads=4, out_dim=14)
    mask = jnp.asarray(np.arange(N)[None] < np.array([[N], [7]]))
    v = _random_params(pool, tokens, mask)
    run = jax.jit(pool.apply)  # the same shapes throughout: one compile
    y = run(v, tokens, mask)
    assert y.shape == (B, 3, 14)
    # Padded tokens do not matter; unpadded ones do.
    noisy = tokens.at[1, 7:].set(100.0)
    np.testing.assert_allclose(run(v, noisy, mask), y, rtol=1e-5, atol=1e-5)
    full = jnp.ones_like(mask)
    assert np.abs(np.asarray(run(v, noisy, full) - run(v, tokens, full))).max() > 1e-3
    # Probes differ from one another.
    assert np.abs(np.asarray(y[:, 0] - y[:, 1])).max() > 1e-4
    with pytest.raises(ValueError, match="mask"):
        pool.apply(v, tokens, mask[:, :5])


@pytest.mark.parametrize("kind,m,extra", [
    ("none", N, {}), ("linear", N, {}), ("mlp", N, {}), ("attention_pool", 5, {}),
    ("perceiver", 5, {}), ("qformer", 5, {}), ("pixel_shuffle", N // 4, {}),
])
def test_build_every_connector(kind, m, extra):
    cfg = connectors.default_config()
    cfg.type, cfg.num_tokens, cfg.num_heads, cfg.depth = kind, 5, 4, 1
    x = jnp.ones((B, 16 if kind == "pixel_shuffle" else N, D))
    m = 4 if kind == "pixel_shuffle" else m
    module = connectors.build(cfg, out_dim=18)
    y, _ = jax.eval_shape(lambda: module.init_with_output(jax.random.key(1), x, mask=None,
                                                          train=False))
    assert y.shape == (B, m, D if kind == "none" else 18)
    assert connectors.num_output_tokens(cfg, x.shape[1]) == m


def test_build_errors():
    cfg = connectors.default_config()
    cfg.type = "resampler9000"
    with pytest.raises(ValueError, match="resampler9000"):
        connectors.build(cfg, out_dim=8)
    cfg.type = "mlp"
    with pytest.raises(ValueError, match="out_dim"):
        connectors.build(cfg)
    cfg.out_dim = 8  # the config's out_dim wins over build's
    assert connectors.build(cfg, out_dim=99).out_dim == 8
    with pytest.raises(ValueError, match="strategy"):
        connectors.select_features({"encoder/block00": jnp.ones((1, 2, 3))}, -1, "cls")


@pytest.fixture(scope="module")
def clip_vit():
    tower = ViT(width=20, depth=3, mlp_dim=28, num_heads=4, patch_size=4, image_size=12,
                pool_type="tok", pre_norm=True, act="quick_gelu")
    img = jnp.asarray(np.random.RandomState(2).rand(2, 12, 12, 3), jnp.float32)
    variables = _random_params(tower, img)
    big = jax.image.resize(img, (2, 24, 24, 3), "bilinear")

    @jax.jit
    def run(v):  # one compile: the tower at 12 (with intermediates) and at 24 pixels
        return tower.apply(v, img, capture_intermediates=True), tower.apply(v, big)[1]
    ((_, out), inter), out24 = run(variables)
    out["pre_norm"] = inter["intermediates"]["pre_norm"]["__call__"][0]
    return tower, variables, img, out, out24


def test_select_features_indexing(clip_vit):
    tower, variables, img, out, _ = clip_vit
    out = {k: v for k, v in out.items() if k != "pre_norm"}
    assert connectors.select_features(out, -1) is out["encoder/block02"]
    assert connectors.select_features(out, 2) is out["encoder/block01"]
    assert connectors.select_features(out, -3) is out["encoder/block00"]
    f = connectors.select_features(out, [-2, "final"], "default")
    np.testing.assert_array_equal(f, jnp.concatenate([out["encoder/block01"][:, 1:],
                                                      out["tokens"][:, 1:]], -1))
    with pytest.raises(ValueError, match="out of range"):
        connectors.select_features(out, 4)
    with pytest.raises(ValueError, match="encoder input"):
        connectors.select_features(out, 0)


def test_front_end_encoder_input_and_connector(clip_vit):
    tower, variables, img, out, _ = clip_vit
    front = VisionFrontEnd(tower, connectors.Projector(8), feature_layers=[0, -1], drop_cls=False)
    fv = _random_params(front, img)
    fv = {"params": {**fv["params"], "tower": variables["params"]}}
    y, feats = jax.jit(front.apply, static_argnames="return_features")(fv, img,
                                                                        return_features=True)
    assert y.shape == (2, 10, 8) and feats.shape == (2, 10, 40)
    # hidden state 0 = pre_norm(concat(cls, patches + posemb)) = the first block's input.
    np.testing.assert_allclose(feats[..., :20], out["pre_norm"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(feats[..., 20:], out["encoder/block02"], rtol=1e-6, atol=1e-6)
    # drop_cls None: dropped for a CLS tower.
    assert jax.eval_shape(VisionFrontEnd(tower, None).apply, fv, img).shape == (2, 9, 20)


def test_multiscale(clip_vit):
    tower, variables, img, o12, o24 = clip_vit
    ms = connectors.MultiScale(tower, scales=(12, 24))
    _, out = jax.jit(ms.apply)({"params": {"tower": variables["params"]}}, img)
    assert out["tokens"].shape == (2, 10, 40)
    # Scale 12 is the tower at the input size; scale 24's 6x6 grid is pooled 2x2 to 3x3.
    np.testing.assert_allclose(out["tokens"][..., :20], o12["tokens"], rtol=1e-5, atol=1e-5)
    grid = o24["encoder/block00"][:, 1:].reshape(2, 3, 2, 3, 2, 20).mean((2, 4)).reshape(2, 9, 20)
    np.testing.assert_allclose(out["encoder/block00"][:, 1:, 20:], grid, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["encoder/block00"][:, :1, 20:], o24["encoder/block00"][:, :1],
                               rtol=1e-5, atol=1e-5)
    front = VisionFrontEnd(ms, connectors.Projector(8), feature_layers=-2)  # drops the CLS
    assert jax.eval_shape(front.init_with_output, jax.random.key(0), img)[0].shape == (2, 9, 8)
    with pytest.raises(ValueError, match="multiple"):
        jax.eval_shape(connectors.MultiScale(tower, scales=(12, 20)).apply,
                       {"params": {"tower": variables["params"]}}, img)


# ---------------------------------------------------------------- splicing

def _emb(ids, table):
    return table[np.clip(ids, 0, len(table) - 1)]


def test_splice_replace_order_and_count_error():
    rng = np.random.RandomState(3)
    table = rng.randn(10, 6).astype(np.float32)
    ids = np.array([[1, 9, 9, 2, 9, 9], [9, 9, 3, 4, 5, 0]])
    imgs = rng.randn(3, 2, 6).astype(np.float32)
    mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]])
    out = sp.splice(ids, table, imgs, 9, mask)
    want = _emb(ids, table)
    want[0, 1:3], want[0, 4:6], want[1, 0:2] = imgs[0], imgs[1], imgs[2]
    np.testing.assert_array_equal(out["inputs_embeds"], want)
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 3, 3]])
    # Also under jit, with [B, L, D] text embeddings.
    jitted = jax.jit(lambda i, e, x: sp.splice(i, e, x, 9)["inputs_embeds"])
    np.testing.assert_array_equal(jitted(ids, want * 0 + _emb(ids, table), imgs), want)
    with pytest.raises(ValueError, match=r"6 image placeholder tokens .* 2 images x 2 tokens = 4"):
        sp.splice(ids, table, imgs[:2], 9)


def test_splice_expand_with_begin_end():
    rng = np.random.RandomState(4)
    table = rng.randn(10, 5).astype(np.float32)
    ids = np.array([[1, 9, 2, 0], [3, 4, 9, 9]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    imgs = rng.randn(3, 3, 5).astype(np.float32)
    beg, end = np.full(5, 7.0, np.float32), np.full(5, -7.0, np.float32)
    out = sp.splice(ids, table, imgs, 9, mask, mode="expand", begin=beg, end=end)
    e = np.asarray(out["inputs_embeds"])
    assert e.shape == (2, 4 + 2 * 4, 5)
    t = lambda i: table[i]  # noqa: E731
    row0 = [t(1), beg, *imgs[0], end, t(2), t(0)]
    row1 = [t(3), t(4), beg, *imgs[1], end, beg, *imgs[2], end]
    np.testing.assert_array_equal(e[0, :8], np.stack(row0))
    np.testing.assert_array_equal(e[0, 8:], 0)
    np.testing.assert_array_equal(e[1], np.stack(row1))
    np.testing.assert_array_equal(out["attention_mask"], [[1] * 7 + [0] * 5, [1] * 12])
    np.testing.assert_array_equal(out["positions"][0], [0, 1, 2, 3, 4, 5, 6] + [6] * 5)
    np.testing.assert_array_equal(out["positions"][1], np.arange(12))
    assert np.asarray(out["image_mask"]).sum() == 9
    with pytest.raises(ValueError, match="3 image placeholder tokens .* 2 images"):
        sp.splice(ids, table, imgs[:2], 9, mode="expand")
    with pytest.raises(ValueError, match="shorter"):
        sp.splice(ids, table, imgs, 9, mode="expand", length=5)


def test_image_splicer_params():
    rng = np.random.RandomState(5)
    table = jnp.asarray(rng.randn(10, 4), jnp.float32)
    ids = np.array([[1, 9, 2]])
    imgs = jnp.asarray(rng.randn(1, 2, 4), jnp.float32)
    m = sp.ImageSplicer(image_token_id=9, begin_end=True, image_modality=True, text_modality=True)
    v = nn.meta.unbox(jax.jit(lambda: m.init(jax.random.key(0), ids, table, imgs))())
    run = jax.jit(lambda v: m.apply(v, ids, table, imgs)["inputs_embeds"])
    assert set(v["params"]) == {"image_begin", "image_end", "image_modality", "text_modality"}
    plain = sp.splice(ids, table, imgs, 9, mode="expand", begin=jnp.zeros(4), end=jnp.zeros(4))
    np.testing.assert_array_equal(run(v), plain["inputs_embeds"])  # zero-init: plain splicing
    v = jax.tree.map(lambda x: x + 1.0, v)
    v["params"]["text_modality"] = v["params"]["text_modality"] * 10
    e = run(v)
    np.testing.assert_allclose(e[0, 0], table[1] + 10, rtol=1e-6)   # text + text modality
    np.testing.assert_allclose(e[0, 1], jnp.ones(4), rtol=1e-6)     # begin marker
    np.testing.assert_allclose(e[0, 2], imgs[0, 0] + 1, rtol=1e-6)  # image + image modality
    np.testing.assert_allclose(e[0, 4], jnp.ones(4), rtol=1e-6)     # end marker
    np.testing.assert_allclose(e[0, 5], table[2] + 10, rtol=1e-6)
    with pytest.raises(ValueError, match="expand"):
        sp.ImageSplicer(image_token_id=9, mode="replace", begin_end=True).init(
            jax.random.key(0), ids, table, imgs)
