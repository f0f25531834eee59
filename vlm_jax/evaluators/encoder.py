"""Batched, jit-compiled image and text encoding shared by the evaluators."""

from __future__ import annotations

import jax
import numpy as np

from vlm_jax import parallel


def normalize(x, axis=-1) -> np.ndarray:
  """float32 ``x / ||x||`` along ``axis`` (a zero vector stays zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class Encoder:
  """Jit-compiled batched ``encode_image`` / ``encode_text`` for one model.

  Inputs are cut into chunks of ``batch_size`` rows; every chunk is padded to
  the same row count (a multiple of the mesh's batch shards) and the padding is
  stripped again, so any number of inputs works and each input shape compiles
  once. With a ``mesh`` the chunks are split over its batch axes and ``params``
  may be sharded on it (as in training); without one everything runs on the
  default device.

  One Encoder can serve several evaluators: the compiled functions are shared.
  """

  def __init__(self, model, *, mesh=None, batch_size: int = 256):
    self.model = model
    self.mesh = mesh
    self.batch_size = int(batch_size)
    encode_image = lambda p, x: model.apply({"params": p}, x, method="encode_image")
    encode_text = lambda p, t: model.apply({"params": p}, t, method="encode_text")
    if mesh is not None and parallel.is_explicit(mesh):
      # The towers run with Auto axes (as in training); only the embeddings
      # are typed, split over the batch axes.
      out = parallel.batch_sharding(mesh, 2)
      encode_image = jax.sharding.auto_axes(encode_image, out_sharding=out)
      encode_text = jax.sharding.auto_axes(encode_text, out_sharding=out)
    # Replicated outputs: every process can read all rows (multi-host meshes).
    out_sharding = parallel.replicated(mesh) if mesh is not None else None
    self._img = jax.jit(encode_image, out_shardings=out_sharding)
    self._txt = jax.jit(encode_text, out_shardings=out_sharding)

  def _run(self, fn, params, x, batch_size=None) -> np.ndarray:
    x = np.asarray(x)
    n = len(x)
    shards = parallel.num_batch_shards(self.mesh) if self.mesh is not None else 1
    bs = int(batch_size or self.batch_size)
    bs = max(shards, bs - bs % shards)
    rows = bs if n >= bs else n + (-n) % shards  # every chunk padded to this
    out = []
    for i in range(0, n, bs):
      chunk = x[i:i + bs]
      m = len(chunk)
      if m < rows:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], rows - m, axis=0)])
      if self.mesh is not None:
        chunk = jax.device_put(chunk, parallel.batch_sharding(self.mesh, chunk.ndim))
      y = fn(params, chunk)
      out.append(np.asarray(jax.device_get(y), np.float32)[:m])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def images(self, params, images, *, batch_size=None) -> np.ndarray:
    """float32 [N,H,W,3] -> [N,D] float32 embeddings (before normalisation)."""
    if not _is_fixed_size(self.model):
      # Packed (NaViT) image towers take packed batches; inference packs them
      # (its batch_size counts packed sequences: its default, not ours).
      from vlm_jax import inference  # pylint: disable=import-outside-toplevel
      return np.asarray(inference.encode_images(
          self.model, {"params": params}, list(np.asarray(images))), np.float32)
    return self._run(self._img, params, images, batch_size)

  def tokens(self, params, tokens, *, batch_size=None) -> np.ndarray:
    """int32 [N,L] -> [N,D] float32 embeddings (before normalisation)."""
    return self._run(self._txt, params, tokens, batch_size)


def _is_fixed_size(model) -> bool:
  from vlm_jax.models import NaViT  # pylint: disable=import-outside-toplevel
  return not isinstance(getattr(model, "image", None), NaViT)
