"""Evaluation splits for the evaluators: preprocessed images with labels or captions.

Images are preprocessed as in training without augmentation (``pp.eval_crop``,
no flip). Corrupt examples are left out and counted. Sources come from
``vlm_jax.data.sources.build_source``: the embedded shapes data, TFDS datasets
prepared locally, or an image folder.

    data = read_split(config, config.evals.retrieval, "heldout", 500)
    data["images"]   # float32 [N, H, W, 3]
    data["texts"]    # list of N lists of captions (every caption of an image)
    data["labels"]   # int32 [N] (-1 when the source has none)
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import ml_collections
import numpy as np

from vlm_jax.data import pipeline, preprocess
from vlm_jax.data.sources import build_source

_log = logging.getLogger(__name__)

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


def read_split(config, section, split: str, num_examples: int | None, *,
               what: str = "evals") -> dict[str, Any]:
  """Reads the first ``num_examples`` examples (-1 / None: all) of ``split``.

  Args:
    config: the run's config (``pp``, ``data``, ``seed``).
    section: the evaluator's config section (its ``data`` picks the source).
    split: the split name (shapes: "train" | "heldout"; TFDS split string).
    num_examples: how many examples from the start of the split.
    what: the section's name for error messages (e.g. "evals.retrieval").

  Returns:
    dict(images=float32 [N,H,W,3], texts=list of N lists of str (all captions
    of an example), labels=int32 [N] (-1: none), classnames=list[str] or None,
    templates=list[str] or None, num_skipped=int).
  Raises:
    ValueError naming ``what`` when the split gives no readable example.
  """
  data_cfg = section_data(config, section)
  source = build_source(data_cfg, split, image_size=config.pp.image_size)
  n = len(source) if num_examples in (None, -1) else min(int(num_examples), len(source))
  if n <= 0:
    raise ValueError(f"{what}: num_examples must be positive or -1, got {num_examples!r}")
  kw = pipeline._pp_kwargs(config.pp, train=False)  # pylint: disable=protected-access
  # Sources with several captions per example (TFDS coco_captions) give them all.
  get = ((lambda i: source.read(i, all_texts=True)) if hasattr(source, "read")
         else source.__getitem__)

  def read(index):
    index = int(index)
    try:
      ex = get(index)
      image = preprocess.preprocess_image(ex["image"], what=f"example {index}", **kw)
    except (preprocess.CorruptExampleError, OSError) as e:
      return index, f"{type(e).__name__}: {e}"
    texts = ex.get("texts") or [ex["text"]]
    texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in texts]
    return dict(image=image, texts=texts, label=int(ex.get("label", -1)))

  threads = int(data_cfg.get("num_threads", 2))
  it = grain.MapDataset.range(n).map(read).to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=256 if threads > 0 else 0))
  images, texts, labels, skipped = [], [], [], 0
  for ex in it:
    if isinstance(ex, tuple):
      skipped += 1
      _log.warning("%s: skipping corrupt example %d: %s", what, *ex)
      continue
    images.append(ex["image"])
    texts.append(ex["texts"])
    labels.append(ex["label"])
  if not images:
    raise ValueError(f"{what}: split {split!r} of {source!r} gave no readable examples")
  classnames = getattr(source, "classnames", None)
  templates = getattr(source, "templates", None)
  return dict(images=np.stack(images), texts=texts, labels=np.asarray(labels, np.int32),
              classnames=list(classnames) if classnames else None,
              templates=list(templates) if templates else None, num_skipped=skipped)
