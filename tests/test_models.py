"""Model shapes, parameter counts (vs transformers), pooling, masks, dtypes, config errors.

Large variants are only traced (jax.eval_shape / torch meta device); anything that
computes uses tiny configs.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import vlm_jax.models as M
from vlm_jax.models import layers
from vlm_jax.models.text import TextTransformer
from vlm_jax.models.vit import ViT, decode_variant

TINY_VIT = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, image_size=32)
TINY_TXT = dict(vocab_size=100, width=32, depth=2, mlp_dim=64, num_heads=2, max_len=8)


def tiny_model_config(**over):
    cfg = M.default_config()
    cfg.image.variant = None
    cfg.text.variant = None
    for k in ("width", "depth", "mlp_dim", "num_heads"):
        cfg.image[k] = TINY_VIT[k]
        cfg.text[k] = TINY_TXT[k]
    cfg.image.depth = cfg.text.depth = 1
    cfg.image.patch_size = 8
    cfg.image.image_size = 32
    cfg.text.vocab_size = 100
    cfg.text.max_len = 8
    for k, v in over.items():
        section, _, key = k.rpartition(".")
        (cfg[section] if section else cfg)[key] = v
    return cfg


def recipe(model_cfg):
    cfg = ml_collections.ConfigDict()
    cfg.model = model_cfg
    return cfg


def abstract_params(module, *inputs):
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
    v = jax.eval_shape(module.init, jax.random.key(0), *shapes)
    return nn.meta.unbox(v)["params"]


_JITTED = {}


def jit_apply(module):
    """Compiled ``module.apply``, cached per module. One compile of a whole tiny model
    is cheaper on CPU than eagerly compiling each op for shapes seen once."""
    if id(module) not in _JITTED:
        _JITTED[id(module)] = (module, jax.jit(module.apply, static_argnames=("train", "method")))
    return _JITTED[id(module)][1]


def fake_init(module, *inputs, seed=0):
    """Variables with the shapes ``module.init`` gives, filled from numpy (no jax RNG
    compilation: initialising many tiny variants for real dominates CPU test time).
    The real initialisers are exercised through ``M.init`` in the ``tiny`` fixture."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda a: jnp.asarray(rs.normal(0, 0.2, a.shape), a.dtype),
                        nn.meta.unbox(abstract))


def torch_count(model_cls, config):
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        m = model_cls(config)
    return sum(p.numel() for p in m.parameters())


def images(b=2, s=32, seed=0):
    return jax.random.uniform(jax.random.key(seed), (b, s, s, 3), jnp.float32, -1, 1)


def tokens(b=2, length=8, seed=1, vocab=100):
    return jax.random.randint(jax.random.key(seed), (b, length), 1, vocab, jnp.int32)


# ---------------------------------------------------------------- parameter counts

def test_siglip_b16_default_param_count_equals_transformers_siglip_model():
    tr = pytest.importorskip("transformers")
    cfg = recipe(M.default_config())
    model = M.build(cfg.model)
    ours = M.count_params(M.abstract_variables(model, cfg)["params"])
    assert ours == torch_count(tr.SiglipModel, tr.SiglipConfig())
    assert ours == 203_155_970


def test_decode_variant_gives_published_vit_shapes():
    expected = {"S": (384, 12, 1536, 6), "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16),
                "So400m": (1152, 27, 4304, 16), "g-opt": (1536, 40, 6144, 16)}
    for name, (w, d, m, h) in expected.items():
        for patch in (14, 16, 32):
            got = decode_variant(f"{name}/{patch}")
            assert got == dict(width=w, depth=d, mlp_dim=m, num_heads=h, patch_size=patch)
    assert "patch_size" not in decode_variant("B")


@pytest.mark.parametrize("variant", ["S/16", "B/32", "L/14", "So400m/14", "g-opt/14"])
def test_vit_map_param_count_matches_transformers_siglip_vision(variant):
    tr = pytest.importorskip("transformers")
    v = decode_variant(variant)
    ours = M.count_params(abstract_params(ViT(**v, image_size=224, pool_type="map"),
                                          jnp.zeros((1, 224, 224, 3))))
    hf = tr.SiglipVisionConfig(hidden_size=v["width"], intermediate_size=v["mlp_dim"],
                               num_hidden_layers=v["depth"], num_attention_heads=v["num_heads"],
                               patch_size=v["patch_size"], image_size=224)
    assert ours == torch_count(tr.SiglipVisionModel, hf)


