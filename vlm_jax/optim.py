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


def build(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optax transformation, learning-rate schedule)."""
  if cfg.name != "adamw":
    raise ValueError(f"optimizer.name {cfg.name!r} is not supported (adamw)")
  lr = schedule(cfg, total_steps)
  parts = []
  if cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(optax.adamw(
      lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
      mask=lambda p: decay_mask(p, cfg.wd_pattern)))
  return optax.chain(*parts), lr
