"""Contrastive image-text training (SigLIP's sigmoid loss, CLIP's softmax loss).

One batch: ``{"image": float32 [B, H, W, 3], "tokens": int32 [B, L]}`` from
``data.pipeline`` (NaViT towers: packed sequences from ``data.navit_pipeline``)
-> the two-tower model embeds both (L2-normalised [B, D] each, plus the
temperature t and bias b) -> ``losses`` (the sigmoid loss never gathers the
global batch) -> gradients of the parameters. Metrics: "train/t", "train/b"
(and "train/num_images" for NaViT). Evaluators: zero-shot classification,
retrieval, linear probe (``config.evals``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vlm_jax import finetune, losses, parallel
from vlm_jax.tasks import common

NAME = "contrastive"
EVALUATORS = ("zeroshot", "retrieval", "linear_probe")


def is_packed(config) -> bool:
  """True when the image tower takes packed NaViT batches (model.image.type navit/naflex)."""
  return config.model.image.get("type", "vit") in ("navit", "naflex")


def prepare_config(config) -> None:
  """Checks the fields this task reads; a classifier head is an error."""
  if config.model.get("num_classes") is not None:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} makes a classifier, "
                     "but config.task is 'contrastive'; unset it or use task 'classification'")


def train_dataset(config, *, process_index: int = 0, process_count: int = 1):
  """Image-caption batches of this process (NaViT towers: packed sequences)."""
  from vlm_jax.data import navit_pipeline, pipeline  # pylint: disable=import-outside-toplevel
  module = navit_pipeline if is_packed(config) else pipeline
  return module.train_dataset(config, process_index=process_index, process_count=process_count)


def batch_shardings(config, mesh):
  """Every batch array split on its first axis over the mesh's batch axes."""
  bs = functools.partial(parallel.batch_sharding, mesh)
  if is_packed(config):
    return {"image": {"patches": bs(3), "segment_ids": bs(2), "positions": bs(3),
                      "grid_sizes": bs(3)},
            "tokens": bs(3), "valid": bs(2)}
  return {"image": bs(4), "tokens": bs(2)}


def _once(x, first):
  """``x`` in value; its gradient flows only where ``first`` is True."""
  x = jnp.asarray(x)
  frozen = jax.lax.stop_gradient(x)
  return frozen + first.astype(x.dtype) * (x - frozen)


