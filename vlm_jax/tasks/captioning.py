"""Image captioning: a causal decoder learns to write an image's caption (teacher forcing).

One batch: ``{"image": float32 [B, H, W, 3], "tokens": int32 [B, L]}`` from
``data.pipeline`` (the same image-caption stream as contrastive training) ->
``models.captioner.Captioner`` (image tower -> connector -> decoder, prefix or
cross-attention conditioning) -> logits [B, L, V], where logits[:, t] predicts
tokens[:, t] from the image and tokens[:, :t] -> softmax cross-entropy summed
over each caption's tokens up to and including its EOS (padding after it is
masked) and divided by the batch's number of such tokens -> gradients.

Metrics: "train/token_accuracy" (argmax == target over the counted tokens).
Evaluator "caption" (``evaluators/caption.py``): greedy (or beam) captions of
held-out images -> "caption/attr_accuracy" (the caption names the image's colour
and shape, and no other; shapes data), "caption/token_accuracy" and
"caption/loss" (teacher-forced, on the held-out captions).

Captioning as pretraining (CapPa-style, from scratch): every parameter trains;
``model.captioner.parallel_fraction`` > 0 turns that fraction of each batch's
rows into parallel prediction (the decoder sees only BOS, so the image must
carry the whole caption; CapPa uses 0.75), the rest stay autoregressive.
As LLaVA's stage 1: ``config.init.workdir`` = a contrastive run (its ``img/...``
tensors load by path) and ``config.finetune.freeze = "^img/"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax import finetune, parallel
from vlm_jax.tasks import common

NAME = "captioning"
EVALUATORS = ("caption",)


def eval_config() -> ml_collections.ConfigDict:
  """The ``config.evals.caption`` section (recipes of this task add it)."""
  return ml_collections.ConfigDict(dict(
      enabled=True,
      split="heldout",        # shapes: "heldout"; TFDS: e.g. "val"
      num_examples=500,       # first N images of the split; -1 for all
      batch_size=250,         # images per decoding call
      beam_size=1,            # 1: greedy
      max_len=0,              # decoded tokens; 0: tokenizer.max_len
      data=None,              # a ``data``-shaped ConfigDict; None: config.data
  ))


def prepare_config(config) -> None:
  """Checks that the model is a captioner whose decoder fits the tokenizer."""
  from vlm_jax import models  # pylint: disable=import-outside-toplevel
  from vlm_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
  if not models.is_captioner(config.model):
    raise ValueError("config.task='captioning' needs a captioner: set config.model.captioner.mode "
                     "to 'prefix' or 'cross'")
  r = models.resolve_config(config.model)
  tok = tokenizers.build_tokenizer(config.tokenizer)
  if tok.vocab_size > r["text"]["vocab_size"]:
    raise ValueError(f"config.model.text.vocab_size={r['text']['vocab_size']} is smaller than the "
                     f"tokenizer's vocabulary ({tok.vocab_size})")
  if tok.max_len > r["text"]["max_len"]:
    raise ValueError(f"config.tokenizer.max_len={tok.max_len} exceeds the decoder's "
                     f"config.model.text.max_len={r['text']['max_len']}")


def train_dataset(config, *, process_index: int = 0, process_count: int = 1):
  """{"image", "tokens"} batches of this process (``data.pipeline``)."""
  from vlm_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.train_dataset(config, process_index=process_index, process_count=process_count)


def batch_shardings(config, mesh):
  """Images and tokens split on their first axis over the mesh's batch axes."""
  del config
  return {"image": parallel.batch_sharding(mesh, 4), "tokens": parallel.batch_sharding(mesh, 2)}


def special_ids(config) -> tuple[int | None, int]:
  """(eos_id, pad_id) of ``config.tokenizer``."""
  from vlm_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
  tok = tokenizers.build_tokenizer(config.tokenizer)
  return tok.eos_id, tok.pad_id


