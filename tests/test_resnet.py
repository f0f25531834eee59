"""ResNet (torchvision layout), BiT ResNet and the hybrid-ViT ResNet stem.

Parity references are torchvision's own models with random weights and random
BatchNorm statistics (torch CPU, fixed seeds); nothing is downloaded.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tv = pytest.importorskip("torchvision")

from vlm_jax.interop import torchvision as tvi  # noqa: E402
from vlm_jax.models import layers, resnet  # noqa: E402
from vlm_jax.models.vit import ViT  # noqa: E402

torch.set_num_threads(1)
RTOL = 1e-5  # max |ours - torch| / max |torch|


def randomize(model, seed):
    """Random affine BN params and running statistics (the init's 1/0/0/1 would hide layout bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + float(name.endswith("weight")))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def rel_err(got, ref):
    return float(np.max(np.abs(np.asarray(got) - ref)) / np.max(np.abs(ref)))


def nchw(seed, b, h, w):
    return np.random.RandomState(seed).randn(b, 3, h, w).astype(np.float32)


@pytest.fixture(scope="module")
def resnet18():
    tm = randomize(tv.models.resnet18(), seed=0)
    model, variables = tvi.load("resnet18", tm.state_dict())
    return tm, model, variables


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_logits_match_torchvision_square_and_non_square(arch, request):
    if arch == "resnet18":
        tm, model, variables = request.getfixturevalue("resnet18")
    else:
        tm = randomize(tv.models.resnet50(), seed=1)
        model, variables = tvi.load(arch, tm.state_dict())
    apply = jax.jit(model.apply)
    # resnet18: a square batch and a non-square image; resnet50: odd, non-square sizes
    # (torch's floor((n + 2p - k) / s) + 1 at every stride).
    inputs = [nchw(0, 2, 64, 64), nchw(1, 1, 61, 96)] if arch == "resnet18" else [nchw(1, 2, 67, 45)]
    for x in inputs:
        with torch.no_grad():
            ref = tm(torch.from_numpy(x)).numpy()
        got = apply(variables, x.transpose(0, 2, 3, 1))
        assert got.shape == ref.shape
        assert rel_err(got, ref) < RTOL, (arch, x.shape, rel_err(got, ref))


def test_input_gradient_matches_torchvision(resnet18):
    tm, model, variables = resnet18
    x = nchw(2, 2, 64, 64)
    w = np.random.RandomState(3).randn(2, 1000).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    (tm(xt) * torch.from_numpy(w)).sum().backward()
    ref = xt.grad.numpy().transpose(0, 2, 3, 1)
    got = jax.jit(jax.grad(lambda im: jnp.sum(model.apply(variables, im) * w)))(
        x.transpose(0, 2, 3, 1))
    assert rel_err(got, ref) < RTOL


def test_train_mode_batchnorm_matches_torch(resnet18):
    """Batch statistics in the forward; running means move as torch's momentum 0.1 does."""
    tm, model, variables = resnet18
    before = {k: v.clone() for k, v in tm.state_dict().items()}
    x = nchw(4, 2, 64, 64)
    tm.train()
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    after = {k: v.clone() for k, v in tm.state_dict().items()}
    tm.load_state_dict(before)
    tm.eval()
    logits, updates = model.apply(variables, x.transpose(0, 2, 3, 1), train=True,
                                  mutable=["batch_stats"])
    assert rel_err(logits, ref) < 1e-4
    ours = tvi.to_state_dict("resnet18", {"params": variables["params"], **updates})
    means = [k for k in after if k.endswith("running_mean")]
    assert len(means) == 20
    for k in means:
        np.testing.assert_allclose(ours[k], after[k].numpy(), rtol=1e-4, atol=1e-5, err_msg=k)
        assert not np.allclose(ours[k], before[k].numpy())
    # Documented difference: flax feeds the biased batch variance into the running
    # variance, torch the unbiased one. For the root BN, n = 2 * 32 * 32 pixels.
    v0, n = before["bn1.running_var"].numpy(), 2 * 32 * 32
    ours_batch = (ours["bn1.running_var"] - 0.9 * v0) / 0.1
    torch_batch = (after["bn1.running_var"].numpy() - 0.9 * v0) / 0.1
    np.testing.assert_allclose(torch_batch, ours_batch * n / (n - 1), rtol=1e-3)


@pytest.mark.parametrize("variant,channels", [("18", (64, 128, 256, 512)),
                                              ("50", (256, 512, 1024, 2048))])
def test_stage_features_and_pooling(variant, channels):
    m = resnet.ResNet(**resnet.decode_resnet_variant(variant), pool_type="gap")
    x = jnp.zeros((2, 64, 96, 3))
    variables = jax.eval_shape(m.init, jax.random.key(0), x)
    y, out = jax.eval_shape(lambda v: m.apply(v, x), variables)
    assert out["stem"].shape == (2, 16, 24, 64)
    for s, (c, (h, w)) in enumerate(zip(channels, [(16, 24), (8, 12), (4, 6), (2, 3)])):
        assert out[f"stage{s + 1}"].shape == (2, h, w, c)
    assert y.shape == out["pre_logits"].shape == (2, channels[-1])
    y, _ = jax.eval_shape(lambda v: m.clone(pool_type="none").apply(v, x), variables)
    assert y.shape == (2, 2, 3, channels[-1])
    with pytest.raises(ValueError, match="pool_type"):
        m.clone(pool_type="map").init(jax.random.key(0), x)


def random_variables(model, x, seed=0):
    """Variables of ``model`` filled with numpy noise (shapes from eval_shape: no init compile)."""
    rs = np.random.RandomState(seed)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
        + 0.1 * rs.randn(*a.shape).astype(np.float32), shapes)


