"""Batched, jit-compiled image and text encoding shared by the evaluators.

``params`` arguments take either a bare params tree or whole variables
(``{"params": ..., "batch_stats": ...}`` for BatchNorm towers).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

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
  ``local`` takes a batch of this process's rows instead (streamed evaluation on
  several processes): the processes' rows form one global batch, each process
  gets back its own rows' outputs.
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
    # ``_fns``: replicated outputs, so every process can read all rows (multi-host
    # meshes). ``_local_fns`` (process-local batches): outputs stay split over the
    # batch axes, each process reads back its own rows.
    out_sharding = parallel.replicated(mesh) if mesh is not None else None
    self._fns, self._local_fns = {}, {}
    for name, fn in fns.items():
      if mesh is not None and parallel.is_explicit(mesh):
        # The towers run with Auto axes (as in training); only the outputs are
        # typed, split over the batch axes.
        fn = jax.sharding.auto_axes(fn, out_sharding=parallel.batch_sharding(mesh, 2))
      self._fns[name] = jax.jit(fn, out_shardings=out_sharding)
      self._local_fns[name] = (self._fns[name] if mesh is None else
                               jax.jit(fn, out_shardings=parallel.batch_sharding(mesh, 2)))

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

  @property
  def local_multiple(self) -> int:
    """Rows of a process-local batch (``local``) must be a multiple of this: the
    batch shards of the mesh that this process holds (1 without a mesh)."""
    if self.mesh is None:
      return 1
    return max(1, parallel.num_batch_shards(self.mesh) // jax.process_count())

  def local(self, method: str, params, x) -> np.ndarray:
    """This process's rows -> their outputs, float32 [b, D] (``method`` "images" or
    "logits"; "tokens" too).

    The rows of all processes form one global batch on the mesh (so every process
    must call this with the same row count, a multiple of ``local_multiple``); each
    gets back the outputs of its own rows. Evaluation streams batches this way.
    """
    name = {"images": "img", "logits": "logits", "tokens": "txt"}.get(method)
    if name is None:
      raise ValueError(f"Encoder.local: method must be 'images', 'logits' or 'tokens', "
                       f"got {method!r}")
    if name == "img" and not _is_fixed_size(self.model):
      return self.images(params, x)  # packed on this process's default device
    if name not in self._fns:
      raise ValueError(f"{type(self.model).__name__} has no {method!r} output")
    x = np.asarray(x)
    if self.mesh is None:
      return np.asarray(jax.device_get(self._fns[name](params, x)), np.float32)
    lead = parallel.batch_sharding(self.mesh, 1).spec[0]
    if len(x) % self.local_multiple:
      raise ValueError(f"Encoder.local: {len(x)} rows are not a multiple of this process's "
                       f"{self.local_multiple} batch shards")
    g = multihost_utils.host_local_array_to_global_array(
        x, self.mesh, P(lead, *([None] * (x.ndim - 1))))
    y = self._local_fns[name](params, g)
    y = multihost_utils.global_array_to_host_local_array(y, self.mesh, P(lead, None))
    return np.asarray(y, np.float32)

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
