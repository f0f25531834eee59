"""Pieces every task's gradient function uses: micro-batching, sharding pins, model state.

``variables(params, model_state)`` joins the trained parameters with the
model's other collections (BatchNorm's ``batch_stats``); ``apply_train`` runs a
model in training mode and returns the updated collections as well.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax import parallel


def check_batch_size(config, mesh) -> int:
  """Checks ``config.batch_size`` against the mesh and ``config.grad_accum_steps``.

  The global batch must split into ``grad_accum_steps`` micro-batches that each
  split evenly over the mesh's batch shards (``parallel.num_batch_shards``).

  Returns:
    M = config.grad_accum_steps (an int >= 1).
  Raises:
    ValueError naming ``config.batch_size`` / ``config.grad_accum_steps``.
  """
  accum = config.get("grad_accum_steps", 1)
  if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
    raise ValueError(f"config.grad_accum_steps must be an int >= 1, got {accum!r}")
  shards = parallel.num_batch_shards(mesh)
  if config.batch_size % (accum * shards):
    where = (f"the {shards} batch shards of mesh {dict(mesh.shape)} (axes "
             f"{parallel.batch_axes(mesh)})")
    if accum > 1:
      where = (f"config.grad_accum_steps={accum} x {where} = {accum * shards}; every "
               f"micro-batch must split evenly over the batch shards")
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by {where}")
  return accum


def constrain(x, sharding):
  """Pins ``x`` to ``sharding``: a reshard on Explicit meshes, a hint on Auto ones."""
  if parallel.is_explicit(sharding.mesh):
    return jax.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def split_micro(x, accum: int):
  """[B, ...] -> [M, B/M, ...]; micro-batch m holds rows m, m+M, m+2M, ...

  Taking every M-th row (not a contiguous block) keeps each micro-batch evenly
  spread over the batch shards: a device's contiguous block of B/n rows holds
  B/(n*M) rows of every micro-batch, so the split moves no data.
  """
  b = x.shape[0]
  return jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)


def merge_micro(x):
  """Inverse of ``split_micro``: [M, B/M, ...] -> [B, ...] in the original row order."""
  accum, micro = x.shape[:2]
  return jnp.swapaxes(x, 0, 1).reshape(accum * micro, *x.shape[2:])


def variables(params, model_state) -> dict:
  """{"params": params, **model_state} (model_state: e.g. {"batch_stats": ...} or {})."""
  return {"params": params, **(model_state or {})}


def apply_train(model, params, model_state, *args, rng, method=None,
                intercept=None) -> tuple[Any, dict]:
  """``model.apply`` in training mode -> (output, updated model_state).

  Non-parameter collections (BatchNorm statistics) are mutable and come back
  updated; without any, model_state stays {}. Dropout and stochastic depth
  draw from ``rng``. ``intercept``: a flax method interceptor to run under
  (``finetune.interceptor(config)``: LoRA dropout), or None.
  """
  mutable = sorted(model_state or {})
  kw = {"method": method} if method is not None else {}
  with nn.intercept_methods(intercept) if intercept else contextlib.nullcontext():
    if not mutable:
      return model.apply(variables(params, None), *args, train=True, rngs={"dropout": rng},
                         **kw), {}
    out, updates = model.apply(variables(params, model_state), *args, train=True,
                               rngs={"dropout": rng}, mutable=mutable, **kw)
  return out, dict(updates)


def accumulate(grad_micro, params, model_state, micro_batches, rng, accum: int,
               param_shardings=None):
  """Sums ``grad_micro`` over M micro-batches with ``lax.scan`` (one live at a time).

  ``grad_micro(params, model_state, micro, key, index) -> (loss, grads, model_state, aux)``;
  ``micro_batches``: a pytree whose leaves are [M, B/M, ...]; micro-batch m uses
  key ``fold_in(rng, m)``. The model state (BatchNorm statistics) is threaded
  through the micro-batches in order, as a framework that accumulates would.
  Returns (losses [M], summed grads, final model_state, aux of every micro-batch [M, ...]).
  """
  zeros = jax.tree.map(jnp.zeros_like, params)
  if param_shardings is not None:
    zeros = jax.tree.map(constrain, zeros, param_shardings)

  def body(carry, xs):
    acc, state = carry
    micro, index = xs
    loss, grads, state, aux = grad_micro(params, state, micro, jax.random.fold_in(rng, index),
                                         index)
    acc = jax.tree.map(jnp.add, acc, grads)
    if param_shardings is not None:
      acc = jax.tree.map(constrain, acc, param_shardings)
    return (acc, state), (loss, aux)

  (grads, model_state), (loss, aux) = jax.lax.scan(
      body, (zeros, model_state), (micro_batches, jnp.arange(accum)))
  return loss, grads, model_state, aux
