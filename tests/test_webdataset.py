"""webdataset tar shards and ArrayRecord: same batches, exact resume, bad files, conversion."""

import hashlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from recipes import ROOT, override
from vlm_jax.data import array_record, convert, pipeline, preprocess, tokenizers, webdataset
from vlm_jax.data import config as data_config

N, PER_SHARD = 32, 8  # 4 shards


def _jpeg(i, size=(20, 24), **save):
    arr = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """N samples in 4 shards, and their ArrayRecord conversion (5 records per file)."""
    root = tmp_path_factory.mktemp("wds")
    samples = [(f"{i:06d}", {"jpg": _jpeg(i), "txt": f"caption {i}".encode()}) for i in range(N)]
    paths = webdataset.write_shards(str(root / "wds"), samples, samples_per_shard=PER_SHARD)
    pattern = str(root / "wds" / "shard-{000000..000003}.tar")
    convert.main(["--output", str(root / "ar"), "--from", "webdataset", "--input", pattern,
                  "--records_per_shard", "5"])
    return dict(root=root, paths=paths, pattern=pattern, ar=str(root / "ar"))


def _config(**overrides):
    c = data_config.default_config()
    c.seed, c.batch_size = 0, 8
    c.pp.image_size, c.tokenizer.max_len = 16, 16
    c.pp.crop, c.pp.flip = "random_resized", True  # augmentation must match too
    c.data.num_threads, c.data.prefetch_buffer_size = 2, 8
    return override(c, overrides)


def _wds(pattern, **overrides):
    return _config(**{"data.source": "webdataset", "data.webdataset.shards": pattern, **overrides})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _texts(batches):
    return [t for b in batches for t in tokenizers.ByteTokenizer(16).decode(b["tokens"])]


def _same(a, b):
    return all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["tokens"], y["tokens"])
               for x, y in zip(a, b, strict=True))


def test_webdataset_and_its_array_record_conversion_give_the_same_batches(good):
    meta = json.load(open(os.path.join(good["ar"], "metadata.json")))
    assert meta["num_records"] == N and len(os.listdir(good["ar"])) == 7 + 2  # 7 files + json x2
    # Unshuffled, one process: shards as listed, tar order = the converted order;
    # 5 batches of 8 cross the epoch boundary at 32.
    w = _take(iter(pipeline.train_dataset(_wds(good["pattern"], **{"data.shuffle": False}))), 5)
    a = _take(iter(pipeline.train_dataset(_config(**{
        "data.source": "array_record", "data.array_record.path": good["ar"], "data.shuffle": False}))), 5)
    assert _same(w, a)
    assert _texts(w) == [f"caption {i % N}" for i in range(40)]
    src = array_record.ArrayRecordSource(good["ar"])
    assert len(src) == N and src[7]["key"] == "000007" and src[7]["image"] == _jpeg(7)


def test_shuffled_stream_resumes_exactly_mid_shard_and_ignores_the_thread_count(good):
    c = _wds(good["pattern"], **{"data.webdataset.shuffle_buffer": 6})
    it = iter(pipeline.train_dataset(c))
    epoch = _take(it, 4)  # one epoch: every sample once, shuffled
    assert sorted(_texts(epoch)) == sorted(f"caption {i}" for i in range(N))
    assert _texts(epoch) != [f"caption {i}" for i in range(N)]
    _take(it, 1)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    inner = state["parent"]["iterators_in_use_states"][0]
    assert inner["epoch"] == 1 and 0 < inner["offset"] and inner["buffer"]  # mid-shard
    expected = _take(it, 4)
    resumed = iter(pipeline.train_dataset(c))
    resumed.set_state(state)
    assert _same(_take(resumed, 4), expected)
    no_threads = _take(iter(pipeline.train_dataset(override(c, {"data.num_threads": 0}))), 9)
    assert _same(no_threads[:4], epoch) and _same(no_threads[5:], expected)
    other_seed = _take(iter(pipeline.train_dataset(override(c, {"seed": 1}))), 1)
    assert _texts(other_seed) != _texts(epoch[:1])


