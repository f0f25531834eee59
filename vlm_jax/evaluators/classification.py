"""Classification accuracy of an ImageClassifier: top-1, top-5, cross-entropy, confusion matrix.

    evaluator = ClassificationEvaluator(config, model, mesh=mesh, workdir=WORKDIR)
    evaluator.run(variables, step=1000)
    # {"val/top1": 0.93, "val/top5": 0.998, "val/loss": 0.21}; writes
    # WORKDIR/confusion/step_1000.png (rows: true class, columns: predicted)

Reads ``config.evals.classification``: ``split`` (None: the source's held-out
split: a class folder's val/, shapes' heldout, TFDS cifar10's test),
``num_examples``, ``batch_size``, ``confusion_matrix`` and ``data`` (another
source). Images are preprocessed as in training, without augmentation, and
streamed in batches: memory holds one batch, not the split.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm_jax.data.sources import default_eval_split
from vlm_jax.data.eval_stream import as_split
from vlm_jax.evaluators.data import eval_split, process_sum, section_data, stream
from vlm_jax.evaluators.encoder import Encoder

__all__ = ["ClassificationEvaluator", "topk_accuracy", "confusion_matrix",
           "render_confusion_matrix"]


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the k largest logits (k capped at the classes).

  logits float [N, C], labels int [N]. Ties are broken towards the lower class id
  (argsort is stable on the negated logits), so k=1 agrees with argmax.
  """
  return float(np.mean(_topk_hits(logits, labels, k)))