def test_zero_init_residual_zeroes_only_the_last_bn_of_each_branch():
    units = {  # (unit, channels in, last BN of the branch)
        "basic": (resnet.BasicUnit(8, strides=2), 4, "bn2"),
        "bottleneck": (resnet.BottleneckUnit(4, strides=2), 8, "bn3"),
        "bottleneck-off": (resnet.BottleneckUnit(4, zero_init_residual=False), 16, "bn3"),
    }
    # One compile for all inits; rbg keys compile faster than threefry and values don't matter.
    inits = jax.jit(lambda k: {n: nn.meta.unbox(u.init(k, jnp.zeros((1, 8, 8, c))))["params"]
                               for n, (u, c, _) in units.items()})(
        jax.random.key(0, impl="unsafe_rbg"))
    for n, (unit, _, last) in units.items():
        p = inits[n]
        assert ("bn_proj" in p) == (unit.strides == 2)
        for name in [k for k in p if k.startswith("bn")]:
            want = 0.0 if (unit.zero_init_residual and name == last) else 1.0
            np.testing.assert_array_equal(p[name]["scale"], want, err_msg=f"{n}/{name}")


def _assert_named(params):
    """Every non-scalar param carries one logical name per dimension."""
    specs = nn.get_partition_spec(params)
    flat = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params))
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert len(flat) == len(spec_leaves) > 0
    for (path, leaf), spec in zip(flat, spec_leaves):
        if leaf.ndim:
            assert len(spec) == leaf.ndim, (jax.tree_util.keystr(path), spec)


@pytest.mark.parametrize("model", [
    resnet.ResNet(stage_depths=(1, 1, 1, 1), bottleneck=False),
    resnet.ResNet(stage_depths=(1, 1, 1, 1), width_factor=2, dtype=jnp.bfloat16),
    resnet.BiTResNet(stage_depths=(1, 1, 1, 1)),
    resnet.BiTResNet(stage_depths=(1, 1, 1, 1), preact=False),
    ViT(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=1, stem="resnet",
        stem_depths=(1, 1), image_size=32),
], ids=["resnet-basic", "wide-resnet-bf16", "bit-v2", "bit-v1", "vit-hybrid"])
def test_every_param_has_logical_axis_names(model):
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    _assert_named(variables["params"])
    # Parameters stay float32 whatever the compute dtype.
    assert {a.dtype for a in jax.tree.leaves(nn.meta.unbox(variables))} == {jnp.dtype("float32")}


def test_decode_variants():
    assert resnet.decode_resnet_variant("34") == dict(stage_depths=(3, 4, 6, 3), bottleneck=False)
    assert resnet.decode_resnet_variant(152)["stage_depths"] == (3, 8, 36, 3)
    assert resnet.decode_bit_variant("101x3") == dict(stage_depths=(3, 4, 23, 3), width_factor=3)
    for bad in ("21", "B/16"):
        with pytest.raises(ValueError, match="ResNet variant"):
            resnet.decode_resnet_variant(bad)
    for bad in ("50", "51x1", "50x0", "50xa"):
        with pytest.raises(ValueError, match="BiT variant"):
            resnet.decode_bit_variant(bad)


def test_from_config_reads_the_documented_keys():
    m = resnet.from_config({"type": "resnet", "variant": "18", "pool_type": "none",
                            "bn_momentum": 0.99, "zero_init_residual": False, "width": 768},
                           dtype=jnp.bfloat16)
    assert isinstance(m, resnet.ResNet) and not m.bottleneck and m.width == 64
    assert (m.pool_type, m.bn_momentum, m.zero_init_residual, m.dtype) == (
        "none", 0.99, False, jnp.bfloat16)
    b = resnet.from_config({"type": "bit", "variant": "101x3", "stage_depths": (1, 1)}, dtype=jnp.float32)
    assert isinstance(b, resnet.BiTResNet) and b.width_factor == 3 and b.stage_depths == (1, 1)
    with pytest.raises(ValueError, match="'vit'"):
        resnet.from_config({"type": "vit"})


# ---------------------------------------------------------------- BiT

