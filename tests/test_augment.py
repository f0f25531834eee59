"""Augmentations: host policies agree with torchvision op for op, batch mixers with timm."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import augment

FILL = (128, 64, 200)  # Distinct per channel, so a channel mix-up in fill handling shows.


def _image(h, w, seed=0):
    # Noise over a gradient, inside 30-240: every op changes it (autocontrast has
    # room to stretch, solarize thresholds fall inside the range, shears move edges).
    rng = np.random.default_rng(seed)
    grad = np.linspace(0, 60, w)[None, :, None] + np.linspace(0, 40, h)[:, None, None]
    return (rng.integers(30, 140, (h, w, 3)) + grad).astype(np.uint8)


@pytest.fixture(scope="module")
def tv():
    pytest.importorskip("torch")
    return pytest.importorskip("torchvision.transforms.autoaugment")


@pytest.fixture(scope="module")
def timm_mixup():
    pytest.importorskip("torch")
    return pytest.importorskip("timm.data.mixup")


def _tv_op(tv, img, name, m):
    # torchvision's own mapping of (op, magnitude) to functional calls on PIL, the
    # reference our table and parameter reading must agree with.
    return np.asarray(tv._apply_op(img, name, m, tv.InterpolationMode.NEAREST, list(FILL)))


def _test_magnitudes(name, hw):
    """Magnitudes to probe for op ``name``: a few bins of both policies' tables, both signs,
    plus off-grid values (fractional pixels and degrees) to pin rounding conventions."""
    ms = set() if name == "Posterize" else {0.0}
    for wide in (True, False):
        table = augment._magnitudes(31, hw, wide).get(name)
        if table is not None:
            ms.update(table[b] for b in (0, 1, 9, 17, 30))
    extra = {"ShearX": [0.123], "ShearY": [0.123], "TranslateX": [5.9, 2.5], "TranslateY": [5.9, 2.5],
             "Rotate": [17.3, 90.0], "Solarize": [100.0, 128.5], "Posterize": [1, 3]}
    ms.update(extra.get(name, []))
    if name in augment._SIGNED:
        ms.update([-m for m in ms])
    return sorted(ms)


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
@pytest.mark.parametrize("name", augment.OPS)
def test_op_matches_torchvision_exactly(tv, name, hw):
    image = _image(*hw, seed=augment.OPS.index(name))
    pil = Image.fromarray(image)
    changed = False
    for m in _test_magnitudes(name, hw):
        ours = np.asarray(augment.apply_op(pil, name, m, FILL))
        ref = _tv_op(tv, pil, name, m)
        assert ours.shape == image.shape and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, ref, err_msg=f"{name} magnitude {m}")
        changed |= not np.array_equal(ours, image)
    # Guard against a vacuous comparison: every op but Identity changes the test image.
    assert changed == (name != "Identity"), name


@pytest.mark.parametrize("num_bins", [31, 11])
def test_magnitude_tables_match_torchvision(tv, num_bins):
    hw = (24, 40)
    for ours_wide, ref in [(True, tv.TrivialAugmentWide()._augmentation_space(num_bins)),
                           (False, tv.RandAugment()._augmentation_space(num_bins, hw))]:
        assert tuple(ref) == augment.OPS
        ours = augment._magnitudes(num_bins, hw, ours_wide)
        for name, (mags, signed) in ref.items():
            assert (name in augment._SIGNED) == signed, name
            if mags.ndim == 0:
                assert name not in ours, name
            else:
                np.testing.assert_allclose(ours[name], mags.double().numpy(), rtol=1e-6, atol=1e-6,
                                           err_msg=name)


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_policy_applies_its_drawn_ops_like_torchvision(tv, policy):
    image = _image(32, 32)
    for seed in range(20):
        if policy == "trivialaugment":
            out = augment.trivial_augment(image, np.random.default_rng(seed), fill=FILL)
            ops = augment._trivial_ops(np.random.default_rng(seed), 31)
        else:
            out = augment.rand_augment(image, np.random.default_rng(seed), num_ops=3, fill=FILL)
            ops = augment._rand_ops(np.random.default_rng(seed), (32, 32), 3, 9, 31)
        ref = Image.fromarray(image)
        for name, m in ops:
            ref = Image.fromarray(_tv_op(tv, ref, name, m))
        np.testing.assert_array_equal(out, np.asarray(ref), err_msg=f"seed {seed}: {ops}")


def test_trivialaugment_draws_every_op_bin_and_sign_uniformly():
    rng = np.random.default_rng(0)
    n = 4200
    draws = [augment._trivial_ops(rng, 31)[0] for _ in range(n)]
    counts = {name: 0 for name in augment.OPS}
    for name, _ in draws:
        counts[name] += 1
    expected = n / len(augment.OPS)  # 300; binomial sd ~17
    assert all(abs(c - expected) < 75 for c in counts.values()), counts
    rot = np.array([m for name, m in draws if name == "Rotate"])
    table = augment._magnitudes(31, (32, 32), True)["Rotate"]
    assert set(np.abs(rot).tolist()) <= set(table)
    assert len(set(np.abs(rot).tolist())) >= 28  # ~300 draws over 31 bins
    assert 0.35 < np.mean(rot < 0) < 0.65
    assert all(m == 0.0 for name, m in draws if name in ("Identity", "AutoContrast", "Equalize"))


def test_randaugment_draws_num_ops_at_the_fixed_magnitude():
    rng = np.random.default_rng(1)
    tables = augment._magnitudes(31, (24, 40), False)
    seen = set()
    for _ in range(300):
        ops = augment._rand_ops(rng, (24, 40), 2, 9, 31)
        assert len(ops) == 2
        for name, m in ops:
            seen.add(name)
            if name in tables:
                assert abs(m) == tables[name][9], (name, m)
    assert seen == set(augment.OPS)
    with pytest.raises(ValueError, match="magnitude"):
        augment.rand_augment(_image(8, 8), rng, magnitude=31)


@pytest.mark.parametrize("policy", augment.POLICIES)
@pytest.mark.parametrize("hw", [(32, 32), (24, 40), (40, 17)])
def test_policy_is_deterministic_and_keeps_shape(policy, hw):
    image = _image(*hw)
    outs = []
    for seed in range(12):
        a = augment.apply_policy(image, policy, np.random.default_rng(seed))
        b = augment.apply_policy(image, policy, np.random.default_rng(seed))
        assert a.shape == image.shape and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        outs.append(a.tobytes())
    if policy != "none":
        assert len(set(outs)) > 6  # different seeds really give different images
    else:
        assert len(set(outs)) == 1 and outs[0] == image.tobytes()


def test_policy_accepts_views_and_rejects_bad_input():
    image = _image(32, 32)
    view = image[:, ::-1]  # negative strides, as after a flip
    out = augment.apply_policy(view, "randaugment", np.random.default_rng(3))
    ref = augment.apply_policy(np.ascontiguousarray(view), "randaugment", np.random.default_rng(3))
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match="pp.augment must be one of"):
        augment.apply_policy(image, "autoaugment", np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        augment.apply_policy(image.astype(np.float32), "trivialaugment", np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs an rng"):
        augment.apply_policy(image, "trivialaugment", None)


# ---------------------------------------------------------------------------------------
# Device side.
# ---------------------------------------------------------------------------------------

B, H, W, C, K = 6, 12, 20, 3, 10


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(B, H, W, C)).astype(np.float32)
    labels = rng.permutation(K)[:B]  # distinct, so a target row shows its own lam
    return images, labels


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_one_hot_smoothed_matches_timm_and_optax(timm_mixup, smoothing):
    import optax
    import torch
    labels = np.array([0, 3, 9, 3])
    ours = np.asarray(augment.one_hot_smoothed(jnp.asarray(labels), K, smoothing))
    assert ours.dtype == np.float32 and ours.shape == (4, K)
    ref = timm_mixup.mixup_target(torch.tensor(labels), K, lam=1.0, smoothing=smoothing).numpy()
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_allclose(ours, optax.smooth_labels(jax.nn.one_hot(labels, K), smoothing), atol=1e-7)
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-6)


def _timm_batch_mix(timm_mixup, images, labels, lam, use_cutmix, smoothing, monkeypatch):
    import torch
    mixer = timm_mixup.Mixup(mixup_alpha=0.0 if use_cutmix else 1.0, cutmix_alpha=1.0 if use_cutmix else 0.0,
                             label_smoothing=smoothing, num_classes=K)
    # Pin timm's draw of (lam, mode); record the box it then draws.
    monkeypatch.setattr(mixer, "_params_per_batch", lambda: (lam, use_cutmix))
    boxes = []
    orig_rand_bbox = timm_mixup.rand_bbox
    monkeypatch.setattr(timm_mixup, "rand_bbox", lambda *a, **k: boxes.append(orig_rand_bbox(*a, **k)) or boxes[-1])
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    x, y = mixer(x, torch.from_numpy(labels))
    return x.numpy().transpose(0, 2, 3, 1), y.numpy(), (boxes[0] if boxes else None)


@pytest.mark.parametrize("seed", range(4))
def test_mixup_with_fixed_lam_matches_timm(timm_mixup, monkeypatch, seed):
    images, labels = _batch(seed)
    lam = float(np.float32(np.random.default_rng(seed).uniform()))
    smoothing = 0.1 * seed
    ref_x, ref_y, _ = _timm_batch_mix(timm_mixup, images, labels, lam, False, smoothing, monkeypatch)
    x, y = augment._mixup_with_lam(jnp.asarray(images), augment.one_hot_smoothed(labels, K, smoothing), lam)
    np.testing.assert_array_equal(np.asarray(x), ref_x)
    np.testing.assert_array_equal(np.asarray(y), ref_y)
    np.testing.assert_allclose(np.asarray(y).sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_with_fixed_lam_matches_timm(timm_mixup, monkeypatch, seed):
    images, labels = _batch(seed)
    lam = float(np.float32(np.random.default_rng(seed).uniform(0.1, 0.9)))
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        ref_x, ref_y, ref_box = _timm_batch_mix(timm_mixup, images, labels, lam, True, 0.1, monkeypatch)
        # timm's rand_bbox draws the centre row then column with the global numpy rng.
        np.random.seed(seed)
        cy, cx = np.random.randint(0, H), np.random.randint(0, W)
    finally:
        np.random.set_state(state)
    box = augment._cutmix_box(lam, cy, cx, H, W)
    assert tuple(int(v) for v in box) == tuple(int(v) for v in ref_box)
    x, y = augment._cutmix_with_box(jnp.asarray(images), augment.one_hot_smoothed(labels, K, 0.1), box)
    np.testing.assert_array_equal(np.asarray(x), ref_x)
    np.testing.assert_array_equal(np.asarray(y), ref_y)


def _kinds(x, images):
    """Per draw [n]: 0 unchanged, 2 cutmix (every pixel from itself or its mirror), 1 mixup."""
    same = (x == images[None]).all(-1)
    mirror = (x == images[::-1][None]).all(-1)
    unchanged = same.all(axis=(1, 2, 3))
    cut = (same | mirror).all(axis=(1, 2, 3)) & ~unchanged
    return np.where(unchanged, 0, np.where(cut, 2, 1))


def _pasted(x, images):
    """[n, B]: fraction of each image that differs from the input (pixels pasted in)."""
    return (x != images[None]).any(-1).mean(axis=(2, 3))


def test_cutmix_pasted_area_equals_its_corrected_lam():
    images, labels = _batch()
    targets = augment.one_hot_smoothed(labels, K)
    n = 300
    keys = jax.random.split(jax.random.key(0), n)
    lams = jax.random.uniform(jax.random.key(1), (n,))
    x, y = jax.jit(jax.vmap(augment._cutmix_with_lam, in_axes=(0, None, None, 0)))(keys, images, targets, lams)
    x, y, lams = np.asarray(x), np.asarray(y), np.asarray(lams)
    assert (_kinds(x, images)[lams < 0.9] == 2).all()
    own = y[:, np.arange(B), labels]  # weight of each example's own label (labels are distinct)
    np.testing.assert_allclose(_pasted(x, images), 1.0 - own, atol=1e-6)
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-6)
    # Flooring the box side and clipping the box at the border only ever shrink the
    # pasted area; clipping often does so by a lot (the correction matters).
    assert (own >= lams[:, None] - 1e-6).all()
    assert ((own[:, 0] - lams) > 0.1).mean() > 0.2


def test_mixup_or_cutmix_draws_like_timm_batch_mode():
    images, labels = _batch()
    targets = augment.one_hot_smoothed(labels, K)
    n, alpha = 1000, 0.4
    fn = functools.partial(augment.mixup_or_cutmix, mixup_alpha=alpha, cutmix_alpha=1.0,
                           switch_prob=0.3, prob=0.6)
    keys = jax.random.split(jax.random.key(0), n)
    x, y = jax.jit(jax.vmap(fn, in_axes=(0, None, None)))(keys, images, targets)
    x, y = np.asarray(x), np.asarray(y)
    kinds = _kinds(x, images)
    np.testing.assert_allclose(np.bincount(kinds, minlength=3) / n, [0.4, 0.42, 0.18], atol=0.05)
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-6)
    lam = y[:, np.arange(B), labels]  # [n, B]
    np.testing.assert_array_equal(y[kinds == 0], np.broadcast_to(targets, y[kinds == 0].shape))
    np.testing.assert_allclose(_pasted(x, images)[kinds == 2], 1.0 - lam[kinds == 2], atol=1e-6)
    # Mixup draws: one lam per batch, images mixed by the lam the targets carry, and
    # lam ~ Beta(alpha, alpha) with the *mixup* alpha (variance 1 / (4 (2 alpha + 1))).
    lm = lam[kinds == 1]
    np.testing.assert_allclose(lm, lm[:, :1].repeat(B, 1), atol=1e-6)
    lm = lm[:, 0, None, None, None, None]
    np.testing.assert_allclose(x[kinds == 1], lm * images + (1 - lm) * images[::-1], atol=1e-5)
    assert abs(lm.mean() - 0.5) < 0.04
    assert abs(lm.var() - 1 / (4 * (2 * alpha + 1))) < 0.02


def test_mixup_or_cutmix_under_jit_with_cutmix_only_and_bfloat16():
    images, labels = _batch()
    x = jnp.asarray(images, jnp.bfloat16)
    t = augment.one_hot_smoothed(labels, K, 0.1)
    # Plain jit (a real branch, unlike under vmap); mixup disabled, so every draw is CutMix
    # and lam must come from cutmix_alpha, not from the disabled mixup_alpha = 0.
    fn = jax.jit(functools.partial(augment.mixup_or_cutmix, mixup_alpha=0.0, cutmix_alpha=1.0))
    for seed in range(5):
        out, tt = fn(jax.random.key(seed), x, t)
        assert out.dtype == jnp.bfloat16 and out.shape == x.shape and tt.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(tt).sum(-1), 1.0, atol=1e-6)
        assert _kinds(np.asarray(out)[None], np.asarray(x))[0] == 2
    with pytest.raises(TypeError, match="floating"):
        augment.mixup(jax.random.key(0), jnp.zeros((2, 4, 4, 3), jnp.uint8), t[:2], 1.0)


def test_disabled_mixing_is_the_identity():
    images, labels = _batch()
    x, t = jnp.asarray(images), augment.one_hot_smoothed(labels, K, 0.1)
    key = jax.random.key(1)
    for out in [augment.mixup(key, x, t, 0.0), augment.cutmix(key, x, t, 0.0),
                augment.mixup_or_cutmix(key, x, t, mixup_alpha=0.0, cutmix_alpha=0.0),
                augment.mixup_or_cutmix(key, x, t, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0)]:
        np.testing.assert_array_equal(np.asarray(out[0]), images)
        np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(t))
