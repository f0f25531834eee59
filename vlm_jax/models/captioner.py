"""Image captioner: image tower -> connector -> causal text decoder; greedy and beam decoding.

    model = vlm_jax.models.build(config.model)        # model.captioner.mode "prefix" | "cross"
    logits, out = model.apply(variables, images, tokens)          # teacher forcing
    visual = model.apply(variables, images, method="encode_image")
    tokens, scores = greedy_decode(logits_fn, batch, max_len, eos_id=1)

Two ways to condition the decoder (``models.decoder.CausalDecoder``):

  prefix  LLaVA: the connector projects the image tower's tokens to the decoder
          width and they go before the text (prefix-LM mask: full view of the
          prefix, causal over the text).
  cross   Flamingo: the decoder cross-attends (gated) to the connector's output,
          usually a Perceiver Resampler's latents.

Params: ``img/...`` (the image tower, built by ``models`` exactly as a two-tower's
image tower but with pool "none", so a contrastive run's ``img/...`` tensors load
by path: ``config.init.workdir``; ``finetune.freeze="^img/"`` gives LLaVA's stage
1, connector and decoder training on a frozen tower), ``connector/...``,
``decoder/...``.

Decoding re-runs the decoder on a fixed [N, max_len] token buffer at every step
(no key-value cache: simple, and cheap at these sizes) inside one
``lax.while_loop``, which stops once every row has emitted EOS.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.decoder import CausalDecoder

MODES = ("prefix", "cross")


class Captioner(nn.Module):
  """Image tower + connector + ``CausalDecoder``.

  image: a tower returning (tokens [B, N, C] (pool "none"), out), or a feature
    map [B, h, w, C] (flattened to tokens); stored as "img".
  connector: called ``connector(tokens, mask=None, train=False) -> [B, M, D]``
    ("connector"; ``models.connectors.build``); D must be the decoder width in
    prefix mode.
  feature_layers, strategy: which hidden states of the tower feed the connector
    (model.connector.feature_layers / strategy, with ``connectors.select_features``'s
    indexing: -1 the last block's output, "final" the final-normed tokens, which
    for pool "none" are the tower's output).
  decoder: a ``CausalDecoder`` ("decoder"); ``cross_attention`` must be True
    exactly in mode "cross".

  __call__(images, tokens, parallel=None, train=False) -> (logits float32
  [B, L, V], out) with out["visual"] [B, M, D] (what the decoder is given);
  ``parallel`` bool [B] marks CapPa parallel-prediction rows (see decoder).
  """

  image: nn.Module
  connector: nn.Module
  decoder: CausalDecoder
  mode: str = "prefix"
  feature_layers: Any = "final"
  strategy: str = "full"

  def setup(self):
    if self.mode not in MODES:
      raise ValueError(f"captioner mode={self.mode!r} is not one of {MODES}")
    if self.decoder.cross_attention != (self.mode == "cross"):
      raise ValueError(f"captioner mode={self.mode!r} needs a decoder with cross_attention="
                       f"{self.mode == 'cross'}")
    self.img = self.image.clone(parent=self, name="img")

  def image_tokens(self, images, train: bool = False):
    """images [B, H, W, 3] -> the tower's tokens [B, N, C]: its output, or the hidden
    states ``feature_layers`` / ``strategy`` pick (``connectors.select_features``)."""
    x, out = self.img(images, train=train)
    if self.feature_layers != "final" or self.strategy != "full":
      from vlm_jax.models import connectors  # pylint: disable=import-outside-toplevel
      x = connectors.select_features(out, self.feature_layers, self.strategy)
    if x.ndim == 4:  # a CNN feature map
      x = x.reshape(x.shape[0], -1, x.shape[-1])
    if x.ndim != 3:
      raise ValueError(f"the captioner's image tower must give tokens [B, N, C], got {x.shape}; "
                       "use model.image.pool_type='none'")
    return x

  def encode_image(self, images, train: bool = False):
    """images [B, H, W, 3] -> visual tokens [B, M, D] for the decoder."""
    return self.connector(self.image_tokens(images, train=train), train=train)

  def decode(self, visual, tokens, parallel=None, train: bool = False):
    """visual [B, M, D], tokens int [B, L] -> logits float32 [B, L, V] (logits[:, t]
    predicts tokens[:, t] from tokens[:, :t])."""
    if self.mode == "prefix":
      return self.decoder(tokens, prefix=visual, parallel=parallel, train=train)[0]
    return self.decoder(tokens, context=visual, parallel=parallel, train=train)[0]

  def __call__(self, images, tokens, parallel=None, train: bool = False):
    visual = self.encode_image(images, train=train)
    return self.decode(visual, tokens, train=train, parallel=parallel), {"visual": visual}


def build_connector(cfg: dict, out_dim: int, dtype: Any = jnp.float32) -> nn.Module:
  """``models.connectors.build(model.connector, out_dim)``: ``cfg.out_dim`` None -> ``out_dim``."""
  from vlm_jax.models import connectors  # pylint: disable=import-outside-toplevel
  return connectors.build(dict(cfg), out_dim=out_dim, dtype=dtype)


def from_resolved(r: dict, tower: nn.Module) -> Captioner:
  """The Captioner of a resolved model config (``models.resolve_config``) and its tower."""
  cap, txt = r["captioner"], r["text"]
  cross = cap["mode"] == "cross"
  decoder = CausalDecoder(
      vocab_size=txt["vocab_size"], width=txt["width"], depth=txt["depth"],
      num_heads=txt["num_heads"], mlp_dim=txt["mlp_dim"], max_len=txt["max_len"],
      cross_attention=cross, cross_every=int(cap["cross_every"]), gated=bool(cap["gated"]),
      gate_init=float(cap["gate_init"]), tie_embeddings=bool(cap["tie_embeddings"]),
      dropout=txt["dropout"], act=txt["act"], ln_eps=txt["ln_eps"], remat=txt["remat"],
      dtype=r["dtype"])
  conn = r["connector"]
  connector = build_connector(conn, txt["width"], r["dtype"])
  layers_ = conn.get("feature_layers", -1)
  layers_ = tuple(layers_) if isinstance(layers_, (list, tuple)) else layers_
  return Captioner(image=tower, connector=connector, decoder=decoder, mode=cap["mode"],
                   feature_layers=layers_, strategy=conn.get("strategy", "full"))


# ------------------------------------------------------------------ decoding ---

def token_weights(tokens, eos_id: int | None, pad_id: int = 0):
  """float32 [B, L]: 1 at the positions a caption's loss counts (up to and including
  its first EOS; without an EOS id, the non-pad positions), 0 after."""
  if eos_id is None:
    return (tokens != pad_id).astype(jnp.float32)
  is_eos = (tokens == eos_id).astype(jnp.int32)
  before = jnp.cumsum(is_eos, axis=1) - is_eos  # EOS tokens strictly before t
  return (before == 0).astype(jnp.float32)


def sequence_scores(logits, tokens, eos_id: int | None, pad_id: int = 0):
  """Sum of log p(tokens[:, t]) over the weighted positions (``token_weights``) -> [B]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
  return jnp.sum(picked * token_weights(tokens, eos_id, pad_id), axis=1)


