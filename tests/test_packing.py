"""NaViT packing (numpy only): fill, nothing dropped, determinism, sizing, streams."""

import grain
import numpy as np
import pytest
import torch
from PIL import Image

from vlm_jax.data import packing


def _images(n, lo, hi, seed=0):
    rng = np.random.default_rng(seed)
    sides = rng.integers(lo, hi + 1, size=(n, 2))
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sides]


def test_fill_is_at_least_98_percent_on_2000_images_of_sides_32_to_256():
    rng = np.random.default_rng(0)
    sides = rng.integers(32, 257, size=(2000, 2))
    lengths = [int(np.prod(packing.fit_grid(h, w, 16, 256))) for h, w in sides]
    bins = packing.pack_lengths(lengths, seq_len=256, max_images=16)
    assert sorted(i for b in bins for i in b) == list(range(2000))  # each image exactly once
    assert all(sum(lengths[i] for i in b) <= 256 and len(b) <= 16 for b in bins)
    fill = sum(lengths) / (len(bins) * 256)
    assert fill >= 0.98, fill


def test_every_image_is_packed_once_with_all_its_patches():
    images = _images(40, 8, 300, seed=1) + [np.zeros((2000, 700, 3), np.uint8)]  # one oversized
    batch = packing.pack(images, patch_size=16, seq_len=64, max_images=5)
    idx = batch["image_index"]
    assert sorted(idx[idx >= 0].tolist()) == list(range(len(images)))
    for s, slot in zip(*np.nonzero(idx >= 0)):
        n = int(np.sum(batch["segment_ids"][s] == slot + 1))
        gh, gw = batch["grid_sizes"][s, slot]
        assert n == gh * gw and 1 <= n <= 64
        rows, cols = batch["positions"][s][batch["segment_ids"][s] == slot + 1].T
        assert rows.max() == gh - 1 and cols.max() == gw - 1
    # Padding holds zeros and no slot.
    assert np.all(batch["patches"][batch["segment_ids"] == 0] == 0)


def test_packing_is_deterministic():
    images = _images(30, 16, 200, seed=2)
    a = packing.pack(images, patch_size=16, seq_len=128, max_images=8)
    b = packing.pack([im.copy() for im in images], patch_size=16, seq_len=128, max_images=8)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_grid_is_nearest_patch_multiple_and_oversized_images_keep_their_aspect():
    assert packing.fit_grid(37, 53, 16, 1000) == (2, 3)   # 2.31 -> 2, 3.31 -> 3
    assert packing.fit_grid(7, 100, 16, 1000) == (1, 6)   # at least one patch per side
    gh, gw = packing.fit_grid(2000, 1000, 16, 256)
    assert gh * gw <= 256 and abs(gh / gw - 2.0) < 0.15
    assert packing.fit_grid(4000, 64, 16, 256, max_side=32) == (32, 1)


def test_patch_layout_matches_the_siglip2_processor():
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    img = np.random.default_rng(0).normal(size=(48, 32, 3)).astype(np.float32)
    ours = packing.patchify(img, 16, (3, 2))
    ref = convert_image_to_patches(torch.from_numpy(img).permute(2, 0, 1), 16).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_an_item_that_fits_nowhere_opens_a_new_sequence():
    bins = packing.pack_lengths([200, 200, 50, 60], seq_len=256, max_images=8, sort=False)
    assert bins == [[0, 2], [1], [3]]  # 60 tokens fit in neither gap (6, 56): a new sequence
    assert packing.pack_lengths([10, 10, 10], seq_len=256, max_images=2) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="seq_len"):
        packing.pack_lengths([300], seq_len=256, max_images=2)


def _stream(n, seed=3):
    images = _images(n, 16, 120, seed=seed)
    items = [dict(packing.image_to_item(im, patch_size=16, max_patches=32), text=f"img {i}")
             for i, im in enumerate(images)]
    return grain.MapDataset.source(items).to_iter_dataset()


