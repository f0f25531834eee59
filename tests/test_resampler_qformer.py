"""Perceiver Resampler and Q-Former: module behaviour, and parity with transformers' BLIP-2,
Blip2QFormerModel and Idefics2PerceiverResampler (random weights, float32, odd sizes)."""

import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from recipes import spy_safetensors_reads
from vlm_jax.interop import CheckpointMismatchError, hf
from vlm_jax.models.qformer import QFormer
from vlm_jax.models.resampler import PerceiverResampler

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def randomize(model, seed=0):
    """Random weights everywhere (LayerNorm scales and biases included) so no mapping hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


# ---------------------------------------------------------------- BLIP-2

VISION = dict(hidden_size=40, intermediate_size=76, num_hidden_layers=2, num_attention_heads=5,
              image_size=30, patch_size=6)
QFORMER = dict(hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=52,
               cross_attention_frequency=2)
TEXT = dict(model_type="opt", hidden_size=24, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
            vocab_size=64, word_embed_proj_dim=24, max_position_embeddings=32)


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    """A random Blip2ForConditionalGeneration saved in the 5.x layout and in the hub's older one."""
    cfg = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=TEXT,
                                   num_query_tokens=7)
    model = randomize(transformers.Blip2ForConditionalGeneration(cfg))
    new = str(tmp_path_factory.mktemp("blip2_new"))
    model.save_pretrained(new)
    # The hub's older files: separate q_bias / v_bias (no key bias) instead of a fused qkv.bias.
    old = str(tmp_path_factory.mktemp("blip2_old"))
    shutil.copy(f"{new}/config.json", f"{old}/config.json")
    tensors = load_file(f"{new}/model.safetensors")
    for k in [k for k in tensors if k.endswith("self_attn.qkv.bias")]:
        q, _, v = np.split(tensors.pop(k), 3)
        tensors[k.replace("qkv.bias", "q_bias")] = q
        tensors[k.replace("qkv.bias", "v_bias")] = v
    save_file(tensors, f"{old}/model.safetensors", metadata={"format": "pt"})
    px = torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=px).pooler_output.numpy()
    return {"new": new, "old": old}, px.numpy(), ref


def test_blip2_image_features_both_layouts(blip2, monkeypatch):
    dirs, px, ref = blip2
    assert ref.shape == (3, 7, 24)
    read = spy_safetensors_reads(monkeypatch)
    for layout, path in dirs.items():
        read.clear()
        model, variables = hf.load(path)
        assert read and not any(k.startswith("language_model.") for k in read), layout
        feats = hf.image_features(model, variables, pixel_values=px)
        assert feats.shape == ref.shape
        assert rel(feats, ref) < 1e-5, layout
    # cross-attention only in layers 0 and 2 (frequency 2), keys from the vision width 40
    q = variables["params"]["qformer"]
    assert "crossattention" in q["layer_0"] and "crossattention" not in q["layer_1"]
    assert q["layer_2"]["crossattention"]["key"]["kernel"].shape == (40, 3, 12)