def greedy_decode(logits_fn: Callable, batch: int, max_len: int, *, eos_id: int,
                  pad_id: int = 0):
  """Greedy decoding on a fixed [batch, max_len] buffer.

  ``logits_fn(tokens int32 [batch, max_len]) -> logits [batch, max_len, V]`` where
  logits[:, t] depends on tokens[:, :t] only. Returns (tokens int32 [batch,
  max_len]: EOS then ``pad_id`` after it, scores float32 [batch]: the summed
  log-probabilities of the emitted tokens, EOS included). Traceable (use under jit).
  """
  def cond(carry):
    t, _, done, _ = carry
    return (t < max_len) & ~jnp.all(done)

  def body(carry):
    t, tokens, done, score = carry
    logp = jax.nn.log_softmax(logits_fn(tokens)[:, t].astype(jnp.float32), axis=-1)
    nxt = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    gain = jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0]
    nxt = jnp.where(done, pad_id, nxt)
    score = score + jnp.where(done, 0.0, gain)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, t, axis=1)
    return t + 1, tokens, done | (nxt == eos_id), score

  init = (jnp.zeros((), jnp.int32), jnp.full((batch, max_len), pad_id, jnp.int32),
          jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.float32))
  _, tokens, _, score = jax.lax.while_loop(cond, body, init)
  return tokens, score


