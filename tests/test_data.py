"""Training and zero-shot pipelines: determinism, resume, sharding, corrupt examples."""

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import config as data_config
from recipes import override
from vlm_jax.data import pipeline, shapes, tokenizers


def _config(**overrides):
    c = data_config.default_config()
    c.seed = 0
    c.batch_size = 8
    c.data.shapes.train_size = 1000
    c.data.num_threads = 2
    c.data.prefetch_buffer_size = 16
    c.tokenizer.max_len = 32
    return override(c, overrides)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["tokens"], y["tokens"])
               for x, y in zip(a, b, strict=True))


def _digests(batches):
    return [hashlib.sha1(im.tobytes()).hexdigest() for b in batches for im in b["image"]]


def test_batches_have_the_contract_shapes_and_value_range():
    c = _config(**{"pp.value_range": (0.0, 1.0)})
    batch = next(iter(pipeline.train_dataset(c)))
    assert set(batch) == {"image", "tokens"}
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["tokens"].shape == (8, 32) and batch["tokens"].dtype == np.int32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    texts = tokenizers.ByteTokenizer(32).decode(batch["tokens"])
    assert all(any(colour in t for colour in shapes.COLOURS) for t in texts)


def test_same_seed_same_batches_and_new_seed_new_batches():
    a = _take(iter(pipeline.train_dataset(_config())), 3)
    b = _take(iter(pipeline.train_dataset(_config(**{"data.num_threads": 0}))), 3)
    assert _same(a, b)  # also independent of the number of reader threads
    c = _take(iter(pipeline.train_dataset(_config(seed=1))), 3)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_epochs_repeat_with_a_new_order():
    c = _config(**{"data.shapes.train_size": 16})
    batches = _take(iter(pipeline.train_dataset(c)), 4)  # two epochs of 16
    first, second = _digests(batches[:2]), _digests(batches[2:])
    assert sorted(first) == sorted(second) and len(set(first)) == 16
    assert first != second


def test_resuming_from_iterator_state_gives_the_same_next_batches():
    c = _config(**{"pp.crop": "random_resized", "pp.flip": True})
    ds = pipeline.train_dataset(c)
    it = iter(ds)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # states survive JSON (Orbax stores them so)
    expected = _take(it, 3)
    resumed = iter(pipeline.train_dataset(c))
    resumed.set_state(state)
    assert _same(_take(resumed, 3), expected)


def test_process_shards_are_disjoint_and_cover_an_epoch():
    c = _config(**{"data.shapes.train_size": 32})
    shards = []
    for p in range(2):
        it = iter(pipeline.train_dataset(c, process_index=p, process_count=2))
        batches = _take(it, 4)  # 4 local batches of 4 = half an epoch each
        assert batches[0]["image"].shape[0] == 4
        shards.append(set(_digests(batches)))
    assert not shards[0] & shards[1]
    everything = {hashlib.sha1(pipeline.preprocess.normalize(shapes.ShapesSource(
        "train", num_examples=32)[i]["image"]).tobytes()).hexdigest() for i in range(32)}
    assert shards[0] | shards[1] == everything


def test_batch_size_must_divide_by_process_count():
    with pytest.raises(ValueError, match="batch_size=8 must be a positive multiple of process_count=3"):
        pipeline.train_dataset(_config(), process_index=0, process_count=3)


def _folder_with_corrupt_examples(root):
    rows = []
    for i in range(6):
        Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(root / f"ok{i}.png")
        rows.append({"image": f"ok{i}.png", "caption": f"good {i}"})
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[:400])
    rows.append({"image": "truncated.jpg", "caption": "broken"})
    rows.append({"image": "missing.jpg", "caption": "gone"})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("threads", [0, 2])
def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path, threads):
    _folder_with_corrupt_examples(tmp_path)
    c = _config(**{"data.source": "folder", "data.folder.path": str(tmp_path),
                   "data.num_threads": threads, "pp.image_size": 16})
    c.batch_size = 4
    it = iter(pipeline.train_dataset(c))
    batches = _take(it, 3)  # 12 good examples: two epochs of 6 good + 2 bad
    texts = [t for b in batches for t in tokenizers.ByteTokenizer(32).decode(b["tokens"])]
    assert all(t.startswith("good") for t in texts)
    consumed = it.get_state()["parent"]["next_index"]
    assert it.num_skipped == consumed - 12 >= 2
    state = it.get_state()
    resumed = iter(pipeline.train_dataset(c))
    resumed.set_state(state)
    assert resumed.num_skipped == it.num_skipped
    assert _same(_take(resumed, 2), _take(it, 2))


def test_a_source_of_only_corrupt_examples_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "captions.jsonl").write_text(
        "".join(json.dumps({"image": f"missing{i}.jpg", "caption": "x"}) + "\n" for i in range(3)))
    c = _config(**{"data.source": "folder", "data.folder.path": str(tmp_path),
                   "data.max_consecutive_skips": 20})
    with pytest.raises(RuntimeError, match="20 corrupt examples in a row.*missing"):
        next(iter(pipeline.train_dataset(c)))


def test_zeroshot_data_is_the_heldout_split_without_augmentation():
    c = _config(**{"evals.zeroshot.num_examples": 64, "pp.crop": "random_resized", "pp.flip": True})
    z = pipeline.zeroshot_data(c)
    assert z["images"].shape == (64, 32, 32, 3) and z["images"].dtype == np.float32
    assert z["labels"].shape == (64,) and z["labels"].dtype == np.int32
    assert z["classnames"] == list(shapes.CLASSNAMES) and z["templates"] == list(shapes.ZEROSHOT_TEMPLATES)
    held = shapes.ShapesSource("heldout")
    assert [held[i]["label"] for i in range(64)] == z["labels"].tolist()
    # eval crop of a random_resized recipe is "center": at the native size, the image itself.
    assert np.array_equal(z["images"][5], pipeline.preprocess.normalize(held[5]["image"]))
    assert np.array_equal(pipeline.zeroshot_data(c)["images"], z["images"])


def test_build_source_names_an_unknown_source():
    c = _config(**{"data.source": "parquet"})
    with pytest.raises(ValueError, match="data.source"):
        pipeline.build_source(c.data)
