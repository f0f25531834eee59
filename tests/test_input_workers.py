"""Input throughput features: worker processes (data.num_workers), reduced-size JPEG
decoding (pp.fast_decode) and robust decoding (EXIF, CMYK, 16-bit, palette, bombs).

Speed itself is measured in experiments/input_pipeline.py, not here.
"""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from recipes import override
from vlm_jax.data import config as data_config
from vlm_jax.data import pipeline, preprocess


def _photo(h, w, seed=0):
    """Smooth colour fields + texture: a JPEG-friendly stand-in for a photo."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), np.uint8))
    fine = rng.normal(0, 4, (h, w, 3))
    arr = np.asarray(coarse.resize((w, h), Image.BICUBIC), np.float64) + fine
    return np.clip(arr, 0, 255).astype(np.uint8)


def _jpeg(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def _png_header(width, height):
    """A PNG that declares width x height pixels but holds none (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def _folder(root):
    """12 small images with captions: 10 readable (JPEG, PNG, EXIF-rotated, CMYK), a
    truncated JPEG and a decompression bomb."""
    lines = []
    for i in range(12):
        name = f"{i}.jpg"
        arr = _photo(20 + i, 24, seed=i)
        if i == 3:
            data = b"\x89PNG" + _png_header(100_000, 100_000)[4:]  # bomb
            name = f"{i}.png"
        elif i == 7:
            data = _jpeg(arr)[:150]  # truncated
        elif i == 5:
            exif = Image.Exif()
            exif[0x0112] = 6
            data = _jpeg(arr, exif=exif)
        elif i == 9:
            buf = io.BytesIO()
            Image.fromarray(arr).convert("CMYK").save(buf, "JPEG")
            data = buf.getvalue()
        elif i % 4 == 2:
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "PNG")
            data, name = buf.getvalue(), f"{i}.png"
        else:
            data = _jpeg(arr)
        (root / name).write_bytes(data)
        lines.append(json.dumps({"image": name, "caption": f"picture {i}", "label": f"c{i % 3}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)


def _config(path, workers):
    c = data_config.default_config()
    c.seed, c.batch_size = 0, 4
    return override(c, {"data.source": "folder", "data.folder.path": path,
                        "data.num_workers": workers, "data.num_threads": 0,
                        "pp.image_size": 16, "pp.crop": "random_resized", "pp.flip": True,
                        "tokenizer.max_len": 16})


def test_workers_give_the_same_batches_and_resume_exactly(tmp_path):
    """data.num_workers=2 (processes) yields the batches of data.num_workers=0 (corrupt
    examples skipped and counted alike), and set_state on a state taken mid-run (part
    of a worker's run already used) resumes them exactly, skip counter included."""
    path = _folder(tmp_path)
    ref_it = iter(pipeline.train_dataset(_config(path, 0)))
    ref, ref_skips = [], []
    for _ in range(7):  # 28 examples: nearly three epochs of 10 readable ones
        ref.append(next(ref_it))
        ref_skips.append(ref_it.num_skipped)
    assert ref_skips[-1] >= 4  # two corrupt files per epoch

    it = iter(pipeline.train_dataset(_config(path, 2)))
    try:
        got, states, skips = [], [], []
        for _ in range(7):
            states.append(json.loads(json.dumps(it.get_state())))  # checkpointable
            got.append(next(it))
            skips.append(it.num_skipped)
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["tokens"], b["tokens"])
            assert b["image"].dtype == np.float32 and b["image"].shape == (4, 16, 16, 3)
        assert skips == ref_skips
        mid = [k for k, s in enumerate(states) if s["used"] > 0]
        assert mid, "no state fell inside a partly used run; the test data lost its corrupt files"
        k = mid[-1]
        it.set_state(states[k])
        assert it.num_skipped == (ref_skips[k - 1] if k else 0)
        for j in range(k, 7):
            b = next(it)
            np.testing.assert_array_equal(ref[j]["image"], b["image"])
            np.testing.assert_array_equal(ref[j]["tokens"], b["tokens"])
            assert it.num_skipped == ref_skips[j]
    finally:
        it.close()


def test_fast_decode_crops_the_same_region_close_to_the_exact_decode(monkeypatch):
    """pp.fast_decode: a 384x512 JPEG cropped to 48 px is decoded at reduced size (the
    decoder is asked for 1/2 to 1/8), the random box is drawn on the full size with
    the same rng draws, and the output stays within 2 levels (mean) of the exact path.
    Where the crop needs full resolution the result is bit-identical."""
    data = _jpeg(_photo(384, 512))
    factors = []
    real = preprocess.simplejpeg.decode_jpeg

    def spy(*a, **kw):
        factors.append(kw.get("min_factor", 1))
        return real(*a, **kw)
    monkeypatch.setattr(preprocess.simplejpeg, "decode_jpeg", spy)
    diffs = []
    for seed in range(8):
        for crop in ("random_resized", "center", "resize"):
            kw = dict(image_size=48, crop=crop, flip=True, value_range=None)
            r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
            exact = preprocess.preprocess_image(data, rng=r1, **kw)
            fast = preprocess.preprocess_image(data, rng=r2, fast_decode=True, **kw)
            assert r1.random() == r2.random()  # the same draws were made
            assert exact.shape == fast.shape == (48, 48, 3)
            diffs.append(np.abs(exact.astype(int) - fast).mean())
    assert max(factors) >= 2 and sum(f > 1 for f in factors) >= 12
    assert max(diffs) < 2.0, diffs
    # A different region would differ by far more: the same check against another seed.
    other = preprocess.preprocess_image(data, image_size=48, crop="random_resized", value_range=None,
                                        rng=np.random.default_rng(99), fast_decode=True)
    first = preprocess.preprocess_image(data, image_size=48, crop="random_resized", value_range=None,
                                        rng=np.random.default_rng(0), fast_decode=True)
    assert np.abs(other.astype(int) - first).mean() > 10
    # Full resolution needed (224 from 384x512 at scale 1): the same pixels as exact.
    kw = dict(image_size=224, crop="random_resized", scale=(0.9, 1.0), value_range=None)
    np.testing.assert_array_equal(preprocess.preprocess_image(data, rng=np.random.default_rng(0), **kw),
                                  preprocess.preprocess_image(data, rng=np.random.default_rng(0),
                                                              fast_decode=True, **kw))


def test_decode_handles_exif_cmyk_16bit_palette_and_bombs():
    arr = _photo(12, 16)
    # simplejpeg (our JPEG path) decodes the same pixels as PIL: baseline, progressive, grey.
    for data in (_jpeg(arr), _jpeg(arr, progressive=True), _jpeg(arr[..., 0])):
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(preprocess.decode_image(data), pil)
    # EXIF orientation, all eight, JPEG and PNG: as ImageOps.exif_transpose.
    for fmt in ("JPEG", "PNG"):
        for orientation in range(1, 9):
            exif = Image.Exif()
            exif[0x0112] = orientation
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, fmt, exif=exif)
            want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB"))
            got = preprocess.decode_image(buf.getvalue())
            assert got.shape == ((16, 12, 3) if orientation >= 5 else (12, 16, 3))
            np.testing.assert_array_equal(got, want, err_msg=f"{fmt} orientation {orientation}")
    # CMYK JPEG -> RGB, as PIL converts it.
    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, "JPEG", quality=95)
    cmyk = preprocess.decode_image(buf.getvalue())
    assert cmyk.shape == (12, 16, 3) and np.abs(cmyk.astype(int) - arr).mean() < 8
    # 16-bit grey PNG (PIL "I;16"): the top 8 bits, not PIL's clipping at 255.
    g16 = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 300)
    buf = io.BytesIO()
    Image.fromarray(g16).save(buf, "PNG")
    np.testing.assert_array_equal(preprocess.decode_image(buf.getvalue()),
                                  np.repeat((g16 >> 8).astype(np.uint8)[..., None], 3, -1))
    # Palette PNG with a transparent entry: composited on white.
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=1)
    np.testing.assert_array_equal(preprocess.decode_image(buf.getvalue())[:, :, :],
                                  [[[255, 0, 0], [255, 255, 255]], [[255, 255, 255], [255, 0, 0]]])
    # Decompression bombs: PIL's own limit, and ours (pp.max_pixels), on every path.
    with pytest.raises(preprocess.CorruptExampleError, match="DecompressionBomb"):
        preprocess.decode_image(_png_header(100_000, 100_000))
    png = io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    for data in (_jpeg(arr), png.getvalue()):
        with pytest.raises(preprocess.CorruptExampleError, match="max_pixels"):
            preprocess.preprocess_image(data, image_size=8, max_pixels=100, fast_decode=True)
    # Truncated JPEG: a corrupt example, not a crash.
    with pytest.raises(preprocess.CorruptExampleError):
        preprocess.decode_image(_jpeg(arr)[:200])
