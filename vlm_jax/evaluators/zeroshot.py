"""Zero-shot classification: class names x prompt templates.

Each class's text embedding is the mean over templates of the L2-normalised
text embeddings of its prompts ("a photo of an orange ring."), renormalised.
An image is assigned the class of highest cosine similarity; "zeroshot/top1"
is the fraction of images whose top class is the label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlm_jax.evaluators.encoder import Encoder
from vlm_jax.numeric import normalize

__all__ = ["Encoder", "class_embeddings", "top1", "ZeroShotEvaluator"]



def class_embeddings(encoder: Encoder, params, tokenizer, classnames: Sequence[str],
                     templates: Sequence[str], *, batch_size=None) -> np.ndarray:
  """[C, D] unit-norm class embeddings averaged over the T templates.

  Prompts are ``template.format(classname)`` with "a" before a vowel made "an"
  (``data.shapes.class_prompts``). Raises ValueError for a template without "{}".
  """
  from vlm_jax.data import shapes  # pylint: disable=import-outside-toplevel
  prompts = [p for row in shapes.class_prompts(classnames, templates) for p in row]
  z = normalize(encoder.tokens(params, tokenizer.encode(prompts), batch_size=batch_size))
  z = z.reshape(len(classnames), len(templates), -1).mean(axis=1)
  return normalize(z)


def top1(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of rows of ``image_emb`` [N, D] whose most similar class in
  ``class_emb`` [C, D] (cosine) is ``labels`` [N]."""
  pred = np.argmax(normalize(image_emb) @ class_emb.T, axis=-1)
  return float(np.mean(pred == np.asarray(labels)))


class ZeroShotEvaluator:
  """Zero-shot top-1 on the config's evaluation data (``config.evals.zeroshot``).

  Args:
    config: the run's config (``evals.zeroshot``, ``data``, ``pp``, ``tokenizer``).
    model: the two-tower model.
    mesh: optional device mesh the params live on (batches are split over it).
    data: optional ``pipeline.zeroshot_data``-style dict (images, labels,
      classnames, templates); read from the config when None.
    tokenizer: optional; built from ``config.tokenizer`` when None.
    encoder: optional shared ``Encoder``.

  ``run(params)`` returns {"zeroshot/top1": fraction in [0, 1]}.
  """

  name = "zeroshot"

  def __init__(self, config, model, *, mesh=None, data=None, tokenizer=None, encoder=None,
               workdir=None):
    del workdir  # writes no files
    from vlm_jax.data import pipeline, tokenizers  # pylint: disable=import-outside-toplevel
    zcfg = config.evals.zeroshot
    self.batch_size = int(zcfg.get("batch_size", 256))
    self.data = data if data is not None else pipeline.zeroshot_data(config)
    self.tokenizer = tokenizer or tokenizers.build_tokenizer(config.tokenizer)
    self.encoder = encoder or Encoder(model, mesh=mesh, batch_size=self.batch_size)

  def predict(self, params, images=None) -> np.ndarray:
    """Class indices int [N] for ``images`` (default: the evaluation images)."""
    d = self.data
    cls = class_embeddings(self.encoder, params, self.tokenizer, d["classnames"],
                           d["templates"], batch_size=self.batch_size)
    img = self.encoder.images(params, d["images"] if images is None else images,
                              batch_size=self.batch_size)
    return np.argmax(normalize(img) @ cls.T, axis=-1)

  def run(self, params, step: int | None = None) -> dict:
    pred = self.predict(params)
    return {"zeroshot/top1": float(np.mean(pred == np.asarray(self.data["labels"])))}
