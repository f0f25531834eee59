"""Evaluation splits read in batches, so evaluation memory does not grow with the split.

    split = EvalSplit.from_config(config, config.data, "heldout", 2000, what="evals.zeroshot")
    for batch in split.batches(256, multiple=8):
        batch["image"]   # float32 [b, H, W, 3]: pp with the eval crop, no flip, no augmentation
        batch["label"]   # int32 [b] (-1: the source has no labels)
        batch["texts"]   # b lists of str: every caption of the example ([] for a padding row)
        batch["index"]   # int64 [b]: the example's index in the split; -1 for a padding row
        batch["valid"]   # bool [b]: False for padding rows and corrupt examples
    split.num_skipped    # corrupt examples the last full pass left out (this process)

The pipeline is the training one without augmentation: grain reads, decodes and
preprocesses examples in ``data.num_threads`` threads, ``data.prefetch_buffer_size``
examples ahead. Only one batch and that buffer are in memory at a time.

Processes: process p reads the examples ``[p::process_count]`` of the first N.
Every process yields the same number of batches, all of the same row count
(``batch_rows``: a multiple of ``multiple``, e.g. the devices of the batch axes
this process holds), so the batches of all processes can form one global batch on
the mesh. Rows past the end of a process's slice, and corrupt examples, are padding
rows (valid False, zero image, index -1): no example is dropped or counted twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from vlm_jax.data import pipeline, preprocess
from vlm_jax.data.sources import DEFAULT_TEMPLATES, build_source

__all__ = ["EvalSplit", "ArraySplit", "as_split", "zeroshot_split"]

_log = logging.getLogger(__name__)


def _process() -> tuple[int, int]:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index(), jax.process_count()


def _rows(n_local: int, batch_size: int, multiple: int) -> int:
  """Rows per local batch: ``batch_size`` rounded down to ``multiple`` (at least one
  multiple), or fewer when the whole slice fits, rounded up to ``multiple``."""
  multiple = max(1, int(multiple))
  full = max(multiple, int(batch_size) - int(batch_size) % multiple)
  need = max(multiple, -(-int(n_local) // multiple) * multiple)
  return min(full, need)


class _Split:
  """What the two kinds of split share: process slicing and batch geometry."""

  num_examples: int
  process_index: int
  process_count: int

  def __len__(self) -> int:
    return self.num_examples

  def local_indices(self) -> range:
    """The split indices this process reads."""
    return range(self.process_index, self.num_examples, self.process_count)

  def _geometry(self, batch_size: int, multiple: int) -> tuple[int, int]:
    """(rows, steps), equal on every process: sized by the longest slice (process 0's)."""
    longest = -(-self.num_examples // self.process_count)
    local_bs = max(1, int(batch_size) // self.process_count)
    rows = _rows(longest, local_bs, multiple)
    return rows, -(-longest // rows)

  def batch_rows(self, batch_size: int, multiple: int = 1) -> int:
    """Rows of every batch ``batches(batch_size, multiple=multiple)`` yields."""
    return self._geometry(batch_size, multiple)[0]

  def num_batches(self, batch_size: int, multiple: int = 1) -> int:
    """Batches ``batches(batch_size, multiple=multiple)`` yields (the same on every process)."""
    return self._geometry(batch_size, multiple)[1]


class EvalSplit(_Split):
  """The first ``num_examples`` examples of a source, streamed in batches.

  Args:
    source: a random-access source (``len``, ``source[i]`` -> dict(image, text,
      label)); with a ``read(i, all_texts=True)`` method every caption is kept.
    pp: the ``pp`` config (image size, eval crop, value range).
    num_examples: how many examples from the start (-1 / None: all).
    what: the config section, for messages (e.g. "evals.retrieval").
    num_threads, prefetch_buffer_size: grain read options (0 threads: read inline).
    process_index, process_count: None: ``jax.process_index()`` / ``process_count()``.
  ``classnames`` / ``templates``: the source's (None when it has none).
  """

  def __init__(self, source: Any, pp: Any, *, num_examples: int | None = None,
               what: str = "evals", num_threads: int = 2, prefetch_buffer_size: int = 256,
               process_index: int | None = None, process_count: int | None = None):
    n = len(source) if num_examples in (None, -1) else min(int(num_examples), len(source))
    if n <= 0:
      raise ValueError(f"{what}: num_examples must be positive or -1, got {num_examples!r}")
    if process_index is None or process_count is None:
      process_index, process_count = _process()
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    self.source, self.num_examples, self.what = source, n, what
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.num_threads, self.prefetch_buffer_size = int(num_threads), int(prefetch_buffer_size)
    self._kw = pipeline._pp_kwargs(pp, train=False)  # pylint: disable=protected-access
    self.image_shape = (*preprocess._size_hw(pp.image_size), 3)  # pylint: disable=protected-access
    classnames = getattr(source, "classnames", None)
    templates = getattr(source, "templates", None)
    self.classnames = list(classnames) if classnames else None
    self.templates = list(templates) if templates else None
    self.num_skipped = 0
    # Every caption of an example where the source has several (TFDS coco_captions);
    # else the image still encoded where the source offers it (as training reads
    # it: preprocess_image decodes, at reduced size with pp.fast_decode).
    if hasattr(source, "read"):
      self._get = lambda i: source.read(i, all_texts=True)
    elif callable(getattr(type(source), "encoded", None)):
      self._get = source.encoded
    else:
      self._get = source.__getitem__

  @classmethod
  def from_config(cls, config: Any, data_config: Any, split: str | None,
                  num_examples: int | None, *, what: str = "evals", **kw) -> "EvalSplit":
    """``split`` of the source ``data_config`` describes, preprocessed with ``config.pp``."""
    source = build_source(data_config, split, image_size=config.pp.image_size)
    return cls(source, config.pp, num_examples=num_examples, what=what,
               num_threads=int(data_config.get("num_threads", 2)),
               prefetch_buffer_size=int(data_config.get("prefetch_buffer_size", 256)), **kw)

  def _read(self, index: int):
    """Example ``index`` -> dict(image, texts, label, index) or (index, reason) if corrupt."""
    index = int(index)
    try:
      ex = self._get(index)
      image = preprocess.preprocess_image(ex["image"], what=f"example {index}", **self._kw)
    except (preprocess.CorruptExampleError, OSError) as e:
      return index, f"{type(e).__name__}: {e}"
    texts = ex.get("texts") or [ex["text"]]
    texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in texts]
    return dict(image=image, texts=texts, label=int(ex.get("label", -1)), index=index)

  def _examples(self) -> Iterator:
    local = self.local_indices()
    if not len(local):
      return iter(())
    ds = grain.MapDataset.range(local.start, local.stop, local.step).map(self._read)
    threads = self.num_threads
    return iter(ds.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=self.prefetch_buffer_size if threads > 0 else 0)))

  def batches(self, batch_size: int, *, multiple: int = 1) -> Iterator[dict[str, Any]]:
    """Yields ``num_batches`` dicts of ``batch_rows`` rows (see the module docstring);
    ``num_skipped`` holds this pass's count once the pass is complete."""
    rows, steps = self._geometry(batch_size, multiple)
    examples = self._examples()
    skipped = 0
    for _ in range(steps):
      batch = _empty_batch(rows, self.image_shape)
      for r in range(rows):
        ex = next(examples, None)
        if ex is None:
          break
        if isinstance(ex, tuple):
          skipped += 1
          if skipped <= 10 or skipped % 1000 == 0:
            _log.warning("%s: skipping corrupt example %d (%d so far): %s", self.what,
                         ex[0], skipped, ex[1])
          continue
        _fill_row(batch, r, ex)
      yield batch
    self.num_skipped = skipped

  def __repr__(self) -> str:
    return (f"EvalSplit({self.source!r}, n={self.num_examples}, "
            f"process {self.process_index}/{self.process_count})")


class ArraySplit(_Split):
  """An in-memory split (``dict(images=[N,H,W,3], labels=[N], texts=N lists, classnames,
  templates)``, e.g. given to an evaluator's ``data=``) with ``EvalSplit``'s interface."""

  def __init__(self, data: dict[str, Any], *, process_index: int | None = None,
               process_count: int | None = None):
    self.images = np.asarray(data["images"])
    n = len(self.images)
    if n == 0:
      raise ValueError("evaluation data has no images")
    labels = data.get("labels")
    self.labels = (np.full((n,), -1, np.int32) if labels is None
                   else np.asarray(labels, np.int32).reshape(-1))
    texts = data.get("texts")
    self.texts = [[] for _ in range(n)] if texts is None else [list(t) for t in texts]
    for name, got in (("labels", len(self.labels)), ("texts", len(self.texts))):
      if got != n:
        raise ValueError(f"evaluation data has {n} images but {got} {name}")
    self.classnames = list(data["classnames"]) if data.get("classnames") else None
    self.templates = list(data["templates"]) if data.get("templates") else None
    self.num_skipped = int(data.get("num_skipped", 0))
    if process_index is None or process_count is None:
      process_index, process_count = _process()
    self.num_examples = n
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.image_shape = self.images.shape[1:]

  def batches(self, batch_size: int, *, multiple: int = 1) -> Iterator[dict[str, Any]]:
    rows, steps = self._geometry(batch_size, multiple)
    local = list(self.local_indices())
    for s in range(steps):
      batch = _empty_batch(rows, self.image_shape, self.images.dtype)
      for r, i in enumerate(local[s * rows:(s + 1) * rows]):
        _fill_row(batch, r, dict(image=self.images[i], texts=self.texts[i],
                                 label=self.labels[i], index=i))
      yield batch


def zeroshot_split(config: Any, **kw) -> EvalSplit:
  """The zero-shot split: the first ``evals.zeroshot.num_examples`` examples (-1: all)
  of split ``evals.zeroshot.split`` of ``evals.zeroshot.data`` (None: ``config.data``).

  ``templates`` are ``evals.zeroshot.templates``, else the source's, else
  ``DEFAULT_TEMPLATES``. ``kw``: ``EvalSplit`` options (process_index, process_count).
  Raises ValueError when the source has no class names.
  """
  zs = config.evals.zeroshot
  data_config = zs.get("data") or config.data
  split = EvalSplit.from_config(config, data_config, zs.split, zs.num_examples,
                                what="evals.zeroshot", **kw)
  if not split.classnames:
    raise ValueError(f"zero-shot needs a labelled source; {split.source!r} has no class names "
                     "(TFDS: set label_key to a ClassLabel; folder: add a 'label' column)")
  split.templates = list(zs.get("templates") or split.templates or DEFAULT_TEMPLATES)
  return split


def as_split(data: Any) -> EvalSplit | ArraySplit:
  """``data`` itself if it has ``batches``, else an ``ArraySplit`` of the dict."""
  return data if hasattr(data, "batches") else ArraySplit(data)


def _empty_batch(rows: int, shape: tuple, dtype=np.float32) -> dict[str, Any]:
  return dict(image=np.zeros((rows, *shape), dtype), label=np.full((rows,), -1, np.int32),
              texts=[[] for _ in range(rows)], index=np.full((rows,), -1, np.int64),
              valid=np.zeros((rows,), bool))


def _fill_row(batch: dict, r: int, ex: dict) -> None:
  batch["image"][r] = ex["image"]
  batch["label"][r] = ex["label"]
  batch["texts"][r] = list(ex["texts"])
  batch["index"][r] = ex["index"]
  batch["valid"][r] = True
