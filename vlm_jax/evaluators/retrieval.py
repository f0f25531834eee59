"""Image-text retrieval: recall@k in both directions on paired images and captions.

Image -> text: for each image, all captions are ranked by cosine similarity;
the image counts as found at k when any of its own captions is among the top k
("retrieval/i2t_r1", "retrieval/i2t_r5", "retrieval/i2t_r10"). Text -> image:
for each caption, all images are ranked; found at k when its image is among the
top k ("retrieval/t2i_r1", ...). Values are fractions in [0, 1].

Equal scores are ordered by index (as a stable sort would), so a model whose
embeddings are all equal scores about k/N, never a perfect 1.0.

Data: the first ``evals.retrieval.num_examples`` images of split
``evals.retrieval.split`` with all their captions: the shapes held-out images
with their own captions by default, or e.g. TFDS coco_captions (five captions
per image) with ``evals.retrieval.data = evaluators.tfds_data("coco_captions")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlm_jax.evaluators import data as eval_data
from vlm_jax.evaluators.encoder import Encoder
from vlm_jax.numeric import normalize

__all__ = ["recall_at_k", "RetrievalEvaluator"]


def _first_true(mask: np.ndarray) -> np.ndarray:
  return np.argmax(mask, axis=1)


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
                ks: Sequence[int] = (1, 5, 10), *, chunk: int = 1024) -> dict[str, float]:
  """Recall@k for image->text and text->image retrieval.

  Args:
    image_emb: [N, D] image embeddings (normalised here).
    text_emb: [M, D] caption embeddings (normalised here).
    text_image: int [M], the index in [0, N) of each caption's image; every image
      needs at least one caption.
    ks: the k values.
    chunk: rows of the similarity matrix computed at once (memory O(chunk * max(N, M))).

  Returns:
    {"i2t_r{k}": float, "t2i_r{k}": float} for every k, fractions in [0, 1].
  Raises:
    ValueError: mismatched shapes, a caption index out of range, an image without captions.
  """
  img, txt = normalize(image_emb), normalize(text_emb)
  owner = np.asarray(text_image, np.int64)
  n, m = len(img), len(txt)
  if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
    raise ValueError(f"embeddings must be [N, D] and [M, D], got {img.shape} and {txt.shape}")
  if owner.shape != (m,):
    raise ValueError(f"text_image must have shape [{m}] (one image per caption), got {owner.shape}")
  if m and (owner.min() < 0 or owner.max() >= n):
    raise ValueError(f"text_image values must be in [0, {n}), got [{owner.min()}, {owner.max()}]")
  counts = np.bincount(owner, minlength=n)
  if n == 0 or (counts == 0).any():
    raise ValueError(f"every image needs a caption; images without one: "
                     f"{np.flatnonzero(counts == 0)[:10].tolist()} (of {n})")
  ks = [int(k) for k in ks]

  i2t_rank = np.empty(n, np.int64)
  cols = np.arange(m)
  for s in range(0, n, chunk):
    sims = img[s:s + chunk] @ txt.T                             # [c, M]
    pos = owner[None, :] == np.arange(s, s + len(sims))[:, None]
    best = np.where(pos, sims, -np.inf).max(axis=1, keepdims=True)
    first = _first_true(pos & (sims == best))[:, None]          # best positive, lowest index
    i2t_rank[s:s + chunk] = ((sims > best).sum(1)
                             + ((sims == best) & (cols[None] < first)).sum(1))

  t2i_rank = np.empty(m, np.int64)
  rows = np.arange(n)
  for s in range(0, m, chunk):
    sims = txt[s:s + chunk] @ img.T                             # [c, N]
    own = owner[s:s + chunk, None]
    score = np.take_along_axis(sims, own, axis=1)
    t2i_rank[s:s + chunk] = ((sims > score).sum(1)
                             + ((sims == score) & (rows[None] < own)).sum(1))

  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = float(np.mean(i2t_rank < k))
  for k in ks:
    out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
  return out


class RetrievalEvaluator:
  """Recall@k on ``config.evals.retrieval``'s paired data.

  The images are streamed in batches (each process reading its share); only their
  embeddings [N, D] and captions are kept, so memory does not grow with the images.

  Args:
    config: the run's config (``evals.retrieval``, ``data``, ``pp``, ``tokenizer``).
    model: the two-tower model.
    mesh: optional device mesh the params live on.
    data: optional ``EvalSplit``, or dict(images=float32 [N,H,W,3], texts=list of N
      lists of str); read from the config when None (``evaluators.data.eval_split``).
    tokenizer, encoder: optional; built from the config when None.

  ``run(params)`` -> {"retrieval/i2t_r1": ..., "retrieval/t2i_r10": ...}.
  After ``run`` (or at once for in-memory data): ``texts`` (the M captions),
  ``text_image`` (int [M], each caption's image) and ``tokens`` (int32 [M, L]).
  """

  name = "retrieval"

  def __init__(self, config, model, *, mesh=None, data=None, tokenizer=None, encoder=None,
               workdir=None):
    del workdir  # writes no files
    from vlm_jax.data import eval_stream, tokenizers  # pylint: disable=import-outside-toplevel
    rcfg = config.evals.retrieval
    self.batch_size = int(rcfg.get("batch_size", 256))
    self.ks = tuple(int(k) for k in rcfg.get("ks", (1, 5, 10)))
    if data is None:
      data = eval_data.eval_split(config, rcfg, rcfg.split, rcfg.num_examples,
                                  what="evals.retrieval")
    self.data = eval_stream.as_split(data)
    self.tokenizer = tokenizer or tokenizers.build_tokenizer(config.tokenizer)
    self.encoder = encoder or Encoder(model, mesh=mesh, batch_size=self.batch_size)
    self.texts, self.text_image, self.tokens = None, None, None
    self.num_skipped = 0  # corrupt examples the last run left out (all processes)
    if isinstance(self.data, eval_stream.ArraySplit):
      self._set_captions(self.data.texts)

  def _set_captions(self, texts) -> None:
    texts = [list(t) for t in texts]
    flat = [t for group in texts for t in group]
    if flat != self.texts:  # the same captions as the last run keep their tokens
      self.texts, self.tokens = flat, self.tokenizer.encode(flat)
    self.text_image = np.asarray([i for i, group in enumerate(texts) for _ in group], np.int64)

  def embed(self, params) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings [N, D], caption embeddings [M, D]), not normalised; N counts
    the readable images (every process's), in split order."""
    got = eval_data.embed_split(self.data, self.encoder, params, self.batch_size, texts=True)
    self._set_captions(got["texts"])
    self.num_skipped = got["num_skipped"]
    return (got["outputs"],
            self.encoder.tokens(params, self.tokens, batch_size=self.batch_size))

  def run(self, params, step: int | None = None) -> dict:
    img, txt = self.embed(params)
    return {f"retrieval/{k}": v for k, v in
            recall_at_k(img, txt, self.text_image, self.ks).items()}