def test_bit_forward_shapes_non_square():
    # Shapes only (traced, not compiled); the numerics run in the invariance test below.
    m = resnet.BiTResNet(stage_depths=(1, 1, 1, 1))
    x = jnp.zeros((2, 64, 96, 3))
    y, out = jax.eval_shape(lambda: m.init_with_output(jax.random.key(0), x)[0])
    assert y.shape == out["pre_logits"].shape == (2, 2048)
    assert out["stem"].shape == (2, 16, 24, 64)
    assert [out[f"stage{s}"].shape for s in (1, 2, 3, 4)] == [
        (2, 16, 24, 256), (2, 8, 12, 512), (2, 4, 6, 1024), (2, 2, 3, 2048)]
    # Widths scale with the variant's factor ("x3"); checked on shapes only.
    wide = resnet.BiTResNet(**resnet.decode_bit_variant("50x3"), pool_type="none")
    y3, out3 = jax.eval_shape(lambda: wide.init_with_output(jax.random.key(0), x)[0])
    assert y3.shape == (2, 2, 3, 6144) and out3["stem"].shape == (2, 16, 24, 192)


def test_standardize_kernel_normalises_each_output_channel():
    rs = np.random.RandomState(0)
    k = rs.randn(3, 3, 4, 8) * rs.uniform(0.1, 3, 8) + rs.randn(8)
    for eps_on_std in (False, True):
        s = np.asarray(layers.standardize_kernel(k, 1e-10, eps_on_std))
        np.testing.assert_allclose(s.mean(axis=(0, 1, 2)), 0, atol=1e-5)
        np.testing.assert_allclose(s.std(axis=(0, 1, 2)), 1, rtol=1e-4)


@pytest.mark.parametrize("preact,tol", [(True, 1e-4), (False, 1e-3)])
def test_bit_output_ignores_per_channel_affine_changes_of_every_kernel(preact, tol):
    """Weight standardisation: scaling / shifting any conv kernel per output channel changes nothing.

    Up to float32 rounding; v1 adds eps=1e-5 to the std (not under the root), so its
    invariance is only approximate. An unstandardised kernel would change y by O(1).
    """
    m = resnet.BiTResNet(stage_depths=(1, 1), preact=preact)
    x = jax.random.normal(jax.random.key(0), (2, 32, 48, 3))
    params = random_variables(m, x)["params"]
    rs = np.random.RandomState(1)

    def perturb(path, k):
        if jax.tree_util.keystr(path).endswith("['kernel']"):
            return k * rs.uniform(1.5, 3.0, k.shape[-1]) + rs.randn(k.shape[-1])
        return k

    changed = jax.tree_util.tree_map_with_path(perturb, params)
    n_changed = sum(not np.allclose(a, b) for a, b in
                    zip(jax.tree.leaves(params), jax.tree.leaves(changed)))
    assert n_changed == 9  # conv_root + 2 units x (conv1, conv2, conv3, conv_proj)
    f = jax.jit(m.apply)
    y0, _ = f({"params": params}, x)
    y1, _ = f({"params": changed}, x)
    assert rel_err(y1, np.asarray(y0)) < tol
    assert y0.shape == (2, 512) and np.all(np.isfinite(y0)) and np.abs(np.asarray(y0)).max() > 0


# ---------------------------------------------------------------- hybrid ViT

def test_hybrid_vit_r50_stem_token_grid():
    vit = ViT(width=64, depth=1, mlp_dim=64, num_heads=2, patch_size=1, stem="resnet",
              stem_depths=(3, 4, 9), image_size=64, pool_type="gap")
    assert vit.total_stride == (16, 16) and vit.grid_size == (4, 4)
    x = jnp.zeros((2, 64, 96, 3))
    variables = jax.eval_shape(vit.init, jax.random.key(0), x)
    y, out = jax.eval_shape(lambda v: vit.apply(v, x), variables)
    assert out["stem"].shape == (2, 4, 6, 64) and y.shape == (2, 64)
    p = variables["params"]
    assert [len(p[f"block{s}"]) for s in (1, 2, 3)] == [3, 4, 9]
    assert p["embedding"]["kernel"].value.shape == (1, 1, 1024, 64)  # R50 stage-3 channels
    assert "gn_root" in p and "conv_root" in p
    with pytest.raises(ValueError, match="total stride"):
        jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, 40, 48, 3)))


def test_hybrid_stem_runs_and_patch_size_multiplies_its_stride():
    vit = ViT(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=2, stem="resnet",
              stem_depths=(1, 1), image_size=32, pool_type="none")
    assert vit.total_stride == (16, 16)
    assert vit.clone(stem_depths=()).total_stride == (8, 8)  # root only: stride 4
    x = jax.random.normal(jax.random.key(0), (2, 32, 48, 3))
    y, out = jax.jit(vit.apply)(random_variables(vit, x), x)
    assert out["stem"].shape == (2, 2, 3, 32) and y.shape == (2, 6, 32)
    assert np.all(np.isfinite(y))
