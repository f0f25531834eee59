"""Grain input pipelines: training batches and the zero-shot evaluation set.

Training (``train_dataset``), per process:

    source indices --shuffle(config.seed, new order each epoch)--> repeat forever
      --map_with_index: read + decode + augment (in ``data.num_threads`` threads)-->
      [process_index::process_count] --> skip & count corrupt --> batch + tokenize

With ``data.cache_decoded`` the source keeps every image it has decoded (and
resized, when the crop squashes first) in memory, so only the first epoch reads
files; augmentation still draws from (seed, position), the batches are unchanged.

Every step is a pure function of (config.seed, position in the stream), so the
same seed gives the same batches, and ``get_state()``/``set_state()`` on the
iterator resume exactly. Processes read disjoint positions of one global stream.

The training iterator (``DataIterator``) is a grain ``DatasetIterator`` and yields

    {"image": float32 [b, H, W, 3] in pp.value_range, "tokens": int32 [b, max_len]}

with ``b = config.batch_size // process_count``. Corrupt or unreadable examples
(``CorruptExampleError``, ``OSError``) are skipped; ``iterator.num_skipped`` is the
running count since the start of training (part of the checkpointed state), for the
trainer's "data/skipped" metric.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import grain
import numpy as np

from vlm_jax.data import preprocess
from vlm_jax.data.sources import DEFAULT_TEMPLATES, CachedSource, build_source
from vlm_jax.data.tokenizers import build_tokenizer

__all__ = ["DataIterator", "build_source", "train_dataset", "zeroshot_data", "example_dataset"]

_log = logging.getLogger(__name__)
_SKIP_ERRORS = (preprocess.CorruptExampleError, OSError)


class Skipped(NamedTuple):
    """Stands in the stream for an example that could not be read."""
    source_index: int
    reason: str


def _seed32(seed: Any, salt: int = 0) -> int:
    return int(np.random.SeedSequence([int(seed) % 2**63, salt]).generate_state(1)[0])


_EVAL_CROP = {"random_resized": "center", "random_pad": "resize"}


def _augment_fn(pp: Any):
    """``fn(uint8 image, rng) -> uint8 image`` for ``pp.augment``, or None for "none"."""
    policy = pp.get("augment", "none") or "none"
    if policy == "none":
        return None
    from vlm_jax.data import augment  # pylint: disable=import-outside-toplevel
    if policy not in augment.POLICIES:
        raise ValueError(f"pp.augment must be one of {augment.POLICIES}, got {policy!r}")
    kw = {}
    if policy == "randaugment":
        kw = dict(num_ops=int(pp.get("randaug_num_ops", 2)),
                  magnitude=int(pp.get("randaug_magnitude", 9)))
    return lambda image, rng: augment.apply_policy(image, policy, rng, **kw)


def _pp_kwargs(pp: Any, train: bool) -> dict[str, Any]:
    crop = pp.crop
    if not train:
        crop = pp.get("eval_crop") or _EVAL_CROP.get(crop, crop)
    if crop not in preprocess.CROP_MODES:
        raise ValueError(f"pp.crop must be one of {preprocess.CROP_MODES}, got {crop!r}")
    return dict(
        image_size=pp.image_size, crop=crop, value_range=tuple(pp.value_range),
        flip=bool(pp.get("flip", False)) and train,
        scale=tuple(pp.get("crop_scale", (0.08, 1.0))), ratio=tuple(pp.get("crop_ratio", (3 / 4, 4 / 3))),
        method=pp.get("resize_method", "bilinear"), padding=int(pp.get("crop_padding", 4)),
        augment=_augment_fn(pp) if train else None,
    )


def _make_reader(source: Any, pp: Any, *, train: bool, seed: int):
    """fn(position, source_index) -> {"image", "text", "label"} or Skipped."""
    kw = _pp_kwargs(pp, train)
    needs_rng = kw["crop"].startswith("random") or kw["flip"] or kw["augment"] is not None
    aug_seed = _seed32(seed, 1)

    def read(position: int, source_index: int):
        source_index = int(source_index)
        try:
            ex = source[source_index]
            rng = np.random.default_rng([aug_seed, int(position)]) if needs_rng else None
            image = preprocess.preprocess_image(ex["image"], rng=rng, what=f"example {source_index}", **kw)
        except _SKIP_ERRORS as e:
            return Skipped(source_index, f"{type(e).__name__}: {e}")
        text = ex["text"]
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return {"image": image, "text": text, "label": int(ex.get("label", -1))}

    return read


# Crop modes whose first step squashes the whole image to pp.image_size: the cache
# may store that resized image and give exactly the same crops.
_SQUASH_FIRST = ("resize", "random_pad")


def cached_source(source: Any, pp: Any) -> CachedSource:
    """``source`` with decoded images kept in memory (``data.cache_decoded``); resized to
    ``pp.image_size`` already when ``pp.crop`` squashes first, so batches are unchanged."""
    squash = pp.crop in _SQUASH_FIRST
    return CachedSource(source, image_size=pp.image_size if squash else None,
                        method=pp.get("resize_method", "bilinear"))


def example_dataset(config: Any, *, process_index: int = 0, process_count: int = 1,
                    split: str | None = None) -> grain.MapDataset:
    """The infinite, shuffled, preprocessed per-example stream of one process.

    A grain MapDataset whose element at position p is ``{"image": float32 [H,W,3],
    "text": str, "label": int}`` or a ``Skipped`` marker for a corrupt example.
    ``train_dataset`` batches it; NaViT packing can consume it instead.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    seed = config.get("seed", 0)
    source = build_source(config.data, split, image_size=config.pp.image_size)
    if config.data.get("cache_decoded", False):
        source = cached_source(source, config.pp)
    ds = grain.MapDataset.range(len(source))
    if config.data.get("shuffle", True):
        ds = ds.shuffle(seed=_seed32(seed, 0))
    ds = ds.repeat(None)
    ds = ds.map_with_index(_make_reader(source, config.pp, train=True, seed=seed))
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds


