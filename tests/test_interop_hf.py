"""transformers interop: loading SigLIP / CLIP checkpoints, saving ours, feature and gradient parity.

Reference models are transformers' own classes with tiny configs and random weights
(torch CPU, fixed seeds), written with save_pretrained into tmp dirs; nothing is downloaded.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from recipes import subprocess_env

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")

import vlm_jax.models as M  # noqa: E402
from vlm_jax import losses  # noqa: E402
from vlm_jax.interop import CheckpointMismatchError, flatten, hf  # noqa: E402

# Vision width 32 (4 heads), text width 24 (2 heads) projected to the shared 32:
# different widths and head counts make a swapped transpose or head split fail.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              patch_size=8, image_size=32)
TEXT = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            vocab_size=100, max_position_embeddings=8)
B, L, VOCAB = 3, 8, 100
RTOL, ATOL = 1e-4, 1e-5


def randomize(model, seed):
    """Every parameter ~ N(0, 0.2): non-trivial biases, LayerNorm scales, probe, logit scale/bias."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def hf_features(f):
    """transformers 5 get_*_features return a BaseModelOutputWithPooling; 4.x a tensor."""
    return getattr(f, "pooler_output", f)


def pixels(seed=0, size=32):
    return np.random.RandomState(seed).randn(B, 3, size, size).astype(np.float32)


