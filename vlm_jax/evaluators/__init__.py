"""Evaluators: zero-shot classification, image-text retrieval, linear probe.

    evaluator = vlm_jax.evaluators.build_evaluators(config, model, mesh=mesh)
    metrics = evaluator.run(params)   # {"zeroshot/top1": ..., "retrieval/i2t_r1": ..., ...}

Each evaluator has a section in ``config.evals`` (defaults and fields in
``vlm_jax/data/config.py``); those with ``enabled=True`` are built. Each
``run(params)`` streams its split through the model with ``params`` (float32,
possibly sharded on ``mesh``) in batches read, decoded and preprocessed in
threads (``data.eval_stream``), each process reading its share; only small
per-example outputs (embeddings, predictions) or running counts are kept, never
the images, so memory does not grow with the split. Metrics are over every
process's examples; corrupt examples are left out and counted (``num_skipped``).

    zeroshot       "zeroshot/top1"                       evaluators/zeroshot.py
    retrieval      "retrieval/{i2t,t2i}_r{1,5,10}"       evaluators/retrieval.py
    linear_probe   "linear_probe/top1"                   evaluators/linear_probe.py
    classification "val/top1", "val/top5", "val/loss"    evaluators/classification.py
    caption        "caption/attr_accuracy", "caption/token_accuracy", "caption/loss"
                                                         evaluators/caption.py

Which of them a run uses is the task's choice (``tasks.<task>.EVALUATORS``):
contrastive runs zero-shot, retrieval and linear probe; classification runs
classification and linear probe; captioning runs caption. ``params`` may be whole variables (BatchNorm's
``batch_stats`` included).

Any section may read another source: ``config.evals.zeroshot.data =
tfds_data("cifar10")`` (with ``split = "test"``), ``config.evals.retrieval.data =
tfds_data("coco_captions")`` (``split = "val"``), for TFDS datasets prepared locally.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from vlm_jax.evaluators.caption import CaptionEvaluator
from vlm_jax.evaluators.classification import ClassificationEvaluator
from vlm_jax.evaluators.data import TFDS_PRESETS, tfds_data
from vlm_jax.evaluators.encoder import Encoder
from vlm_jax.evaluators.linear_probe import LinearProbeEvaluator
from vlm_jax.evaluators.retrieval import RetrievalEvaluator
from vlm_jax.evaluators.zeroshot import ZeroShotEvaluator

__all__ = ["EVALUATORS", "Evaluators", "build_evaluators", "enabled_names", "metric_names",
           "tfds_data",
           "TFDS_PRESETS", "Encoder", "ZeroShotEvaluator", "RetrievalEvaluator",
           "LinearProbeEvaluator", "ClassificationEvaluator", "CaptionEvaluator"]

# config.evals section name -> evaluator class (constructor (config, model, *, mesh, encoder,
# tokenizer, workdir); ``run(params, step=None) -> dict``).
EVALUATORS = {
    "zeroshot": ZeroShotEvaluator,
    "retrieval": RetrievalEvaluator,
    "linear_probe": LinearProbeEvaluator,
    "classification": ClassificationEvaluator,
    "caption": CaptionEvaluator,
}


class Evaluators:
  """Several evaluators run as one: ``run(params)`` merges their metrics.

  ``len()`` is the number of evaluators (an empty one is falsy);
  ``seconds`` holds each evaluator's wall time in the last ``run`` and
  ``skipped`` the corrupt examples each left out.
  """

  def __init__(self, evaluators: Sequence):
    self.evaluators = list(evaluators)
    self.seconds: dict[str, float] = {}
    self.skipped: dict[str, int] = {}

  @property
  def names(self) -> list[str]:
    return [e.name for e in self.evaluators]

  def __len__(self) -> int:
    return len(self.evaluators)

  def __iter__(self):
    return iter(self.evaluators)

  def run(self, params, step: int | None = None) -> dict:
    """Runs every evaluator on ``params`` (or variables) at training step ``step``;
    returns their merged {name: float} metrics."""
    metrics = {}
    for e in self.evaluators:
      t0 = time.perf_counter()
      metrics.update(e.run(params, step=step))
      self.seconds[e.name] = time.perf_counter() - t0
      self.skipped[e.name] = int(getattr(e, "num_skipped", 0))
    return metrics


def enabled_names(config, allowed: Sequence[str] | None = None) -> list[str]:
  """Names of the ``config.evals`` sections with ``enabled`` true (default true).

  ``allowed``: the evaluators the run's task can use (``tasks.<task>.EVALUATORS``);
  None: the task of ``config.task``. Raises ValueError for a section that is not
  a known evaluator.
  """
  evals = config.get("evals") or {}
  for name in evals:
    if name not in EVALUATORS:
      raise ValueError(f"config.evals.{name} is not a known evaluator; known: "
                       f"{sorted(EVALUATORS)}")
  if allowed is None:
    from vlm_jax import tasks  # pylint: disable=import-outside-toplevel
    allowed = tasks.get(config).EVALUATORS
  return [name for name in EVALUATORS if name in allowed
          and evals.get(name) is not None and evals[name].get("enabled", True)]


def metric_names(config, names: Sequence[str] | None = None) -> list[str]:
  """The metric names the evaluators ``names`` (None: the enabled ones) report."""
  out = []
  for name in enabled_names(config) if names is None else names:
    if name == "retrieval":
      ks = config.evals.retrieval.get("ks", (1, 5, 10))
      out += [f"retrieval/{d}_r{int(k)}" for d in ("i2t", "t2i") for k in ks]
    elif name == "classification":
      out += ["val/top1", "val/top5", "val/loss"]
    elif name == "caption":
      out += ["caption/token_accuracy", "caption/loss", "caption/attr_accuracy"]
    else:
      out.append(f"{name}/top1")
  return out


def build_evaluators(config, model, *, mesh=None, names: Sequence[str] | None = None,
                     workdir: str | None = None) -> Evaluators:
  """Builds the run's evaluators; they share one compiled ``Encoder`` and tokenizer.

  Args:
    config: the run's config (``evals``, ``data``, ``pp``, ``tokenizer``).
    model: the two-tower model or image classifier.
    mesh: the mesh the params live on (None: the default device).
    names: which evaluators (sections of ``config.evals``); None: the enabled ones
      of the run's task.
    workdir: where evaluators may write files (the confusion matrix); None: nowhere.
  Returns:
    ``Evaluators``, empty (falsy) when none is enabled.
  Raises:
    errors of an evaluator's data, with a note naming its ``config.evals`` section.
  """
  from vlm_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
  if names is None:
    names = enabled_names(config)
  names = list(names)
  for name in names:
    if name not in EVALUATORS:
      raise ValueError(f"unknown evaluator {name!r}; known: {sorted(EVALUATORS)}")
    if name not in (config.get("evals") or {}):
      raise ValueError(f"config.evals has no {name!r} section")
  if not names:
    return Evaluators([])
  encoder = Encoder(model, mesh=mesh)
  tokenizer = tokenizers.build_tokenizer(config.tokenizer)
  out = []
  for name in names:
    try:
      out.append(EVALUATORS[name](config, model, mesh=mesh, encoder=encoder,
                                  tokenizer=tokenizer, workdir=workdir))
    except Exception as e:
      e.add_note(f"(while building the {name} evaluator from config.evals.{name})")
      raise
  return Evaluators(out)