def test_stream_packing_drops_nothing_and_resumes_exactly():
    ds = packing.PackedDataset(_stream(50), seq_len=32, max_images=4, window=16, slot_keys=("text",))
    seqs = list(ds)
    index = np.concatenate([s["image_index"] for s in seqs])
    assert sorted(index[index >= 0].tolist()) == list(range(50))
    for s in seqs:  # per-slot fields follow their image
        assert [t for t in s["text"] if t] == [f"img {j}" for j in s["image_index"] if j >= 0]

    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    rest = list(it)
    it2 = iter(packing.PackedDataset(_stream(50), seq_len=32, max_images=4, window=16,
                                     slot_keys=("text",)))
    it2.set_state(state)
    rest2 = list(it2)
    assert len(rest) == len(rest2) == len(seqs) - 5
    for a, b in zip(rest, rest2):
        assert np.array_equal(a["patches"], b["patches"]) and a["text"] == b["text"]


# --------------------------------------------------------------------------- against a plain reference


def _ref_first_fit(lengths, seq_len, max_images, sort):
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else range(len(lengths))
    bins = []
    for i in order:
        for b in bins:
            if sum(lengths[j] for j in b) + lengths[i] <= seq_len and len(b) < max_images:
                b.append(i)
                break
        else:
            bins.append([i])
    return bins


def _ref_item(image, p, grid):
    """Resize (PIL, as documented) and cut patch by patch, token by token."""
    gh, gw = grid
    size = (gw * p, gh * p)
    if image.shape[:2] == (gh * p, gw * p):
        img = image.astype(np.float32)
    elif image.dtype == np.uint8:
        img = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR), np.float32)
    else:
        img = np.stack([np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F")
                                   .resize(size, Image.Resampling.BILINEAR)) for c in range(3)], -1)
    patches = [img[r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1) for r in range(gh) for c in range(gw)]
    positions = np.array([(r, c) for r in range(gh) for c in range(gw)])
    return {"patches": np.stack(patches), "positions": positions, "grid": (gh, gw)}


def _ref_pack(items, seq_len, max_images, sort=True):
    bins = _ref_first_fit([len(it["patches"]) for it in items], seq_len, max_images, sort)
    dim = items[0]["patches"].shape[-1]
    out = {"patches": np.zeros((len(bins), seq_len, dim), np.float32),
           "segment_ids": np.zeros((len(bins), seq_len), np.int32),
           "positions": np.zeros((len(bins), seq_len, 2), np.int32),
           "image_index": np.full((len(bins), max_images), -1, np.int32),
           "grid_sizes": np.zeros((len(bins), max_images, 2), np.int32)}
    for s, b in enumerate(bins):
        pos = 0
        for slot, i in enumerate(b):
            for t in range(len(items[i]["patches"])):
                out["patches"][s, pos] = items[i]["patches"][t]
                out["positions"][s, pos] = items[i]["positions"][t]
                out["segment_ids"][s, pos] = slot + 1
                pos += 1
            out["image_index"][s, slot] = i
            out["grid_sizes"][s, slot] = items[i]["grid"]
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_pack_and_token_dropped_pack_items_equal_a_plain_reference_bit_for_bit():
    from vlm_jax.data import navit_pipeline, preprocess

    rng = np.random.default_rng(7)
    images = _images(14, 3, 90, seed=4)                                   # uint8, any size
    images += [rng.normal(size=(h, w, 3)) for h, w in [(40, 23), (16, 48), (7, 70)]]  # float64
    images += [np.zeros((32, 48, 3), np.uint8), np.full((300, 20, 3), 9, np.uint8)]  # aligned; oversized
    for kw in (dict(patch_size=8, seq_len=40, max_images=4), dict(patch_size=4, seq_len=64, max_images=3,
                                                                  sort=False, max_side=9)):
        p, length = kw["patch_size"], kw["seq_len"]
        grids = [packing.fit_grid(*im.shape[:2], p, length, kw.get("max_side")) for im in images]
        ref = _ref_pack([_ref_item(im, p, g) for im, g in zip(images, grids)], length, kw["max_images"],
                        kw.get("sort", True))
        _assert_same(packing.pack(images, **kw), ref)

    # Training: uint8 items, tokens dropped by "keep" indices, normalised as they are packed
    # == normalise, drop (copy the kept rows), pack.
    cfg = navit_pipeline.default_config().token_drop
    cfg.kind, cfg.rate = "beta", 0.5
    drop = navit_pipeline.TokenDrop(cfg)
    tower = dict(patch_size=8, seq_len=40, max_side=None)
    items = [navit_pipeline.patchify_uint8(im, tower) for im in images[:14]]
    assert all(it["patches"].dtype == np.uint8 for it in items)
    keeps = [drop.keep(len(it["patches"]), np.random.default_rng(i)) for i, it in enumerate(items)]
    assert sum(k is not None for k in keeps) >= 7
    ref_items, float_items = [], []
    for it, k in zip(items, keeps):
        x = dict(it, patches=preprocess.normalize(it["patches"], (-1.0, 0.5)))
        ref_items.append(x if k is None else dict(x, patches=x["patches"][k], positions=x["positions"][k]))
        float_items.append(x if k is None else dict(x, keep=k))
    ref = _ref_pack(ref_items, 40, 4)
    got = packing.pack_items([it if k is None else dict(it, keep=k) for it, k in zip(items, keeps)],
                             seq_len=40, max_images=4, value_range=(-1.0, 0.5))
    _assert_same(got, ref)
    _assert_same(packing.pack_items(float_items, seq_len=40, max_images=4), ref)  # float32 + "keep"
    with pytest.raises(ValueError, match="item 0 has float32 patches; value_range needs uint8"):
        packing.pack_items([ref_items[0]], seq_len=40, max_images=4, value_range=(-1.0, 0.5))