def test_blip2_rejects_wrong_tensors(blip2, tmp_path):
    dirs, _, _ = blip2
    shutil.copy(f"{dirs['new']}/config.json", tmp_path / "config.json")
    tensors = load_file(f"{dirs['new']}/model.safetensors")
    del tensors["qformer.encoder.layer.2.crossattention.attention.key.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="crossattention.attention.key.weight"):
        hf.load(str(tmp_path))


def test_standalone_qformer_parity(tmp_path):
    qf = randomize(transformers.Blip2QFormerModel(
        transformers.Blip2QFormerConfig(**QFORMER, encoder_hidden_size=44)), seed=2)
    qf.save_pretrained(str(tmp_path))
    model, variables = hf.load(str(tmp_path))
    g = torch.Generator().manual_seed(3)
    img, queries = torch.randn(2, 9, 44, generator=g), torch.randn(2, 7, 36, generator=g)
    img_mask = torch.ones(2, 9, dtype=torch.long)
    img_mask[1, 5:] = 0
    q_mask = torch.ones(2, 7, dtype=torch.long)
    q_mask[0, 4:] = 0
    with torch.no_grad():
        ref = qf(query_embeds=queries, encoder_hidden_states=img, encoder_attention_mask=img_mask,
                 attention_mask=q_mask).last_hidden_state.numpy()
    ours = hf.image_features(model, variables, query_embeds=queries.numpy(),
                             encoder_hidden_states=img.numpy(),
                             encoder_attention_mask=img_mask.numpy(), attention_mask=q_mask.numpy())
    assert ours.shape == (2, 7, 36)
    assert rel(ours, ref) < 1e-5
    with pytest.raises(ValueError, match="query_embeds"):
        hf.image_features(model, variables, encoder_hidden_states=img.numpy())


# ---------------------------------------------------------------- Idefics2

PERCEIVER = dict(hidden_size=40, resampler_n_latents=5, resampler_depth=2, resampler_n_heads=6,
                 resampler_head_dim=7, num_key_value_heads=3)  # 2 query heads per key/value head


def test_idefics2_perceiver_parity_with_padding(tmp_path):
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    ref_model = randomize(Idefics2PerceiverResampler(
        transformers.Idefics2PerceiverConfig(**PERCEIVER)), seed=4)
    ref_model.save_pretrained(str(tmp_path))
    model, variables = hf.load(str(tmp_path))
    g = torch.Generator().manual_seed(5)
    ctx = torch.randn(2, 11, 40, generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = ref_model(ctx, mask).numpy()
    ours = hf.image_features(model, variables, context=ctx.numpy(), attention_mask=mask.numpy())
    assert ours.shape == (2, 5, 40)
    assert rel(ours, ref) < 1e-5
    assert model.variant == "idefics2" and model.num_kv_heads == 3


def test_idefics2_image_features(tmp_path):
    """Full Idefics2 get_image_features: padding frames, a padded image region, SwiGLU projection."""
    cfg = transformers.Idefics2Config(
        vision_config=dict(hidden_size=28, intermediate_size=20, num_hidden_layers=1,
                           num_attention_heads=2, image_size=24, patch_size=6),
        text_config=dict(model_type="mistral", hidden_size=40, intermediate_size=44,
                         num_hidden_layers=1, num_attention_heads=5, num_key_value_heads=1,
                         vocab_size=64, hidden_act="gelu"),
        perceiver_config=PERCEIVER)
    ref_model = randomize(transformers.Idefics2ForConditionalGeneration(cfg), seed=6)
    ref_model.save_pretrained(str(tmp_path))
    model, variables = hf.load(str(tmp_path))
    assert set(variables["params"]) == {"tower", "connector"}
    g = torch.Generator().manual_seed(7)
    pv = torch.randn(2, 2, 3, 24, 18, generator=g)  # non-square, 4 x 3 patches
    pv[1, 1] = 0.0  # a padding frame
    pam = torch.ones(2, 2, 24, 18, dtype=torch.long)
    pam[0, 1, 15:] = 0  # rows 15.. padded: the patch row 12-17 is only partly real -> padding
    pam[0, 1, :, 12:] = 0
    with torch.no_grad():
        ref = ref_model.get_image_features(pixel_values=pv, pixel_attention_mask=pam).pooler_output
    ours = hf.image_features(model, variables, pixel_values=pv.numpy(),
                             pixel_attention_mask=pam.numpy())
    assert [o.shape for o in ours] == [(10, 40), (5, 40)]
    for a, b in zip(ours, ref):
        assert rel(a, b.numpy()) < 1e-5


# ---------------------------------------------------------------- modules

def _init_and_grads(module, x, mask):
    """Random params (numpy, no RNG program to compile), their logical specs, and in one
    compiled program the output and d sum(out^2) / d (params, tokens)."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), x, mask)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, jnp.float32),
                          nn.meta.unbox(abstract)["params"])

    @jax.jit
    def run(params, x, mask):
        def loss(p, x):
            y = module.apply({"params": p}, x, mask)
            return jnp.sum(y ** 2), y
        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, grads
    return nn.get_partition_spec(abstract)["params"], *run(params, x, mask)


def _padded_batch(b, n, d, n_real, seed):
    """Rows [0, b) with the last n - n_real tokens of row 1 padded; rows [b, 2b) the same
    with garbage in the padded slots (must not change anything)."""
    x = np.random.default_rng(seed).normal(size=(b, n, d)).astype(np.float32)
    mask = np.ones((b, n), bool)
    mask[1, n_real:] = False
    x2 = x.copy()
    x2[1, n_real:] = 100.0
    return jnp.asarray(np.concatenate([x, x2])), np.concatenate([mask, mask])


def _check_padding_and_grads(y, grads, b, n_real):
    gp, gx = grads
    np.testing.assert_allclose(y[b:], y[:b], rtol=0, atol=1e-5)  # padding changes nothing
    assert float(jnp.abs(y[1] - y[0]).max()) > 1e-3
    norms = jax.tree.map(lambda g: float(jnp.abs(g).max()), gp)
    assert all(v > 0 for v in jax.tree.leaves(norms)), norms  # every parameter learns
    assert float(jnp.abs(gx[1, n_real:]).max()) == 0.0  # no gradient into padding
    assert float(jnp.abs(gx[1, :n_real]).min()) > 0


def test_flamingo_resampler_shapes_mask_and_gradients():
    m = PerceiverResampler(num_latents=6, depth=2, num_heads=3, head_dim=5, out_dim=11)
    x, mask = _padded_batch(2, 13, 20, 8, seed=0)
    specs, y, grads = _init_and_grads(m, x, mask)
    assert y.shape == (4, 6, 11)
    assert tuple(specs["latents"]) == (None, "embed")
    assert tuple(specs["block_0"]["attention"]["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["block_1"]["mlp_in"]["kernel"]) == ("embed", "mlp")
    assert set(specs["block_0"]["latents_norm"]) == {"scale", "bias"}  # LayerNorm, not RMSNorm
    _check_padding_and_grads(y, grads, 2, 8)


def test_qformer_module_masks_and_gradients():
    # depth 1 keeps the compile short; BLIP-2 parity covers deeper stacks and frequency 2
    m = QFormer(num_queries=4, depth=1, num_heads=3, width=18, out_dim=10, encoder_width=14,
                mlp_dim=22)
    x, mask = _padded_batch(2, 9, 14, 5, seed=1)
    spec, y, grads = _init_and_grads(m, x, mask)
    assert y.shape == (4, 4, 10)
    assert tuple(spec["query_tokens"]) == (None, None, "embed")
    assert tuple(spec["layer_0"]["crossattention"]["key"]["kernel"]) == ("embed", "heads", "kv")
    _check_padding_and_grads(y, grads, 2, 5)
    with pytest.raises(ValueError, match="encoder_width=14"):
        m.init(jax.random.key(0), jnp.zeros((1, 3, 15)))


def test_bad_configs_raise():
    x = jnp.zeros((1, 4, 12))
    with pytest.raises(ValueError, match="variant"):
        PerceiverResampler(2, 1, 3, variant="nope").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="num_kv_heads=2 must divide"):
        PerceiverResampler(2, 1, 3, num_kv_heads=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="mask must be"):
        PerceiverResampler(2, 1, 3).init(jax.random.key(0), x, np.ones((1, 5), bool))
    with pytest.raises(ValueError, match="num_queries=0 needs queries"):
        QFormer(0, 1, 3).init(jax.random.key(0), x)
