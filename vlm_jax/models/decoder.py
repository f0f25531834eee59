"""A small causal text decoder for captioning, conditioned on image tokens.

    dec = CausalDecoder(vocab_size=258, width=128, depth=2, num_heads=4, mlp_dim=256, max_len=48)
    logits, out = dec(tokens, prefix=visual)                       # LLaVA-style prefix
    dec = CausalDecoder(..., cross_attention=True)
    logits, out = dec(tokens, context=visual)                      # Flamingo-style

Conventions
-----------
``tokens`` int [B, L] are the caption itself (no BOS). The decoder's input at
position t is a learned BOS embedding for t = 0 and the embedding of
``tokens[:, t-1]`` after that (plus a learned position embedding), so
``logits[:, t]`` is the distribution of ``tokens[:, t]`` given ``tokens[:, :t]``
(and the image). Changing ``tokens[:, t:]`` never changes ``logits[:, :t+1]``.
Decoding fills a fixed [B, L] buffer left to right (``models.captioner``).

Prefix mode (``prefix`` [B, P, width]): the image tokens go before the text in
one sequence. They attend to each other fully and never to the text; text
position t attends to the whole prefix and to text positions <= t (a prefix-LM
mask). Only the text positions produce logits. The prefix gets no position
embedding from the decoder (the image tower's tokens carry their own).

Cross-attention mode (``cross_attention=True``, ``context`` [B, M, Dc]): every
``cross_every``-th block (blocks 0, k, 2k, ...) adds, after its self-attention,
``tanh(gate) * CrossAttn(LN(x), context)`` with a learned scalar gate that starts
at ``gate_init`` (Flamingo's gated cross-attention; 0 makes the untrained
decoder a pure language model). ``gated=False`` drops the gate.

Parallel prediction (CapPa, ``parallel`` bool [B]): the marked rows see the BOS
embedding at every position instead of the previous tokens, so they predict
the whole caption from the image alone. The causal mask stays; with identical
inputs it hides nothing the row could use.

Output logits are tied to the token embedding (``logits = LN(x) @ E^T``) by
default; ``tie_embeddings=False`` adds an untied ``head`` Dense(vocab) with bias.

Params: ``Embed_0/embedding`` [V, W] ("vocab", "embed"), ``bos`` [1, 1, W],
``pos_embedding`` [1, max_len, W], ``block_{i}/...`` (LayerNorm_0,
``SelfAttention``, LayerNorm_1 + ``CrossAttention`` + ``cross_gate`` in cross
blocks, LayerNorm_{last} + ``MlpBlock_0``), ``decoder_norm``, ``head`` (untied).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import layers


def prefix_lm_mask(prefix_len: int, text_len: int) -> jax.Array:
  """bool [1, 1, P+L, P+L]: True = attend. Prefix rows see the prefix; text rows see the
  prefix and the text up to themselves."""
  n = prefix_len + text_len
  i = jnp.arange(n)[:, None]
  j = jnp.arange(n)[None, :]
  allowed = (j < prefix_len) | ((j >= prefix_len) & (i >= j))
  return allowed[None, None]


class DecoderBlock(nn.Module):
  """Pre-LN block: self-attention (masked), optional gated cross-attention, MLP.

  x [B, T, D] -> [B, T, D]; ``mask`` broadcastable to [B, H, T, T];
  ``context`` [B, M, Dc] (cross blocks); ``context_mask`` [B, M] bool or None.
  """

  mlp_dim: int
  num_heads: int
  cross_attention: bool = False
  gated: bool = True
  gate_init: float = 0.0
  dropout: float = 0.0
  act: str = "gelu_tanh"
  ln_eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, context=None, context_mask=None, train: bool = False):
    drop = nn.Dropout(rate=self.dropout)
    y = layers.layer_norm(eps=self.ln_eps, dtype=self.dtype)(x)
    y = layers.attention(self.num_heads, dtype=self.dtype, name="SelfAttention")(y, y, mask=mask)
    x = layers.constrain(x + drop(y, deterministic=not train), ("batch", "length", "embed"))
    if self.cross_attention:
      if context is None:
        raise ValueError("a cross-attention decoder block needs context (the image tokens)")
      m = None if context_mask is None else context_mask[:, None, None, :]
      y = layers.layer_norm(eps=self.ln_eps, dtype=self.dtype)(x)
      y = layers.attention(self.num_heads, dtype=self.dtype, name="CrossAttention")(
          y, context.astype(self.dtype), mask=m)
      if self.gated:
        gate = self.param("cross_gate", layers.named_init(
            nn.initializers.constant(self.gate_init), ()), (), jnp.float32)
        y = jnp.tanh(gate).astype(self.dtype) * y
      x = layers.constrain(x + drop(y, deterministic=not train), ("batch", "length", "embed"))
    y = layers.layer_norm(eps=self.ln_eps, dtype=self.dtype)(x)
    y = layers.MlpBlock(self.mlp_dim, self.dropout, self.act, self.dtype)(y, train)
    return layers.constrain(x + drop(y, deterministic=not train), ("batch", "length", "embed"))


class CausalDecoder(nn.Module):
  """Causal transformer decoder over caption tokens, conditioned on image tokens.

  __call__(tokens int [B, L], *, prefix=None, context=None, context_mask=None,
  parallel=None, train=False) -> (logits float32 [B, L, vocab_size], out) with
  out["hidden"] [B, L, width] (final-normed text positions). See the module
  docstring for the BOS shift, the masks and the two conditioning modes.
  """

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_len: int
  cross_attention: bool = False
  cross_every: int = 1
  gated: bool = True
  gate_init: float = 0.0
  tie_embeddings: bool = True
  dropout: float = 0.0
  act: str = "gelu_tanh"
  ln_eps: float = 1e-6
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, prefix=None, context=None, context_mask=None, parallel=None,
               train: bool = False):
    if tokens.ndim != 2:
      raise ValueError(f"decoder tokens must be [B, L] integers, got shape {tokens.shape}")
    b, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f"decoder tokens have length {length} > max_len={self.max_len}")
    if self.cross_attention and context is None:
      raise ValueError("CausalDecoder(cross_attention=True) needs context= (image tokens)")
    if not self.cross_attention and context is not None:
      raise ValueError("context= given but the decoder has no cross-attention; "
                       "pass prefix= or build it with cross_attention=True")
    if self.cross_every < 1:
      raise ValueError(f"cross_every must be >= 1, got {self.cross_every}")
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                     embedding_init=layers.named_init(nn.linear.default_embed_init,
                                                      ("vocab", "embed")), name="Embed_0")
    bos = self.param("bos", layers.named_init(nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, 1, self.width), jnp.float32).astype(self.dtype)
    x = embed(tokens[:, :-1])
    x = jnp.concatenate([jnp.broadcast_to(bos, (b, 1, self.width)), x], axis=1)
    if parallel is not None:  # CapPa: these rows see only BOS
      x = jnp.where(parallel[:, None, None], jnp.broadcast_to(bos, x.shape), x)
    pe = layers.learned_posemb(self, "pos_embedding", (1, self.max_len, self.width))
    x = x + pe[:, :length].astype(self.dtype)

    p = 0
    if prefix is not None:
      if prefix.ndim != 3 or prefix.shape[0] != b or prefix.shape[-1] != self.width:
        raise ValueError(f"prefix must be [B={b}, P, width={self.width}], got {prefix.shape}")
      p = prefix.shape[1]
      x = jnp.concatenate([prefix.astype(self.dtype), x], axis=1)
    mask = prefix_lm_mask(p, length)
    x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)
    x = layers.constrain(x, ("batch", "length", "embed"))

    block_cls = DecoderBlock
    if self.remat:
      block_cls = nn.remat(DecoderBlock, static_argnums=(5,))  # (self, x, mask, ctx, cmask, train)
    for i in range(self.depth):
      cross = self.cross_attention and i % self.cross_every == 0
      x = block_cls(mlp_dim=self.mlp_dim, num_heads=self.num_heads, cross_attention=cross,
                    gated=self.gated, gate_init=self.gate_init, dropout=self.dropout,
                    act=self.act, ln_eps=self.ln_eps, dtype=self.dtype, name=f"block_{i}")(
                        x, mask, context if cross else None, context_mask if cross else None,
                        train)
    x = layers.layer_norm("decoder_norm", self.ln_eps, self.dtype)(x)
    x = x[:, p:]
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(self.vocab_size, dtype=self.dtype, name="head",
                        kernel_init=layers.named_init(nn.initializers.zeros, ("embed", "vocab")),
                        bias_init=layers.named_init(nn.initializers.zeros, ("vocab",)))(x)
    return logits.astype(jnp.float32), {"hidden": x}