def test_uint8_packing_keeps_the_pixels_and_maps_onto_the_value_range_on_device():
    """dtype=uint8: the same packing with the pixels as uint8, and ``to_value_range``
    (jax) gives the host-normalised float32 batch exactly, padding included."""
    from vlm_jax.data import navit_pipeline

    images = _images(12, 3, 90, seed=5) + [np.full((300, 20, 3), 250, np.uint8)]
    kw = dict(patch_size=8, seq_len=40, max_images=4)
    u8, f32 = packing.pack(images, dtype=np.uint8, **kw), packing.pack(images, **kw)
    assert u8["patches"].dtype == np.uint8 and f32["patches"].dtype == np.float32
    for k in f32:
        assert np.array_equal(u8[k], f32[k]), k                       # same layout, same values

    tower = dict(patch_size=8, seq_len=40, max_side=None)
    items = [navit_pipeline.patchify_uint8(im, tower) for im in images]
    rng = np.random.default_rng(3)
    items = [dict(it, keep=np.sort(rng.choice(len(it["patches"]), max(1, len(it["patches"]) // 2),
                                              replace=False))) if i % 2 else it
             for i, it in enumerate(items)]
    host = packing.pack_items(items, seq_len=40, max_images=4, value_range=(-1.0, 0.5))
    raw = packing.pack_items(items, seq_len=40, max_images=4, dtype=np.uint8)
    assert raw["patches"].dtype == np.uint8 and raw["patches"].nbytes * 4 == host["patches"].nbytes
    dev = packing.to_value_range(raw, (-1.0, 0.5))
    assert dev["patches"].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(dev["patches"]), host["patches"])
    for k in ("segment_ids", "positions", "image_index", "grid_sizes"):
        assert np.array_equal(raw[k], host[k]) and dev[k] is raw[k], k
    assert packing.to_value_range(host, (-1.0, 0.5)) is host          # float batches pass through

    with pytest.raises(ValueError, match="needs dtype float32, not uint8"):
        packing.pack_items(items, seq_len=40, max_images=4, value_range=(-1.0, 0.5), dtype=np.uint8)
    with pytest.raises(ValueError, match="item 0 has float32 patches; dtype uint8 needs uint8"):
        packing.pack_items([dict(items[0], patches=items[0]["patches"].astype(np.float32))],
                           seq_len=40, max_images=4, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"images\[1\] is float64; dtype uint8 needs uint8 images"):
        packing.pack([images[0], np.zeros((8, 8, 3))], dtype=np.uint8, **kw)
    with pytest.raises(ValueError, match="float32 or uint8, got dtype int16"):
        packing.pack(images, dtype=np.int16, **kw)