_CHILD = """
import hashlib, json, os, sys, time
from vlm_jax.data import config as data_config, pipeline
c = data_config.default_config()
c.seed, c.batch_size, c.pp.image_size, c.tokenizer.max_len = 0, 8, 16, 16
c.pp.crop, c.pp.flip, c.data.num_threads, c.data.prefetch_buffer_size = "random_resized", True, 2, 8
c.data.source, c.data.webdataset.shards, c.data.webdataset.shuffle_buffer = "webdataset", {pattern!r}, 6
it = iter(pipeline.train_dataset(c))
with open(sys.argv[1], "w") as log:
    for step in range(1, 41):
        b = next(it)
        # the "checkpoint" after this batch (written atomically), then the batch's digest
        with open(sys.argv[1] + ".tmp", "w") as f:
            json.dump({{"step": step, "data": it.get_state()}}, f)
        os.replace(sys.argv[1] + ".tmp", sys.argv[1] + ".state")
        log.write(hashlib.sha1(b["image"].tobytes() + b["tokens"].tobytes()).hexdigest() + "\\n")
        log.flush()
        time.sleep(0.05)
"""


def _digest(b):
    return hashlib.sha1(b["image"].tobytes() + b["tokens"].tobytes()).hexdigest()


def test_resume_after_kill_9_gives_the_same_batches(good, tmp_path):
    """A child process streams batches and saves the iterator state after each, as the
    trainer's checkpoints do; it is killed with SIGKILL mid-epoch, and an iterator
    restored from its last saved state continues with the uninterrupted batches."""
    script, log = tmp_path / "child.py", tmp_path / "batches.log"
    script.write_text(_CHILD.format(pattern=good["pattern"]))
    child = subprocess.Popen([sys.executable, str(script), str(log)],
                             env=dict(os.environ, PYTHONPATH=ROOT))
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None and (
            not log.exists() or len(log.read_text().split()) < 6):
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    done = log.read_text().split()
    saved = json.loads((tmp_path / "batches.log.state").read_text())
    assert 6 <= len(done) <= saved["step"] < 40  # killed mid-run
    c = _wds(good["pattern"], **{"data.webdataset.shuffle_buffer": 6})
    reference = [_digest(b) for b in _take(iter(pipeline.train_dataset(c)), saved["step"] + 5)]
    assert done == reference[:len(done)]  # the same batches in another process
    resumed = iter(pipeline.train_dataset(c))
    resumed.set_state(saved["data"])
    assert [_digest(b) for b in _take(resumed, 5)] == reference[saved["step"]:]


