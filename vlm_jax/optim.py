"""The optimizer: AdamW with warmup + cosine decay, decoupled weight decay on
kernels only, and global-norm gradient clipping (optax)."""

from __future__ import annotations

import re

import jax
import ml_collections
import optax


def default_config() -> ml_collections.ConfigDict:
  """Every optimizer field with its default; recipes override."""
  return ml_collections.ConfigDict(dict(
      name="adamw",
      lr=1e-3,            # peak learning rate
      warmup_steps=0,     # linear warmup from 0 to lr
      decay="cosine",     # "cosine" | "linear" | "constant" after warmup
      end_lr_ratio=0.0,   # final lr = lr * end_lr_ratio
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=1e-4,  # AdamW (optax): each step param -= lr(step) * weight_decay * param
      wd_pattern=r"(^|/)(kernel|embedding)$",  # params that decay (regex on the path)
      grad_clip_norm=1.0,  # 0 or None: no clipping
  ))


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate per step: linear warmup, then cosine/linear/constant decay."""
  warmup = int(cfg.warmup_steps)
  if warmup >= total_steps and total_steps > 1:
    raise ValueError(
        f"optimizer.warmup_steps ({warmup}) must be < total_steps ({total_steps})")
  decay_steps = max(total_steps - warmup, 1)
  end = cfg.lr * cfg.end_lr_ratio
  if cfg.decay == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
  elif cfg.decay == "linear":
    after = optax.linear_schedule(cfg.lr, end, decay_steps)
  elif cfg.decay == "constant":
    after = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"optimizer.decay must be cosine|linear|constant, got {cfg.decay!r}")
  if warmup == 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params, pattern: str):
  """True for the params whose '/'-joined path matches ``pattern``."""
  rx = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(lambda p, _: bool(rx.search(_path_str(p))), params)


def build(cfg: ml_collections.ConfigDict, total_steps: int, trainable=None
          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optax transformation, learning-rate schedule).

  ``trainable``: optional ``params -> tree of bools`` (``finetune.trainable_fn``).
  Leaves marked False get zero updates and no optimizer state (no Adam moments):
  ``optax.multi_transform`` gives the AdamW chain only the trainable leaves, so
  gradient clipping and weight decay see only those as well.
  """
  if cfg.name != "adamw":
    raise ValueError(f"optimizer.name {cfg.name!r} is not supported (adamw)")
  lr = schedule(cfg, total_steps)
  parts = []
  if cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(optax.adamw(
      lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
      mask=lambda p: decay_mask(p, cfg.wd_pattern)))
  tx = optax.chain(*parts)
  if trainable is not None:
    tx = optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(params)))
  return tx, lr


def state_shardings(abstract_opt, param_shardings, other):
  """The shardings of an optimizer state: moments follow their parameters.

  A leaf of ``abstract_opt`` whose path ends in a parameter's dict keys (e.g.
  ``...mu["img"]["Transformer"]...["kernel"]``, AdamW's moments, which have
  its shape) takes that parameter's sharding from ``param_shardings``; every
  other leaf (step counts, scalars) gets ``other``.
  Unlike ``optax.tree_map_params`` this needs no re-``init``, so it also serves
  states whose layout depends on the params (``multi_transform`` with frozen leaves).
  """
  by_path = {_path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

  def one(path, leaf):
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.append(str(k.key))
    return by_path.get("/".join(reversed(keys)), other) if keys else other

  return jax.tree_util.tree_map_with_path(one, abstract_opt)
