"""Linear probe: a linear classifier on frozen image embeddings.

The classifier is closed-form ridge regression onto one-hot class targets
(as big_vision's few-shot linear evaluation): features are the L2-normalised
image embeddings, centred by the training mean; for penalty lambda,

    W = (X^T X + lambda * s * I)^-1 X^T Y,   b = mean(Y) - mean(X) W,

with s = trace(X^T X) / D so that lambda does not depend on the feature scale.
One eigendecomposition of X^T X gives W for every lambda in ``l2_regs``; the
lambda with the best accuracy on the last ``val_fraction`` of the training
split is refit on the whole training split. "linear_probe/top1" is the test
accuracy (a fraction in [0, 1]).

Data: the first ``num_train`` examples of ``train_split`` and the first
``num_test`` of ``test_split`` (shapes "train" / "heldout" by default; e.g.
TFDS cifar10 "train" / "test" with ``data = evaluators.tfds_data("cifar10")``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.evaluators import data as eval_data
from vlm_jax.evaluators.encoder import Encoder
from vlm_jax.numeric import normalize

__all__ = ["fit_ridge", "select_and_fit", "accuracy", "LinearProbeEvaluator"]


@jax.jit
def _eig(x):
  mean = x.mean(axis=0)
  xc = x - mean
  evals, evecs = jnp.linalg.eigh(xc.T @ xc)
  return mean, xc, jnp.maximum(evals, 0.0), evecs


def fit_ridge(features: np.ndarray, labels: np.ndarray, num_classes: int,
              l2_regs: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
  """Ridge-regression classifiers, one per penalty.

  Args:
    features: float [N, D] (normalised and centred here).
    labels: int [N] in [0, num_classes).
    num_classes: C.
    l2_regs: penalties lambda (relative to trace(X^T X) / D), each > 0.
  Returns:
    [(W float32 [D, C], b float32 [C])] in the order of ``l2_regs``; predict
    with ``argmax(normalize(x) @ W + b)``.
  """
  x = jnp.asarray(normalize(features))
  labels = np.asarray(labels)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
  y = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  mean, xc, evals, evecs = _eig(x)
  y_mean = y.mean(axis=0)
  proj = evecs.T @ (xc.T @ (y - y_mean))                 # [D, C]
  scale = jnp.maximum(evals.sum() / x.shape[1], 1e-12)
  out = []
  for lam in l2_regs:
    if not lam > 0:
      raise ValueError(f"linear_probe l2_regs must be > 0, got {lam!r}")
    w = evecs @ (proj / (evals + float(lam) * scale)[:, None])
    b = y_mean - mean @ w
    out.append((np.asarray(w, np.float32), np.asarray(b, np.float32)))
  return out


def accuracy(w: np.ndarray, b: np.ndarray, features: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of rows of ``features`` [N, D] classified as ``labels`` [N] by (w, b)."""
  pred = np.argmax(normalize(features) @ w + b, axis=-1)
  return float(np.mean(pred == np.asarray(labels)))


def select_and_fit(features: np.ndarray, labels: np.ndarray, num_classes: int,
                   l2_regs: Sequence[float], val_fraction: float = 0.2):
  """Picks lambda on a held-back tail of the training data, refits on all of it.

  Returns:
    (W [D, C], b [C], lambda). With one penalty, or fewer than 2 validation rows,
    no selection happens.
  """
  l2_regs = list(l2_regs)
  if not l2_regs:
    raise ValueError("linear_probe l2_regs is empty")
  n_val = int(round(len(features) * float(val_fraction)))
  if len(l2_regs) > 1 and 2 <= n_val < len(features) - 1:
    fits = fit_ridge(features[:-n_val], labels[:-n_val], num_classes, l2_regs)
    scores = [accuracy(w, b, features[-n_val:], labels[-n_val:]) for w, b in fits]
    lam = l2_regs[int(np.argmax(scores))]  # ties: the smallest index wins
  else:
    lam = l2_regs[0]
  w, b = fit_ridge(features, labels, num_classes, [lam])[0]
  return w, b, lam


_UNLABELLED = ("evals.linear_probe needs a labelled source (TFDS: a ClassLabel label_key; "
               "folder: a 'label' column)")


class LinearProbeEvaluator:
  """Linear-probe top-1 on ``config.evals.linear_probe``'s labelled splits.

  Both splits are streamed in batches (each process reading its share); only the
  image embeddings [N, D] and labels are kept, never the images.

  Args:
    config: the run's config (``evals.linear_probe``, ``data``, ``pp``).
    model: the two-tower model (only the image tower is used).
    mesh: optional device mesh the params live on.
    train, test: optional ``EvalSplit`` or dicts(images=float32 [N,H,W,3], labels=int [N]);
      read from the config when None.
    encoder: optional shared ``Encoder``.

  ``run(params)`` -> {"linear_probe/top1": fraction in [0, 1]}.
  """

  name = "linear_probe"

  def __init__(self, config, model, *, mesh=None, train=None, test=None, encoder=None,
               tokenizer=None, workdir=None):
    del tokenizer, workdir  # image tower only; writes no files
    from vlm_jax.data import eval_stream  # pylint: disable=import-outside-toplevel
    lcfg = config.evals.linear_probe
    self.batch_size = int(lcfg.get("batch_size", 256))
    self.l2_regs = tuple(float(v) for v in lcfg.get("l2_regs", (1e-3,)))
    self.val_fraction = float(lcfg.get("val_fraction", 0.2))
    if train is None:
      train = eval_data.eval_split(config, lcfg, lcfg.train_split, lcfg.num_train,
                                   what="evals.linear_probe (train)")
    if test is None:
      test = eval_data.eval_split(config, lcfg, lcfg.test_split, lcfg.num_test,
                                  what="evals.linear_probe (test)")
    self.train, self.test = eval_stream.as_split(train), eval_stream.as_split(test)
    for s in (self.train, self.test):
      if isinstance(s, eval_stream.ArraySplit) and s.labels.min() < 0:
        raise ValueError(_UNLABELLED)
    names = self.train.classnames
    # None: no class names; the largest label + 1, found when run.
    self.num_classes = len(names) if names else None
    self.encoder = encoder or Encoder(model, mesh=mesh, batch_size=self.batch_size)
    self.last_l2 = None
    self.num_skipped = 0  # corrupt examples the last run left out (both splits, all processes)

  def run(self, params, step: int | None = None) -> dict:
    tr = eval_data.embed_split(self.train, self.encoder, params, self.batch_size)
    te = eval_data.embed_split(self.test, self.encoder, params, self.batch_size)
    self.num_skipped = tr["num_skipped"] + te["num_skipped"]
    labels = np.concatenate([tr["labels"], te["labels"]])
    if labels.min() < 0:
      raise ValueError(_UNLABELLED)
    num_classes = self.num_classes or int(labels.max()) + 1
    w, b, self.last_l2 = select_and_fit(tr["outputs"], tr["labels"], num_classes,
                                        self.l2_regs, self.val_fraction)
    return {"linear_probe/top1": accuracy(w, b, te["outputs"], te["labels"])}
