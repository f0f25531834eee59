"""open_clip interop: RN50 / ViT-B-32 (and -quickgelu) checkpoints give open_clip's features.

References are open_clip's own models with random weights (``pretrained=None``, torch CPU,
fixed seeds; nothing is downloaded). BatchNorm running stats, biases and LayerNorm
affines are randomised so that none of them is trivially 0 or 1. Each large model is
created, converted and run once per module; shape-only properties (non-square ViTs,
odd input sizes, gradients, file formats, errors) use tiny open_clip CLIP models built
from open_clip's own classes and loaded under a real name (the loader reads every size
from tensor shapes).
"""

import functools
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from recipes import subprocess_env

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from open_clip.model import CLIP  # noqa: E402
from open_clip.transformer import QuickGELU  # noqa: E402

from vlm_jax.interop import CheckpointMismatchError, flatten  # noqa: E402
from vlm_jax.interop import open_clip as oc  # noqa: E402
from vlm_jax.models import clip_resnet  # noqa: E402

torch.set_num_threads(2)
B = 2
TOL = 1e-5  # max over rows of ||ours - theirs|| / ||theirs||


def randomize(model, seed):
    """Non-trivial BatchNorm stats/affines, LayerNorm affines, biases and logit scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5, generator=g)  # also turns on open_clip's zeroed bn3
                mod.bias.normal_(0, 0.1, generator=g)
                mod.running_mean.normal_(0, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.8, 1.2, generator=g)
                mod.bias.normal_(0, 0.05, generator=g)
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.ndim == 1 and not _is_norm(model, name):
                p.normal_(0, 0.05, generator=g)
        model.logit_scale.fill_(float(np.log(1 / 0.05)))  # not open_clip's init value
    return model.eval()


def _is_norm(model, param_name):
    mod = model.get_submodule(param_name.rsplit(".", 1)[0])
    return isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.LayerNorm))


def tokens(ctx, vocab, seed=1):
    """CLIP rows: SOT (vocab-2), random ids, EOT (vocab-1, the largest id), zero padding."""
    rs = np.random.RandomState(seed)
    out = np.zeros((B, ctx), np.int64)
    for i, n in enumerate([5, ctx - 2][:B]):
        out[i, 0] = vocab - 2
        out[i, 1:n - 1] = rs.randint(1, vocab - 2, n - 2)
        out[i, n - 1] = vocab - 1
    return out


def pixels(h, w, seed=0):
    return np.random.RandomState(seed).randn(B, 3, h, w).astype(np.float32)


def nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def rel(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.linalg.norm(ours - theirs, axis=-1) / np.linalg.norm(theirs, axis=-1)))


def torch_outputs(model, x, tok):
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(x))
        # encode_image(normalize=True) is F.normalize of this; one forward instead of two.
        return dict(zimg=torch.nn.functional.normalize(img, dim=-1).numpy(), img=img.numpy(),
                    ztxt=model.encode_text(torch.from_numpy(tok), normalize=True).numpy(),
                    t=float(model.logit_scale.exp()))


def our_outputs(model, variables, x, tok):
    images, tok = jnp.asarray(nhwc(x)), jnp.asarray(tok, jnp.int32)
    zimg, ztxt, out = jax.jit(model.apply)(variables, images, tok)
    return dict(zimg=np.asarray(zimg), img=np.asarray(out["img/features"]), ztxt=np.asarray(ztxt),
                t=float(out["t"]), b=float(out["b"]))


def assert_parity(ours, theirs):
    errs = {k: rel(ours[k], theirs[k]) for k in ("zimg", "img", "ztxt")}
    assert max(errs.values()) < TOL, errs
    assert ours["t"] == pytest.approx(theirs["t"], rel=1e-6)
    assert ours["b"] == 0.0
    return errs


def full_model(name, seed):
    torch.manual_seed(seed)
    model = randomize(open_clip.create_model(name, pretrained=None), seed)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x, tok = pixels(size, size, seed), tokens(model.context_length, model.vocab_size, seed)
    return model, x, tok


def test_rn50_gives_open_clip_features():
    tm, x, tok = full_model("RN50", seed=0)
    theirs = torch_outputs(tm, x, tok)
    model, variables = oc.load("RN50", tm.state_dict())
    del tm
    assert set(variables) == {"params", "batch_stats"}
    assert isinstance(model.image, clip_resnet.ClipModifiedResNet)
    img = model.image
    assert (img.layers, img.width, img.image_size, img.out_dim) == ((3, 4, 6, 3), 64, 224, 1024)
    errs = assert_parity(our_outputs(model, variables, x, tok), theirs)
    print("RN50 max relative error", errs)


def test_vit_b32_gives_open_clip_features():
    tm, x, tok = full_model("ViT-B-32", seed=1)
    act = tm.transformer.resblocks[0].mlp.gelu  # open_clip's plain names: exact GELU
    assert type(act) is torch.nn.GELU and act.approximate == "none"
    theirs = torch_outputs(tm, x, tok)
    model, variables = oc.load("ViT-B-32", tm.state_dict())
    del tm
    assert model.image.act == model.text.act == "gelu"
    errs = assert_parity(our_outputs(model, variables, x, tok), theirs)
    print("ViT-B-32 max relative error", errs)


def _plain(cfg):
    """open_clip configs that only set the fields our loader understands."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return (set(cfg) <= {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
            and set(v) <= {"layers", "width", "patch_size", "image_size", "head_width", "mlp_ratio"}
            and set(t) <= {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"})


def test_names_agree_with_open_clip_model_configs():
    plain = 0
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if not _plain(cfg):
            with pytest.raises(ValueError, match="not supported"):
                oc.parse_name(name)
            continue
        plain += 1
        info = oc.parse_name(name)
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        assert info["quick_gelu"] == cfg.get("quick_gelu", False), name
        assert t["heads"] == t["width"] // 64, name  # what the loader assumes for text towers
        if isinstance(v["layers"], (list, tuple)):
            assert info["kind"] == "resnet", name
            assert clip_resnet.VARIANTS[info["variant"]] == (
                tuple(v["layers"]), v["width"], cfg["embed_dim"], v["image_size"]), name
        else:
            assert info["kind"] == "vit", name
            assert info["head_width"] == v.get("head_width", 64), name
    assert plain >= 40  # RN*, ViT-{S,M,B,L,H,g,bigG,e}-* and their -quickgelu twins
    assert oc.parse_name("ViT-B-32", force_quick_gelu=True)["quick_gelu"]


# ---------------------------------------------------------------- tiny models

TEXT = dict(context_length=16, vocab_size=300, width=128, heads=2, layers=1)


def tiny_rn():
    torch.manual_seed(3)
    model = CLIP(embed_dim=48, vision_cfg=dict(layers=[1, 2, 1, 1], width=16, image_size=64),
                 text_cfg=TEXT)
    return randomize(model, 3)


@pytest.fixture(scope="module")
def rn_tiny():
    model = tiny_rn()
    ours, variables = oc.load("RN50", model.state_dict())
    return model, ours, variables


def test_resnet_stages_match_open_clip_at_odd_non_square_sizes(rn_tiny):
    tm, model, variables = rn_tiny
    x = pixels(75, 101, seed=4)  # open_clip's attention pool only takes 64x64: compare the maps
    with torch.no_grad():
        maps = tm.visual.forward_intermediates(torch.from_numpy(x), intermediates_only=True)
    apply = jax.jit(functools.partial(model.apply, tokens=None))
    _, _, out = apply(variables, jnp.asarray(nhwc(x)))
    for name, theirs in zip(["stem", "stage1", "stage2", "stage3", "stage4"],
                            maps["image_intermediates"]):
        theirs = nhwc(theirs.numpy())
        ours = np.asarray(out[f"img/{name}"])
        assert ours.shape == theirs.shape, name
        err = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
        assert err < TOL, (name, err)


def test_files_and_layouts_safetensors_pth_wrapped_torchscript_custom_text_load_the_same(
        rn_tiny, tmp_path):
    from safetensors.torch import save_file
    tm, _, variables = rn_tiny
    sd = tm.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.pth")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}},
               tmp_path / "wrapped.pt")
    with warnings.catch_warnings():  # OpenAI's releases are TorchScript archives like this one
        warnings.simplefilter("ignore")
        x, tok = torch.from_numpy(pixels(64, 64)), torch.from_numpy(tokens(16, 300))
        torch.jit.trace(tm, (x, tok), check_trace=False).save(str(tmp_path / "jit.pt"))
    text = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    custom = {f"text.{k}" if k.startswith(text) else k: v for k, v in sd.items()}
    want = flatten(variables)
    for source in ("m.safetensors", "m.pth", "wrapped.pt", "jit.pt", custom):
        _, got = oc.load("RN50", tmp_path / source if isinstance(source, str) else source)
        got = flatten(got)
        what = source if isinstance(source, str) else "custom-text layout"
        assert set(got) == set(want), what
        for k in want:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]),
                                          err_msg=f"{what}: {k}")


