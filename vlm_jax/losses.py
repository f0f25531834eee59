"""Contrastive image-text losses: sigmoid (SigLIP) and softmax (CLIP).

Shapes: ``zimg`` and ``ztxt`` are L2-normalised embeddings ``[B, D]`` (row ``i`` of
each is a matching pair), ``t`` is the temperature (already exponentiated, a
scalar) and ``b`` the logit bias (a scalar). All losses compute in float32 and
return a float32 scalar, whatever the input dtype.

Three implementations of the sigmoid loss give the same value and gradients:

* ``sigmoid_loss``: dense, on whatever arrays it is given (the global batch under
  ``jax.jit`` and GSPMD). Memory O(B^2).
* ``gathered_sigmoid_loss``: under ``jax.shard_map``; every device all-gathers the
  text embeddings and computes its own ``b`` rows against all ``B`` columns.
  Memory O(b * B) per device, b = B / n_devices.
* ``chunked_sigmoid_loss``: under ``jax.shard_map``; every device keeps its own
  images and passes the text chunks around a ring (``jax.lax.ppermute``), one
  ``b x b`` block at a time. A ``jax.custom_vjp`` reruns the ring in the backward
  pass, so per-device memory is O(b^2 + b * D) forward and backward.

``get_loss_fn`` picks one of them by name for the train step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

__all__ = [
    "sigmoid_loss",
    "softmax_loss",
    "chunked_sigmoid_loss",
    "gathered_sigmoid_loss",
    "gathered_softmax_loss",
    "get_loss_fn",
]

LossFn = Callable[[jax.Array, jax.Array, Any, Any], jax.Array]


# --------------------------------------------------------------------------- checks


def _check_pair(zimg, ztxt) -> tuple[int, int]:
    if zimg.ndim != 2:
        raise ValueError(f"zimg must be [B, D], got shape {tuple(zimg.shape)}")
    if ztxt.ndim != 2:
        raise ValueError(f"ztxt must be [B, D], got shape {tuple(ztxt.shape)}")
    if zimg.shape != ztxt.shape:
        raise ValueError(
            f"zimg and ztxt must have the same shape [B, D], got zimg {tuple(zimg.shape)} "
            f"and ztxt {tuple(ztxt.shape)}"
        )
    return zimg.shape


def _scalar(x, name: str) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.size != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(x.shape)}")
    return x.reshape(())


def _batch_axes(mesh, batch_axes) -> tuple[str, ...]:
    if mesh is None:
        raise ValueError("mesh is required for the sharded losses (got mesh=None)")
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    if not axes:
        raise ValueError("batch_axes must name at least one mesh axis")
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(
            f"batch_axes {unknown} are not axes of the mesh (its axes: {tuple(mesh.axis_names)})"
        )
    if len(set(axes)) != len(axes):
        raise ValueError(f"batch_axes has repeated axes: {axes}")
    return axes


def _n_batch_devices(mesh, axes) -> int:
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


def _check_divisible(batch: int, n: int, axes) -> None:
    if batch % n:
        raise ValueError(
            f"global batch size {batch} is not divisible by the {n} devices of "
            f"batch_axes {tuple(axes)}"
        )


# --------------------------------------------------------------------------- dense


def _unshard_explicit(y):
    """Replicates y if its type carries an Explicit sharding.

    On Explicit meshes ``x @ y.T`` with both operands sharded on the batch is a
    sharding type error; replicating the right operand keeps the logits sharded
    on their rows (what GSPMD picks on Auto meshes anyway).
    """
    sharding = getattr(jax.typeof(y), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(s is None for s in spec):
        return y
    return jax.reshard(y, jax.sharding.NamedSharding(sharding.mesh, P()))


def _sigmoid_block(x, y, t, b, positive: bool, vx=None, vy=None) -> jax.Array:
    """Sum over a block of -log sigmoid(z * (t x.y + b)); float32 inputs.

    vx [bx], vy [by] (float 0/1, optional): only pairs of valid rows and columns count.
    """
    logits = t * (x @ y.T) + b
    if positive:
        z = 2.0 * jnp.eye(x.shape[0], y.shape[0], dtype=jnp.float32) - 1.0
    else:
        z = -1.0
    terms = jax.nn.log_sigmoid(z * logits)
    if vx is not None:
        terms = terms * (vx[:, None] * vy[None, :])
    return -jnp.sum(terms)


def _check_valid(valid, batch: int) -> jax.Array | None:
    """valid [B] bool/0-1 -> float32 [B] (None stays None)."""
    if valid is None:
        return None
    valid = jnp.asarray(valid)
    if valid.shape != (batch,):
        raise ValueError(f"valid must be [B] = [{batch}] (one flag per row), got shape "
                         f"{tuple(valid.shape)}")
    return valid.astype(jnp.float32)


def sigmoid_loss(zimg: jax.Array, ztxt: jax.Array, t, b, valid=None) -> jax.Array:
    """SigLIP pairwise sigmoid loss on a (global) batch.

    ``-(1/B) * sum_ij log sigmoid(z_ij * (t * <x_i, y_j> + b))`` with
    ``z_ij = 1`` if ``i == j`` else ``-1``.

    Args:
      zimg: ``[B, D]`` normalised image embeddings (any float dtype).
      ztxt: ``[B, D]`` normalised text embeddings, row ``i`` pairs with ``zimg[i]``.
      t: scalar temperature (already exponentiated).
      b: scalar logit bias.
      valid: optional ``[B]`` bool: which rows are real pairs (NaViT batches
        have empty slots). Only pairs (i, j) with both rows valid count, and the
        sum is divided by the number of valid rows: the loss of the batch with
        the invalid rows removed. None: all rows are valid.

    Returns:
      float32 scalar, the loss summed over the B x B pairs and divided by B.
    """
    batch, _ = _check_pair(zimg, ztxt)
    t, b = _scalar(t, "t"), _scalar(b, "b")
    x = zimg.astype(jnp.float32)
    y = _unshard_explicit(ztxt).astype(jnp.float32)
    v = _check_valid(valid, batch)
    if v is None:
        return _sigmoid_block(x, y, t, b, positive=True) / batch
    return _sigmoid_block(x, y, t, b, True, v, _unshard_explicit(v)) / jnp.maximum(jnp.sum(v), 1.0)


def softmax_loss(zimg: jax.Array, ztxt: jax.Array, t, valid=None) -> jax.Array:
    """CLIP softmax contrastive loss.

    With ``logits = t * zimg @ ztxt.T``: the mean over the batch of the
    image->text cross-entropy (rows) and of the text->image cross-entropy
    (columns), averaged. Matching pairs are on the diagonal.

    Args:
      zimg: ``[B, D]`` normalised image embeddings (any float dtype).
      ztxt: ``[B, D]`` normalised text embeddings.
      t: scalar temperature (already exponentiated).
      valid: optional ``[B]`` bool; invalid rows are left out of both softmaxes
        and of the means (the loss of the batch without them).

    Returns:
      float32 scalar.
    """
    batch, _ = _check_pair(zimg, ztxt)
    t = _scalar(t, "t")
    x = zimg.astype(jnp.float32)
    logits = t * (x @ _unshard_explicit(ztxt).astype(jnp.float32).T)
    diag = t * jnp.sum(x * ztxt.astype(jnp.float32), axis=1)  # the matching pairs
    v = _check_valid(valid, batch)
    if v is None:
        i2t = jax.nn.logsumexp(logits, axis=1) - diag
        t2i = jax.nn.logsumexp(logits, axis=0) - diag
        return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))
    vc = _unshard_explicit(v)
    i2t = jax.nn.logsumexp(logits, axis=1, b=vc[None, :]) - diag
    t2i = jax.nn.logsumexp(logits, axis=0, b=v[:, None]) - diag
    n = jnp.maximum(jnp.sum(v), 1.0)
    return 0.5 * (jnp.sum(jnp.where(v > 0, i2t, 0.0)) + jnp.sum(jnp.where(v > 0, t2i, 0.0))) / n


# --------------------------------------------------------------------------- sharded


def _shard_map(fn, mesh, in_specs, out_specs):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _place(x, mesh, spec):
    """Lays x out as ``spec`` on ``mesh`` (a no-op when it already is).

    shard_map on Explicit axes requires the inputs' shardings to equal its
    in_specs, so inputs laid out otherwise (replicated, other axes, a sharded
    feature dim) are resharded first; on Auto axes a sharding constraint does it.
    """
    sharding = jax.sharding.NamedSharding(mesh, spec)
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return jax.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def _prepare(zimg, ztxt, t, b, mesh, batch_axes):
    """Validates and lays out a sharded loss's arguments.

    Returns (axes, n, B, zimg, ztxt, t, b) with the embeddings sharded on the
    batch over ``axes`` and t, b float32 replicated scalars.
    """
    batch, _ = _check_pair(zimg, ztxt)
    axes = _batch_axes(mesh, batch_axes)
    n = _n_batch_devices(mesh, axes)
    _check_divisible(batch, n, axes)
    t = _place(_scalar(t, "t"), mesh, P())
    b = _place(_scalar(0.0 if b is None else b, "b"), mesh, P())
    zimg = _place(zimg, mesh, P(axes, None))
    ztxt = _place(ztxt, mesh, P(axes, None))
    return axes, n, batch, zimg, ztxt, t, b


def gathered_sigmoid_loss(
    zimg: jax.Array, ztxt: jax.Array, t, b, *, mesh, batch_axes: Sequence[str] = ("data",),
    valid=None,
) -> jax.Array:
    """Sigmoid loss with the text embeddings all-gathered over the batch axes.

    Each device computes its ``b`` image rows against all ``B`` texts (a
    ``b x B`` logits block), then the partial sums are ``psum``-ed. Same value
    and gradients as :func:`sigmoid_loss`; per-device memory O(b * B). Kept as
    the baseline that :func:`chunked_sigmoid_loss` is measured against.

    Args: as :func:`chunked_sigmoid_loss`.
    Returns: float32 scalar (replicated).
    """
    axes, _, batch, zimg, ztxt, t, b = _prepare(zimg, ztxt, t, b, mesh, batch_axes)
    if valid is not None:
        v = _place(_check_valid(valid, batch), mesh, P(axes))

        def local_masked(x, y, vx, t, b):
            y_all = jax.lax.all_gather(y, axes, tiled=True).astype(jnp.float32)
            v_all = jax.lax.all_gather(vx, axes, tiled=True)
            nb = x.shape[0]
            logits = t * (x.astype(jnp.float32) @ y_all.T) + b
            rows = jax.lax.axis_index(axes) * nb + jnp.arange(nb)
            z = jnp.where(rows[:, None] == jnp.arange(batch)[None, :], 1.0, -1.0)
            w = vx[:, None] * v_all[None, :]
            part = -jnp.sum(w * jax.nn.log_sigmoid(z * logits))
            return jax.lax.psum(part, axes) / jnp.maximum(jax.lax.psum(jnp.sum(vx), axes), 1.0)

        spec = P(axes, None)
        return _shard_map(local_masked, mesh, (spec, spec, P(axes), P(), P()), P())(
            zimg, ztxt, v, t, b)

    def local(x, y, t, b):
        x = x.astype(jnp.float32)
        y_all = jax.lax.all_gather(y, axes, tiled=True).astype(jnp.float32)
        nb = x.shape[0]
        logits = t * (x @ y_all.T) + b
        rows = jax.lax.axis_index(axes) * nb + jnp.arange(nb)
        z = jnp.where(rows[:, None] == jnp.arange(batch)[None, :], 1.0, -1.0)
        part = -jnp.sum(jax.nn.log_sigmoid(z * logits)) / batch
        return jax.lax.psum(part, axes)

    spec = P(axes, None)
    return _shard_map(local, mesh, (spec, spec, P(), P()), P())(zimg, ztxt, t, b)


def gathered_softmax_loss(
    zimg: jax.Array, ztxt: jax.Array, t, *, mesh, batch_axes: Sequence[str] = ("data",)
) -> jax.Array:
    """CLIP softmax loss for batch-sharded inputs, all-gathering both towers.

    Each device computes the image->text cross-entropy of its own images and
    the text->image cross-entropy of its own texts against the gathered global
    batch, then the partial sums are ``psum``-ed. Same value and gradients as
    :func:`softmax_loss`. (A softmax needs a whole row, so it is not chunked.)

    Args:
      zimg, ztxt: ``[B, D]`` sharded on B over ``batch_axes``.
      t: scalar temperature.
      mesh: the ``jax.sharding.Mesh``.
      batch_axes: mesh axes the batch dimension is sharded over.
    Returns: float32 scalar (replicated).
    """
    axes, _, batch, zimg, ztxt, t, _ = _prepare(zimg, ztxt, t, 0.0, mesh, batch_axes)

    def local(x, y, t):
        x = x.astype(jnp.float32)
        y = y.astype(jnp.float32)
        x_all = jax.lax.all_gather(x, axes, tiled=True)
        y_all = jax.lax.all_gather(y, axes, tiled=True)
        pos = t * jnp.sum(x * y, axis=1)
        i2t = jax.nn.logsumexp(t * (x @ y_all.T), axis=1) - pos
        t2i = jax.nn.logsumexp(t * (y @ x_all.T), axis=1) - pos
        part = 0.5 * (jnp.sum(i2t) + jnp.sum(t2i)) / batch
        return jax.lax.psum(part, axes)

    spec = P(axes, None)
    return _shard_map(local, mesh, (spec, spec, P()), P())(zimg, ztxt, t)


# --------------------------------------------------------------------------- chunked


def _ring_perm(n: int) -> list[tuple[int, int]]:
    # Device k sends to k + 1, so after s steps device k holds the chunk of k - s.
    # Indices are linear over the batch axes in the order given, the same order
    # in which P(batch_axes) lays out the batch, so chunk k is rows [k*b, (k+1)*b).
    return [(i, (i + 1) % n) for i in range(n)]


def _block_grads(x, y, t, b, g, positive: bool, vx=None, vy=None):
    """Cotangents of one block's loss sum, scaled by g (float32); vx/vy weight rows/cols."""
    dots = x @ y.T
    logits = t * dots + b
    if positive:
        z = 2.0 * jnp.eye(x.shape[0], y.shape[0], dtype=jnp.float32) - 1.0
    else:
        z = -1.0
    # d/dlogits of -log sigmoid(z * logits) = -z * sigmoid(-z * logits)
    dlogits = (-z * jax.nn.sigmoid(-z * logits)) * g
    if vx is not None:
        dlogits = dlogits * (vx[:, None] * vy[None, :])
    gx = t * (dlogits @ y)
    gy = t * (dlogits.T @ x)
    gt = jnp.sum(dlogits * dots)
    gb = jnp.sum(dlogits)
    return gx, gy, gt, gb