def _topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """bool [N]: the label is among the k largest logits (ties towards the lower id)."""
  k = min(int(k), logits.shape[1])
  top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return np.any(top == labels[:, None], axis=1)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Mean softmax cross-entropy (nats) of float [N, C] logits against int [N] labels."""
  return float(np.mean(_nll(logits, labels)))


def _nll(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """float64 [N]: each row's softmax cross-entropy (nats)."""
  z = logits.astype(np.float64)
  z = z - z.max(axis=1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  return -logp[np.arange(len(labels)), labels]


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 [C, C]: entry (i, j) counts examples of true class i predicted as j."""
  m = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(m, (labels, predictions), 1)
  return m


def render_confusion_matrix(matrix: np.ndarray, classnames, path: str, title: str = "") -> str:
  """Writes the confusion matrix as a PNG heat map (row-normalised: each true class's
  predictions sum to 1), class names on both axes and counts in the cells when there
  are few classes. Returns ``path``."""
  n = matrix.shape[0]
  cell = max(6, min(40, 800 // max(n, 1)))
  font = ImageFont.load_default()
  names = [str(c)[:18] for c in classnames] if n <= 60 else [""] * n
  label_w = 8 + 7 * max((len(s) for s in names), default=0)
  top = 40 + (label_w if n <= 60 else 0)
  left = label_w + 20
  img = Image.new("RGB", (left + n * cell + 10, top + n * cell + 30), "white")
  draw = ImageDraw.Draw(img)
  rows = matrix.sum(axis=1, keepdims=True)
  frac = matrix / np.maximum(rows, 1)
  for i in range(n):
    for j in range(n):
      v = float(frac[i, j])
      shade = int(255 * (1 - v))
      colour = (shade, shade, 255) if i == j else (255, shade, shade)
      x0, y0 = left + j * cell, top + i * cell
      draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(230, 230, 230))
      if n <= 20 and matrix[i, j]:
        draw.text((x0 + 2, y0 + cell // 2 - 5), str(int(matrix[i, j])),
                  fill="black" if v < 0.6 else "white", font=font)
  if n <= 60:
    for i, name in enumerate(names):
      draw.text((4, top + i * cell + cell // 2 - 5), name, fill="black", font=font)
      col = Image.new("RGBA", (label_w, 12), (255, 255, 255, 0))
      ImageDraw.Draw(col).text((0, 0), name, fill="black", font=font)
      col = col.rotate(90, expand=True)
      img.paste(col, (left + i * cell + cell // 2 - 6, 38), col)
  acc = float(np.trace(matrix) / max(matrix.sum(), 1))
  draw.text((4, 4), f"{title}  accuracy {acc:.4f}  (rows: true class, columns: predicted)",
            fill="black", font=font)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
  return path


class ClassificationEvaluator:
  """Top-1 / top-5 accuracy and cross-entropy on a labelled split, with a confusion matrix.

  ``run(params, step=None)`` streams the split in batches (each process reading its
  share) and classifies it with ``params`` (params or whole variables, possibly
  sharded on ``mesh``); only running sums and the [C, C] confusion matrix are kept.
  It returns {"val/top1", "val/top5", "val/loss"}. With a ``workdir`` and
  ``confusion_matrix`` on, ``WORKDIR/confusion/step_<step>.png`` is written too.

  ``data``: optional ``EvalSplit`` or dict(images=float32 [N,H,W,3], labels=int [N],
  classnames); read from the config when None.
  """

  name = "classification"

  def __init__(self, config, model, *, mesh=None, data=None, encoder=None, tokenizer=None,
               workdir=None):
    del tokenizer  # labels, not captions
    section = config.evals.classification
    self.batch_size = int(section.get("batch_size", 256))
    self.encoder = encoder or Encoder(model, mesh=mesh)
    self.workdir = workdir
    self.draw = bool(section.get("confusion_matrix", True))
    split = section.get("split") or default_eval_split(section_data(config, section))
    self.split_name = split
    self.data = as_split(data) if data is not None else eval_split(
        config, section, split, section.get("num_examples", -1), what="evals.classification")
    labels = getattr(self.data, "labels", None)  # in-memory data: checked now
    if labels is not None and np.any(labels < 0):
      raise ValueError(f"evals.classification: split {split!r} has unlabelled examples")
    self.classnames = self.data.classnames or (
        [str(i) for i in range(int(labels.max()) + 1)] if labels is not None else None)
    self.last_confusion: np.ndarray | None = None
    self.last_png: str | None = None
    self.num_skipped = 0  # corrupt examples the last run left out (all processes)

  def run(self, params, step: int | None = None) -> dict:
    top1 = top5 = loss = total = 0.0
    matrix = None
    for logits, batch in stream(self.data, self.encoder, "logits", params, self.batch_size):
      keep = batch["valid"]
      logits, labels = logits[keep], batch["label"][keep]
      if np.any(labels < 0):
        raise ValueError(f"evals.classification: split {self.split_name!r} has unlabelled "
                         "examples")
      if self.classnames is not None and logits.shape[1] < len(self.classnames):
        raise ValueError(f"evals.classification: the model has {logits.shape[1]} classes but "
                         f"the data has {len(self.classnames)}")
      if matrix is None:
        matrix = np.zeros((logits.shape[1], logits.shape[1]), np.int64)
      if not len(labels):
        continue
      top1 += int(np.sum(_topk_hits(logits, labels, 1)))
      top5 += int(np.sum(_topk_hits(logits, labels, 5)))
      loss += float(np.sum(_nll(logits, labels)))
      total += len(labels)
      matrix += confusion_matrix(labels, np.argmax(logits, axis=1), logits.shape[1])
    # Sums over processes (the counts are whole numbers, exact in float64).
    top1, top5, loss, total, skipped = (float(v) for v in process_sum(
        [top1, top5, loss, total, self.data.num_skipped]))
    self.num_skipped = int(skipped)
    matrix = process_sum(matrix)
    if not total:
      raise ValueError(f"evals.classification: split {self.split_name!r} gave no readable "
                       "examples")
    self.last_confusion = matrix
    if self.workdir and self.draw and jax.process_index() == 0:
      name = f"step_{step}.png" if step is not None else "latest.png"
      known = list(self.classnames or [])
      names = known + [str(i) for i in range(len(known), matrix.shape[0])]
      self.last_png = render_confusion_matrix(
          matrix, names, os.path.join(self.workdir, "confusion", name),
          title=f"step {step}" if step is not None else "")
    return {"val/top1": top1 / total, "val/top5": top5 / total, "val/loss": loss / total}
