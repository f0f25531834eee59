"""Grain input pipelines: training batches and the zero-shot evaluation set.

Training (``train_dataset``), per process:

    source indices --shuffle(config.seed, new order each epoch)--> repeat forever
      --map_with_index: read + decode + augment (in ``data.num_threads`` threads)-->
      [process_index::process_count] --> skip & count corrupt --> batch + tokenize

Webdataset tar shards (``data.source = "webdataset"``) are a stream, not random
access: each process reads its own shards, shuffled by shard and through a seeded
buffer, and its reader threads split the stream by position (``webdataset.py``).
The batches after that are built, counted and resumed the same way.

With ``data.num_workers > 0`` the read + decode + augment step runs in that many
worker processes (grain ``mp_prefetch``), each cutting its share of the stream into
runs of ``b`` consecutive examples and stacking them (one shared-memory transfer per
batch, normalised already); ``WorkerDataIterator`` then skips the corrupt ones and
assembles the same batches as in-process threads give, and resumes them exactly.

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
from vlm_jax.data.sources import CachedSource, build_source
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
        fast_decode=bool(pp.get("fast_decode", False)),
        max_pixels=int(pp.get("max_pixels", preprocess.DEFAULT_MAX_PIXELS) or 0) or None,
    )


def _make_reader(source: Any, pp: Any, *, train: bool, seed: int, normalize: bool = True):
    """fn(position, source_index) -> {"image", "text", "label"} or Skipped; the image
    float32 in pp.value_range, or uint8 with ``normalize=False``."""
    kw = _pp_kwargs(pp, train)
    if not normalize:
        kw["value_range"] = None
    needs_rng = kw["crop"].startswith("random") or kw["flip"] or kw["augment"] is not None
    aug_seed = _seed32(seed, 1)

    # Sources that can hand over the image still encoded (a path or bytes) let
    # preprocess_image decode it, at reduced size with pp.fast_decode.
    get = source.encoded if callable(getattr(type(source), "encoded", None)) else source.__getitem__

    def read(position: int, source_index: int):
        source_index = int(source_index)
        try:
            ex = get(source_index)
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
                    split: str | None = None, normalize: bool = True
                    ) -> grain.MapDataset | grain.IterDataset:
    """The infinite, shuffled, preprocessed per-example stream of one process.

    A grain MapDataset whose element at position p is ``{"image": float32 [H,W,3],
    "text": str, "label": int}`` or a ``Skipped`` marker for a corrupt example.
    ``train_dataset`` batches it; NaViT packing can consume it instead.
    For ``data.source = "webdataset"`` (a stream, not random access) it is a grain
    IterDataset of the same elements (``webdataset.WebDataset``, read by reference;
    ``set_slice`` splits it between reader threads or worker processes).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    seed = config.get("seed", 0)
    if config.data.source == "webdataset":
        from vlm_jax.data import webdataset  # pylint: disable=import-outside-toplevel
        if config.data.get("cache_decoded", False):
            raise ValueError("data.cache_decoded needs a random-access source; webdataset streams "
                             "(convert the shards with python -m vlm_jax.data.convert)")
        c = config.data.webdataset
        paths = webdataset.expand_shards(c.shards)
        stream = webdataset.WebDataset(
            paths, seed=_seed32(seed, 0), shuffle=config.data.get("shuffle", True),
            buffer_size=c.get("shuffle_buffer", 1000), process_index=process_index,
            process_count=process_count)
        samples = webdataset.ShardSamples(stream.paths, **webdataset.member_options(c))
        read = _make_reader(samples, config.pp, train=True, seed=seed, normalize=normalize)
        return stream.map(lambda element: read(*element))
    source = build_source(config.data, split, image_size=config.pp.image_size)
    if config.data.get("cache_decoded", False):
        source = cached_source(source, config.pp)
    ds = grain.MapDataset.range(len(source))
    if config.data.get("shuffle", True):
        ds = ds.shuffle(seed=_seed32(seed, 0))
    ds = ds.repeat(None)
    ds = ds.map_with_index(_make_reader(source, config.pp, train=True, seed=seed,
                                        normalize=normalize))
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds


def caption_collate(tokenizer: Any) -> Callable[[list[dict]], dict[str, np.ndarray]]:
    """Examples -> {"image": float32 [b,H,W,3], "tokens": int32 [b,L]} (contrastive).

    ``collate.from_columns(columns)`` makes the same batch from stacked columns
    (``_stack_examples``); the worker-process pipeline uses it to avoid a copy."""
    def from_columns(cols):
        return {"image": cols["image"], "tokens": tokenizer.encode(list(cols["text"]))}

    def collate(examples):
        return from_columns(_stack_examples(examples))
    collate.from_columns = from_columns
    return collate


