"""Evaluation data for the evaluators: splits streamed through the model in batches.

Images are preprocessed as in training without augmentation (``pp.eval_crop``,
no flip). Corrupt examples are left out and counted. Sources come from
``vlm_jax.data.sources.build_source``: the embedded shapes data, TFDS datasets
prepared locally, or an image folder.

    split = eval_split(config, config.evals.retrieval, "heldout", 500)   # nothing read yet
    for outputs, batch in stream(split, encoder, "images", params, 256):
        ...   # outputs [b, D] of this process's rows; batch["valid"] marks real examples
    got = embed_split(split, encoder, params, 256, texts=True)
    got["outputs"]   # float32 [N, D], every process's rows in split order
    got["texts"]     # list of N lists of captions (every caption of an image)

Each process reads its own share of the split (``data.eval_stream``) and
evaluators combine the results over processes (``gather_rows``, ``process_sum``),
so metrics are over the whole split while memory holds one batch of images.
``read_split`` still reads a small split into memory (notebooks, tests).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vlm_jax.data.eval_stream import EvalSplit
from vlm_jax.evaluators.encoder import Encoder

# TFDS datasets the evaluators know how to read: data.tfds fields and the evaluation split.
TFDS_PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": dict(image_key="image", label_key="label", text_key=None, split="test"),
    "cifar100": dict(image_key="image", label_key="label", text_key=None, split="test"),
    "imagenet2012": dict(image_key="image", label_key="label", text_key=None, split="validation"),
    "coco_captions": dict(image_key="image", label_key="", text_key="captions/text", split="val"),
}


def tfds_data(name: str, *, data_dir: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """A ``data`` ConfigDict reading TFDS dataset ``name`` for an evaluator's ``data`` field.

      config.evals.zeroshot.data = tfds_data("cifar10")
      config.evals.zeroshot.split = "test"
      config.evals.retrieval.data = tfds_data("coco_captions")

  ``name`` may carry a version ("coco_captions:2017"); known names (``TFDS_PRESETS``)
  get their image/label/caption keys; ``overrides`` set other ``data.tfds`` fields.
  """
  from vlm_jax.data import config as data_config  # pylint: disable=import-outside-toplevel
  c = data_config.default_config().data
  c.source = "tfds"
  c.tfds.name = name
  preset = dict(TFDS_PRESETS.get(name.split(":")[0].split("/")[0], {}))
  c.tfds.split = preset.pop("split", "test")
  for k, v in {**preset, **overrides}.items():
    if k not in c.tfds:
      raise ValueError(f"tfds_data: {k!r} is not a data.tfds field; known: {sorted(c.tfds)}")
    c.tfds[k] = v
  if data_dir is not None:
    c.tfds.data_dir = data_dir
  return c


def section_data(config, section) -> ml_collections.ConfigDict:
  """The ``data`` config an evaluator section reads: ``section.data`` or ``config.data``."""
  return section.get("data") or config.data


def eval_split(config, section, split: str | None, num_examples: int | None, *,
               what: str = "evals") -> EvalSplit:
  """The evaluation split an evaluator streams: the first ``num_examples`` examples
  (-1 / None: all) of ``split`` of the section's source, read in batches, this
  process's share (``[process_index::process_count]``) only.

  Args:
    config: the run's config (``pp``, ``data``).
    section: the evaluator's config section (its ``data`` picks the source).
    split: the split name (shapes: "train" | "heldout"; TFDS split string).
    num_examples: how many examples from the start of the split.
    what: the section's name for error messages (e.g. "evals.retrieval").
  """
  return EvalSplit.from_config(config, section_data(config, section), split, num_examples,
                               what=what)


def read_split(config, section, split: str, num_examples: int | None, *,
               what: str = "evals") -> dict[str, Any]:
  """Reads the first ``num_examples`` examples (-1 / None: all) of ``split`` into memory.

  For small splits and notebooks; the evaluators stream (``eval_split``). Every
  process reads the whole split.

  Returns:
    dict(images=float32 [N,H,W,3], texts=list of N lists of str (all captions
    of an example), labels=int32 [N] (-1: none), classnames=list[str] or None,
    templates=list[str] or None, num_skipped=int).
  Raises:
    ValueError naming ``what`` when the split gives no readable example.
  """
  s = EvalSplit.from_config(config, section_data(config, section), split, num_examples,
                            what=what, process_index=0, process_count=1)
  images, texts, labels = [], [], []
  for batch in s.batches(256):
    keep = np.flatnonzero(batch["valid"])
    images.append(batch["image"][keep])
    labels.append(batch["label"][keep])
    texts += [batch["texts"][i] for i in keep]
  if not texts:
    raise ValueError(f"{what}: split {split!r} of {s.source!r} gave no readable examples")
  return dict(images=np.concatenate(images), texts=texts, labels=np.concatenate(labels),
              classnames=s.classnames, templates=s.templates, num_skipped=s.num_skipped)


# ------------------------------------------------- streaming through a model ---

def local_multiple(encoder) -> int:
  """Rows of a process-local batch must be a multiple of this for ``encoder``."""
  return int(getattr(encoder, "local_multiple", 1)) if isinstance(encoder, Encoder) else 1


def encode_batch(encoder, method: str, params, x) -> np.ndarray:
  """Outputs float32 [b, ...] of this process's rows ``x`` (``method`` "images" or
  "logits"): ``Encoder.local`` for a real encoder, else ``encoder.<method>(params, x)``
  (test doubles)."""
  if isinstance(encoder, Encoder):
    return encoder.local(method, params, x)
  return np.asarray(getattr(encoder, method)(params, x), np.float32)


def stream(split, encoder, method: str, params, batch_size: int) -> Iterator[tuple]:
  """Yields ``(outputs [b, ...], batch)`` for every batch of ``split`` (an ``EvalSplit`` /
  ``ArraySplit``); rows with ``batch["valid"]`` False are padding."""
  for batch in split.batches(batch_size, multiple=local_multiple(encoder)):
    yield encode_batch(encoder, method, params, batch["image"]), batch


def process_sum(values) -> np.ndarray:
  """``values`` (numbers or an array, equal shape on every process) summed over processes."""
  x = np.asarray(values)
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


def gather_objects(obj: Any) -> list[Any]:
  """Every process's JSON-serialisable ``obj``, in process order."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(data)))).reshape(-1)
  buf = np.zeros((int(sizes.max()),), np.uint8)
  buf[:len(data)] = data
  every = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(bytes(every[p, :int(sizes[p])]).decode("utf-8")) for p in range(len(sizes))]


