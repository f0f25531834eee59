"""Idefics3 / SmolVLM vision front-end: pixel shuffle, bucketed position ids and image features
against transformers' own modules (tiny random models, float32, nothing downloaded)."""

import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")

from transformers.models.idefics3 import modeling_idefics3 as mi  # noqa: E402

from recipes import spy_safetensors_reads  # noqa: E402
from vlm_jax.interop import CheckpointMismatchError, flatten, hf, hf_idefics3  # noqa: E402
from vlm_jax.models import idefics_vision  # noqa: E402
from vlm_jax.models.pixel_shuffle import PixelShuffleProjector, pixel_shuffle  # noqa: E402

# Width 40 / 5 heads / MLP 52; 30x30 images with 3x3 patches: a 10x10 grid (G = 10),
# shuffled by 2 into 25 tokens of 160 channels, projected to the LM width 36.
VISION = dict(hidden_size=40, intermediate_size=52, num_hidden_layers=2, num_attention_heads=5,
              image_size=30, patch_size=3)
TEXT = dict(model_type="llama", hidden_size=36, intermediate_size=20, num_hidden_layers=1,
            num_attention_heads=3, num_key_value_heads=1, vocab_size=64)
RTOL = 1e-5


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def processor_batch():
    """2 samples x 2 image slots, 30x30: sample 0 = a full image and one whose real part is
    the top-left 20x23 pixels (7x8 patches, zeros elsewhere); sample 1 = a full image and a
    padding frame (all zeros)."""
    rs = np.random.RandomState(0)
    pv = rs.randn(2, 2, 3, 30, 30).astype(np.float32)
    mask = np.ones((2, 2, 30, 30), np.int64)
    mask[0, 1, 20:], mask[0, 1, :, 23:] = 0, 0
    pv[0, 1] *= mask[0, 1][None]
    pv[1, 1], mask[1, 1] = 0, 0
    return pv, mask