def caption_collate(tokenizer: Any) -> Callable[[list[dict]], dict[str, np.ndarray]]:
    """Examples -> {"image": float32 [b,H,W,3], "tokens": int32 [b,L]} (contrastive)."""
    def collate(examples):
        return {"image": np.stack([ex["image"] for ex in examples]),
                "tokens": tokenizer.encode([ex["text"] for ex in examples])}
    return collate


def label_collate(examples: list[dict]) -> dict[str, np.ndarray]:
    """Examples -> {"image": float32 [b,H,W,3], "label": int32 [b]} (classification)."""
    labels = np.asarray([ex["label"] for ex in examples], np.int32)
    if np.any(labels < 0):
        raise ValueError("classification needs labelled examples, but the source gave label -1 "
                         "(TFDS: set data.tfds.label_key; folder: DIR/train/<class>/ layout)")
    return {"image": np.stack([ex["image"] for ex in examples]), "label": labels}


class DataIterator(grain.DatasetIterator):
    """Batches of the per-example stream; skips and counts corrupt examples.

    ``next(it)`` -> ``collate(examples)``, by default {"image": float32 [b,H,W,3],
    "tokens": int32 [b,L]} (``caption_collate``).
    ``it.num_skipped``: corrupt examples skipped so far (restored by ``set_state``).
    ``it.get_state()`` / ``it.set_state(state)``: JSON-serialisable resume state.
    """

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, collate: Callable,
                 max_consecutive_skips: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._collate = collate
        self._max_skips = max_consecutive_skips
        self._skipped = 0

    @property
    def num_skipped(self) -> int:
        return self._skipped

    def __next__(self) -> dict[str, np.ndarray]:
        examples = []
        run = 0
        while len(examples) < self._batch_size:
            ex = next(self._parent)
            if isinstance(ex, Skipped):
                self._skipped += 1
                run += 1
                if self._skipped <= 10 or self._skipped % 1000 == 0:
                    _log.warning("skipping corrupt example %d (%d skipped so far): %s",
                                 ex.source_index, self._skipped, ex.reason)
                if run >= self._max_skips:
                    raise RuntimeError(f"{run} corrupt examples in a row (data.max_consecutive_skips); "
                                       f"last: example {ex.source_index}: {ex.reason}")
                continue
            run = 0
            examples.append(ex)
        return self._collate(examples)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "num_skipped": self._skipped}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = int(state["num_skipped"])