def gather_rows(index: np.ndarray, **arrays: np.ndarray) -> dict[str, np.ndarray]:
  """Rows of every process, ordered by example ``index`` (int [n], this process's rows).

  Each array has n rows here (n may differ between processes); returns them
  concatenated over processes and sorted by index, with "index" itself.
  """
  index = np.asarray(index, np.int64)
  if jax.process_count() > 1:
    n = np.asarray(multihost_utils.process_allgather(np.int64(len(index)))).reshape(-1)
    pad = int(n.max()) - len(index)

    def gather(x):
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      every = np.asarray(multihost_utils.process_allgather(x))
      return np.concatenate([every[p, :int(n[p])] for p in range(len(n))])
    index = gather(index)
    arrays = {k: gather(np.asarray(v)) for k, v in arrays.items()}
  order = np.argsort(index, kind="stable")
  return {"index": index[order], **{k: np.asarray(v)[order] for k, v in arrays.items()}}


def embed_split(split, encoder, params, batch_size: int, *, method: str = "images",
                texts: bool = False) -> dict[str, Any]:
  """Outputs of every example of ``split`` (all processes), in split order.

  Returns dict(outputs=float32 [N, D], labels=int32 [N], index=int64 [N],
  num_skipped=int (corrupt examples left out, all processes) and, with ``texts``,
  texts=list of N caption lists). Only these per-example outputs are kept, never
  the images. Raises ValueError when no example was readable.
  """
  outs, labels, index, caps = [], [], [], []
  for y, batch in stream(split, encoder, method, params, batch_size):
    keep = np.flatnonzero(batch["valid"])
    outs.append(y[keep])
    labels.append(batch["label"][keep])
    index.append(batch["index"][keep])
    if texts:
      caps += [batch["texts"][i] for i in keep]
  got = gather_rows(np.concatenate(index), outputs=np.concatenate(outs),
                    labels=np.concatenate(labels))
  got["num_skipped"] = int(process_sum(split.num_skipped))
  if not len(got["index"]):
    raise ValueError(f"{getattr(split, 'what', 'evals')}: the split gave no readable examples")
  got["labels"] = got["labels"].astype(np.int32)
  if texts:
    by_index = {}
    for idx, group in zip(gather_objects(np.concatenate(index).tolist()), gather_objects(caps)):
      by_index.update(zip(idx, group))
    got["texts"] = [by_index[int(i)] for i in got["index"]]
  return got