def caption_loss(logits, tokens, eos_id, pad_id, row_weights=None):
  """(summed cross-entropy, number of counted tokens, number correct) of a batch.

  Counted tokens: each caption up to and including its first EOS
  (``captioner.token_weights``); padding after it never counts. ``row_weights``
  [B] (optional) scales whole rows (0 drops a padding row).
  """
  from vlm_jax.models.captioner import token_weights  # pylint: disable=import-outside-toplevel
  w = token_weights(tokens, eos_id, pad_id)
  if row_weights is not None:
    w = w * row_weights[:, None]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)
  correct = (jnp.argmax(logits, -1) == tokens).astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(w), jnp.sum(correct * w)


def make_grad_fn(config, model, mesh, param_shardings=None):
  """Returns ``grad_fn(params, model_state, batch, rng) -> (loss, grads, model_state, metrics)``.

  Pure, not jitted. ``batch``: {"image": float32 [B,H,W,3], "tokens": int32 [B,L]};
  ``loss``: the mean next-token cross-entropy over the batch's counted tokens
  (``caption_loss``); ``metrics``: {"train/token_accuracy"}. With
  ``config.grad_accum_steps = M > 1`` the batch is split into M micro-batches
  (rows m, m+M, ...); each micro-batch's summed loss is divided by the whole
  batch's token count, so the summed gradient equals the one-batch gradient.
  Parallel-prediction rows (``model.captioner.parallel_fraction``) are drawn
  from ``fold_in(rng, 1)``.
  """
  accum = common.check_batch_size(config, mesh)
  eos_id, pad_id = special_ids(config)
  frac = float(config.model.captioner.get("parallel_fraction", 0.0) or 0.0)
  view = finetune.view(config)
  lora_dropout = finetune.interceptor(config)  # None unless finetune.lora.dropout > 0
  from vlm_jax.models.captioner import token_weights  # pylint: disable=import-outside-toplevel

  def grad_micro(params, model_state, micro, key, denom):
    tokens = micro["tokens"]
    par = None
    if frac > 0:
      par = jax.random.bernoulli(jax.random.fold_in(key, 1), frac, (tokens.shape[0],))

    def compute_loss(p):
      (logits, _), state = common.apply_train(model, view(p), model_state, micro["image"],
                                              tokens, par, rng=key, intercept=lora_dropout)
      total, count, correct = caption_loss(logits, tokens, eos_id, pad_id)
      return total / denom, (state, count, correct)

    (loss, (state, count, correct)), grads = jax.value_and_grad(
        compute_loss, has_aux=True)(params)
    return loss, grads, state, (count, correct)

  if accum == 1:
    def grad_fn(params, model_state, batch, rng):
      denom = jnp.maximum(jnp.sum(token_weights(batch["tokens"], eos_id, pad_id)), 1.0)
      loss, grads, state, (count, correct) = grad_micro(params, model_state, batch, rng, denom)
      return loss, grads, state, {"train/token_accuracy": correct / jnp.maximum(count, 1.0)}
    return grad_fn

  def grad_fn(params, model_state, batch, rng):
    denom = jnp.maximum(jnp.sum(token_weights(batch["tokens"], eos_id, pad_id)), 1.0)
    micro = jax.tree.map(lambda x: common.split_micro(x, accum), batch)

    def one(p, state, m, key, index):
      del index
      m = {k: common.constrain(v, parallel.batch_sharding(mesh, v.ndim)) for k, v in m.items()}
      return grad_micro(p, state, m, key, denom)

    loss, grads, model_state, (count, correct) = common.accumulate(
        one, params, model_state, micro, rng, accum, param_shardings)
    acc = jnp.sum(correct) / jnp.maximum(jnp.sum(count), 1.0)
    return jnp.sum(loss), grads, model_state, {"train/token_accuracy": acc}

  return grad_fn


def build_evaluators(config, model, *, mesh=None, workdir=None):
  """The enabled caption evaluator (``config.evals.caption``)."""
  from vlm_jax import evaluators  # pylint: disable=import-outside-toplevel
  return evaluators.build_evaluators(config, model, mesh=mesh, workdir=workdir,
                                     names=evaluators.enabled_names(config, EVALUATORS))