@pytest.mark.parametrize("variant", ["S", "L", "So400m"])
def test_text_param_count_matches_transformers_siglip_text(variant):
    tr = pytest.importorskip("transformers")
    v = M.decode_text_variant(variant)
    module = TextTransformer(vocab_size=32000, max_len=64, head=v["width"], **v)
    ours = M.count_params(abstract_params(module, jnp.zeros((1, 64), jnp.int32)))
    hf = tr.SiglipTextConfig(hidden_size=v["width"], intermediate_size=v["mlp_dim"],
                             num_hidden_layers=v["depth"], num_attention_heads=v["num_heads"],
                             vocab_size=32000, max_position_embeddings=64)
    assert ours == torch_count(tr.SiglipTextModel, hf)


def test_pooling_and_posemb_param_differences_follow_formulas():
    d, m, n = 32, 64, 16  # width, mlp_dim, tokens of a 32px image with patch 8
    count = lambda **kw: M.count_params(abstract_params(ViT(**{**TINY_VIT, **kw}), images(1)))
    mlp = d * m + m + m * d + d
    map_head = d + 4 * (d * d + d) + 2 * d + mlp  # probe, q/k/v/out, LayerNorm, MLP
    assert count(pool_type="map") - count(pool_type="gap") == map_head
    assert count(pool_type="tok") - count(pool_type="gap") == d  # cls token
    assert count(pool_type="gap") - count(pool_type="gap", posemb="sincos2d") == n * d
    assert count(pool_type="gap", head=10) - count(pool_type="gap") == d * 10 + 10


# ---------------------------------------------------------------- two-tower API

@pytest.fixture(scope="module")
def tiny():
    cfg = recipe(tiny_model_config())
    model, variables = M.init(cfg, jax.random.key(0))
    return cfg, model, variables


def test_init_returns_plain_arrays_and_encoders_give_b_by_d(tiny):
    _, model, variables = tiny
    leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in leaves)
    assert jit_apply(model)(variables, images(), method="encode_image").shape == (2, 32)
    assert jit_apply(model)(variables, tokens(), method="encode_text").shape == (2, 32)