@functools.lru_cache(maxsize=64)
def _make_chunked(mesh, axes: tuple[str, ...], n: int, batch: int):
    spec = P(axes, None)
    perm = _ring_perm(n)
    shift = lambda v: jax.lax.ppermute(v, axes, perm)  # noqa: E731

    def fwd_local(x, y, t, b):
        xf = x.astype(jnp.float32)
        total = _sigmoid_block(xf, y.astype(jnp.float32), t, b, positive=True)

        def step(_, carry):
            y, total = carry
            y = shift(y)
            total = total + _sigmoid_block(xf, y.astype(jnp.float32), t, b, positive=False)
            return y, total

        if n > 1:
            _, total = jax.lax.fori_loop(1, n, step, (y, total))
        return jax.lax.psum(total / batch, axes)

    def bwd_local(x, y, t, b, g):
        xf = x.astype(jnp.float32)
        g = g / batch
        gx, gy, gt, gb = _block_grads(xf, y.astype(jnp.float32), t, b, g, positive=True)

        def step(_, carry):
            y, gy, gx, gt, gb = carry
            # The text chunk travels with the gradient accumulated for it so far.
            y, gy = shift(y), shift(gy)
            dx, dy, dt, db = _block_grads(xf, y.astype(jnp.float32), t, b, g, positive=False)
            return y, gy + dy, gx + dx, gt + dt, gb + db

        if n > 1:
            _, gy, gx, gt, gb = jax.lax.fori_loop(1, n, step, (y, gy, gx, gt, gb))
            gy = shift(gy)  # one more hop brings each chunk's gradient home
        gt = jax.lax.psum(gt, axes)
        gb = jax.lax.psum(gb, axes)
        return gx.astype(x.dtype), gy.astype(y.dtype), gt, gb

    fwd_sm = _shard_map(fwd_local, mesh, (spec, spec, P(), P()), P())
    bwd_sm = _shard_map(bwd_local, mesh, (spec, spec, P(), P(), P()), (spec, spec, P(), P()))

    @jax.custom_vjp
    def loss(zimg, ztxt, t, b):
        return fwd_sm(zimg, ztxt, t, b)

    def loss_fwd(zimg, ztxt, t, b):
        return fwd_sm(zimg, ztxt, t, b), (zimg, ztxt, t, b)

    def loss_bwd(res, g):
        zimg, ztxt, t, b = res
        return bwd_sm(zimg, ztxt, t, b, jnp.asarray(g, jnp.float32))

    loss.defvjp(loss_fwd, loss_bwd)
    return loss