def make_grad_fn(config, model, mesh, param_shardings=None):
  """Returns ``grad_fn(params, model_state, batch, rng) -> (loss, grads, model_state, metrics)``.

  Pure, not jitted. ``batch``: {"image": float32 [B,H,W,3], "tokens": int32 [B,L]}
  (the global batch); ``rng``: the step's dropout key; ``loss``: float32
  scalar, the contrastive loss of the whole batch; ``grads``: like ``params``;
  ``model_state``: the model's non-parameter collections ({"batch_stats": ...}
  for BatchNorm towers, else {}), updated; ``metrics``: {"train/t", "train/b"}.

  NaViT (``is_packed(config)``): ``batch`` is {"image": packed dict [S, ...],
  "tokens": int32 [S, M, L], "valid": bool [S, M]} (``data.navit_pipeline``);
  uint8 patches are mapped onto ``pp.value_range`` here, on the device
  (``packing.to_value_range``); the model flattens the S x M slots and the loss ignores empty ones (the
  model's ``img/valid``); metrics add "train/num_images". grad_accum_steps must be 1.

  With ``config.grad_accum_steps = M > 1`` the batch is split into M
  micro-batches (rows m, m+M, ...; see ``common.split_micro``) and the loss still
  sees all B x B pairs, as open_clip's ``accum_freq``: a first pass embeds
  every micro-batch without gradients (a [B, D] cache per tower); then, for
  each micro-batch, its embeddings are recomputed with gradients, put into the
  cache in place of their cached copy, and the full-batch loss is
  differentiated; the parameter gradients are summed. Their sum is the
  gradient of the full-batch loss, because each embedding enters the loss once.
  The temperature and bias enter every one of the M losses, so their gradient
  is kept from the first only. Micro-batch m uses dropout key
  ``fold_in(rng, m)`` in both passes, so recomputed and cached embeddings
  agree. ``lax.scan`` runs the micro-batches one after another: only one
  micro-batch's activations are live at a time (at the price of M + 1 forward
  and M backward passes, and M evaluations of the B x B loss).
  """
  accum = common.check_batch_size(config, mesh)
  loss_fn = losses.get_loss_fn(
      config.get("loss", "sigmoid"), config.get("loss_impl", "chunked"),
      mesh=mesh, batch_axes=parallel.batch_axes(mesh))
  packed = is_packed(config)
  emb = parallel.batch_sharding(mesh, 2)
  rep = parallel.replicated(mesh)
  view = finetune.view(config)  # frozen leaves, LoRA kernels merged
  lora_dropout = finetune.interceptor(config)  # None unless finetune.lora.dropout > 0

  def embed_raw(params, model_state, images, tokens, key):
    if packed:  # uint8 pixels -> pp.value_range, here on the device
      from vlm_jax.data import packing  # pylint: disable=import-outside-toplevel
      images = packing.to_value_range(images, config.pp.value_range)
    (zimg, ztxt, out), model_state = common.apply_train(
        model, view(params), model_state, images, tokens, rng=key, intercept=lora_dropout)
    valid = out["img/valid"] if packed else jnp.zeros((), bool)
    return (zimg, ztxt, out["t"], out["b"], valid), model_state

  def embed(params, model_state, images, tokens, key):
    fn = embed_raw
    if parallel.is_explicit(mesh):
      # On Explicit meshes every op must have an unambiguous output sharding;
      # the towers (embedding gathers, convolutions, FSDP matmuls) leave that to
      # the partitioner, so they run with Auto axes and only their outputs are
      # typed: embeddings split on the batch, t, b and BatchNorm statistics
      # replicated. The sharded losses take Explicit inputs as they are.
      valid = parallel.batch_sharding(mesh, 1) if packed else rep
      fn = jax.sharding.auto_axes(fn, out_sharding=(
          (emb, emb, rep, rep, valid), jax.tree.map(lambda _: rep, model_state)))
    out, model_state = fn(params, model_state, images, tokens, key)
    return out[:4] + ((out[4] if packed else None),), model_state

  if packed and accum != 1:
    raise ValueError(f"config.grad_accum_steps={accum}: gradient accumulation is not "
                     "supported for packed NaViT batches (model.image.type "
                     f"{config.model.image.type!r}); use 1")

  if accum == 1:
    def grad_fn(params, model_state, batch, rng):
      def compute_loss(p):
        (zimg, ztxt, t, b, valid), state = embed(p, model_state, batch["image"],
                                                 batch["tokens"], rng)
        return loss_fn(zimg, ztxt, t, b, valid=valid), (t, b, valid, state)

      (loss, (t, b, valid, state)), grads = jax.value_and_grad(
          compute_loss, has_aux=True)(params)
      metrics = {"train/t": t, "train/b": b}
      if packed:  # NaViT: images in the step's packed sequences
        metrics["train/num_images"] = jnp.sum(valid.astype(jnp.int32))
      return loss, grads, state, metrics
    return grad_fn

  def grad_fn(params, model_state, batch, rng):
    micro = {"image": common.split_micro(batch["image"], accum),      # [M, B/M, H, W, 3]
             "tokens": common.split_micro(batch["tokens"], accum)}    # [M, B/M, L]

    def pinned(m):
      return {k: common.constrain(v, parallel.batch_sharding(mesh, v.ndim)) for k, v in m.items()}

    def cache_step(_, xs):
      m, index = xs
      m = pinned(m)
      (zimg, ztxt, *_), _ = embed(params, model_state, m["image"], m["tokens"],
                                  jax.random.fold_in(rng, index))
      return None, (zimg, ztxt)

    # [M, B/M, D] each; constants for the gradient pass.
    _, cache = jax.lax.scan(cache_step, None, (micro, jnp.arange(accum)))
    cache_img, cache_txt = jax.lax.stop_gradient(cache)

    def grad_micro(p, state, m, key, i):
      m = pinned(m)

      def compute_loss(p):
        (zimg, ztxt, t, b, _), new_state = embed(p, state, m["image"], m["tokens"], key)
        first = i == 0
        t, b = _once(t, first), _once(b, first)
        full = [common.constrain(common.merge_micro(jax.lax.dynamic_update_index_in_dim(
            c, z.astype(c.dtype), i, 0)), emb) for c, z in ((cache_img, zimg), (cache_txt, ztxt))]
        return loss_fn(*full, t, b), (t, b, new_state)

      (loss, (t, b, new_state)), grads = jax.value_and_grad(compute_loss, has_aux=True)(p)
      return loss, grads, new_state, (t, b)

    loss, grads, model_state, (t, b) = common.accumulate(
        grad_micro, params, model_state, micro, rng, accum, param_shardings)
    # Every micro-step evaluates the same full-batch loss; report the first.
    return loss[0], grads, model_state, {"train/t": t[0], "train/b": b[0]}

  return grad_fn


def build_evaluators(config, model, *, mesh=None, workdir=None):
  """The enabled zero-shot / retrieval / linear-probe evaluators (``config.evals``)."""
  del workdir  # these evaluators write no files
  from vlm_jax import evaluators  # pylint: disable=import-outside-toplevel
  return evaluators.build_evaluators(config, model, mesh=mesh,
                                     names=evaluators.enabled_names(config, EVALUATORS))