class TrainDataset(grain.IterDataset):
    """IterDataset of training batches; ``iter()`` gives a fresh ``DataIterator``."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, collate: Callable,
                 max_consecutive_skips: int):
        super().__init__(parent)
        self.batch_size = batch_size
        self.collate = collate
        self._max_skips = max_consecutive_skips

    def __iter__(self) -> DataIterator:
        return DataIterator(self._parent.__iter__(), self.batch_size, self.collate, self._max_skips)

    def __str__(self) -> str:
        return f"TrainDataset(batch_size={self.batch_size})"


def train_dataset(config: Any, *, process_index: int = 0, process_count: int = 1,
                  collate: Callable | None = None) -> TrainDataset:
    """Training batches for one process.

    Args:
      config: a recipe config: ``seed``, ``batch_size`` (global), ``data``, ``pp``,
        ``tokenizer`` (see config.py).
      process_index, process_count: this process and the number of processes
        (``jax.process_index()``, ``jax.process_count()``).
      collate: list of examples -> batch dict; None: ``caption_collate`` with the
        config's tokenizer (classification passes ``label_collate``).
    Returns:
      A grain IterDataset; ``iter(ds)`` is a ``DataIterator`` of local batches
      {"image": float32 [b,H,W,3], "tokens": int32 [b,L]} (or what ``collate``
      makes), b = batch_size // process_count.
    """
    if "batch_size" not in config:
        raise ValueError("config.batch_size (global batch size) is not set")
    if config.batch_size <= 0 or config.batch_size % process_count:
        raise ValueError(f"config.batch_size={config.batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    local = config.batch_size // process_count
    ds = example_dataset(config, process_index=process_index, process_count=process_count)
    threads = int(config.data.get("num_threads", 2))
    buffer = int(config.data.get("prefetch_buffer_size", 256))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer
                                                 if threads > 0 else 0))
    if collate is None:
        collate = caption_collate(build_tokenizer(config.tokenizer))
    return TrainDataset(it_ds, local, collate, int(config.data.get("max_consecutive_skips", 1000)))


def zeroshot_data(config: Any) -> dict[str, Any]:
    """The zero-shot evaluation set, preprocessed like training without augmentation.

    Reads the first ``evals.zeroshot.num_examples`` examples (-1: all) of split
    ``evals.zeroshot.split`` of ``evals.zeroshot.data`` (None: ``config.data``).
    Corrupt examples are left out.

    Returns:
      dict(images=float32 [N,H,W,3], labels=int32 [N], classnames=list[str] (C),
      templates=list[str] (each with one "{}"), num_skipped=int).
      ``shapes.class_prompts(classnames, templates)`` gives the [C][T] prompts.
    """
    zs = config.evals.zeroshot
    data_cfg = zs.get("data") or config.data
    source = build_source(data_cfg, zs.split, image_size=config.pp.image_size)
    classnames = getattr(source, "classnames", None)
    if not classnames:
        raise ValueError(f"zero-shot needs a labelled source; {source!r} has no class names "
                         "(TFDS: set label_key to a ClassLabel; folder: add a 'label' column)")
    n = len(source) if zs.num_examples in (None, -1) else min(int(zs.num_examples), len(source))
    read = _make_reader(source, config.pp, train=False, seed=config.get("seed", 0))
    threads = int(data_cfg.get("num_threads", 2))
    it = grain.MapDataset.range(n).map_with_index(read).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=256 if threads > 0 else 0))
    images, labels, skipped = [], [], 0
    for ex in it:
        if isinstance(ex, Skipped):
            skipped += 1
            _log.warning("zero-shot: skipping corrupt example %d: %s", ex.source_index, ex.reason)
            continue
        if not 0 <= ex["label"] < len(classnames):
            raise ValueError(f"zero-shot example has label {ex['label']} outside [0, {len(classnames)})")
        images.append(ex["image"])
        labels.append(ex["label"])
    if not images:
        raise ValueError(f"zero-shot split {zs.split!r} of {source!r} gave no readable examples")
    templates = zs.get("templates") or getattr(source, "templates", None) or DEFAULT_TEMPLATES
    return dict(images=np.stack(images), labels=np.asarray(labels, np.int32),
                classnames=list(classnames), templates=list(templates), num_skipped=skipped)