def _label_columns(cols: dict[str, Any]) -> dict[str, np.ndarray]:
    labels = np.asarray(cols["label"], np.int32)
    if np.any(labels < 0):
        raise ValueError("classification needs labelled examples, but the source gave label -1 "
                         "(TFDS: set data.tfds.label_key; folder: DIR/train/<class>/ layout)")
    return {"image": cols["image"], "label": labels}


def label_collate(examples: list[dict]) -> dict[str, np.ndarray]:
    """Examples -> {"image": float32 [b,H,W,3], "label": int32 [b]} (classification).
    ``label_collate.from_columns``: the same from stacked columns."""
    return _label_columns(_stack_examples(examples))


label_collate.from_columns = _label_columns


def _stack_examples(examples: list[dict]) -> dict[str, Any]:
    """Examples -> columns: arrays stacked ([n, ...]), other values as lists."""
    cols = {}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        cols[key] = np.stack(values) if isinstance(values[0], np.ndarray) else values
    return cols


def _columns_slice(cols: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    return {k: v[start:stop] for k, v in cols.items()}


def _columns_concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) if isinstance(parts[0][k], np.ndarray)
            else [v for p in parts for v in p[k]] for k in parts[0]}


class _Chunk:
    """Batches a run of consecutive stream elements in a worker process: {"columns": the
    readable examples stacked (None if none), "skipped": [[index in the run, source
    index, reason]]}. uint8 images are normalised onto ``value_range`` straight into a
    shared-memory float32 [n, H, W, 3] (no stacking copy; it reaches the main process
    without another), with the same float32 arithmetic as ``preprocess.normalize``."""

    def __init__(self, value_range: Any):
        self.scale, self.lo = preprocess.pixel_affine(value_range)

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        from grain.multiprocessing import SharedMemoryArray  # pylint: disable=import-outside-toplevel
        good = [ex for ex in examples if not isinstance(ex, Skipped)]
        skipped = [[i, int(ex.source_index), ex.reason] for i, ex in enumerate(examples)
                   if isinstance(ex, Skipped)]
        if not good:
            return {"columns": None, "skipped": skipped}
        images = [ex["image"] for ex in good]
        out = SharedMemoryArray((len(images), *images[0].shape), np.float32)
        for i, image in enumerate(images):
            np.multiply(image, self.scale, out=out[i])
            out[i] += self.lo
        cols = _stack_examples([{k: v for k, v in ex.items() if k != "image"} for ex in good])
        cols["image"] = out
        return {"columns": cols, "skipped": skipped}


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