def beam_search(logits_fn: Callable, batch: int, max_len: int, beam_size: int, *, eos_id: int,
                pad_id: int = 0, length_penalty: float = 0.0):
  """Beam search on fixed [batch * beam_size, max_len] buffers.

  ``logits_fn`` as in ``greedy_decode`` but over batch * beam_size rows (row
  b * beam_size + k is beam k of example b). A beam ends at EOS and keeps its
  score; the search stops when every beam has ended or at max_len. The result
  is the best beam by score / length ** length_penalty (0: the plain summed
  log-probability, the most probable sequence found).

  Returns (tokens int32 [batch, max_len], scores float32 [batch], the summed
  log-probabilities). With beam_size 1 it is exactly ``greedy_decode``.
  """
  k = int(beam_size)
  if k < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}")
  neg = jnp.float32(-1e9)

  def cond(carry):
    t, _, _, done = carry
    return (t < max_len) & ~jnp.all(done)

  def body(carry):
    t, tokens, score, done = carry                       # [B,K,L], [B,K], [B,K]
    logits = logits_fn(tokens.reshape(batch * k, max_len))[:, t]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, -1)
    v = logp.shape[-1]
    ended = jnp.full((v,), neg).at[pad_id].set(0.0)      # an ended beam only extends by pad
    logp = jnp.where(done[..., None], ended, logp)
    cand = (score[..., None] + logp).reshape(batch, k * v)
    score, idx = jax.lax.top_k(cand, k)
    src, tok = idx // v, (idx % v).astype(jnp.int32)
    tokens = jnp.take_along_axis(tokens, src[..., None], axis=1)
    done = jnp.take_along_axis(done, src, axis=1)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, tok, t, axis=2)
    return t + 1, tokens, score, done | (tok == eos_id)

  score0 = jnp.full((batch, k), neg).at[:, 0].set(0.0)   # start from one live beam
  init = (jnp.zeros((), jnp.int32), jnp.full((batch, k, max_len), pad_id, jnp.int32),
          score0, jnp.zeros((batch, k), bool))
  _, tokens, score, _ = jax.lax.while_loop(cond, body, init)
  rank = score
  if length_penalty:
    lengths = jnp.sum(token_weights(tokens.reshape(batch * k, max_len), eos_id, pad_id)
                      * (tokens.reshape(batch * k, max_len) != pad_id), axis=1)
    rank = score / jnp.maximum(lengths.reshape(batch, k), 1.0) ** length_penalty
  best = jnp.argmax(rank, axis=1)
  pick = lambda a: jnp.take_along_axis(a, best[:, None] if a.ndim == 2 else best[:, None, None],
                                       axis=1)[:, 0]
  return pick(tokens), pick(score)


def generate(model: Captioner, variables: Any, images, *, max_len: int, eos_id: int,
             pad_id: int = 0, beam_size: int = 1, length_penalty: float = 0.0):
  """Captions of ``images`` [B, H, W, 3] (traceable): (tokens int32 [B, max_len], scores [B]).

  Encodes the images once, then decodes greedily (beam_size 1) or by beam search.
  """
  visual = model.apply(variables, images, method="encode_image")
  b = visual.shape[0]
  if beam_size > 1:
    visual = jnp.repeat(visual, beam_size, axis=0)

  def logits_fn(tokens):
    return model.apply(variables, visual, tokens, method="decode")

  if beam_size == 1:
    return greedy_decode(logits_fn, b, max_len, eos_id=eos_id, pad_id=pad_id)
  return beam_search(logits_fn, b, max_len, beam_size, eos_id=eos_id, pad_id=pad_id,
                     length_penalty=length_penalty)


@functools.lru_cache(maxsize=32)
def generate_fn(model: Captioner, *, max_len: int, eos_id: int, pad_id: int = 0,
                beam_size: int = 1, length_penalty: float = 0.0) -> Callable:
  """``jit(generate)`` for one model and setting: fn(variables, images) -> (tokens, scores)."""
  return jax.jit(functools.partial(generate, model, max_len=max_len, eos_id=eos_id,
                                   pad_id=pad_id, beam_size=beam_size,
                                   length_penalty=length_penalty))
