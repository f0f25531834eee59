"""LLaVA / PaliGemma vision front-ends vs transformers, and prompt splicing vs LLaVA's merge.

Tiny random transformers models (odd sizes, float32) are saved with save_pretrained,
loaded with hf.load, and compared with get_image_features(...).pooler_output.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from vlm_jax import splice  # noqa: E402
from vlm_jax.interop import CheckpointMismatchError, hf, hf_llava  # noqa: E402

VISION = dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5,
              image_size=30, patch_size=6, attention_dropout=0.0)
LLAMA = dict(model_type="llama", hidden_size=44, intermediate_size=52, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, vocab_size=120)
IMAGE_ID = 100


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _llava(tmp, name, vision, **kw):
    torch.manual_seed(len(name))
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=LLAMA, image_token_id=IMAGE_ID,
                                   **kw)
    m = transformers.LlavaForConditionalGeneration(cfg).eval()
    path = str(tmp / name)
    m.save_pretrained(path)
    return m, path


@pytest.fixture(scope="module")
def pixels():
    return torch.from_numpy(np.random.RandomState(0).randn(3, 3, 30, 30).astype(np.float32))


@pytest.fixture(scope="module")
def clip_llava(tmp_path_factory):
    """CLIP tower, vision_feature_layer -2, strategy "default", projector with biases."""
    vision = dict(VISION, model_type="clip_vision_model", hidden_act="quick_gelu")
    return _llava(tmp_path_factory.mktemp("llava"), "clip", vision, vision_feature_layer=-2,
                  vision_feature_select_strategy="default")


def _reference(model, pixels, **kw):
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels, **kw).pooler_output
    return out.numpy() if torch.is_tensor(out) else np.stack([o.numpy() for o in out])


def test_llava_clip_layer_minus_2_default(clip_llava, pixels):
    tm, path = clip_llava
    model, variables = hf.load(path)
    assert type(model).__name__ == "LlavaFrontEnd"
    ours = hf.image_features(model, variables, pixel_values=pixels.numpy())
    assert isinstance(ours, list) and len(ours) == 3 and ours[0].shape == (25, 44)
    assert _rel(np.stack(ours), _reference(tm, pixels)) < 1e-5
    # Overriding the layer / strategy at call time, as get_image_features allows.
    ours = hf.image_features(model, variables, pixel_values=pixels, vision_feature_layer=-3,
                             vision_feature_select_strategy="full")
    ref = _reference(tm, pixels, vision_feature_layer=-3, vision_feature_select_strategy="full")
    assert ref.shape == (3, 26, 44)
    assert _rel(np.stack(ours), ref) < 1e-5


def _rewrite(src, dst, rename, drop=lambda k: False):
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items() if not drop(k)},
              os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return tensors


def test_llava_key_layouts_and_language_model_not_read(clip_llava, pixels, tmp_path, monkeypatch):
    tm, path = clip_llava
    ref = _reference(tm, pixels)
    # The hub's older layout: vision_tower.vision_model.*; no language-model tensors at all.
    old = str(tmp_path / "old")
    tensors = _rewrite(path, old,
                       lambda k: k.replace("vision_tower.", "vision_tower.vision_model."),
                       drop=lambda k: k.startswith(("language_model", "lm_head")))
    assert any(k.startswith("language_model.") for k in tensors)
    assert any(k.startswith("vision_tower.embeddings.") for k in tensors)  # 5.x layout
    model, variables = hf.load(old)
    assert _rel(np.stack(hf.image_features(model, variables, pixel_values=pixels)), ref) < 1e-5
    # In-memory 5.x names (model.vision_tower..., model.language_model...), with a spy on
    # what is read: never a language-model tensor.
    mem = str(tmp_path / "mem")
    _rewrite(path, mem, lambda k: k if k.startswith("lm_head") else "model." + k)
    seen = []
    real = hf_llava.read_safetensors

    def spy(p, keep=None):
        assert keep is not None
        out = real(p, keep=keep)
        seen.extend(out)
        return out
    monkeypatch.setattr(hf_llava, "read_safetensors", spy)
    model, variables = hf.load(mem)
    assert seen and not [k for k in seen if "language_model" in k or "lm_head" in k]
    assert _rel(np.stack(hf.image_features(model, variables, pixel_values=pixels)), ref) < 1e-5


def test_llava_checkpoint_mismatch_and_bad_config(clip_llava, tmp_path):
    _, path = clip_llava
    bad = str(tmp_path / "bad")
    _rewrite(path, bad, lambda k: k, drop=lambda k: k.endswith("linear_2.weight"))
    with pytest.raises(CheckpointMismatchError, match="linear_2.weight"):
        hf.load(bad)
    with open(os.path.join(bad, "config.json")) as f:
        cfg = json.load(f)
    cfg["vision_config"]["model_type"] = "dinov2"
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="dinov2"):
        hf.load(bad)


def test_llava_layer_list_full_no_bias(tmp_path_factory, pixels):
    """A list of feature layers (incl. 0, the encoder input) concatenated, strategy "full",
    bias-free projector with tanh GELU."""
    vision = dict(VISION, model_type="clip_vision_model", hidden_act="gelu")
    tm, path = _llava(tmp_path_factory.mktemp("llava"), "list", vision,
                      vision_feature_layer=[0, -1, 2], vision_feature_select_strategy="full",
                      multimodal_projector_bias=False, projector_hidden_act="gelu_pytorch_tanh")
    model, variables = hf.load(path)
    assert "bias" not in variables["params"]["connector"]["Dense_0"]
    ours = np.stack(hf.image_features(model, variables, pixel_values=pixels))
    ref = _reference(tm, pixels)
    assert ref.shape == (3, 26, 44)
    assert _rel(ours, ref) < 1e-5


def test_llava_siglip_tower(tmp_path_factory, pixels):
    """SigLIP tower: no CLS, yet "default" drops the first token, as transformers does."""
    vision = dict(VISION, model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh")
    tm, path = _llava(tmp_path_factory.mktemp("llava"), "siglip", vision, vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    model, variables = hf.load(path)
    ours = np.stack(hf.image_features(model, variables, pixel_values=pixels))
    ref = _reference(tm, pixels)
    assert ref.shape == (3, 24, 44)
    assert _rel(ours, ref) < 1e-5


def test_paligemma_both_layouts(tmp_path_factory, pixels):
    tmp = tmp_path_factory.mktemp("paligemma")
    torch.manual_seed(3)
    cfg = transformers.PaliGemmaConfig(
        vision_config=dict(VISION, hidden_act="gelu_pytorch_tanh"), projection_dim=44,
        text_config=dict(model_type="gemma", hidden_size=44, intermediate_size=52,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=22, vocab_size=120), image_token_id=IMAGE_ID)
    tm = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    path = str(tmp / "pg")
    tm.save_pretrained(path)
    ref = _reference(tm, pixels)
    assert ref.shape == (3, 25, 44)
    model, variables = hf.load(path)
    assert type(model).__name__ == "PaliGemmaFrontEnd"
    ours = hf.image_features(model, variables, pixel_values=pixels)
    assert isinstance(ours, np.ndarray) and _rel(ours, ref) < 1e-5
    old = str(tmp / "old")
    _rewrite(path, old, lambda k: k.replace("vision_tower.", "vision_tower.vision_model."),
             drop=lambda k: k.startswith("language_model"))
    model, variables = hf.load(old)
    assert _rel(hf.image_features(model, variables, pixel_values=pixels), ref) < 1e-5


def test_splice_replace_equals_llava_merge(clip_llava, pixels):
    """Our splice (mode "replace") gives the inputs_embeds LLaVA's language model receives."""
    tm, path = clip_llava
    model, variables = hf.load(path)
    feats = np.stack(hf.image_features(model, variables, pixel_values=pixels))  # [3, 25, 44]
    rng = np.random.RandomState(1)
    ids = rng.randint(0, IMAGE_ID, size=(2, 70))
    ids[0, 3:28] = IMAGE_ID      # row 0: two images
    ids[0, 40:65] = IMAGE_ID
    ids[1, 10:35] = IMAGE_ID     # row 1: one image
    captured = {}

    def hook(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().numpy()
    handle = tm.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            tm(input_ids=torch.from_numpy(ids), pixel_values=pixels)
    finally:
        handle.remove()
    table = tm.model.language_model.embed_tokens.weight.detach().numpy()
    out = splice.splice(ids, table, feats, IMAGE_ID)
    assert out["inputs_embeds"].shape == (2, 70, 44)
    np.testing.assert_allclose(np.asarray(out["inputs_embeds"]), captured["embeds"], atol=1e-6,
                               rtol=0)
    np.testing.assert_array_equal(np.asarray(out["positions"]), np.tile(np.arange(70), (2, 1)))
    assert int(np.asarray(out["image_mask"]).sum()) == 75