def clip_ids(seed=1):
    """CLIP-style rows: tokens < 98, then EOS (99, the largest id), then padding 0."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(1, 98, (B, L))
    lengths = np.array([3, 8, 5])[:B]
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask, ids, 0)
    ids[np.arange(B), lengths - 1] = 99
    return ids, mask


def siglip_ids(seed=1):
    ids = np.random.RandomState(seed).randint(0, VOCAB, (B, L))
    mask = np.ones((B, L), np.int64)
    mask[0, 5:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    cfg = tr.SiglipConfig(
        vision_config=VISION,
        text_config=dict(TEXT, projection_size=32, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None))
    model = randomize(tr.SiglipModel(cfg), seed=0)
    path = str(tmp_path_factory.mktemp("hf") / "siglip")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    cfg = tr.CLIPConfig(projection_dim=16, vision_config=VISION,
                        text_config=dict(TEXT, bos_token_id=98, eos_token_id=99, pad_token_id=0))
    model = randomize(tr.CLIPModel(cfg), seed=1)
    path = str(tmp_path_factory.mktemp("hf") / "clip")
    model.save_pretrained(path)
    return model, path


NAFLEX_VISION = dict(VISION, patch_size=4, num_patches=16)
NAFLEX_VISION.pop("image_size")


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
    cfg = tr.Siglip2Config(
        vision_config=NAFLEX_VISION,
        text_config=dict(TEXT, projection_size=32, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None))
    model = randomize(tr.Siglip2Model(cfg), seed=2)
    path = str(tmp_path_factory.mktemp("hf") / "siglip2")
    model.save_pretrained(path)
    return model, path


def naflex_inputs(seed=0):
    """What transformers' Siglip2 image processor returns for three differently shaped images
    (4x4 posemb grid resized to 6x4, 3x8, 4x4 patch grids; the last padded to 24 patches)."""
    from PIL import Image
    rs = np.random.RandomState(seed)
    imgs = [Image.fromarray(rs.randint(0, 255, (h, w, 3), dtype=np.uint8))
            for h, w in [(20, 12), (9, 30), (16, 16)]]
    proc = tr.Siglip2ImageProcessor(patch_size=4, max_num_patches=24)
    out = proc(imgs, return_tensors="pt")
    assert out["pixel_attention_mask"].sum(1).tolist() == [24, 24, 16]
    return dict(out)


def torch_outputs(model, x, ids, mask):
    with torch.no_grad():
        fi = hf_features(model.get_image_features(pixel_values=torch.tensor(x))).numpy()
        ft = hf_features(model.get_text_features(input_ids=torch.tensor(ids),
                                                 attention_mask=torch.tensor(mask))).numpy()
        logits = model(pixel_values=torch.tensor(x), input_ids=torch.tensor(ids),
                       attention_mask=torch.tensor(mask)).logits_per_image.numpy()
    return fi, ft, logits


def our_logits(model, variables, x, ids):
    zi, zt, out = jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                       jnp.asarray(ids, jnp.int32))
    return np.asarray(out["t"] * zi @ zt.T + out["b"])


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- import parity

def test_siglip_checkpoint_gives_transformers_features_and_logits(siglip_dir):
    ref, path = siglip_dir
    model, variables = hf.load(path)
    assert model.image.pool_type == "map" and model.text.pool_type == "last"
    x, (ids, mask) = pixels(), siglip_ids()
    fi, ft, logits = torch_outputs(ref, x, ids, mask)
    close(hf.image_features(model, variables, pixel_values=torch.tensor(x)), fi)
    # The padding mask changes transformers' output; ours must follow it.
    close(hf.text_features(model, variables, ids, mask), ft)
    with torch.no_grad():
        ft_nomask = hf_features(ref.get_text_features(input_ids=torch.tensor(ids))).numpy()
    assert not np.allclose(ft_nomask, ft, atol=1e-3)
    close(hf.text_features(model, variables, ids), ft_nomask)
    with torch.no_grad():
        ref_all = ref(pixel_values=torch.tensor(x), input_ids=torch.tensor(ids)).logits_per_image
    close(our_logits(model, variables, x, ids), ref_all.numpy(), atol=1e-4)


def test_clip_checkpoint_gives_transformers_features_and_logits(clip_dir):
    ref, path = clip_dir
    model, variables = hf.load(path)
    assert "b" not in variables["params"] and model.image.pool_type == "tok"
    x, (ids, mask) = pixels(), clip_ids()
    fi, ft, logits = torch_outputs(ref, x, ids, mask)
    close(hf.image_features(model, variables, pixel_values=x), fi)
    close(hf.text_features(model, variables, ids, mask), ft)
    close(our_logits(model, variables, x, ids), logits, atol=1e-4)


def test_siglip2_checkpoint_gives_transformers_features_for_processor_outputs(siglip2_dir):
    ref, path = siglip2_dir
    model, variables = hf.load(path)
    assert model.image.posemb == "naflex" and model.image.posemb_size == 4
    inputs = naflex_inputs()
    ids, mask = siglip_ids()
    with torch.no_grad():
        fi = hf_features(ref.get_image_features(**inputs)).numpy()
        ft = hf_features(ref.get_text_features(input_ids=torch.tensor(ids),
                                               attention_mask=torch.tensor(mask))).numpy()
        logits = ref(**inputs, input_ids=torch.tensor(ids)).logits_per_image.numpy()
    ours = hf.image_features(model, variables, **inputs)
    close(ours, fi)
    close(hf.text_features(model, variables, ids, mask), ft)
    zi = ours / np.linalg.norm(ours, axis=-1, keepdims=True)
    zt = hf.text_features(model, variables, ids)
    zt = zt / np.linalg.norm(zt, axis=-1, keepdims=True)
    p = variables["params"]
    close(np.exp(p["t"][0]) * zi @ zt.T + p["b"][0], logits, atol=1e-4)
    with pytest.raises(ValueError, match="spatial_shapes"):
        hf.image_features(model, variables, pixel_values=inputs["pixel_values"])


def test_clip_eos_not_largest_id_pools_at_first_eos_like_transformers(clip_dir, tmp_path):
    ref, path = clip_dir
    path2 = str(tmp_path / "clip_eos50")
    shutil.copytree(path, path2)
    with open(os.path.join(path2, "config.json")) as f:
        cfg = json.load(f)
    cfg["text_config"]["eos_token_id"] = 50
    with open(os.path.join(path2, "config.json"), "w") as f:
        json.dump(cfg, f)
    ref50 = tr.CLIPModel.from_pretrained(path2).eval()
    with pytest.warns(UserWarning, match="eos_token_id=50"):
        model, variables = hf.load(path2)
    ids = np.array([[5, 60, 50, 70, 0, 0, 0, 0], [50, 3, 4, 80, 2, 0, 0, 0], [7, 8, 9, 10, 11, 12, 13, 50]])
    with torch.no_grad():
        ft = hf_features(ref50.get_text_features(input_ids=torch.tensor(ids))).numpy()
    close(hf.text_features(model, variables, ids, eos_token_id=50), ft)
    assert not np.allclose(hf.text_features(model, variables, ids), ft, atol=1e-3)


def test_sigmoid_loss_gradients_match_transformers(siglip_dir):
    ref, path = siglip_dir
    model, variables = hf.load(path)
    x, (ids, _) = pixels(seed=3), siglip_ids(seed=4)

    xt = torch.tensor(x, requires_grad=True)
    ref.zero_grad()
    out = ref(pixel_values=xt, input_ids=torch.tensor(ids), return_loss=True)
    out.loss.backward()

    def loss_fn(params, images):
        zi, zt, o = model.apply({"params": params}, images, jnp.asarray(ids, jnp.int32))
        return losses.sigmoid_loss(zi, zt, o["t"], o["b"])

    loss, (gp, gx) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
        variables["params"], jnp.asarray(x.transpose(0, 2, 3, 1)))
    close(loss, out.loss.item())

    def close_grad(ours, theirs):  # relative to the gradient's scale
        ours, theirs = np.asarray(ours), np.asarray(theirs)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())

    close_grad(np.transpose(gx, (0, 3, 1, 2)), xt.grad.numpy())
    close_grad(gp["txt"]["head"]["kernel"], ref.text_model.head.weight.grad.numpy().T)
    close_grad(gp["img"]["MAPHead_0"]["probe"], ref.vision_model.head.probe.grad.numpy())
    close_grad(gp["b"], ref.logit_bias.grad.numpy())
    close_grad(gp["t"], ref.logit_scale.grad.numpy())


# ---------------------------------------------------------------- export round trips

def tiny_config(kind):
    cfg = M.default_config()
    for sec, d in ((cfg.image, VISION), (cfg.text, TEXT)):
        sec.variant = None
        sec.width, sec.depth = d["hidden_size"], d["num_hidden_layers"]
        sec.mlp_dim, sec.num_heads = d["intermediate_size"], d["num_attention_heads"]
    cfg.image.patch_size, cfg.image.image_size = 8, 32
    cfg.text.vocab_size, cfg.text.max_len = VOCAB, L
    cfg.out_dim = 32
    if kind == "siglip2":
        cfg.image.update(type="naflex", patch_size=4, posemb_size=4, image_size=16)
    if kind == "clip":
        cfg.out_dim = 16
        cfg.image.update(pool_type="tok", pre_norm=True, patch_bias=False, head=True,
                         head_bias=False, act="quick_gelu", ln_eps=1e-5)
        cfg.text.update(causal=True, pool_type="eos", head_bias=False, act="quick_gelu",
                        ln_eps=1e-5)
        cfg.bias_init = None
        cfg.temperature_init = 1 / 0.07
    return cfg


def random_variables(model, cfg, seed):
    """Our param tree filled with N(0, 0.2) (every bias and scale non-trivial)."""
    import ml_collections
    abstract = M.abstract_variables(model, ml_collections.ConfigDict({"model": cfg}))
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda a: jnp.asarray(rs.normal(0, 0.2, a.shape), jnp.float32), abstract)


@pytest.mark.parametrize("kind", ["siglip", "clip", "siglip2"])
def test_our_model_saved_loads_in_transformers_with_same_outputs(kind, tmp_path):
    cfg = tiny_config(kind)
    model = M.build(cfg)
    variables = random_variables(model, cfg, seed=5)
    path = hf.save(model, variables, str(tmp_path / kind))
    cls = {"siglip": tr.SiglipModel, "clip": tr.CLIPModel, "siglip2": tr.Siglip2Model}[kind]
    ref = cls.from_pretrained(path).eval()  # raises on any missing / mismatched weight
    ids, mask = clip_ids(seed=7) if kind == "clip" else siglip_ids(seed=7)
    if kind == "siglip2":
        inputs = naflex_inputs(seed=6)
        with torch.no_grad():
            fi = hf_features(ref.get_image_features(**inputs)).numpy()
        close(hf.image_features(model, variables, **inputs), fi)
        x = None  # logits: see the siglip2 import test
    else:
        x = pixels(seed=6)
        fi, _, _ = torch_outputs(ref, x, ids, mask)
        apply = jax.jit(model.apply, static_argnames="method")
        close(np.asarray(apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)),
                               method="encode_image")), fi)
    with torch.no_grad():
        ft = hf_features(ref.get_text_features(input_ids=torch.tensor(ids),
                                               attention_mask=torch.tensor(mask))).numpy()
    close(hf.text_features(model, variables, ids, mask), ft)
    if x is not None:
        with torch.no_grad():
            logits = ref(pixel_values=torch.tensor(x), input_ids=torch.tensor(ids)).logits_per_image
        close(our_logits(model, variables, x, ids), logits.numpy(), atol=1e-4)

    # ... and our own loader gives back exactly what was saved.
    model2, variables2 = hf.load(path)
    assert model2.clone(temperature_init=model.temperature_init) == model  # exp(log(t)) rounding
    a, b = flatten(variables["params"]), flatten(variables2["params"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_bfloat16_checkpoint_loads_as_float32(siglip_dir, tmp_path):
    ref, _ = siglip_dir
    path = str(tmp_path / "bf16")
    cfg = ref.config
    half = tr.SiglipModel(cfg)
    half.load_state_dict(ref.state_dict())
    half.to(torch.bfloat16).save_pretrained(path)
    model, variables = hf.load(path)
    kernel = variables["params"]["txt"]["head"]["kernel"]
    assert kernel.dtype == jnp.float32
    want = ref.text_model.head.weight.detach().to(torch.bfloat16).float().numpy().T
    np.testing.assert_array_equal(np.asarray(kernel), want)


# ---------------------------------------------------------------- errors

def test_mismatched_checkpoint_error_lists_missing_unexpected_and_shapes(siglip_dir, tmp_path):
    _, path = siglip_dir
    from safetensors.numpy import load_file, save_file
    bad = str(tmp_path / "bad")
    shutil.copytree(path, bad)
    file = os.path.join(bad, "model.safetensors")
    t = load_file(file)
    del t["text_model.final_layer_norm.bias"]
    t["vision_model.extra.weight"] = np.zeros(3, np.float32)
    t["vision_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((65, 32), np.float32)
    save_file(t, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as e:
        hf.load(bad)
    msg = str(e.value)
    assert "text_model.final_layer_norm.bias" in e.value.missing
    assert "vision_model.extra.weight" in e.value.unexpected
    assert "vision_model.encoder.layers.1.mlp.fc1.weight" in msg and "(65, 32)" in msg
    assert len(e.value.mismatched) == 1


def test_config_that_disagrees_with_weights_is_reported(siglip_dir, tmp_path):
    _, path = siglip_dir
    bad = str(tmp_path / "deeper")
    shutil.copytree(path, bad)
    with open(os.path.join(bad, "config.json")) as f:
        cfg = json.load(f)
    cfg["vision_config"]["num_hidden_layers"] = 3
    cfg["text_config"]["intermediate_size"] = 40
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointMismatchError) as e:
        hf.load(bad)
    assert any(k.startswith("vision_model.encoder.layers.2.") for k in e.value.missing)
    assert any("text_model.encoder.layers.0.mlp.fc1.weight" in k for k, *_ in e.value.mismatched)


def test_missing_files_and_unknown_architecture_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="bert"):
        hf.load(str(tmp_path))


def test_save_names_fields_without_a_transformers_counterpart(tmp_path):
    cfg = tiny_config("siglip")
    cfg.image.pool_type = "gap"
    cfg.text.causal = True
    model = M.build(cfg)
    with pytest.raises(ValueError, match=r"image.pool_type='gap'.*text.causal=True"):
        hf.save(model, random_variables(model, cfg, 0), str(tmp_path / "x"))


def test_save_reports_params_that_do_not_fit_the_model(tmp_path):
    cfg = tiny_config("siglip")
    model = M.build(cfg)
    variables = random_variables(model, cfg, 0)
    params = dict(variables["params"], extra=jnp.zeros(2), t=jnp.zeros((2,)))
    del params["b"]
    with pytest.raises(CheckpointMismatchError) as e:
        hf.save(model, {"params": params}, str(tmp_path / "x"))
    assert e.value.missing == ["b"] and e.value.unexpected == ["extra"]
    assert e.value.mismatched == [("t", (2,), (1,))]
    assert not os.path.exists(tmp_path / "x")  # nothing half-written


def test_config_defaults_equal_transformers_defaults():
    classes = {"siglip": (tr.SiglipTextConfig, tr.SiglipVisionConfig, tr.SiglipConfig),
               "clip": (tr.CLIPTextConfig, tr.CLIPVisionConfig, tr.CLIPConfig),
               "siglip2": (tr.Siglip2TextConfig, tr.Siglip2VisionConfig, tr.Siglip2Config)}
    for kind, (tc, vc, top) in classes.items():
        for part, cls in (("text", tc), ("vision", vc), ("top", top)):
            ref = cls().to_dict()
            for k, v in hf.HF_DEFAULTS[kind][part].items():
                if k == "projection_size":  # None -> hidden_size in transformers' __post_init__
                    assert ref[k] == ref["hidden_size"]
                else:
                    assert ref[k] == v, (kind, part, k)


def test_load_and_save_do_not_import_torch(siglip_dir, tmp_path):
    import subprocess
    import sys
    _, path = siglip_dir
    code = (
        "import sys, numpy as np\n"
        "from vlm_jax.interop import hf\n"
        f"model, variables = hf.load({path!r})\n"
        f"hf.save(model, variables, {str(tmp_path / 'out')!r})\n"
        "hf.image_features(model, variables, np.zeros((1, 3, 32, 32), np.float32))\n"
        "hf.text_features(model, variables, np.zeros((1, 8), np.int32), np.ones((1, 8)))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n")
    env = subprocess_env()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_load_overrides_change_compute_fields_but_not_weights(siglip_dir):
    _, path = siglip_dir
    model, variables = hf.load(path, overrides={"dtype": "bfloat16", "image": {"remat": True}})
    assert model.dtype == jnp.bfloat16 and model.image.remat
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    with pytest.raises(ValueError, match="model.image.widht"):
        hf.load(path, overrides={"image": {"widht": 3}})
    with pytest.raises(CheckpointMismatchError, match="mlp.fc1.weight"):
        hf.load(path, overrides={"image": {"mlp_dim": 80}})


def test_merged_lora_saved_loads_in_transformers_with_the_unmerged_features(tmp_path):
    """LoRA fine-tune -> finetune.merge_lora -> hf.save -> transformers: the features of
    the model that trained (base kernels plus scale * A @ B, applied unmerged)."""
    from vlm_jax import config_util, finetune  # pylint: disable=import-outside-toplevel
    cfg = tiny_config("siglip")
    model = M.build(cfg)
    variables = random_variables(model, cfg, seed=5)
    c = config_util.base_config()
    c.finetune.lora.rank, c.finetune.lora.alpha = 4, 8.0
    params = finetune.add_lora(c, variables, jax.random.PRNGKey(1))["params"]
    rs = np.random.RandomState(2)  # trained B factors: not zero
    params = flatten(params)
    for k in params:
        if k.endswith(finetune.LORA_B):
            params[k] = jnp.asarray(rs.normal(0, 0.2, params[k].shape), jnp.float32)
    params = finetune._unflat(params)  # pylint: disable=protected-access
    x, (ids, mask) = pixels(seed=6), siglip_ids(seed=7)
    nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    unmerged = np.asarray(model.apply({"params": finetune.view(c)(params)}, nhwc,
                                      method="encode_image"))
    base = np.asarray(model.apply(variables, nhwc, method="encode_image"))
    assert np.abs(unmerged - base).max() > 1e-2  # the LoRA update matters
    path = hf.save(model, {"params": finetune.merge_lora(params)}, str(tmp_path / "merged"))
    ref = tr.SiglipModel.from_pretrained(path).eval()
    fi, _, _ = torch_outputs(ref, x, ids, mask)
    close(unmerged, fi, rtol=1e-5, atol=1e-6)  # the acceptance bound
