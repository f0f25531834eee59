"""Prompt splicing: put image tokens into a language model's input sequence.

    batch = splice(input_ids, embed_table, image_tokens, image_token_id,
                   attention_mask=mask, mode="replace")
    batch["inputs_embeds"], batch["attention_mask"], batch["positions"], batch["image_mask"]

Two modes:

  "replace" (LLaVA, PaliGemma): the prompt already holds M placeholder ids per image
      (the processor expanded them). The k-th placeholder, counting row by row and
      left to right, receives row k of the image tokens flattened to [num_images * M, D]
      -- transformers' ``inputs_embeds.masked_scatter(placeholder_mask, features)``.
      The sequence keeps its length; a count mismatch raises ValueError naming both
      counts. Works under jit (the count is checked when the ids are concrete).
  "expand": one placeholder per image; each becomes [begin] + M image tokens + [end]
      (begin / end: optional learned embeddings [D]), so rows grow. Rows are
      left-aligned and right-padded to the longest row (or to ``length``); padding
      has attention_mask 0 and a zero embedding. The ids must be concrete (the
      output length depends on them); the embeddings may be traced.

Positions are cumsum(attention_mask) - 1, clipped at 0: arange(L) for unpadded
rows (what transformers' LLaVA uses when no position_ids are given), and counting
only real tokens in padded rows (what generate() computes for left padding).

``ImageSplicer`` adds learned parameters: image begin / end embeddings (expand
mode) and modality embeddings added to the image tokens (and optionally the text
tokens), E_mod in the seed article's z + E_pos + E_mod.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import layers

MODES = ("replace", "expand")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _positions(mask: jax.Array) -> jax.Array:
    m = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


def _text_embeds(input_ids, text_embeds):
    """[B, L, D] embeddings, looked up when ``text_embeds`` is an embedding table [V, D]."""
    emb = jnp.asarray(text_embeds)
    if emb.ndim == 2:  # a table; placeholder ids may lie outside it (they get replaced)
        return jnp.take(emb, jnp.asarray(input_ids), axis=0, mode="clip")
    if emb.ndim != 3 or emb.shape[:2] != tuple(input_ids.shape):
        raise ValueError(f"text_embeds must be [B, L, D] matching input_ids "
                         f"{tuple(input_ids.shape)} or an embedding table [V, D]; got shape "
                         f"{emb.shape}")
    return emb


def _image_rows(image_tokens) -> jax.Array:
    img = jnp.asarray(image_tokens)
    if img.ndim == 2:  # [M, D]: one image
        img = img[None]
    if img.ndim != 3:
        raise ValueError(f"image_tokens must be [num_images, M, D], got shape {img.shape}")
    return img


def splice(input_ids, text_embeds, image_tokens, image_token_id: int, attention_mask=None, *,
           mode: str = "replace", begin=None, end=None, length: int | None = None) -> dict:
    """Build the language model's input from a prompt with image placeholders.

    input_ids int [B, L]; text_embeds [B, L, D] or an embedding table [V, D];
    image_tokens [num_images, M, D] (or [B, M, D]: one image per row), in the order
    the placeholders appear (row by row); image_token_id: the placeholder id;
    attention_mask [B, L] (1 = token; default all ones).
    mode "replace" / "expand" (see the module docstring); begin / end [D]: expand
    mode's optional embeddings around each image; length: expand mode's output
    length (default: the longest row).

    Returns {"inputs_embeds" [B, L', D], "attention_mask" int32 [B, L'],
    "positions" int32 [B, L'], "image_mask" bool [B, L'] (True at image tokens)}.
    """
    if mode not in MODES:
        raise ValueError(f"splice mode {mode!r} is not one of {MODES}")
    # Concrete ids / masks stay numpy (also inside jit, where jnp values become tracers).
    ids = np.asarray(input_ids) if _is_concrete(input_ids) else input_ids
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {ids.shape}")
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int32)
    elif _is_concrete(attention_mask):
        mask = np.asarray(attention_mask).astype(np.int32)
    else:
        mask = attention_mask.astype(jnp.int32)
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    emb = _text_embeds(ids, text_embeds)
    img = _image_rows(image_tokens).astype(emb.dtype)
    n_img, m, d = img.shape
    if d != emb.shape[-1]:
        raise ValueError(f"image tokens have width {d} but the text embeddings {emb.shape[-1]}")
    if mode == "expand":
        if not _is_concrete(ids) or not _is_concrete(mask):
            raise ValueError("splice(mode='expand') needs concrete input_ids / attention_mask "
                             "(the output length depends on them)")
        return _expand(ids, emb, img, mask, image_token_id, begin, end, length)
    if begin is not None or end is not None:
        raise ValueError("begin / end embeddings need mode='expand' (in 'replace' mode the "
                         "prompt holds their ids already)")
    is_img = ids == image_token_id
    if _is_concrete(ids):
        n_ph = int(is_img.sum())
        if n_ph != n_img * m:
            raise ValueError(f"the prompt holds {n_ph} image placeholder tokens (id "
                             f"{image_token_id}) but there are {n_img} images x {m} tokens = "
                             f"{n_img * m} image features")
    flat = img.reshape(n_img * m, d)
    idx = jnp.cumsum(jnp.asarray(is_img).reshape(-1)) - 1
    picked = jnp.take(flat, jnp.clip(idx, 0, n_img * m - 1), axis=0).reshape(emb.shape)
    out = jnp.where(jnp.asarray(is_img)[..., None], picked, emb)
    mask = jnp.asarray(mask)
    return {"inputs_embeds": out, "attention_mask": mask, "positions": _positions(mask),
            "image_mask": jnp.asarray(is_img)}


def _expand(ids, emb, img, mask, image_token_id, begin, end, length):
    b, seq = ids.shape
    n_img, m, d = img.shape
    is_img = ids == image_token_id
    n_ph = int(is_img.sum())
    if n_ph != n_img:
        raise ValueError(f"the prompt holds {n_ph} image placeholder tokens (id {image_token_id}) "
                         f"but there are {n_img} images; expand mode takes one placeholder "
                         "per image")
    extra = [x for x in (begin, end) if x is not None]
    block = m + len(extra)
    rows = (seq + is_img.sum(1) * (block - 1)).astype(int)
    out_len = int(rows.max()) if length is None else int(length)
    if out_len < rows.max():
        raise ValueError(f"length={length} is shorter than the longest spliced row ({rows.max()})")
    # Source of each output slot, as an index into concat([text (B*L), image (n*M), begin,
    # end, zero]) rows of width D.
    zero = b * seq + n_img * m + 2
    src = np.full((b, out_len), zero, np.int64)
    new_mask = np.zeros((b, out_len), np.int32)
    img_mask = np.zeros((b, out_len), bool)
    k = 0
    for r in range(b):
        t = 0
        for j in range(seq):
            if is_img[r, j]:
                if begin is not None:
                    src[r, t], new_mask[r, t] = b * seq + n_img * m, 1
                    t += 1
                src[r, t:t + m] = b * seq + k * m + np.arange(m)
                new_mask[r, t:t + m] = 1
                img_mask[r, t:t + m] = True
                t += m
                k += 1
                if end is not None:
                    src[r, t], new_mask[r, t] = b * seq + n_img * m + 1, 1
                    t += 1
            else:
                src[r, t], new_mask[r, t] = r * seq + j, mask[r, j]
                t += 1
    z = jnp.zeros((d,), emb.dtype)
    table = jnp.concatenate([
        emb.reshape(b * seq, d), img.reshape(n_img * m, d),
        (z if begin is None else jnp.asarray(begin, emb.dtype).reshape(d))[None],
        (z if end is None else jnp.asarray(end, emb.dtype).reshape(d))[None], z[None]], axis=0)
    new_mask = jnp.asarray(new_mask)
    return {"inputs_embeds": jnp.take(table, jnp.asarray(src), axis=0),
            "attention_mask": new_mask, "positions": _positions(new_mask),
            "image_mask": jnp.asarray(img_mask)}


class ImageSplicer(nn.Module):
    """``splice`` with learned image begin / end and modality embeddings.

    image_token_id: the placeholder id. mode: "replace" | "expand".
    begin_end: learned ``image_begin`` / ``image_end`` [D] around each image
      (expand mode only). image_modality: a learned ``image_modality`` [D] added to
      every image token. text_modality: a learned ``text_modality`` [D] added to
      every text token. All zero-initialised (start as plain splicing), logical
      axis ("embed",).

    __call__(input_ids [B, L], text_embeds [B, L, D] or table [V, D], image_tokens
    [num_images, M, D], attention_mask=None, length=None) -> ``splice``'s dict.
    """

    image_token_id: int
    mode: str = "expand"
    begin_end: bool = False
    image_modality: bool = False
    text_modality: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, text_embeds, image_tokens, attention_mask=None,
                 length: int | None = None) -> dict:
        if self.begin_end and self.mode != "expand":
            raise ValueError("ImageSplicer(begin_end=True) needs mode='expand'")
        d = jnp.shape(image_tokens)[-1]

        def vec(name):
            init = layers.named_init(nn.initializers.zeros, ("embed",))
            return self.param(name, init, (d,), jnp.float32).astype(self.dtype)

        img = jnp.asarray(image_tokens).astype(self.dtype)
        if self.image_modality:
            img = img + vec("image_modality")
        begin = end = None
        if self.begin_end:
            begin, end = vec("image_begin"), vec("image_end")
        out = splice(input_ids, text_embeds, img, self.image_token_id, attention_mask,
                     mode=self.mode, begin=begin, end=end, length=length)
        if self.text_modality:
            text = out["attention_mask"].astype(bool) & ~out["image_mask"]
            if begin is not None:  # begin / end rows are neither text nor image tokens
                text = text & ~_marker_mask(out["image_mask"])
            out["inputs_embeds"] = out["inputs_embeds"] + jnp.where(
                text[..., None], vec("text_modality"), 0).astype(out["inputs_embeds"].dtype)
        return out


def _marker_mask(image_mask: jax.Array) -> jax.Array:
    """Slots right before the first and right after the last token of each image run."""
    im = image_mask
    nxt = jnp.pad(im[:, 1:], ((0, 0), (0, 1)))
    prv = jnp.pad(im[:, :-1], ((0, 0), (1, 0)))
    return (~im) & (nxt | prv)
