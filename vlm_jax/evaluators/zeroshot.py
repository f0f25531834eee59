"""Zero-shot classification: class names x prompt templates.

Each class's text embedding is the mean over templates of the L2-normalised
text embeddings of its prompts ("a photo of a red triangle."), renormalised.
An image is assigned the class of highest cosine similarity; "zeroshot/top1"
is the fraction of images whose top class is the label.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import parallel


def _normalize(x, axis=-1):
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class Encoder:
  """Jit-compiled batched ``encode_image`` / ``encode_text`` for one model.

  Pads the last batch (to a multiple of the mesh's batch shards) and strips the
  padding again, so any number of inputs works.
  """

  def __init__(self, model, *, mesh=None, batch_size=256):
    self.model = model
    self.mesh = mesh
    self.batch_size = batch_size
    self._img = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
    self._txt = jax.jit(lambda p, t: model.apply({"params": p}, t, method="encode_text"))

  def _run(self, fn, params, x):
    x = np.asarray(x)
    n = len(x)
    shards = parallel.num_batch_shards(self.mesh) if self.mesh is not None else 1
    bs = max(shards, self.batch_size - self.batch_size % shards)
    out = []
    for i in range(0, n, bs):
      chunk = x[i:i + bs]
      pad = (-len(chunk)) % shards
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      if self.mesh is not None:
        chunk = jax.device_put(chunk, parallel.batch_sharding(self.mesh, chunk.ndim))
      y = fn(params, chunk)
      out.append(np.asarray(jax.device_get(y), np.float32)[:len(chunk) - pad])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def images(self, params, images) -> np.ndarray:
    """float32 [N,H,W,3] -> [N,D] embeddings (before normalisation)."""
    return self._run(self._img, params, images)

  def tokens(self, params, tokens) -> np.ndarray:
    """int32 [N,L] -> [N,D] embeddings (before normalisation)."""
    return self._run(self._txt, params, tokens)


def class_embeddings(encoder: Encoder, params, tokenizer, classnames: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
  """[C, D] unit-norm class embeddings averaged over templates."""
  prompts = [t.format(c) for c in classnames for t in templates]
  z = _normalize(encoder.tokens(params, tokenizer.encode(prompts)))
  z = z.reshape(len(classnames), len(templates), -1).mean(axis=1)
  return _normalize(z)


def top1(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of rows whose most similar class is the label."""
  pred = np.argmax(_normalize(image_emb) @ class_emb.T, axis=-1)
  return float(np.mean(pred == np.asarray(labels)))


class ZeroShotEvaluator:
  """Zero-shot top-1 on the config's evaluation data (``config.evals.zeroshot``).

  ``run(params)`` returns {"zeroshot/top1": fraction in [0, 1]}.
  """

  def __init__(self, config, model, *, mesh=None, data=None, tokenizer=None):
    from vlm_jax.data import pipeline, tokenizers  # pylint: disable=import-outside-toplevel
    zcfg = config.evals.zeroshot
    self.data = data if data is not None else pipeline.zeroshot_data(config)
    self.tokenizer = tokenizer or tokenizers.build_tokenizer(config.tokenizer)
    self.encoder = Encoder(model, mesh=mesh,
                           batch_size=int(zcfg.get("batch_size", 256)))

  def run(self, params) -> dict:
    d = self.data
    cls = class_embeddings(self.encoder, params, self.tokenizer, d["classnames"], d["templates"])
    img = self.encoder.images(params, d["images"])
    return {"zeroshot/top1": top1(img, cls, d["labels"])}