def _png(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(side=100_000):
    """A PNG whose header declares side x side pixels (10 Gpx), in 60 bytes."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _odd_images():
    """Unusual but valid images: name -> encoded bytes."""
    rgb = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = io.BytesIO()
    Image.fromarray(rgb).save(rotated, format="JPEG", exif=exif)
    return {"cmyk": ("jpg", cmyk.getvalue()),
            "gray16": ("png", _png((np.arange(240, dtype=np.uint16).reshape(12, 20) * 250))),
            "palette": ("png", _png(np.asarray(Image.fromarray(rgb).convert("P")), mode="P")),
            "exif": ("jpg", rotated.getvalue())}


def test_shards_with_every_kind_of_bad_file_train_and_count_what_they_skip(tmp_path):
    good = [(f"good{i}", {"jpg": _jpeg(i), "txt": f"caption good{i}".encode()}) for i in range(6)]
    odd = [(k, {ext: data, "txt": f"caption {k}".encode()}) for k, (ext, data) in _odd_images().items()]
    odd.append(("json", {"jpg": _jpeg(50), "json": json.dumps({"caption": "caption json"}).encode()}))
    bad = [("empty", {"jpg": _jpeg(60), "txt": b"  "}),
           ("latin1", {"jpg": _jpeg(61), "txt": "caption caf\xe9".encode("latin-1")}),
           ("bomb", {"png": _bomb_png(), "txt": b"caption bomb"}),
           ("truncjpeg", {"jpg": _jpeg(62, (64, 64))[:300], "txt": b"caption truncated jpeg"}),
           ("nocaption", {"jpg": _jpeg(63)}),
           ("badjson", {"jpg": _jpeg(64), "json": b"{'caption': 1"})]
    # A truncated shard (cut inside its third sample: two samples survive), then
    # bad and odd samples mixed with good ones.
    first = webdataset.write_shards(str(tmp_path), good[:4], prefix="a")[0]
    raw = open(first, "rb").read()
    cut = list(webdataset.scan_shard(first))[2][0] + 700
    open(first, "wb").write(raw[:cut])
    rest = webdataset.write_shards(str(tmp_path), [good[4]] + bad[:3] + odd + bad[3:] + [good[5]],
                                   samples_per_shard=6, prefix="b")
    expected = {"caption good0", "caption good1", "caption good4", "caption good5", "caption json"}
    expected |= {f"caption {k}" for k in _odd_images()}
    c = _wds("::".join([first] + rest), **{"data.shuffle": False, "pp.crop": "resize", "pp.flip": False})
    c.batch_size = len(expected)  # one batch: one epoch's good examples
    it = iter(pipeline.train_dataset(c))
    batch = next(it)
    assert set(_texts([batch])) == expected
    assert it.num_skipped == 1 + len(bad)  # the truncated shard's rest + each bad sample
    next(it)
    assert it.num_skipped == 2 * (1 + len(bad))  # and again next epoch
    # The odd images decode to upright 8-bit RGB (EXIF orientation 6: 12x20 -> 20x12).
    samples = webdataset.ShardSamples(rest)
    refs = {webdataset.read_members(webdataset.read_range(path, s, n), "")[0]: (i, s, n)
            for i, path in enumerate(rest) for s, n in webdataset.scan_shard(path)}
    exif = preprocess.decode_image(samples[webdataset.make_handle(*refs["exif"])]["image"])
    assert exif.shape == (20, 12, 3) and exif.dtype == np.uint8
    with pytest.raises(preprocess.CorruptExampleError, match="pixels|bomb"):
        preprocess.decode_image(_bomb_png())


def test_a_missing_shard_or_filesystem_package_is_a_clear_error(good, tmp_path):
    missing = os.path.join(os.path.dirname(good["paths"][0]), "shard-000004.tar")
    with pytest.raises(FileNotFoundError, match=r"webdataset shard .*shard-000004.tar does not exist"):
        pipeline.train_dataset(_wds(good["pattern"].replace("000003", "000004")))
    assert not os.path.exists(missing)
    if importlib.util.find_spec("gcsfs") is None:  # not a dependency: named when needed
        with pytest.raises(ImportError, match="gcsfs"):
            pipeline.train_dataset(_wds("gs://bucket/shard-{0..3}.tar"))
    with pytest.raises(ValueError, match="4 shards, fewer than the 5 processes"):
        webdataset.WebDataset(good["paths"], seed=0, process_index=0, process_count=5)


def test_processes_read_disjoint_shards_that_cover_the_data(good):
    seen = []
    for p in range(3):
        ds = webdataset.WebDataset(good["paths"], seed=0, process_index=p, process_count=3,
                                   buffer_size=4)
        it = iter(ds)
        positions, shards = set(), set()
        for _ in range(20):  # more than one epoch of every process
            pos, handle = next(it)
            positions.add(pos)
            shards.add(ds.paths[webdataset.split_handle(handle)[0]])
        assert all(q % 3 == p for q in positions)  # augmentation positions never collide
        seen.append(shards)
    assert [len(s) for s in seen] == [2, 1, 1] and set.union(*seen) == set(good["paths"])
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def _records(directory):
    src = array_record.ArrayRecordSource(directory)
    return [src._ds[i] for i in range(len(src))]  # pylint: disable=protected-access


def test_convert_resumes_after_an_interruption(good, tmp_path, monkeypatch):
    reads, real, killed = [], webdataset.read_range, []

    class Killed(Exception):
        pass

    def flaky(*args):
        reads.append(args)
        if len(reads) == 13 and not killed:
            killed.append(True)
            raise Killed  # dies while writing the third file (5 records each)
        return real(*args)

    monkeypatch.setattr(webdataset, "read_range", flaky)
    argv = ["--output", str(tmp_path / "ar"), "--from", "webdataset", "--input", good["pattern"],
            "--records_per_shard", "5"]
    with pytest.raises(Killed):
        convert.main(argv)
    assert sorted(os.listdir(tmp_path / "ar")) == [
        "data-000000.array_record", "data-000001.array_record", "data-000002.array_record.tmp",
        "progress.json"]
    del reads[:]
    convert.main(argv)
    assert len(reads) == N - 10  # continued after the two complete files
    assert _records(tmp_path / "ar") == _records(good["ar"])
    # A folder (captions file with labels) converts too; images are copied, not re-encoded.
    folder = tmp_path / "folder"
    folder.mkdir()
    rows = [{"image": f"{i}.jpg", "caption": f"caption {i}", "label": "cat dog".split()[i % 2]}
            for i in range(3)]
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(_jpeg(i))
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    convert.main(["--output", str(tmp_path / "far"), "--from", "folder", "--input", str(folder)])
    src = array_record.ArrayRecordSource(str(tmp_path / "far"))
    assert src.classnames == ["cat", "dog"]
    assert [(src[i]["image"], src[i]["text"], src[i]["label"]) for i in range(3)] == [
        (_jpeg(i), f"caption {i}", i % 2) for i in range(3)]
