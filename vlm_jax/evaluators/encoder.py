"""Batched, jit-compiled image and text encoding shared by the evaluators.

``params`` arguments take either a bare params tree or whole variables
(``{"params": ..., "batch_stats": ...}`` for BatchNorm towers).
"""

from __future__ import annotations

import jax
import numpy as np

from vlm_jax import parallel
from vlm_jax.models import as_variables


class Encoder:
  """Jit-compiled batched ``encode_image`` / ``encode_text`` for one model.

  Inputs are cut into chunks of ``batch_size`` rows; every chunk is padded to
  the same row count (a multiple of the mesh's batch shards) and the padding is
  stripped again, so any number of inputs works and each input shape compiles
  once. With a ``mesh`` the chunks are split over its batch axes and ``params``
  may be sharded on it (as in training); without one everything runs on the
  default device.

  One Encoder can serve several evaluators: the compiled functions are shared.
  For an ``ImageClassifier`` ``images`` gives the pooled features (before the
  head) and ``logits`` the class logits; it has no ``tokens``.
  """

  def __init__(self, model, *, mesh=None, batch_size: int = 256):
    from vlm_jax.models import ImageClassifier  # pylint: disable=import-outside-toplevel
    self.model = model
    self.mesh = mesh
    self.batch_size = int(batch_size)
    if isinstance(model, ImageClassifier):
      fns = {"img": lambda v, x: model.apply(as_variables(v), x, method="encode")[0],
             "logits": lambda v, x: model.apply(as_variables(v), x)}
    else:
      fns = {"img": lambda v, x: model.apply(as_variables(v), x, method="encode_image"),
             "txt": lambda v, t: model.apply(as_variables(v), t, method="encode_text")}
    # Replicated outputs: every process can read all rows (multi-host meshes).
    out_sharding = parallel.replicated(mesh) if mesh is not None else None
    self._fns = {}
    for name, fn in fns.items():
      if mesh is not None and parallel.is_explicit(mesh):
        # The towers run with Auto axes (as in training); only the outputs are
        # typed, split over the batch axes.
        fn = jax.sharding.auto_axes(fn, out_sharding=parallel.batch_sharding(mesh, 2))
      self._fns[name] = jax.jit(fn, out_shardings=out_sharding)

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
          self.model, as_variables(params), list(np.asarray(images))), np.float32)
    return self._run(self._fns["img"], params, images, batch_size)

  def tokens(self, params, tokens, *, batch_size=None) -> np.ndarray:
    """int32 [N,L] -> [N,D] float32 embeddings (before normalisation)."""
    if "txt" not in self._fns:
      raise ValueError(f"{type(self.model).__name__} has no text tower")
    return self._run(self._fns["txt"], params, tokens, batch_size)

  def logits(self, params, images, *, batch_size=None) -> np.ndarray:
    """float32 [N,H,W,3] -> [N, num_classes] float32 logits (classifiers only)."""
    if "logits" not in self._fns:
      raise ValueError(f"{type(self.model).__name__} is not an image classifier")
    return self._run(self._fns["logits"], params, images, batch_size)


def _is_fixed_size(model) -> bool:
  from vlm_jax.models import NaViT  # pylint: disable=import-outside-toplevel
  return not isinstance(getattr(model, "image", None), NaViT)
