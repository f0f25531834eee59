"""Supervised image classification (from scratch or fine-tuning any image encoder).

One batch: ``{"image": float32 [B, H, W, 3], "label": int32 [B]}`` from
``data.pipeline`` (class folders, TFDS label datasets, the embedded shapes'
48 colour x shape classes) -> smoothed one-hot targets
(``classification.label_smoothing``) -> optional mixup / cutmix on the device
(``classification.mixup_alpha`` / ``cutmix_alpha``) -> ``ImageClassifier``
logits (BatchNorm statistics from the global batch, kept in the train state) ->
softmax cross-entropy -> gradients. Metrics: "train/accuracy" (against the
unmixed labels). Evaluator: "val/top1", "val/top5", "val/loss" and a confusion
matrix PNG (``evaluators/classification.py``).

``config.model.num_classes`` is taken from the data's class names when unset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax import finetune, parallel
from vlm_jax.tasks import common

NAME = "classification"
EVALUATORS = ("classification", "linear_probe")


def default_config() -> ml_collections.ConfigDict:
  """The ``config.classification`` fields (every recipe has them; read by this task)."""
  return ml_collections.ConfigDict(dict(
      label_smoothing=0.0,  # targets (1 - s) * one_hot + s / K
      mixup_alpha=0.0,      # > 0: mixup with lam ~ Beta(alpha, alpha)
      cutmix_alpha=0.0,     # > 0: cutmix with box area 1 - lam, lam ~ Beta(alpha, alpha)
      mix_prob=1.0,         # probability that a batch is mixed at all
      switch_prob=0.5,      # with both alphas > 0: probability of cutmix rather than mixup
  ))


def prepare_config(config) -> None:
  """Sets ``config.model.num_classes`` from the training data's classes when unset.

  Raises ValueError when the source has no class names, or when a set
  num_classes disagrees with them.
  """
  from vlm_jax.data.sources import build_source  # pylint: disable=import-outside-toplevel
  source = build_source(config.data, None, image_size=config.pp.image_size)
  names = getattr(source, "classnames", None)
  given = config.model.get("num_classes")
  if not names:
    if given is None:
      raise ValueError(f"classification needs labels: {source!r} has no class names; use a "
                       "class folder (DIR/train/<class>/), a TFDS ClassLabel feature "
                       "(data.tfds.label_key) or set config.model.num_classes")
    return
  if given is None:
    config.model.num_classes = len(names)
  elif int(given) != len(names):
    raise ValueError(f"config.model.num_classes={given} but the training data has "
                     f"{len(names)} classes ({source!r})")


def train_dataset(config, *, process_index: int = 0, process_count: int = 1):
  """{"image", "label"} batches of this process (``data.pipeline``)."""
  from vlm_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.train_dataset(config, process_index=process_index,
                                process_count=process_count, collate=pipeline.label_collate)


def batch_shardings(config, mesh):
  """Images and labels split on their first axis over the mesh's batch axes."""
  del config
  return {"image": parallel.batch_sharding(mesh, 4), "label": parallel.batch_sharding(mesh, 1)}


def _settings(config):
  c = config.get("classification") or default_config()
  out = {k: c.get(k, v) for k, v in default_config().items()}
  for k in ("label_smoothing", "mix_prob", "switch_prob"):
    if not 0.0 <= float(out[k]) <= 1.0:
      raise ValueError(f"config.classification.{k} must be in [0, 1], got {out[k]!r}")
  for k in ("mixup_alpha", "cutmix_alpha"):
    if float(out[k]) < 0:
      raise ValueError(f"config.classification.{k} must be >= 0, got {out[k]!r}")
  return out


def make_grad_fn(config, model, mesh, param_shardings=None):
  """Returns ``grad_fn(params, model_state, batch, rng) -> (loss, grads, model_state, metrics)``.

  Pure, not jitted. ``batch``: {"image": float32 [B,H,W,3], "label": int32 [B]};
  ``loss``: float32 scalar, the mean softmax cross-entropy against the
  (smoothed, mixed) targets; ``model_state``: updated BatchNorm statistics
  ({} without BatchNorm); ``metrics``: {"train/accuracy"}.

  Mixup / cutmix draw from ``fold_in(rng, 1)``; dropout / stochastic depth from
  ``rng``. With ``config.grad_accum_steps = M > 1`` the batch is split into M
  micro-batches (rows m, m+M, ...); the loss is the mean of theirs (each
  example weighs the same, as in one big batch) and BatchNorm statistics
  update micro-batch after micro-batch.
  """
  accum = common.check_batch_size(config, mesh)
  settings = _settings(config)
  num_classes = int(config.model.num_classes)
  mixing = settings["mixup_alpha"] > 0 or settings["cutmix_alpha"] > 0
  view = finetune.view(config)  # frozen leaves, LoRA kernels merged
  lora_dropout = finetune.interceptor(config)  # None unless finetune.lora.dropout > 0

  def targets_of(batch, key):
    from vlm_jax.data import augment  # pylint: disable=import-outside-toplevel
    images = batch["image"]
    targets = augment.one_hot_smoothed(batch["label"], num_classes, settings["label_smoothing"])
    if mixing:
      images, targets = augment.mixup_or_cutmix(
          key, images, targets, mixup_alpha=settings["mixup_alpha"],
          cutmix_alpha=settings["cutmix_alpha"], switch_prob=settings["switch_prob"],
          prob=settings["mix_prob"])
    return images, targets

  def grad_micro(params, model_state, micro, key, scale):
    images, targets = targets_of(micro, jax.random.fold_in(key, 1))

    def compute_loss(p):
      logits, state = common.apply_train(model, view(p), model_state, images, rng=key,
                                         intercept=lora_dropout)
      loss = jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))
      return loss * scale, (logits, state)

    (loss, (logits, state)), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
    correct = jnp.mean((jnp.argmax(logits, -1) == micro["label"]).astype(jnp.float32))
    return loss, grads, state, correct

  if accum == 1:
    def grad_fn(params, model_state, batch, rng):
      loss, grads, state, acc = grad_micro(params, model_state, batch, rng, 1.0)
      return loss, grads, state, {"train/accuracy": acc}
    return grad_fn

  def grad_fn(params, model_state, batch, rng):
    micro = jax.tree.map(lambda x: common.split_micro(x, accum), batch)

    def one(p, state, m, key, index):
      del index
      m = {k: common.constrain(v, parallel.batch_sharding(mesh, v.ndim)) for k, v in m.items()}
      return grad_micro(p, state, m, key, 1.0 / accum)

    loss, grads, model_state, acc = common.accumulate(
        one, params, model_state, micro, rng, accum, param_shardings)
    return jnp.sum(loss), grads, model_state, {"train/accuracy": jnp.mean(acc)}

  return grad_fn


def build_evaluators(config, model, *, mesh=None, workdir=None):
  """The enabled classification / linear-probe evaluators (``config.evals``)."""
  from vlm_jax import evaluators  # pylint: disable=import-outside-toplevel
  return evaluators.build_evaluators(config, model, mesh=mesh, workdir=workdir,
                                     names=evaluators.enabled_names(config, EVALUATORS))