@functools.lru_cache(maxsize=64)
def _make_chunked_masked(mesh, axes: tuple[str, ...], n: int):
    """The ring of ``_make_chunked`` with a validity mask ``v`` [B] (float 0/1).

    Each text chunk travels with its validity flags; block sums are weighted by
    v_i * v_j and the total is divided by the number of valid rows.
    """
    spec, vspec = P(axes, None), P(axes)
    perm = _ring_perm(n)
    shift = lambda v: jax.lax.ppermute(v, axes, perm)  # noqa: E731

    def count(v):
        return jnp.maximum(jax.lax.psum(jnp.sum(v), axes), 1.0)

    def fwd_local(x, y, v, t, b):
        xf = x.astype(jnp.float32)
        total = _sigmoid_block(xf, y.astype(jnp.float32), t, b, True, v, v)

        def step(_, carry):
            y, vy, total = carry
            y, vy = shift(y), shift(vy)
            return y, vy, total + _sigmoid_block(xf, y.astype(jnp.float32), t, b, False, v, vy)

        if n > 1:
            _, _, total = jax.lax.fori_loop(1, n, step, (y, v, total))
        return jax.lax.psum(total, axes) / count(v)

    def bwd_local(x, y, v, t, b, g):
        xf = x.astype(jnp.float32)
        g = g / count(v)
        gx, gy, gt, gb = _block_grads(xf, y.astype(jnp.float32), t, b, g, True, v, v)

        def step(_, carry):
            y, vy, gy, gx, gt, gb = carry
            y, vy, gy = shift(y), shift(vy), shift(gy)
            dx, dy, dt, db = _block_grads(xf, y.astype(jnp.float32), t, b, g, False, v, vy)
            return y, vy, gy + dy, gx + dx, gt + dt, gb + db

        if n > 1:
            _, _, gy, gx, gt, gb = jax.lax.fori_loop(1, n, step, (y, v, gy, gx, gt, gb))
            gy = shift(gy)
        gt = jax.lax.psum(gt, axes)
        gb = jax.lax.psum(gb, axes)
        return gx.astype(x.dtype), gy.astype(y.dtype), jnp.zeros_like(v), gt, gb

    fwd_sm = _shard_map(fwd_local, mesh, (spec, spec, vspec, P(), P()), P())
    bwd_sm = _shard_map(bwd_local, mesh, (spec, spec, vspec, P(), P(), P()),
                        (spec, spec, vspec, P(), P()))

    @jax.custom_vjp
    def loss(zimg, ztxt, v, t, b):
        return fwd_sm(zimg, ztxt, v, t, b)

    def loss_fwd(zimg, ztxt, v, t, b):
        return fwd_sm(zimg, ztxt, v, t, b), (zimg, ztxt, v, t, b)

    def loss_bwd(res, g):
        return bwd_sm(*res, jnp.asarray(g, jnp.float32))

    loss.defvjp(loss_fwd, loss_bwd)
    return loss