def test_safetensors_load_does_not_import_torch(rn_tiny, tmp_path):
    from safetensors.numpy import save_file
    tensors = {k: v.numpy() for k, v in rn_tiny[0].state_dict().items()}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    code = ("import sys; sys.modules['torch'] = None\n"  # any torch import now fails
            "from vlm_jax.interop import open_clip as oc\n"
            f"m, v = oc.load('RN50', {str(tmp_path / 'm.safetensors')!r})\n"
            "print(sorted(v))")
    env = subprocess_env()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "['batch_stats', 'params']" in res.stdout


def test_mismatched_state_dict_lists_missing_unexpected_and_wrong_shapes(rn_tiny):
    tm = rn_tiny[0]
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    assert any(k.endswith("num_batches_tracked") for k in sd)  # present, yet not reported
    del sd["visual.layer2.1.conv2.weight"]
    sd["visual.layer9.0.conv1.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    sd["visual.attnpool.c_proj.bias"] = np.zeros(47, np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        oc.load("RN50", sd)
    err = e.value
    assert err.missing == ["visual.layer2.1.conv2.weight"]
    assert err.unexpected == ["visual.layer9.0.conv1.weight"]
    assert [m[0].split(" ")[0] for m in err.mismatched] == ["visual.attnpool.c_proj.bias"]
    assert "num_batches_tracked" not in str(err)


def test_wrong_tower_kind_and_unsupported_names_are_named(rn_tiny):
    sd = rn_tiny[0].state_dict()
    with pytest.raises(CheckpointMismatchError, match="use an RN name"):
        oc.load("ViT-B-32", sd)
    for name in ("ViT-B-16-SigLIP", "EVA02-B-16", "coca_ViT-B-32", "ViT-M-16-alt", "RN18"):
        with pytest.raises(ValueError, match=name):
            oc.load(name, sd)


def test_logit_bias_of_sigmoid_trained_clip_becomes_b(rn_tiny):
    sd = dict(rn_tiny[0].state_dict())
    sd["logit_bias"] = torch.tensor([-7.5])
    model, variables = oc.load("RN50", sd)
    assert model.bias_init is not None
    np.testing.assert_allclose(np.asarray(variables["params"]["b"]), [-7.5])
    np.testing.assert_allclose(np.exp(np.asarray(variables["params"]["t"])), 1 / 0.05, rtol=1e-6)


def test_non_square_quickgelu_vit_gives_open_clip_features_and_image_gradients():
    # open_clip's "-quickgelu" configs only set quick_gelu=True, which CLIP(...) receives here.
    assert open_clip.get_model_config("ViT-B-16-quickgelu")["quick_gelu"] is True
    torch.manual_seed(7)
    tm = randomize(CLIP(embed_dim=32, vision_cfg=dict(layers=2, width=128, patch_size=16,
                                                      image_size=(64, 96)),
                        text_cfg=TEXT, quick_gelu=True), 7)
    assert isinstance(tm.transformer.resblocks[0].mlp.gelu, QuickGELU)
    sd = tm.state_dict()
    with pytest.raises(ValueError, match="image_size"):  # 4x6 posemb: the grid is not square
        oc.load("ViT-B-16-quickgelu", sd)
    model, variables = oc.load("ViT-B-16-quickgelu", sd, image_size=(64, 96))
    assert tuple(model.image.image_size) == (64, 96)
    assert model.image.act == model.text.act == "quick_gelu"

    x, tok = pixels(64, 96, seed=8), tokens(16, 300, seed=8)
    w = np.random.RandomState(9).randn(B, 32).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    img = tm.encode_image(xt)
    (torch.nn.functional.normalize(img, dim=-1) * torch.from_numpy(w)).sum().backward()
    with torch.no_grad():
        theirs = dict(zimg=torch.nn.functional.normalize(img, dim=-1).numpy(), img=img.numpy(),
                      ztxt=tm.encode_text(torch.from_numpy(tok), normalize=True).numpy(),
                      t=float(tm.logit_scale.exp()))

    def loss(images):  # one compile gives the features and the image gradient
        zimg, ztxt, out = model.apply(variables, images, jnp.asarray(tok, jnp.int32))
        aux = dict(zimg=zimg, img=out["img/features"], ztxt=ztxt, t=out["t"], b=out["b"])
        return jnp.sum(zimg * w), aux

    grad, aux = jax.jit(jax.grad(loss, has_aux=True))(jnp.asarray(nhwc(x)))
    ours = {k: np.asarray(v) if np.ndim(v) else float(v) for k, v in aux.items()}
    errs = assert_parity(ours, theirs)
    gerr = rel(np.asarray(grad).reshape(B, -1), nhwc(xt.grad.numpy()).reshape(B, -1))
    print("non-square quickgelu ViT max relative error", errs, "image gradient", gerr)
    assert gerr < TOL
    # The activation matters at this tolerance: with exact GELU open_clip gives other features.
    for blk in [*tm.visual.transformer.resblocks, *tm.transformer.resblocks]:
        blk.mlp.gelu = torch.nn.GELU()
    assert rel(torch_outputs(tm, x, tok)["zimg"], ours["zimg"]) > 100 * TOL
