"""NaViT data pipeline: packed batches with per-slot captions, token dropping (training
only), resolution sampling, determinism and exact resume."""

import ml_collections
import numpy as np
import pytest

import recipes
from vlm_jax.data import navit_pipeline, tokenizers


def _config(**navit):
    c = recipes.get_config("navit_b16", "runlocal")
    c.batch_size = 4
    recipes.override(c.navit, navit)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_hold_packed_images_and_one_caption_per_slot():
    c = _config()
    b = next(iter(navit_pipeline.train_dataset(c)))
    s, m, length = 4, c.model.image.max_images, c.model.image.seq_len
    assert b["image"]["patches"].shape == (s, length, 8 * 8 * 3)
    assert b["tokens"].shape == (s, m, c.tokenizer.max_len) and b["valid"].shape == (s, m)
    texts = tokenizers.ByteTokenizer(c.tokenizer.max_len).decode(b["tokens"].reshape(s * m, -1))
    valid = b["valid"].reshape(-1)
    assert all(t for t, v in zip(texts, valid) if v) and not any(t for t, v in zip(texts, valid) if not v)
    seg = b["image"]["segment_ids"]
    assert np.array_equal(valid.reshape(s, m), np.stack([[np.any(r == k + 1) for k in range(m)] for r in seg]))


def test_constant_token_dropping_keeps_the_right_share_and_eval_drops_nothing():
    c = _config(**{"token_drop.rate": 0.5})
    b = next(iter(navit_pipeline.train_dataset(c)))
    seg, grids = b["image"]["segment_ids"], b["image"]["grid_sizes"]
    for s, k in zip(*np.nonzero(b["valid"])):
        n_full = int(np.prod(grids[s, k]))
        assert int(np.sum(seg[s] == k + 1)) == max(1, round(n_full * 0.5))
    # Evaluation items: full grids, no dropping and no resolution sampling.
    c.navit.resolution.kind = "uniform"
    items = navit_pipeline.eval_items(c, "heldout", 8)
    assert all(len(it["patches"]) == int(np.prod(it["grid"])) for it in items)
    sizes = c.navit.shapes_sizes
    assert [tuple(it["grid"]) for it in items] == [(sizes[i % 4] // 8,) * 2 for i in range(8)]


def test_same_seed_same_batches_and_resume_is_exact():
    c = _config()
    a = _take(iter(navit_pipeline.train_dataset(c)), 4)
    it = iter(navit_pipeline.train_dataset(c))
    _take(it, 2)
    state = it.get_state()
    it2 = iter(navit_pipeline.train_dataset(c))
    it2.set_state(state)
    for x, y in zip(a[2:], _take(it2, 2)):
        assert np.array_equal(x["image"]["patches"], y["image"]["patches"])
        assert np.array_equal(x["tokens"], y["tokens"])


def test_uint8_batches_map_on_device_onto_the_host_normalised_ones():
    from vlm_jax.data import packing

    c = _config(**{"token_drop.rate": 0.5})
    b8 = next(iter(navit_pipeline.train_dataset(c)))
    assert b8["image"]["patches"].dtype == np.uint8                  # the default
    c.navit.patch_dtype = "float32"
    b32 = next(iter(navit_pipeline.train_dataset(c)))
    assert b32["image"]["patches"].dtype == np.float32
    dev = packing.to_value_range(b8["image"], c.pp.value_range)
    np.testing.assert_array_equal(np.asarray(dev["patches"]), b32["image"]["patches"])
    assert np.array_equal(b8["tokens"], b32["tokens"])
    c.navit.patch_dtype = "float16"
    with pytest.raises(ValueError, match="navit.patch_dtype must be 'uint8' or 'float32'"):
        navit_pipeline.train_dataset(c)


def _drop_cfg(**kw):
    cfg = navit_pipeline.default_config().token_drop
    cfg.update(kw)
    return cfg


def test_token_drop_rates_beta_resolution_and_schedule():
    rng = np.random.default_rng(0)
    beta = navit_pipeline.TokenDrop(_drop_cfg(kind="beta", beta_a=2.0, beta_b=5.0, max_drop=0.99))
    rates = [beta.rate(100, rng) for _ in range(4000)]
    assert abs(np.mean(rates) - 2 / 7) < 0.01                 # Beta(2, 5) mean
    res = navit_pipeline.TokenDrop(_drop_cfg(kind="resolution", min_rate=0.1, max_rate=0.7,
                                             min_tokens=16, max_tokens=256))
    assert res.rate(8, rng) == pytest.approx(0.1) and res.rate(256, rng) == pytest.approx(0.7)
    assert res.rate(136, rng) == pytest.approx(0.4)
    sched = navit_pipeline.TokenDrop(_drop_cfg(kind="constant", rate=0.5, schedule="linear",
                                               schedule_start=1.0, schedule_end=0.0,
                                               schedule_steps=100))
    assert [sched.rate(50, rng, s) for s in (0, 50, 100, 200)] == pytest.approx([0.5, 0.25, 0, 0])
    item = {"patches": np.arange(40.0).reshape(10, 4), "positions": np.arange(20).reshape(10, 2)}
    kept = sched(item, rng, step=0)
    assert len(kept["patches"]) == 5 and np.all(np.diff(kept["patches"][:, 0]) > 0)


def test_resolution_sampling_keeps_the_aspect_ratio():
    cfg = ml_collections.ConfigDict(dict(kind="uniform", min_side=40, max_side=80, sides=(),
                                         mean=0.0, std=1.0))
    rng = np.random.default_rng(0)
    img = np.zeros((100, 50, 3), np.uint8)
    for _ in range(5):
        side = navit_pipeline.sample_side(cfg, rng)
        out = navit_pipeline._rescale(img, side)
        assert 40 <= side <= 80 and out.shape[0] == side and abs(out.shape[1] - side / 2) <= 0.5
