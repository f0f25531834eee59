"""data.cache_decoded: the training pipeline keeps decoded images in memory.

Same batches as without the cache (also across epochs and on resume), files are
read once, and corrupt files are skipped every epoch rather than cached.
"""

import os

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import config as data_config
from vlm_jax.data import pipeline
from vlm_jax.data.sources import CachedSource, ClassFolderSource

CLASSES = ("cat", "dog", "eel")


def _write_folder(root, per_class=4, corrupt=True):
  """A class folder of small images of mixed sizes and formats (+ one truncated PNG)."""
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for c, name in enumerate(CLASSES):
      d = root / split / name
      d.mkdir(parents=True)
      for i in range(per_class):
        if i % 2:  # RGB JPEG, not square, not the model's size
          arr = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
          Image.fromarray(arr).save(d / f"{i}.jpg", quality=90)
        else:  # 28x28 grayscale PNG
          arr = (rng.integers(0, 256, size=(28, 28)) // (c + 1)).astype(np.uint8)
          Image.fromarray(arr, "L").save(d / f"{i}.png")
  if corrupt:
    good = (root / "train" / "dog" / "0.png").read_bytes()
    (root / "train" / "dog" / "broken.png").write_bytes(good[:len(good) // 2])
  return str(root)


def _config(path, *, cache, crop="random_pad", threads=0, augment="trivialaugment"):
  c = data_config.default_config()
  c.seed, c.batch_size = 3, 4
  c.data.source = "folder"
  c.data.folder.path = path
  c.data.num_threads = threads
  c.data.cache_decoded = cache
  c.pp.image_size = 32
  c.pp.crop = crop
  c.pp.flip = True
  c.pp.augment = augment
  return c


def _batches(config, n, state=None):
  it = iter(pipeline.train_dataset(config, collate=pipeline.label_collate))
  if state is not None:
    it.set_state(state)
  return [next(it) for _ in range(n)], it


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


@pytest.mark.parametrize("crop", ["random_pad", "random_resized", "resize"])
def test_cached_batches_equal_uncached_over_several_epochs(tmp_path, crop):
  path = _write_folder(tmp_path)
  n = 12  # 48 examples: four epochs of 13 files (one of them corrupt)
  plain, it_plain = _batches(_config(path, cache=False, crop=crop), n)
  cached, it_cached = _batches(_config(path, cache=True, crop=crop, threads=2), n)
  _assert_same(plain, cached)
  assert it_cached.num_skipped == it_plain.num_skipped >= 3  # skipped every epoch


def test_cached_run_reads_no_file_after_the_first_epoch(tmp_path):
  path = _write_folder(tmp_path)
  reference, _ = _batches(_config(path, cache=False), 9)

  def run(cache):
    it = iter(pipeline.train_dataset(_config(path, cache=cache), collate=pipeline.label_collate))
    first = [next(it) for _ in range(4)]  # 16 positions > 13 files: every file read once
    for root, _, files in os.walk(os.path.join(path, "train")):
      for f in files:
        os.rename(os.path.join(root, f), os.path.join(root, f + ".gone"))
    try:
      rest = [next(it) for _ in range(5)]
    finally:
      for root, _, files in os.walk(os.path.join(path, "train")):
        for f in files:
          os.rename(os.path.join(root, f), os.path.join(root, f[:-len(".gone")]))
    return first + rest, it.num_skipped

  cached, skipped = run(cache=True)
  _assert_same(reference, cached)
  assert skipped == 3  # only the corrupt file, once per epoch
  with pytest.raises(RuntimeError, match="corrupt examples in a row"):
    # Without the cache every read now fails (12 files missing).
    c = _config(path, cache=False)
    c.data.max_consecutive_skips = 12
    it = iter(pipeline.train_dataset(c, collate=pipeline.label_collate))
    [next(it) for _ in range(4)]
    for root, _, files in os.walk(os.path.join(path, "train")):
      for f in files:
        os.remove(os.path.join(root, f))
    [next(it) for _ in range(5)]


def test_resume_with_cache_continues_exactly(tmp_path):
  path = _write_folder(tmp_path)
  config = _config(path, cache=True, threads=2)
  whole, _ = _batches(config, 10)
  _, it = _batches(config, 6)
  state = it.get_state()
  rest, _ = _batches(config, 4, state=state)  # a fresh pipeline with an empty cache
  _assert_same(whole[6:], rest)


def test_cached_source_stores_resized_read_only_images(tmp_path):
  path = _write_folder(tmp_path, corrupt=False)
  inner = ClassFolderSource(path, "train")
  squashed = pipeline.cached_source(inner, _config(path, cache=True).pp)
  kept = pipeline.cached_source(inner, _config(path, cache=True, crop="random_resized").pp)
  assert isinstance(squashed, CachedSource) and squashed.classnames == list(CLASSES)
  jpg = next(i for i in range(len(inner)) if inner[i]["path"].endswith(".jpg"))
  assert squashed[jpg]["image"].shape == (32, 32, 3)
  assert kept[jpg]["image"].shape == (30, 40, 3)  # random_resized crops the original
  assert squashed.num_cached == 1
  ex = squashed[jpg]
  assert ex["label"] == inner[jpg]["label"] and ex["path"] == inner[jpg]["path"]
  with pytest.raises(ValueError):
    ex["image"][0, 0, 0] = 1  # shared by later reads: must not be writable
