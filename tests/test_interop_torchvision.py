"""torchvision interop: file formats, key checking, export, and layouts of every supported arch.

Logit parity lives in test_resnet.py / test_convnext.py; here the reference is
torchvision's state_dict itself (random weights, nothing downloaded).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tv = pytest.importorskip("torchvision")

from vlm_jax.interop import CheckpointMismatchError, flatten  # noqa: E402
from vlm_jax.interop import torchvision as tvi  # noqa: E402
from vlm_jax.models import convnext, resnet  # noqa: E402

torch.set_num_threads(1)


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("layer_scale"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + float(name.endswith("weight")))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("num_batches_tracked"):
                b.fill_(1234)
    return model.eval()


@pytest.fixture(scope="module")
def r18():
    """(torch state_dict with num_batches_tracked, the variables loaded from it)."""
    sd = randomize(tv.models.resnet18(), seed=0).state_dict()
    model, variables = tvi.load("resnet18", sd)
    return sd, model, variables


def assert_same_variables(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_load_maps_every_tensor_and_skips_num_batches_tracked(r18):
    sd, model, variables = r18
    assert set(variables) == {"params", "batch_stats"}
    n_ours = len(flatten(variables))
    n_torch = len([k for k in sd if not k.endswith("num_batches_tracked")])
    assert n_ours == n_torch
    assert not any("num_batches" in k for k in flatten(variables))
    # The same weights without the counters load to the same variables.
    _, v2 = tvi.load("resnet18", {k: v.numpy() for k, v in sd.items()
                                  if not k.endswith("num_batches_tracked")})
    assert_same_variables(variables, v2)
    p = variables["params"]["img"]
    np.testing.assert_array_equal(p["conv_root"]["kernel"],
                                  sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["block2"]["unit1"]["bn_proj"]["bias"],
                                  sd["layer2.0.downsample.1.bias"].numpy())
    np.testing.assert_array_equal(variables["batch_stats"]["img"]["block4"]["unit2"]["bn1"]["var"],
                                  sd["layer4.1.bn1.running_var"].numpy())
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"], sd["fc.weight"].numpy().T)


def test_mismatch_error_names_missing_unexpected_and_misshaped_keys(r18):
    sd = {k: v.numpy() for k, v in r18[0].items()}
    del sd["layer1.0.conv1.weight"]
    sd["layer5.0.conv1.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    sd["layer2.1.bn2.running_var"] = np.ones((7,), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        tvi.load("resnet18", sd)
    err = e.value
    assert err.missing == ["layer1.0.conv1.weight"]
    assert err.unexpected == ["layer5.0.conv1.weight"]
    assert err.mismatched == [("layer2.1.bn2.running_var", (7,), (128,))]
    for key in ("layer1.0.conv1.weight", "layer5.0.conv1.weight", "layer2.1.bn2.running_var"):
        assert key in str(err)
    # Another arch's checkpoint is reported, not silently half-loaded.
    with pytest.raises(CheckpointMismatchError, match="conv3"):
        tvi.load("resnet50", sd)


def test_safetensors_and_pth_files_load_like_the_dict(r18, tmp_path):
    from safetensors.numpy import save_file
    sd, _, variables = r18
    st = tmp_path / "r18.safetensors"
    save_file({k: v.numpy() for k, v in sd.items()}, str(st))
    pth = tmp_path / "r18.pth"
    torch.save(sd, pth)
    # Training scripts wrap weights and DataParallel prefixes every key.
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    for path in (st, str(pth), wrapped):
        model, v = tvi.load("resnet18", path)
        assert model.num_classes == 1000
        assert_same_variables(variables, v)
    bad = tmp_path / "r18.npz"
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        tvi.load("resnet18", bad)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tvi.load("resnet18", tmp_path / "nope.pth")


def test_class_count_follows_the_checkpoint_head(r18):
    sd = dict(r18[0])
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    model, v = tvi.load("resnet18", sd)
    assert model.num_classes == 10 and v["params"]["head"]["kernel"].shape == (512, 10)


def test_unknown_arch_is_named():
    with pytest.raises(ValueError, match="resnet19"):
        tvi.load("resnet19", {})


@pytest.mark.parametrize("arch", ["resnet18", "convnext_tiny"])
def test_to_state_dict_loads_strictly_into_torchvision(arch, r18):
    if arch == "resnet18":
        sd, _, variables = r18
    else:
        sd = randomize(tv.models.convnext_tiny(), seed=1).state_dict()
        variables = tvi.load(arch, sd)[1]
    out = tvi.to_state_dict(arch, variables)
    target = getattr(tv.models, arch)()
    target.load_state_dict({k: torch.from_numpy(v) for k, v in out.items()}, strict=True)
    for k, v in target.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
    headless = {**variables, "params": {"img": variables["params"]["img"]}}
    with pytest.raises(CheckpointMismatchError, match="head"):
        tvi.to_state_dict(arch, headless)


@pytest.mark.parametrize("arch", ["resnet34", "resnet152", "wide_resnet101_2", "convnext_small",
                                  "convnext_large"])
def test_expected_keys_and_shapes_equal_torchvision(arch):
    with torch.device("meta"):  # no memory, no init: only names and shapes
        tm = getattr(tv.models, arch)()
    ref = {k: tuple(v.shape) for k, v in tm.state_dict().items()
           if not k.endswith("num_batches_tracked")}
    assert tvi.torch_shapes(arch) == ref


def test_depth_and_width_tables_equal_torchvision_for_every_arch():
    """The cheap half of the layout check, for all archs: blocks per stage and channels."""
    for arch, (family, kw) in tvi.ARCHS.items():
        with torch.device("meta"):
            tm = getattr(tv.models, arch)()
        if family == "resnet":
            v = resnet.decode_resnet_variant(kw["depth"])
            stages = [getattr(tm, f"layer{i}") for i in (1, 2, 3, 4)]
            assert tuple(len(s) for s in stages) == v["stage_depths"], arch
            inner = stages[0][0].conv1.out_channels
            assert inner == 64 * kw.get("width_factor", 1), arch
            assert (type(stages[0][0]).__name__ == "Bottleneck") == v["bottleneck"], arch
        else:
            v = convnext.decode_variant(kw["variant"])
            blocks = [tm.features[i] for i in (1, 3, 5, 7)]
            assert tuple(len(b) for b in blocks) == v["stage_depths"], arch
            assert tuple(b[0].block[0].in_channels for b in blocks) == v["widths"], arch
