"""Encode images and texts with a trained two-tower model, caption images with a captioner.

    ckpt = vlm_jax.checkpoint.load(workdir)
    zimg = encode_images(ckpt.model, {"params": ckpt.params}, images)   # [N, D]
    ztxt = encode_texts(ckpt.model, {"params": ckpt.params}, ["a red circle", ...])

Images may have any sizes and come back in input order. For a NaViT tower they
are packed (``data.packing.pack``; aspect kept, at most ``seq_len`` patches each)
and every image is encoded exactly as it would be alone. For a fixed-size ViT
they are resized (squashed, PIL bilinear) to ``model.image.image_size``.

Pixel values: uint8 images (0-255) are mapped linearly onto ``value_range``
(default (-1, 1), the recipes' ``pp.value_range``); float images are taken as
already normalised. No token dropping or resolution sampling ever happens here.
Results are the towers' outputs before L2 normalisation (as ``encode_image`` /
``encode_text``); ``normalize=True`` returns unit vectors.

    texts = caption(ckpt.model, ckpt.variables, images)               # greedy
    texts = caption(ckpt.model, ckpt.variables, images, beam_size=4)  # beam search
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

from vlm_jax.data import packing, preprocess
from vlm_jax.data.tokenizers import ByteTokenizer
from vlm_jax.numeric import normalize as normalize_rows
from vlm_jax.models.navit import NaViT

__all__ = ["encode_images", "encode_texts", "caption"]


@functools.lru_cache(maxsize=16)
def _jitted(model, method: str):
    return jax.jit(lambda variables, x: model.apply(variables, x, method=method))


def _check(image: Any, what: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3 or 0 in arr.shape:
        raise ValueError(f"{what} must be an H x W x 3 (or H x W) array, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32, copy=False)
    if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
        raise ValueError(f"{what} has integer values outside 0-255")
    return arr.astype(np.uint8, copy=False)


def _to_range(x: np.ndarray, raw_dtype, value_range) -> np.ndarray:
    """Pixels resized from a uint8 image (0-255 floats) -> value_range; floats unchanged."""
    if raw_dtype != np.uint8:
        return x
    lo, hi = (float(v) for v in value_range)
    return (x * np.float32((hi - lo) / 255.0) + np.float32(lo)).astype(np.float32)


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def _pad_rows(x: dict | np.ndarray, rows: int):
    """Pad axis 0 to ``rows`` with zeros (packed dicts: empty sequences)."""
    def pad(a):
        a = np.asarray(a)
        if a.shape[0] == rows:
            return a
        extra = np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)
        return np.concatenate([a, extra])
    if isinstance(x, dict):
        return {k: pad(v) for k, v in x.items()}
    return pad(x)


def encode_images(model, variables, images: Sequence[Any], *, seq_len: int | None = None,
                  max_images: int | None = None, batch_size: int | None = None,
                  value_range: Sequence[float] = (-1.0, 1.0),
                  normalize: bool = False) -> np.ndarray:
    """Embeds images of any sizes -> float32 [N, D], in input order.

    Args:
      model: a ``TwoTower`` (``models.build``); variables: {"params": ...}.
      images: N arrays H x W x 3 (or H x W), uint8 0-255 or already-normalised floats.
      seq_len, max_images: NaViT packing (defaults: model.image.seq_len /
        max_images; NaFlex towers always use one image per sequence).
      batch_size: sequences (NaViT) or images (ViT) per forward pass; default
        32. The last batch is padded to the others' size (one compiled shape).
      value_range: where uint8 pixels 0-255 are mapped.
      normalize: L2-normalise the embeddings.
    """
    if len(images) == 0:
        raise ValueError("encode_images got no images")
    tower = model.image
    bs = int(batch_size or 32)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arrays = [_check(im, f"images[{i}]") for i, im in enumerate(images)]
    fn = _jitted(model, "encode_image")
    if isinstance(tower, NaViT):
        seq_len = int(seq_len or tower.seq_len)
        m = 1 if tower.posemb == "naflex" else int(max_images or tower.max_images)
        max_side = (tower.posemb_size if tower.posemb == "learn" and tower.posemb_coords == "absolute"
                    else None)
        items = []
        for a in arrays:  # resize (as uint8 when given uint8, like training), then normalise
            item = packing.image_to_item(a, patch_size=tower.patch_size, max_patches=seq_len,
                                         max_side=max_side)
            item["patches"] = _to_range(item["patches"], a.dtype, value_range)
            items.append(item)
        batch = packing.pack_items(items, seq_len=seq_len, max_images=m)
        out: np.ndarray | None = None
        n_seq = batch["segment_ids"].shape[0]
        for start, stop in _batches(n_seq, bs):
            chunk = _pad_rows({k: v[start:stop] for k, v in batch.items()}, min(bs, n_seq))
            z = np.asarray(fn(variables, chunk), np.float32)[:stop - start]   # [s, M, D]
            if out is None:
                out = np.zeros((len(arrays), z.shape[-1]), np.float32)
            idx = batch["image_index"][start:stop]
            s_i, m_i = np.nonzero(idx >= 0)
            out[idx[s_i, m_i]] = z[s_i, m_i]
    else:
        size = tower.image_size
        hw = (size, size) if np.isscalar(size) else tuple(size)
        resized = []
        for a in arrays:
            if a.dtype == np.uint8:
                a = preprocess.normalize(preprocess.resize_crop(a, hw, "resize"), value_range)
            elif a.shape[:2] != hw:
                a = packing.resize_image(a, hw)
            resized.append(a)
        parts = []
        for start, stop in _batches(len(resized), bs):
            x = _pad_rows(np.stack(resized[start:stop]), min(bs, len(resized)))
            parts.append(np.asarray(fn(variables, x), np.float32)[:stop - start])
        out = np.concatenate(parts)
    return normalize_rows(out) if normalize else out


def encode_texts(model, variables, texts: Sequence[str], *, tokenizer: Any = None,
                 max_len: int | None = None, batch_size: int | None = None,
                 normalize: bool = False) -> np.ndarray:
    """Embeds texts -> float32 [N, D], in input order.

    Args:
      model, variables: as ``encode_images``.
      texts: N strings.
      tokenizer: anything with ``encode(list[str]) -> int32 [N, L]``; default the
        byte tokenizer (``data.tokenizers.ByteTokenizer``) with ``max_len``.
      max_len: tokens per text for the default tokenizer (default model.text.max_len).
      batch_size: texts per forward pass (default 256; the last batch is padded).
      normalize: L2-normalise the embeddings.
    """
    if isinstance(texts, str):
        raise ValueError("encode_texts takes a list of strings, got one string")
    if len(texts) == 0:
        raise ValueError("encode_texts got no texts")
    if tokenizer is None:
        tokenizer = ByteTokenizer(int(max_len or model.text.max_len))
        if model.text.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"the text tower has a vocabulary of {model.text.vocab_size}, not the byte "
                f"tokenizer's {tokenizer.vocab_size}: pass the run's tokenizer, e.g. "
                "tokenizer=vlm_jax.data.tokenizers.build_tokenizer(ckpt.config.tokenizer)")
    tokens = np.asarray(tokenizer.encode(list(texts)), np.int32)
    if tokens.shape[1] > model.text.max_len:
        raise ValueError(f"tokenizer gives {tokens.shape[1]} tokens per text, more than the "
                         f"text tower's max_len={model.text.max_len}")
    bs = int(batch_size or 256)
    fn = _jitted(model, "encode_text")
    parts = []
    for start, stop in _batches(len(tokens), bs):
        parts.append(np.asarray(fn(variables, _pad_rows(tokens[start:stop], min(bs, len(tokens)))),
                                np.float32)[:stop - start])
    out = np.concatenate(parts)
    return normalize_rows(out) if normalize else out


def caption(model, variables, images: Sequence[Any], *, max_len: int | None = None,
            beam_size: int = 1, tokenizer: Any = None, batch_size: int | None = None,
            value_range: Sequence[float] = (-1.0, 1.0), length_penalty: float = 0.0,
            return_scores: bool = False):
    """Captions of ``images`` from a captioner (``models.captioner.Captioner``), in input order.

    Args:
      model, variables: the captioner and its variables ({"params": ...}).
      images: N arrays H x W x 3 (or H x W), uint8 0-255 or already-normalised
        floats; resized (squashed) to the tower's image_size as ``encode_images`` does.
      max_len: tokens to generate at most (default: the decoder's max_len).
      beam_size: 1 = greedy; more = beam search keeping that many beams.
      tokenizer: anything with ``decode`` and ``eos_id`` / ``pad_id``; default the
        byte tokenizer (the decoder's vocabulary must then be 258).
      batch_size: images per jit-compiled decoding call (default 64; the last
        batch is padded to the same size, one compiled shape).
      value_range: where uint8 pixels 0-255 are mapped.
      length_penalty: beam search ranks by score / length ** length_penalty.
      return_scores: also return the captions' summed token log-probabilities.
    Returns:
      list of N strings (decoding stops at EOS), or (strings, float32 [N] scores).
    """
    from vlm_jax.models.captioner import Captioner, generate_fn  # pylint: disable=import-outside-toplevel
    if not isinstance(model, Captioner):
        raise ValueError(f"caption needs a Captioner (model.captioner.mode set), got "
                         f"{type(model).__name__}")
    if len(images) == 0:
        raise ValueError("caption got no images")
    if int(beam_size) < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    dec = model.decoder
    max_len = int(max_len or dec.max_len)
    if not 1 <= max_len <= dec.max_len:
        raise ValueError(f"max_len={max_len} must be in [1, the decoder's max_len={dec.max_len}]")
    if tokenizer is None:
        tokenizer = ByteTokenizer(max(max_len, 2))
        if dec.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"the decoder has a vocabulary of {dec.vocab_size}, not the byte tokenizer's "
                f"{tokenizer.vocab_size}: pass the run's tokenizer, e.g. tokenizer=vlm_jax."
                "data.tokenizers.build_tokenizer(ckpt.config.tokenizer)")
    if tokenizer.eos_id is None:
        raise ValueError("caption needs a tokenizer with an EOS id")
    size = model.image.image_size
    hw = (size, size) if np.isscalar(size) else tuple(size)
    arrays = []
    for i, im in enumerate(images):
        a = _check(im, f"images[{i}]")
        if a.dtype == np.uint8:
            a = preprocess.normalize(preprocess.resize_crop(a, hw, "resize"), value_range)
        elif a.shape[:2] != hw:
            a = packing.resize_image(a, hw)
        arrays.append(a)
    fn = generate_fn(model, max_len=max_len, eos_id=int(tokenizer.eos_id),
                     pad_id=int(tokenizer.pad_id), beam_size=int(beam_size),
                     length_penalty=float(length_penalty))
    bs = int(batch_size or 64)
    texts, scores = [], []
    for start, stop in _batches(len(arrays), bs):
        x = _pad_rows(np.stack(arrays[start:stop]), min(bs, len(arrays)))
        tokens, score = fn(variables, x)
        texts += list(tokenizer.decode(np.asarray(tokens)[:stop - start]))
        scores.append(np.asarray(score, np.float32)[:stop - start])
    return (texts, np.concatenate(scores)) if return_scores else texts