class WorkerDataIterator(DataIterator):
    """``DataIterator`` over runs of examples read and batched in worker processes
    (``data.num_workers > 0``): the same batches as ``DataIterator`` over the same
    stream. A run with corrupt examples leaves a partial run over for the next batch;
    the state then points at that run's start plus how many of its examples are used."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, collate: Callable,
                 max_consecutive_skips: int):
        super().__init__(parent, batch_size, collate, max_consecutive_skips)
        self._from_columns = getattr(collate, "from_columns", None)
        self._run = 0  # corrupt examples in a row
        # The run in use: (its columns, examples of it already in batches, parent state before it).
        self._pending: tuple[dict | None, int, Any] | None = None

    def _fetch(self, count_skips: bool = True) -> tuple[dict | None, Any]:
        """The next run of examples: (columns or None, the parent state before it)."""
        state = self._parent.get_state()
        run = next(self._parent)
        cols, skipped = run["columns"], run["skipped"]
        if not count_skips:
            return cols, state
        if not skipped:
            self._run = 0
            return cols, state
        n = (0 if cols is None else len(cols["image"])) + len(skipped)
        bad = {int(i): (source_index, reason) for i, source_index, reason in skipped}
        for i in range(n):
            if i not in bad:
                self._run = 0
                continue
            source_index, reason = bad[i]
            self._skipped += 1
            self._run += 1
            if self._skipped <= 10 or self._skipped % 1000 == 0:
                _log.warning("skipping corrupt example %d (%d skipped so far): %s",
                             source_index, self._skipped, reason)
            if self._run >= self._max_skips:
                raise RuntimeError(f"{self._run} corrupt examples in a row (data.max_consecutive_"
                                   f"skips); last: example {source_index}: {reason}")
        return cols, state

    def __next__(self) -> dict[str, np.ndarray]:
        parts, have = [], 0
        while have < self._batch_size:
            if self._pending is None:
                cols, state = self._fetch()
                self._pending = (cols, 0, state)
            cols, used, state = self._pending
            n = 0 if cols is None else len(cols["image"])
            take = min(n - used, self._batch_size - have)
            if take > 0:
                parts.append(_columns_slice(cols, used, used + take) if (used, take) != (0, n) else cols)
                have += take
            self._pending = None if used + take >= n else (cols, used + take, state)
        cols = _columns_concat(parts)
        if self._from_columns is not None:
            return self._from_columns(cols)
        return self._collate([{k: v[i] for k, v in cols.items()} for i in range(have)])

    def get_state(self) -> dict[str, Any]:
        if self._pending is None:
            return {"parent": self._parent.get_state(), "used": 0, "num_skipped": self._skipped}
        _, used, state = self._pending
        return {"parent": state, "used": used, "num_skipped": self._skipped}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = int(state["num_skipped"])
        self._pending, self._run = None, 0
        if int(state.get("used", 0)):  # re-read the partly used run; its skips are counted
            cols, _ = self._fetch(count_skips=False)
            self._pending = (cols, int(state["used"]), state["parent"])


class TrainDataset(grain.IterDataset):
    """IterDataset of training batches; ``iter()`` gives a fresh ``DataIterator``."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, collate: Callable,
                 max_consecutive_skips: int, iterator: type[DataIterator] = DataIterator):
        super().__init__(parent)
        self.batch_size = batch_size
        self.collate = collate
        self._max_skips = max_consecutive_skips
        self._iterator = iterator

    def __iter__(self) -> DataIterator:
        return self._iterator(self._parent.__iter__(), self.batch_size, self.collate, self._max_skips)

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
    workers = int(config.data.get("num_workers", 0))
    if workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {workers}")
    ds = example_dataset(config, process_index=process_index, process_count=process_count,
                         normalize=workers == 0)
    threads = int(config.data.get("num_threads", 2))
    buffer = int(config.data.get("prefetch_buffer_size", 256))
    max_skips = int(config.data.get("max_consecutive_skips", 1000))
    if collate is None:
        collate = caption_collate(build_tokenizer(config.tokenizer))
    if workers > 0:
        runs = _worker_runs(ds, local, workers, threads, _Chunk(config.pp.value_range))
        return TrainDataset(runs, local, collate, max_skips, iterator=WorkerDataIterator)
    if isinstance(ds, grain.MapDataset):
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer
                                                     if threads > 0 else 0))
    else:  # a stream (webdataset): each thread reads positions i::threads of it
        it_ds = grain.experimental.multithread_prefetch(
            ds, num_threads=threads, buffer_size=max(1, buffer // max(threads, 1)))
    return TrainDataset(it_ds, local, collate, max_skips)


def _worker_runs(ds: grain.MapDataset | grain.IterDataset, size: int, workers: int,
                 threads: int, chunk: Callable) -> grain.IterDataset:
    """Runs of ``size`` consecutive stream elements (``_Chunk``), run k read, preprocessed
    and stacked by worker process k % ``workers`` with ``threads`` reader threads each;
    grain's mp_prefetch hands them back in order, arrays through shared memory.
    A random-access stream is cut into runs before it is split between the workers, so
    the batches do not depend on the worker count; a webdataset stream is split by
    position first (worker w reads positions w::workers), so they do."""
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags: defaults outside an app
        flags.FLAGS.mark_as_parsed()
    if isinstance(ds, grain.MapDataset):
        threads = threads if threads > 1 else 0  # 1: the worker's own thread reads
        runs = ds.batch(size, batch_fn=chunk).to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
    else:
        runs = ds.batch(size, batch_fn=chunk)
    return runs.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                         per_worker_buffer_size=1))


def zeroshot_data(config: Any) -> dict[str, Any]:
    """The zero-shot evaluation set in memory, preprocessed like training without augmentation.

    Reads the first ``evals.zeroshot.num_examples`` examples (-1: all) of split
    ``evals.zeroshot.split`` of ``evals.zeroshot.data`` (None: ``config.data``).
    Corrupt examples are left out. For small sets (notebooks, tests): the zero-shot
    evaluator streams the same examples in batches instead
    (``eval_stream.zeroshot_split``), so its memory does not grow with the set.

    Returns:
      dict(images=float32 [N,H,W,3], labels=int32 [N], classnames=list[str] (C),
      templates=list[str] (each with one "{}"), num_skipped=int).
      ``shapes.class_prompts(classnames, templates)`` gives the [C][T] prompts.
    """
    # eval_stream builds on this module (its preprocessing), so it is imported here.
    from vlm_jax.data import eval_stream  # pylint: disable=import-outside-toplevel
    split = eval_stream.zeroshot_split(config, process_index=0, process_count=1)
    num_classes = len(split.classnames)
    images, labels = [], []
    for batch in split.batches(256):
        keep = np.flatnonzero(batch["valid"])
        bad = [int(v) for v in batch["label"][keep] if not 0 <= v < num_classes]
        if bad:
            raise ValueError(f"zero-shot example has label {bad[0]} outside [0, {num_classes})")
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
    labels = np.concatenate(labels)
    if not len(labels):
        raise ValueError(f"zero-shot split {config.evals.zeroshot.split!r} of {split.source!r} "
                         "gave no readable examples")
    return dict(images=np.concatenate(images), labels=labels.astype(np.int32),
                classnames=list(split.classnames), templates=list(split.templates),
                num_skipped=split.num_skipped)