@pytest.fixture(scope="module")
def idefics3(tmp_path_factory):
    """(5.x directory, directory with the base-model key layout, reference features with the
    pixel mask, without it)."""
    cfg = tr.Idefics3Config(vision_config=VISION, text_config=TEXT, scale_factor=2,
                            image_token_id=63)
    torch.manual_seed(0)
    model = tr.Idefics3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    path = str(tmp_path_factory.mktemp("idefics3"))
    model.save_pretrained(path)
    pv, mask = processor_batch()
    with torch.no_grad():
        ref_masked = model.get_image_features(torch.from_numpy(pv), torch.from_numpy(mask))
        ref_plain = model.get_image_features(torch.from_numpy(pv))
    # The other layout: keys without "model." (a saved Idefics3Model, no lm_head).
    from safetensors.numpy import load_file, save_file
    old = str(tmp_path_factory.mktemp("idefics3_base_layout"))
    tensors = load_file(os.path.join(path, "model.safetensors"))
    save_file({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
              os.path.join(old, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(path, "config.json"), old)
    as_list = lambda out: [t.numpy() for t in out.pooler_output]  # noqa: E731
    return path, old, as_list(ref_masked), as_list(ref_plain)


def test_pixel_shuffle_equals_transformers_channel_order():
    rs = np.random.RandomState(1)
    for n, d, s in ((100, 7, 2), (81, 5, 3), (36, 3, 6)):
        x = rs.randn(2, n, d).astype(np.float32)
        want = mi.Idefics3Connector.pixel_shuffle(None, torch.from_numpy(x), s).numpy()
        got = np.asarray(pixel_shuffle(x, s))
        assert got.shape == (2, n // s**2, d * s**2)
        np.testing.assert_array_equal(got, want)


def test_pixel_shuffle_projector_is_shuffle_then_named_dense():
    x = np.random.RandomState(2).randn(2, 36, 5).astype(np.float32)
    proj = PixelShuffleProjector(out_dim=7, scale=3)
    variables = proj.init(jax.random.key(0), x)
    names = {k: v.names for k, v in flatten(variables["params"]).items()}
    assert names == {"proj/kernel": ("mlp", "embed")}
    kernel = nn.meta.unbox(variables)["params"]["proj"]["kernel"]
    y = proj.apply(variables, x, mask=np.ones((2, 36), bool))
    assert y.shape == (2, 4, 7)
    np.testing.assert_allclose(y, np.asarray(pixel_shuffle(x, 3)) @ kernel, rtol=1e-6, atol=1e-6)
    with_bias = PixelShuffleProjector(out_dim=7, scale=3, use_bias=True).init(jax.random.key(0), x)
    assert flatten(with_bias["params"])["proj/bias"].names == ("embed",)


def test_pixel_shuffle_errors_name_the_problem():
    with pytest.raises(ValueError, match="not a square"):
        pixel_shuffle(np.zeros((1, 12, 4)), 2)
    with pytest.raises(ValueError, match="not divisible by scale=3"):
        pixel_shuffle(np.zeros((1, 100, 4)), 3)
    with pytest.raises(ValueError, match="positive int"):
        pixel_shuffle(np.zeros((1, 16, 4)), 0)
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        pixel_shuffle(np.zeros((16, 4)), 2)


def test_position_ids_equal_transformers_bucketing():
    """The table rows transformers' Idefics3VisionEmbeddings picks (read out through a table
    whose row r holds r) for padded images with many real sizes; G = 19 with 19 or 38 real
    rows hits boundaries that torch's arange rounds one ulp off k/G."""
    rs = np.random.RandomState(3)
    for g, side, fixed in ((7, 16, (7, 3, 16)), (10, 13, (10, 5, 13)), (19, 38, (19, 38, 23))):
        vc = tr.Idefics3VisionConfig(hidden_size=2, image_size=g, patch_size=1, num_channels=1)
        emb = mi.Idefics3VisionEmbeddings(vc)
        with torch.no_grad():
            for p in emb.parameters():
                p.zero_()
            emb.position_embedding.weight[:, 0] = torch.arange(g * g)
        sizes = [(n, m) for n in fixed for m in fixed] + [tuple(rs.randint(1, side + 1, 2))
                                                         for _ in range(6)]
        mask = np.zeros((len(sizes), side, side), bool)
        for k, (n, m) in enumerate(sizes):
            mask[k, :n, :m] = True
        with torch.no_grad():
            want = emb(torch.zeros(len(sizes), 1, side, side), torch.from_numpy(mask))[..., 0]
        got = jax.jit(idefics_vision.bucketed_position_ids, static_argnums=1)(mask, g)
        np.testing.assert_array_equal(np.asarray(got), want.numpy().astype(np.int64),
                                      err_msg=f"G={g}")


def test_image_features_equal_transformers_with_padding_frames_and_masks(idefics3):
    path, _, ref_masked, ref_plain = idefics3
    model, variables = hf.load(path)
    assert type(model).__name__ == "Idefics3FrontEnd"
    pv, mask = processor_batch()
    text = {"input_ids": np.zeros((2, 5), np.int64), "attention_mask": np.ones((2, 5))}
    for kw, ref in (({"pixel_attention_mask": mask, **text}, ref_masked), ({}, ref_plain)):
        got = hf.image_features(model, variables, pixel_values=pv, **kw)
        assert isinstance(got, list) and len(got) == 2
        assert [g.shape for g in got] == [r.shape for r in ref] == [(50, 36), (25, 36)]
        for g, r in zip(got, ref):
            assert g.dtype == np.float32
            assert rel_err(g, r) < RTOL
    # The mask matters: the partly padded image's tokens differ with and without it.
    assert rel_err(ref_masked[0][25:], ref_plain[0][25:]) > 1e-2


def test_base_model_key_layout_loads_and_language_model_is_never_read(idefics3, monkeypatch):
    path, old, ref_masked, _ = idefics3
    import safetensors

    real_open = safetensors.safe_open
    read = spy_safetensors_reads(monkeypatch)
    model, variables = hf.load(path)
    model_old, variables_old = hf.load(old)
    with real_open(os.path.join(path, "model.safetensors"), "np") as f:
        lm_keys = [k for k in f.keys() if "text_model" in k or k.startswith("lm_head")]
    assert lm_keys and read
    assert not [k for k in read if "text_model" in k or "lm_head" in k]
    assert model_old == model
    for k, v in flatten(variables["params"]).items():
        np.testing.assert_array_equal(v, flatten(variables_old["params"])[k], err_msg=k)
    pv, mask = processor_batch()
    got = hf.image_features(model_old, variables_old, pixel_values=pv,
                            pixel_attention_mask=mask)
    assert all(rel_err(g, r) < RTOL for g, r in zip(got, ref_masked))


def test_bad_inputs_and_mismatched_checkpoints_are_named(idefics3, tmp_path):
    path, _, _, _ = idefics3
    model, variables = hf.load(path)
    pv, mask = processor_batch()
    with pytest.raises(ValueError, match=r"\[B, N_images, C, H, W\]"):
        hf.image_features(model, variables, pixel_values=pv[0])
    with pytest.raises(ValueError, match="pixel_attention_mask shape"):
        hf.image_features(model, variables, pixel_values=pv, pixel_attention_mask=mask[:, :, :5])
    with pytest.raises(ValueError, match="spatial_shapes"):
        hf.image_features(model, variables, pixel_values=pv, spatial_shapes=np.ones((2, 2)))
    with pytest.raises(ValueError, match="not square"):
        hf.image_features(model, variables, pixel_values=pv[..., :27])
    with pytest.raises(ValueError, match="overrides?"):
        hf.load(path, overrides={"width": 3})
    # A config that disagrees with the weights: the projection and encoder keys are named.
    from safetensors.numpy import load_file, save_file
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.vision_model.post_layernorm.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    with pytest.raises(CheckpointMismatchError, match="post_layernorm.bias"):
        hf.load(str(tmp_path))


def test_config_defaults_equal_transformers_defaults():
    ref = tr.Idefics3VisionConfig().to_dict()
    for k, v in hf_idefics3.VISION_DEFAULTS.items():
        assert ref[k] == v, k
    assert tr.Idefics3Config().scale_factor == hf_idefics3.DEFAULTS["scale_factor"]