def chunked_sigmoid_loss(
    zimg: jax.Array, ztxt: jax.Array, t, b, *, mesh, batch_axes: Sequence[str] = ("data",),
    valid=None,
) -> jax.Array:
    """Sigmoid loss over a batch-sharded global batch, never gathering it.

    Same value and gradients (wrt ``zimg``, ``ztxt``, ``t``, ``b``) as
    :func:`sigmoid_loss` on the global batch. Under ``jax.shard_map`` over
    ``batch_axes`` (n devices, local batch ``b = B / n``), device k computes its
    ``b x b`` block against its own texts (which holds the positives), then
    receives the text chunk of its ring neighbour ``n - 1`` times via
    ``jax.lax.ppermute``, adding negative-only blocks. The backward pass (a
    ``jax.custom_vjp``) reruns the ring, passing each text chunk together with
    its accumulating gradient, which arrives back home after ``n`` hops.
    Per-device memory: O(b^2 + b * D), forward and backward.

    Works inside ``jax.jit`` on meshes with ``AxisType.Explicit`` or ``Auto``
    axes, with extra non-batch axes (the loss is replicated over those). Inputs
    laid out otherwise are first resharded to ``P(batch_axes, None)``. Outside
    ``jax.jit`` on an Explicit mesh, take gradients under ``jax.set_mesh(mesh)``
    (JAX needs the mesh context to build the sharded output cotangent).

    Args:
      zimg: ``[B, D]`` normalised image embeddings, B sharded over ``batch_axes``.
      ztxt: ``[B, D]`` normalised text embeddings, sharded like ``zimg``.
      t: scalar temperature (already exponentiated), replicated.
      b: scalar logit bias, replicated.
      mesh: the ``jax.sharding.Mesh``.
      batch_axes: mesh axis name(s) the batch dimension is sharded over, major
        first, e.g. ``("data",)`` or ``("data", "fsdp")``.
      valid: optional ``[B]`` bool, sharded like the rows: as in
        :func:`sigmoid_loss`, only pairs of valid rows count and the sum is
        divided by the number of valid rows. Each text chunk carries its flags
        around the ring. No gradient flows to ``valid``.

    Returns:
      float32 scalar (replicated).

    Raises:
      ValueError: bad shapes, unknown axes, or B not divisible by the number of
        devices along ``batch_axes``.
    """
    axes, n, batch, zimg, ztxt, t, b = _prepare(zimg, ztxt, t, b, mesh, batch_axes)
    if valid is not None:
        v = _place(_check_valid(valid, batch), mesh, P(axes))
        return _make_chunked_masked(mesh, axes, n)(zimg, ztxt, v, t, b)
    return _make_chunked(mesh, axes, n, batch)(zimg, ztxt, t, b)


