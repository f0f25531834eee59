"""Zero-shot classification: class names x prompt templates.

Each class's text embedding is the mean over templates of the L2-normalised
text embeddings of its prompts ("a photo of an orange ring."), renormalised.
An image is assigned the class of highest cosine similarity; "zeroshot/top1"
is the fraction of images whose top class is the label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlm_jax.evaluators import data as eval_data
from vlm_jax.evaluators.encoder import Encoder
from vlm_jax.numeric import normalize

__all__ = ["Encoder", "class_embeddings", "top1", "ZeroShotEvaluator"]



def class_embeddings(encoder: Encoder, params, tokenizer, classnames: Sequence[str],
                     templates: Sequence[str], *, batch_size=None) -> np.ndarray:
  """[C, D] unit-norm class embeddings averaged over the T templates.

  Prompts are ``template.format(classname)`` with "a" before a vowel made "an"
  (``data.shapes.class_prompts``). They are embedded whole classes at a time,
  about ``batch_size`` prompts per call (default: the encoder's), and each class's
  mean is kept as it goes, so memory is O(C x D) for any number of templates
  (ImageNet's 1,000 classes x 80 templates included). Every call has the same
  row count (the last group is padded), so the text tower compiles once.
  Raises ValueError for a template without "{}".
  """
  from vlm_jax.data import shapes  # pylint: disable=import-outside-toplevel
  classnames, templates = list(classnames), list(templates)
  num_classes, t = len(classnames), len(templates)
  per = max(1, int(batch_size or getattr(encoder, "batch_size", 256)) // max(t, 1))
  per = min(per, num_classes)  # classes per call
  out = None
  for s in range(0, num_classes, per):
    names = classnames[s:s + per]
    tokens = np.asarray(tokenizer.encode(
        [p for row in shapes.class_prompts(names, templates) for p in row]))
    m = len(tokens)
    if m < per * t:  # the last group: pad to the others' row count
      tokens = np.concatenate([tokens, np.repeat(tokens[-1:], per * t - m, axis=0)])
    z = normalize(encoder.tokens(params, tokens, batch_size=per * t)[:m])
    z = z.reshape(len(names), t, -1).mean(axis=1)
    if out is None:
      out = np.empty((num_classes, z.shape[-1]), np.float32)
    out[s:s + len(names)] = z
  return normalize(out)


def top1(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of rows of ``image_emb`` [N, D] whose most similar class in
  ``class_emb`` [C, D] (cosine) is ``labels`` [N]."""
  pred = np.argmax(normalize(image_emb) @ class_emb.T, axis=-1)
  return float(np.mean(pred == np.asarray(labels)))


class ZeroShotEvaluator:
  """Zero-shot top-1 on the config's evaluation data (``config.evals.zeroshot``).

  The images are streamed in batches (``data.eval_stream``), each process reading
  its share; only running counts are kept, so memory does not grow with the set.

  Args:
    config: the run's config (``evals.zeroshot``, ``data``, ``pp``, ``tokenizer``).
    model: the two-tower model.
    mesh: optional device mesh the params live on (batches are split over it).
    data: optional evaluation data: an ``EvalSplit`` with class names and templates,
      or a ``pipeline.zeroshot_data``-style dict (images, labels, classnames,
      templates); ``eval_stream.zeroshot_split(config)`` when None.
    tokenizer: optional; built from ``config.tokenizer`` when None.
    encoder: optional shared ``Encoder``.

  ``run(params)`` returns {"zeroshot/top1": fraction in [0, 1]} over the readable
  examples; ``num_skipped`` then counts the corrupt ones left out.
  """

  name = "zeroshot"

  def __init__(self, config, model, *, mesh=None, data=None, tokenizer=None, encoder=None,
               workdir=None):
    del workdir  # writes no files
    # pylint: disable=import-outside-toplevel
    from vlm_jax.data import eval_stream, tokenizers
    zcfg = config.evals.zeroshot
    self.batch_size = int(zcfg.get("batch_size", 256))
    self.data = (eval_stream.zeroshot_split(config) if data is None
                 else eval_stream.as_split(data))
    if not self.data.classnames or not self.data.templates:
      raise ValueError("evals.zeroshot: the data needs classnames and templates")
    self.tokenizer = tokenizer or tokenizers.build_tokenizer(config.tokenizer)
    self.encoder = encoder or Encoder(model, mesh=mesh, batch_size=self.batch_size)
    self.num_skipped = 0  # corrupt examples the last run left out (all processes)

  def class_embeddings(self, params) -> np.ndarray:
    """[C, D] unit-norm class embeddings of the data's class names and templates."""
    return class_embeddings(self.encoder, params, self.tokenizer, self.data.classnames,
                            self.data.templates, batch_size=self.batch_size)

  def _predictions(self, params):
    """Yields (predicted class int [b], batch) per streamed batch of this process."""
    cls = self.class_embeddings(params)
    for img, batch in eval_data.stream(self.data, self.encoder, "images", params,
                                       self.batch_size):
      yield np.argmax(normalize(img) @ cls.T, axis=-1), batch

  def predict(self, params, images=None) -> np.ndarray:
    """Class indices int [N] for ``images`` float32 [N,H,W,3]; by default for the
    evaluation set's readable examples (every process's), in set order."""
    if images is not None:
      cls = self.class_embeddings(params)
      img = self.encoder.images(params, images, batch_size=self.batch_size)
      return np.argmax(normalize(img) @ cls.T, axis=-1)
    preds, index = [], []
    for pred, batch in self._predictions(params):
      preds.append(pred[batch["valid"]])
      index.append(batch["index"][batch["valid"]])
    return eval_data.gather_rows(np.concatenate(index), pred=np.concatenate(preds))["pred"]

  def run(self, params, step: int | None = None) -> dict:
    num_classes = len(self.data.classnames)
    correct = total = 0
    for pred, batch in self._predictions(params):
      valid, labels = batch["valid"], batch["label"]
      bad = labels[valid & ((labels < 0) | (labels >= num_classes))]
      if len(bad):
        raise ValueError(f"zero-shot example has label {int(bad[0])} outside [0, {num_classes})")
      correct += int(np.sum(valid & (pred == labels)))
      total += int(np.sum(valid))
    correct, total, self.num_skipped = (int(v) for v in eval_data.process_sum(
        [correct, total, self.data.num_skipped]))
    if not total:
      raise ValueError(f"evals.zeroshot: {self.data!r} gave no readable examples")
    return {"zeroshot/top1": correct / total}