def test_two_tower_outputs_are_unit_norm_with_initial_t_and_b(tiny):
    _, model, variables = tiny
    zimg, ztxt, out = jit_apply(model)(variables, images(), tokens())
    assert zimg.shape == ztxt.shape == (2, 32)
    assert zimg.dtype == ztxt.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ztxt, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["t"], 10.0, rtol=1e-6)
    np.testing.assert_allclose(variables["params"]["t"], np.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(out["b"], -10.0)
    assert "img/pre_logits" in out and "txt/encoded" in out
    feats = jit_apply(model)(variables, images(), method="encode_image")
    np.testing.assert_allclose(zimg, feats / np.linalg.norm(feats, axis=-1, keepdims=True),
                               rtol=1e-5, atol=1e-6)


def test_bias_init_none_means_no_bias_param_and_zero_bias(tiny):
    cfg = recipe(tiny_model_config(bias_init=None, temperature_init=1 / 0.07))
    model = M.build(cfg.model)
    abstract = M.abstract_variables(model, cfg)
    assert "b" not in abstract["params"]
    params = {k: v for k, v in tiny[2]["params"].items() if k != "b"}
    variables = {"params": params}
    _, _, out = jit_apply(model)(variables, images(), tokens())
    assert float(out["b"]) == 0.0


def test_every_param_carries_logical_axis_names(tiny):
    cfg, model, variables = tiny
    specs = M.logical_specs(model, cfg)
    flat_v = jax.tree_util.tree_leaves_with_path(variables)
    flat_s = dict(jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    assert len(flat_v) == len(flat_s)
    for path, x in flat_v:
        spec = flat_s[path]
        assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) == x.ndim, path
    p = specs["params"]["img"]["Transformer"]["encoderblock_0"]
    assert p["MlpBlock_0"]["Dense_0"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
    assert p["MultiHeadDotProductAttention_0"]["query"]["kernel"] == \
        jax.sharding.PartitionSpec("embed", "heads", "kv")
    assert specs["params"]["txt"]["Embed_0"]["embedding"] == \
        jax.sharding.PartitionSpec("vocab", "embed")


def test_bfloat16_compute_keeps_float32_params(tiny):
    cfg = recipe(tiny_model_config(dtype="bfloat16"))
    model = M.build(cfg.model)
    abstract = M.abstract_variables(model, cfg)
    assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
    variables = tiny[2]  # same param tree as the float32 model
    feats = jit_apply(model)(variables, images(), method="encode_image")
    assert feats.dtype == jnp.bfloat16
    zimg, ztxt, _ = jit_apply(model)(variables, images(), tokens())
    assert zimg.dtype == ztxt.dtype == jnp.float32


# ---------------------------------------------------------------- config errors

def test_unknown_variant_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="Q/16"):
        M.build(tiny_model_config(**{"image.variant": "Q/16"}))
    with pytest.raises(ValueError, match="Huge"):
        M.build({"text": {"variant": "Huge"}})


def test_unknown_config_key_errors():
    with pytest.raises(AttributeError):
        M.default_config().image.widht = 3
    with pytest.raises(ValueError, match="model.text.vocab"):
        M.build({"text": {"vocab": 10}})


def test_explicit_sizes_override_variant():
    cfg = M.default_config()
    cfg.image.variant = "L/14"
    cfg.image.depth = 3
    cfg.out_dim = 1024
    cfg.text.variant = "L"
    r = M.resolve_config(cfg)
    assert (r["image"]["width"], r["image"]["depth"], r["image"]["patch_size"]) == (1024, 3, 14)
    assert r["text"]["head"] == 1024


def test_image_width_must_match_out_dim_without_image_head():
    with pytest.raises(ValueError, match="model.image.head"):
        M.build(tiny_model_config(out_dim=16))
    M.build(tiny_model_config(out_dim=16, **{"image.head": True}))  # head projects to 16


# ---------------------------------------------------------------- ViT behaviour

def _vit(**kw):
    module = ViT(**{**TINY_VIT, **kw})
    variables = fake_init(module, images(1))
    return module, variables


def test_vit_pool_types_give_expected_shapes():
    x = images()
    for pool, shape in [("map", (2, 32)), ("gap", (2, 32)), ("tok", (2, 32)),
                        ("none", (2, 16, 32))]:
        module, variables = _vit(pool_type=pool)
        y, out = module.apply(variables, x)
        assert y.shape == shape, pool
        assert out["encoded"].shape == (2, 16, 32), pool  # CLS excluded for "tok"
        if pool == "gap":
            np.testing.assert_allclose(y, out["encoded"].mean(1), rtol=1e-5, atol=1e-6)
        if pool == "tok":
            assert "cls" in variables["params"]
            assert out["encoder/block01"].shape == (2, 17, 32)


def test_vit_head_projects_to_out_dim():
    module, variables = _vit(pool_type="gap", head=7)
    y, out = module.apply(variables, images())
    assert y.shape == (2, 7) and out["pre_logits"].shape == (2, 32)


def test_sincos_posemb_has_no_param_and_known_values():
    module, variables = _vit(posemb="sincos2d")
    assert "pos_embedding" not in variables["params"]
    pe = np.asarray(layers.posemb_sincos_2d(3, 4, 16))
    assert pe.shape == (1, 12, 16)
    # At row 0, col 0 every sin channel is 0 and every cos channel is 1.
    np.testing.assert_allclose(pe[0, 0], np.r_[np.zeros(4), np.ones(4), np.zeros(4), np.ones(4)])
    # The first frequency is 1: the x-sin channel of token (r, c) is sin(c).
    np.testing.assert_allclose(pe[0, :, 0], np.sin(np.tile(np.arange(4), 3)), rtol=1e-6)
    np.testing.assert_allclose(pe[0, :, 8], np.sin(np.repeat(np.arange(3), 4)), rtol=1e-6)
    y, _ = module.apply(variables, images(s=48))  # any grid works for sincos
    assert y.shape == (2, 32)


def test_learned_posemb_resized_for_other_input_sizes():
    module, variables = _vit(pool_type="gap")
    assert variables["params"]["pos_embedding"].shape == (1, 16, 32)
    _, out = module.apply(variables, images(s=48))
    assert out["encoded"].shape == (2, 36, 32)
    pe = variables["params"]["pos_embedding"]
    same = layers.resize_posemb(pe, (4, 4), (4, 4))
    np.testing.assert_array_equal(same, pe)
    big = layers.resize_posemb(pe, (4, 4), (8, 8))
    assert big.shape == (1, 64, 32)
    np.testing.assert_allclose(big.mean(), pe.mean(), atol=1e-5)


def test_conv_stem_token_grid_is_image_over_strides_times_patch():
    module, variables = _vit(stem="conv", stem_features=(8, 16), stem_strides=(2, 2),
                             patch_size=2, pool_type="gap")
    assert {"stem_conv_0", "stem_conv_1", "embedding"} <= set(variables["params"])
    assert variables["params"]["embedding"]["kernel"].shape == (2, 2, 16, 32)
    y, out = module.apply(variables, images())
    assert out["stem"].shape == (2, 4, 4, 32)  # 32 / (2*2*2)
    assert variables["params"]["pos_embedding"].shape == (1, 16, 32)
    assert y.shape == (2, 32)


def test_image_size_not_multiple_of_stride_errors():
    module, variables = _vit()
    with pytest.raises(ValueError, match="multiple"):
        module.apply(variables, images(s=36))


def test_dropout_active_only_in_train_mode():
    module, variables = _vit(pool_type="gap", dropout=0.5)
    nodrop = ViT(**{**TINY_VIT, "pool_type": "gap"})
    x = images()
    y_eval, _ = module.apply(variables, x)
    y_ref, _ = nodrop.apply(variables, x)
    np.testing.assert_array_equal(y_eval, y_ref)
    y_a, _ = module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    y_b, _ = module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(y_a, y_eval) and not np.allclose(y_a, y_b)


def test_attention_fn_hook_is_used():
    calls = []

    def attn(query, key, value, mask=None, dtype=None):
        calls.append(query.shape)
        return layers.dot_product_attention_f32(query, key, value, mask=mask, dtype=dtype)

    module, variables = _vit()
    hooked = ViT(**TINY_VIT, attention_fn=attn)
    y_ref, _ = module.apply(variables, images())
    y, _ = hooked.apply(variables, images())
    assert len(calls) == 3  # two encoder blocks + the MAP head
    np.testing.assert_allclose(y, y_ref, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_default_attention_equals_flax_dot_product_attention(dtype):
    """layers.dot_product_attention_f32 (heads-first layout, normalised after p v) is
    flax's nn.dot_product_attention(force_fp32_for_softmax=True): outputs with bias, a
    mask with a fully masked row, and dropout; the sown weights; the gradients."""
    ks = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(t, (2, 5, 3, 4), dtype) for t in ks[:3])
    bias = jax.random.normal(ks[3], (2, 1, 5, 5))
    mask = jax.random.bernoulli(ks[4], 0.7, (2, 1, 5, 5)).at[1, 0, 2].set(False)
    kw = dict(bias=bias, mask=mask, dropout_rate=0.3, dropout_rng=jax.random.key(7),
              deterministic=False)

    def ours(q, k, v, **kw):
        return layers.dot_product_attention_f32(q, k, v, **kw)

    def flax_ref(q, k, v, **kw):
        return nn.dot_product_attention(q, k, v, force_fp32_for_softmax=True, **kw)

    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    for extra in ({}, kw):
        a, b = ours(q, k, v, **extra), flax_ref(q, k, v, **extra)
        assert a.dtype == b.dtype and a.shape == b.shape == q.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
        ga, gb = (jax.grad(lambda *x, f=f: jnp.sum(f(*x, **extra).astype(jnp.float32) ** 2),
                           argnums=(0, 1, 2))(q, k, v) for f in (ours, flax_ref))
        for x, y in zip(ga, gb):
            np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                       **tol)

    class Sow(nn.Module):
        fn: object

        @nn.compact
        def __call__(self, q, k, v):
            return self.fn(q, k, v, mask=mask, module=self)

    sown = [Sow(f).apply({}, q, k, v, mutable="intermediates")[1]["intermediates"]
            ["attention_weights"][0] for f in (ours, flax_ref)]
    assert sown[0].shape == (2, 3, 5, 5)
    np.testing.assert_allclose(sown[0], sown[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sum(sown[0], -1), 1.0, rtol=1e-5)


# ---------------------------------------------------------------- text behaviour

def _text(**kw):
    module = TextTransformer(**{**TINY_TXT, "head": 16, **kw})
    variables = fake_init(module, tokens(1))
    return module, variables


def test_causal_mask_later_token_does_not_change_earlier_positions():
    t1 = tokens(1)
    t2 = t1.at[0, 5].set((t1[0, 5] + 1) % 100)
    module, variables = _text(causal=True, pool_type="eos", head_bias=False)
    e1 = module.apply(variables, t1)[1]["encoded"]
    e2 = module.apply(variables, t2)[1]["encoded"]
    np.testing.assert_allclose(e1[0, :5], e2[0, :5], rtol=1e-5, atol=1e-6)
    assert not np.allclose(e1[0, 5:], e2[0, 5:])
    module, variables = _text()  # SigLIP: bidirectional, so earlier positions change
    e1 = module.apply(variables, t1)[1]["encoded"]
    e2 = module.apply(variables, t2)[1]["encoded"]
    assert not np.allclose(e1[0, :5], e2[0, :5])


def test_clip_style_text_pools_at_eos_and_head_has_no_bias():
    module, variables = _text(causal=True, pool_type="eos", head_bias=False)
    assert "bias" not in variables["params"]["head"]
    tok = jnp.array([[5, 7, 99, 0, 0, 0, 0, 0], [3, 4, 6, 8, 99, 2, 0, 0]], jnp.int32)
    _, out = module.apply(variables, tok)
    np.testing.assert_array_equal(out["pre_logits"], out["encoded"][jnp.arange(2), jnp.array([2, 4])])


def test_siglip_text_pools_last_position_with_head_bias():
    module, variables = _text()
    assert variables["params"]["head"]["bias"].shape == (16,)
    y, out = module.apply(variables, tokens())
    np.testing.assert_array_equal(out["pre_logits"], out["encoded"][:, -1])
    assert y.shape == (2, 16)
    y_short, _ = module.apply(variables, tokens(length=5))  # shorter than max_len is fine
    assert y_short.shape == (2, 16)
    with pytest.raises(ValueError, match="max_len"):
        module.apply(variables, tokens(length=9))


def test_remat_gives_same_params_and_outputs():
    module, variables = _text()
    rm = TextTransformer(**{**TINY_TXT, "head": 16, "remat": True})
    v2 = fake_init(rm, tokens(1))
    assert jax.tree.structure(v2) == jax.tree.structure(variables)
    np.testing.assert_allclose(rm.apply(variables, tokens())[0],
                               module.apply(variables, tokens())[0], rtol=1e-6)
    grad = lambda m, p: jax.grad(lambda p: m.apply({"params": p}, tokens())[0].sum())(p)
    g_rm, g = jax.jit(lambda p: (grad(rm, p), grad(module, p)))(variables["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_rm, g)


# ---------------------------------------------------------------- reference parity

def _siglip_params_from_transformers(sd, width, heads, depth):
    """transformers SiglipModel state dict (numpy) -> our param tree (test-local mapping)."""
    hd = width // heads
    lin = lambda p: {"kernel": sd[p + ".weight"].T, "bias": sd[p + ".bias"]}
    ln = lambda p: {"scale": sd[p + ".weight"], "bias": sd[p + ".bias"]}
    qkv = lambda w, b: {"kernel": w.T.reshape(width, heads, hd), "bias": b.reshape(heads, hd)}
    out = lambda p: {"kernel": sd[p + ".weight"].T.reshape(heads, hd, width),
                     "bias": sd[p + ".bias"]}

    def encoder(pre, norm):
        tree = {"encoder_norm": ln(f"{pre}.{norm}")}
        for i in range(depth):
            b = f"{pre}.encoder.layers.{i}"
            attn = {n: qkv(sd[f"{b}.self_attn.{t}_proj.weight"], sd[f"{b}.self_attn.{t}_proj.bias"])
                    for n, t in (("query", "q"), ("key", "k"), ("value", "v"))}
            attn["out"] = out(f"{b}.self_attn.out_proj")
            tree[f"encoderblock_{i}"] = {
                "LayerNorm_0": ln(b + ".layer_norm1"), "LayerNorm_1": ln(b + ".layer_norm2"),
                "MultiHeadDotProductAttention_0": attn,
                "MlpBlock_0": {"Dense_0": lin(b + ".mlp.fc1"), "Dense_1": lin(b + ".mlp.fc2")}}
        return tree

    v, t = "vision_model", "text_model"
    w_in, b_in = sd[v + ".head.attention.in_proj_weight"], sd[v + ".head.attention.in_proj_bias"]
    mha = {n: qkv(w_in[j * width:(j + 1) * width], b_in[j * width:(j + 1) * width])
           for j, n in enumerate(("query", "key", "value"))}
    mha["out"] = out(v + ".head.attention.out_proj")
    img = {"embedding": {"kernel": sd[v + ".embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
                         "bias": sd[v + ".embeddings.patch_embedding.bias"]},
           "pos_embedding": sd[v + ".embeddings.position_embedding.weight"][None],
           "Transformer": encoder(v, "post_layernorm"),
           "MAPHead_0": {"probe": sd[v + ".head.probe"], "MultiHeadDotProductAttention_0": mha,
                         "LayerNorm_0": ln(v + ".head.layernorm"),
                         "MlpBlock_0": {"Dense_0": lin(v + ".head.mlp.fc1"),
                                        "Dense_1": lin(v + ".head.mlp.fc2")}}}
    txt = {"Embed_0": {"embedding": sd[t + ".embeddings.token_embedding.weight"]},
           "pos_embedding": sd[t + ".embeddings.position_embedding.weight"][None],
           "Transformer": encoder(t, "final_layer_norm"), "head": lin(t + ".head")}
    return {"img": img, "txt": txt, "t": sd["logit_scale"], "b": sd["logit_bias"]}


def test_siglip_features_match_transformers_with_random_weights():
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    w, depth, mlp, heads = 32, 2, 64, 4
    hf = tr.SiglipModel(tr.SiglipConfig(
        vision_config=dict(hidden_size=w, intermediate_size=mlp, num_hidden_layers=depth,
                           num_attention_heads=heads, patch_size=8, image_size=32),
        text_config=dict(hidden_size=w, intermediate_size=mlp, num_hidden_layers=depth,
                         num_attention_heads=heads, vocab_size=100, max_position_embeddings=8,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None))).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)  # non-trivial biases, LayerNorm scales, probe
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    cfg = tiny_model_config(**{"image.depth": depth, "text.depth": depth,
                               "image.num_heads": heads, "text.num_heads": heads})
    model = M.build(cfg)
    params = _siglip_params_from_transformers(sd, w, heads, depth)
    abstract = M.abstract_variables(model, recipe(cfg))["params"]
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(np.shape, params)

    x, tok = np.asarray(images()), np.asarray(tokens())
    with torch.no_grad():
        fi = hf.get_image_features(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2)))
        ft = hf.get_text_features(input_ids=torch.tensor(tok))
    fi, ft = (getattr(f, "pooler_output", f).numpy() for f in (fi, ft))
    apply = jit_apply(model)
    np.testing.assert_allclose(apply({"params": params}, x, method="encode_image"), fi,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(apply({"params": params}, tok, method="encode_text"), ft,
                               rtol=1e-4, atol=1e-5)