# --------------------------------------------------------------------------- dispatch

_NAMES = ("sigmoid", "softmax")
_IMPLS = ("chunked", "gather", "dense")


def get_loss_fn(
    name: str,
    impl: str = "chunked",
    mesh=None,
    batch_axes: Sequence[str] = ("data",),
) -> LossFn:
    """Returns ``fn(zimg, ztxt, t, b, valid=None) -> float32 scalar`` for the train step.

    ``valid`` ([B] bool, optional) masks empty NaViT slots (see :func:`sigmoid_loss`).

    Args:
      name: ``"sigmoid"`` (SigLIP) or ``"softmax"`` (CLIP; ignores ``b``).
      impl: ``"dense"`` (plain jnp on the global arrays, GSPMD partitions it),
        ``"gather"`` (shard_map with all-gathered embeddings) or ``"chunked"``
        (shard_map ring; sigmoid only, for softmax it means ``"gather"``).
      mesh: required for ``"gather"`` and ``"chunked"``.
      batch_axes: mesh axes the batch is sharded over.
    """
    if name not in _NAMES:
        raise ValueError(f"loss name must be one of {_NAMES}, got {name!r}")
    if impl not in _IMPLS:
        raise ValueError(f"loss impl must be one of {_IMPLS}, got {impl!r}")
    if impl != "dense":
        _batch_axes(mesh, batch_axes)  # fail early on a bad mesh / axes
    if name == "sigmoid":
        if impl == "dense":
            return sigmoid_loss
        fn = chunked_sigmoid_loss if impl == "chunked" else gathered_sigmoid_loss
        return lambda zimg, ztxt, t, b, valid=None: fn(
            zimg, ztxt, t, b, mesh=mesh, batch_axes=batch_axes, valid=valid)
    if impl == "dense":
        return lambda zimg, ztxt, t, b=None, valid=None: softmax_loss(zimg, ztxt, t, valid=valid)

    def softmax_fn(zimg, ztxt, t, b=None, valid=None):
        if valid is not None:  # the masked softmax is not sharded by hand; GSPMD partitions it
            return softmax_loss(zimg, ztxt, t, valid=valid)
        return gathered_softmax_loss(zimg, ztxt, t, mesh=mesh, batch_axes=batch_axes)

    return softmax_fn
