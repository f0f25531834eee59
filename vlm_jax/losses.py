"""Contrastive image-text losses: sigmoid (SigLIP) and softmax (CLIP).

Shapes: ``zimg`` and ``ztxt`` are L2-normalised embeddings ``[B, D]`` (row ``i`` of
each is a matching pair), ``t`` is the temperature (already exponentiated, a
scalar) and ``b`` the logit bias (a scalar). All losses compute in float32 and
return a float32 scalar, whatever the input dtype.

Three implementations of the sigmoid loss give the same value and gradients:

* ``sigmoid_loss``: dense, on whatever arrays it is given (the global batch under
  ``jax.jit`` and GSPMD, which keeps two ``b x B`` blocks per device for the
  forward and backward, b = B / n_devices). Memory O(B^2).
* ``gathered_sigmoid_loss``: under ``jax.shard_map``; every device all-gathers the
  text embeddings and computes its own ``b`` rows against all ``B`` columns, one
  ``b x B`` block. Memory O(b * B) per device, below the dense loss.
* ``chunked_sigmoid_loss``: under ``jax.shard_map``; every device keeps its own
  images and passes the text chunks around a ring (``jax.lax.ppermute``), one
  ``b x b`` block at a time. Per-device memory O(b^2 + b * D), forward and backward.

The sharded two share one ``jax.custom_vjp``: under differentiation a single
pass computes the loss and its gradients, each block's derivative written over
its own logits, and keeps only the ``[b, D]`` gradients for the backward.

Every softmax path takes the matching-pair logits from the logits matrix it
normalises, so that dL/dt, a small difference of large sums once the model
aligns its pairs, keeps float32 precision.

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


def _positives(rows: int, cols: int, offset=0) -> jax.Array:
    """[rows, cols] bool, True where column == row + offset: the matching pairs.

    Built from iotas, so XLA fuses it into the elementwise op that reads it
    instead of materialising a matrix. An offset >= cols marks no pair.
    """
    i = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    return j == i + offset


def _sigmoid_terms(logits, pos) -> jax.Array:
    """-log sigmoid(z * logits) elementwise, z = +1 where pos else -1."""
    return -jax.nn.log_sigmoid(jnp.where(pos, logits, -logits))


def _diagonal(logits, pos) -> jax.Array:
    """The matching-pair entries of each row of ``logits`` ([rows], float32).

    Taken from the logits themselves, not recomputed as ``t * <x_i, y_i>``:
    each cross-entropy is a log-sum-exp minus its positive, and dL/dt a
    difference of nearly equal sums, so both must see the same rounding.
    """
    return jnp.sum(jnp.where(pos, logits, 0.0), axis=1)


def _check_valid(valid, batch: int) -> jax.Array | None:
    """valid [B] bool (or 0/1) -> float32 0/1 flags [B] (None stays None)."""
    if valid is None:
        return None
    valid = jnp.asarray(valid)
    if valid.shape != (batch,):
        raise ValueError(f"valid must be [B] = [{batch}] (one flag per row), got shape "
                         f"{tuple(valid.shape)}")
    return (valid != 0).astype(jnp.float32)


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
    # t scales x before the matmul: reverse mode then gets dL/dt from x and
    # dL/d(t x) (a [B, D] array) instead of keeping x @ y.T alive for the backward.
    x = t * zimg.astype(jnp.float32)
    y = _unshard_explicit(ztxt).astype(jnp.float32)
    terms = _sigmoid_terms(x @ y.T + b, _positives(batch, batch))
    v = _check_valid(valid, batch)
    if v is None:
        return jnp.sum(terms) / batch
    terms = terms * (v[:, None] * _unshard_explicit(v)[None, :])
    return jnp.sum(terms) / jnp.maximum(jnp.sum(v), 1.0)


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
    logits = t * (zimg.astype(jnp.float32) @ _unshard_explicit(ztxt).astype(jnp.float32).T)
    diag = _diagonal(logits, _positives(batch, batch))  # logits[i, i], as both softmaxes see it
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


def _block_loss(x, y, t, b, pos, w=None) -> jax.Array:
    """Sum over one block of -log sigmoid(z * (t x.y + b)), float32.

    x [bx, D], y [by, D] (any float dtype); pos [bx, by] bool marks the
    matching pairs (z = +1); w [bx, by] optional 0/1 pair flags.
    """
    logits = t * jnp.matmul(x, y.T, preferred_element_type=jnp.float32) + b
    terms = _sigmoid_terms(logits, pos)
    if w is not None:
        terms = terms * w
    return jnp.sum(terms)


def _block_value_and_grads(x, y, t, b, pos, w=None):
    """One block's loss sum and the pieces of its gradient, float32.

    With ``logits = t * x @ y.T + b`` and ``dl`` the derivative of the block's
    sum wrt the logits, returns ``(sum, dl @ y [bx, D], dl.T @ x [by, D], sum(dl))``.
    The gradients follow: d/dx = t * (dl @ y), d/dy = t * (dl.T @ x),
    d/db = sum(dl) and d/dt = sum(dl * x @ y.T) = sum(x * (dl @ y)), so nothing
    of size bx * by outlives ``dl``, and logits, terms and ``dl`` are written
    one over the other: one block buffer. ``w`` [bx, by]: optional 0/1 pair flags.
    """
    logits = t * jnp.matmul(x, y.T, preferred_element_type=jnp.float32) + b
    terms = _sigmoid_terms(logits, pos)  # softplus(-u), u = z * logits
    if w is not None:
        terms = terms * w
    loss = jnp.sum(terms)
    # dl is computed from the terms, not from the logits, so logits, terms and
    # dl can share one buffer: 1 - exp(-softplus(-u)) = sigmoid(-u) = -d terms/du,
    # to float32 rounding for every u (expm1 keeps it exact where it is tiny), and
    # 0 where w = 0. Adding 0 * loss orders the sum before dl overwrites the terms
    # (XLA's CPU pipeline drops an optimization_barrier).
    s = -jnp.expm1(-(terms + 0.0 * loss))
    dl = jnp.where(pos, -s, s)
    h = dl @ y.astype(jnp.float32)
    k = dl.T @ x.astype(jnp.float32)
    return loss, h, k, jnp.sum(dl)


def _count(v, batch: int, axes) -> jax.Array:
    """What the loss sum is divided by: B, or the number of valid rows (>= 1)."""
    if v is None:
        return jnp.float32(batch)
    return jnp.maximum(jax.lax.psum(jnp.sum(v), axes), 1.0)


def _ring_perm(n: int) -> list[tuple[int, int]]:
    # Device k sends to k + 1, so after s steps device k holds the chunk of k - s.
    # Indices are linear over the batch axes in the order given, the same order
    # in which P(batch_axes) lays out the batch, so chunk k is rows [k*b, (k+1)*b).
    return [(i, (i + 1) % n) for i in range(n)]


def _ring_local(x, y, t, b, v, *, axes, n: int, grads: bool):
    """Per-device body of the ring-chunked sigmoid loss (under shard_map).

    Device k holds images x_k, texts y_k and flags v_k [b] (or v None). The text
    chunk (with its flags and, with ``grads``, the gradient accumulated for it)
    hops around the ring; every step adds one b x b block. Positives lie only
    in the block of step 0 (the device's own texts). Returns the loss, and with
    ``grads`` also (d/dzimg, d/dztxt, d/dt, d/db) of it for the local chunks.
    """
    nb = x.shape[0]
    perm = _ring_perm(n)
    travelling = ("y", "vy", "gy")

    def zeros(shape):  # accumulators differ per device: mark them varying over the axes
        return jax.lax.pcast(jnp.zeros(shape, jnp.float32), axes, to="varying")

    carry = {"y": y, "loss": zeros(())}
    if v is not None:
        carry["vy"] = v
    if grads:
        carry["gx"] = zeros(x.shape)  # sum of dl @ y over the blocks
        carry["gy"] = zeros(y.shape)  # sum of dl.T @ x, travels with y
        carry["gb"] = zeros(())

    def update(step, carry):
        carry = dict(carry)
        # An offset of nb marks no pair: only step 0 holds this device's own texts.
        pos = _positives(nb, nb, jnp.where(step == 0, 0, nb))
        w = None if v is None else v[:, None] * carry["vy"][None, :]
        if grads:
            loss, h, k, sdl = _block_value_and_grads(x, carry["y"], t, b, pos, w)
            carry["gx"] = carry["gx"] + h
            carry["gy"] = carry["gy"] + k
            carry["gb"] = carry["gb"] + sdl
        else:
            loss = _block_loss(x, carry["y"], t, b, pos, w)
        carry["loss"] = carry["loss"] + loss
        return carry

    def hop(carry):
        return {key: jax.lax.ppermute(a, axes, perm) if key in travelling else a
                for key, a in carry.items()}

    if n > 1:
        carry = jax.lax.fori_loop(0, n - 1, lambda step, c: hop(update(step, c)), carry)
    carry = update(n - 1, carry)  # the last chunk needs no hop onwards
    count = _count(v, nb * n, axes)
    loss = jax.lax.psum(carry["loss"], axes) / count
    if not grads:
        return loss
    gy = carry["gy"] if n == 1 else jax.lax.ppermute(carry["gy"], axes, perm)  # home
    gt = jax.lax.psum(jnp.sum(x.astype(jnp.float32) * carry["gx"]), axes) / count
    gb = jax.lax.psum(carry["gb"], axes) / count
    return loss, t * carry["gx"] / count, t * gy / count, gt, gb


def _gather_local(x, y, t, b, v, *, axes, n: int, grads: bool):
    """Per-device body of the all-gather sigmoid loss: b rows against all B texts."""
    nb = x.shape[0]
    y_all = jax.lax.all_gather(y, axes, tiled=True)
    pos = _positives(nb, nb * n, jax.lax.axis_index(axes) * nb)
    w = None
    if v is not None:
        w = v[:, None] * jax.lax.all_gather(v, axes, tiled=True)[None, :]
    count = _count(v, nb * n, axes)
    if not grads:
        return jax.lax.psum(_block_loss(x, y_all, t, b, pos, w), axes) / count
    loss, h, k, sdl = _block_value_and_grads(x, y_all, t, b, pos, w)
    gy = jax.lax.psum_scatter(k, axes, scatter_dimension=0, tiled=True)
    gt = jax.lax.psum(jnp.sum(x.astype(jnp.float32) * h), axes) / count
    return (jax.lax.psum(loss, axes) / count, t * h / count, t * gy / count, gt,
            jax.lax.psum(sdl, axes) / count)


_LOCAL = {"chunked": _ring_local, "gather": _gather_local}


@functools.lru_cache(maxsize=64)
def _make_sharded_sigmoid(impl: str, mesh, axes: tuple[str, ...], n: int, masked: bool,
                          x_dtype, y_dtype):
    """``loss(zimg, ztxt, t, b[, v])`` for batch-sharded inputs, with a custom VJP.

    Under differentiation one pass computes the loss and all its gradients
    (the derivative of each block comes from the same elementwise pass as its
    value); the residuals are those gradients, [b, D] per device, so neither
    the embeddings nor any block is kept for the backward, which only scales
    them by the incoming cotangent. Without differentiation only the loss is
    computed. ``v`` [B] float 0/1: validity flags; they get a zero cotangent.
    """
    local = _LOCAL[impl]
    spec = P(axes, None)
    in_specs = (spec, spec, P(), P()) + ((P(axes),) if masked else ())

    def body(grads):
        def fn(x, y, t, b, *v):
            return local(x, y, t, b, v[0] if v else None, axes=axes, n=n, grads=grads)
        return fn

    value_sm = _shard_map(body(False), mesh, in_specs, P())
    grads_sm = _shard_map(body(True), mesh, in_specs, (P(), spec, spec, P(), P()))

    @jax.custom_vjp
    def loss(*args):
        return value_sm(*args)

    def loss_fwd(*args):
        value, gx, gy, gt, gb = grads_sm(*args)
        return value, (gx, gy, gt, gb, args[4:])

    def loss_bwd(res, g):
        gx, gy, gt, gb, v = res
        g = jnp.asarray(g, jnp.float32)
        return ((g * gx).astype(x_dtype), (g * gy).astype(y_dtype), g * gt, g * gb,
                *(jnp.zeros_like(a) for a in v))

    loss.defvjp(loss_fwd, loss_bwd)
    return loss


def _sharded_sigmoid(impl, zimg, ztxt, t, b, mesh, batch_axes, valid):
    axes, n, batch, zimg, ztxt, t, b = _prepare(zimg, ztxt, t, b, mesh, batch_axes)
    masked = valid is not None
    fn = _make_sharded_sigmoid(impl, mesh, axes, n, masked, zimg.dtype, ztxt.dtype)
    if masked:
        return fn(zimg, ztxt, t, b, _place(_check_valid(valid, batch), mesh, P(axes)))
    return fn(zimg, ztxt, t, b)


def gathered_sigmoid_loss(
    zimg: jax.Array, ztxt: jax.Array, t, b, *, mesh, batch_axes: Sequence[str] = ("data",),
    valid=None,
) -> jax.Array:
    """Sigmoid loss with the text embeddings all-gathered over the batch axes.

    Each device computes its ``b`` image rows against all ``B`` texts (one
    ``b x B`` block); the text gradients are reduce-scattered back. Same value
    and gradients as :func:`sigmoid_loss`. Per-device memory O(b * B + B * D):
    one ``b x B`` block where the dense loss under GSPMD keeps two.

    Args: as :func:`chunked_sigmoid_loss`.
    Returns: float32 scalar (replicated).
    """
    return _sharded_sigmoid("gather", zimg, ztxt, t, b, mesh, batch_axes, valid)


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
        nb = x.shape[0]
        # This device's rows are rows k*nb.. of the global batch: their positives
        # are those columns of the local logits, not a separate <x_i, y_i>.
        pos = _positives(nb, batch, jax.lax.axis_index(axes) * nb)
        i2t_logits = t * (x @ y_all.T)
        t2i_logits = t * (y @ x_all.T)
        i2t = jax.nn.logsumexp(i2t_logits, axis=1) - _diagonal(i2t_logits, pos)
        t2i = jax.nn.logsumexp(t2i_logits, axis=1) - _diagonal(t2i_logits, pos)
        part = 0.5 * (jnp.sum(i2t) + jnp.sum(t2i)) / batch
        return jax.lax.psum(part, axes)

    spec = P(axes, None)
    return _shard_map(local, mesh, (spec, spec, P()), P())(zimg, ztxt, t)


# --------------------------------------------------------------------------- chunked


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
    ``jax.lax.ppermute``, adding negative-only blocks. Under differentiation
    (a ``jax.custom_vjp``) the same ring also computes the gradients: each
    block's derivative comes from the elementwise pass that gives its value,
    each text chunk travels with the gradient accumulated for it and arrives
    back home after ``n`` hops, and only the ``[b, D]`` gradients are kept for
    the backward. Per-device memory: one ``b x b`` float32 block plus a few
    ``[b, D]`` arrays, forward and backward.

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
    return _sharded_sigmoid("chunked", zimg, ztxt, t, b, mesh, batch_axes, valid)


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
