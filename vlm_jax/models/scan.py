"""Scan over layers: the two parameter layouts of an encoder, and remat policies.

An encoder (``layers.Encoder``: ViT, text and NaViT towers) stores its blocks in
one of two layouts, chosen by ``model.image.scan`` / ``model.text.scan``:

    unrolled (scan=False)   Transformer/encoderblock_{i}/...   one subtree per block
    scanned  (scan=True)    Transformer/encoderblock/...       every leaf stacked [depth, ...]

The scanned layout is big_vision's. Its leaves carry the extra leading logical
axis "layers" (replicated by default: see ``vlm_jax.parallel``), so FSDP / TP
shard the other dims as in the unrolled layout. Scanning compiles one block
instead of ``depth`` copies; the outputs are the same.

Converting between the layouts is one function pair, on any tree of nested dicts
(params, variables, optimizer states, abstract ``ShapeDtypeStruct`` trees, whose
NamedShardings gain / lose a replicated leading dim, flax ``Partitioned`` boxes,
sown intermediates):

    scanned = scan.to_scanned(params)       # every encoderblock_{0..n-1} group -> encoderblock
    params = scan.to_unrolled(scanned)      # and back
    tree = scan.match_layout(tree, target)  # per encoder, the layout ``target`` has

Remat policies (``model.*.remat_policy``; ``REMAT_POLICIES``): what a block keeps
from its forward pass for the backward pass; the rest is recomputed.

    "none"                              keep everything (no rematerialisation)
    "full"                              keep only the block inputs (= remat=True)
    "dots_saveable"                     keep every matmul output (attention scores too)
    "dots_with_no_batch_dims_saveable"  keep the weight matmuls (QKV/out/MLP), recompute
                                        attention scores, softmax, norms, activations
    "offload"                           as the previous, but the kept matmuls go to pinned
                                        host memory (``offload_dot_with_no_batch_dims``);
                                        needs a device with a "pinned_host" memory space
                                        (TPU, GPU; jax's CPU backend has one too)
    ""                                  follow the boolean ``remat`` (False: "none", True: "full")
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

__all__ = ["to_scanned", "to_unrolled", "match_layout", "is_scanned", "REMAT_POLICIES",
           "remat_policy", "checkpoint_policy", "BLOCK", "SCANNED_BLOCK"]

SCANNED_BLOCK = "encoderblock"
BLOCK = re.compile(r"^encoderblock_(\d+)$")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload")
LAYERS_AXIS = "layers"


# --------------------------------------------------------------------------- remat policies


def remat_policy(remat: bool, policy: str = "", field: str = "remat_policy") -> str:
    """The effective policy name from the ``remat`` flag and ``remat_policy`` ("" follows remat).

    Raises ValueError naming ``field`` for an unknown policy, or for remat=True
    with remat_policy="none" (contradictory).
    """
    policy = policy or ""
    if policy == "":
        return "full" if remat else "none"
    if policy not in REMAT_POLICIES:
        raise ValueError(f"{field}={policy!r} is not one of {REMAT_POLICIES} (or '' to follow "
                         "remat)")
    if remat and policy == "none":
        raise ValueError(f"remat=True contradicts {field}='none'; set one of them")
    return policy


def checkpoint_policy(name: str) -> Callable | None:
    """The ``jax.checkpoint`` policy for a policy name other than "none" (None for "full")."""
    pols = jax.checkpoint_policies
    if name == "full":
        return None
    if name == "dots_saveable":
        return pols.dots_saveable
    if name == "dots_with_no_batch_dims_saveable":
        return pols.dots_with_no_batch_dims_saveable
    if name == "offload":
        kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
        if "pinned_host" not in kinds:
            raise ValueError(f"remat_policy='offload' needs a 'pinned_host' memory space, which "
                             f"the {jax.default_backend()!r} device lacks (it has "
                             f"{sorted(kinds)}); use 'dots_with_no_batch_dims_saveable'")
        return pols.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"no checkpoint policy for {name!r}; expected one of {REMAT_POLICIES[1:]}")


# --------------------------------------------------------------------------- layouts


def _shift(sharding, stack: bool):
    """A NamedSharding for the stacked (one more leading, replicated dim) or unstacked leaf."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)
        spec = (None,) + spec if stack else spec[1:]
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return sharding  # None, one device, or fully replicated: the same for either shape


def _stack(leaves: list) -> Any:
    first = leaves[0]
    if isinstance(first, nn.Partitioned):
        value = _stack([leaf.value for leaf in leaves])
        names = (LAYERS_AXIS,) + tuple(first.names)
        return first.replace(value=value, names=names)
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype,
                                    sharding=_shift(first.sharding, stack=True))
    if isinstance(first, np.ndarray) or np.isscalar(first):
        return np.stack(leaves)
    return jax.numpy.stack(leaves)


def _unstack(leaf: Any, n: int) -> list:
    if isinstance(leaf, nn.Partitioned):
        names = tuple(leaf.names)
        rest = names[1:] if names and names[0] == LAYERS_AXIS else names
        return [leaf.replace(value=v, names=rest) for v in _unstack(leaf.value, n)]
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = _shift(leaf.sharding, stack=False)
        return [jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype, sharding=sharding)
                for _ in range(n)]
    return [leaf[i] for i in range(n)]


def _is_leaf(x) -> bool:
    return isinstance(x, (nn.Partitioned, jax.ShapeDtypeStruct))


def _depth(node: Mapping) -> int:
    """n when ``node`` holds encoderblock_0 .. encoderblock_{n-1} (and no scanned group), else 0."""
    idx = sorted(int(m.group(1)) for k in node if isinstance(k, str) and (m := BLOCK.match(k)))
    if not idx:
        return 0
    if idx != list(range(len(idx))):
        raise ValueError(f"encoder blocks {['encoderblock_%d' % i for i in idx]} are not "
                         "numbered 0..n-1; cannot stack them")
    if SCANNED_BLOCK in node:
        raise ValueError("a tree node holds both 'encoderblock' and 'encoderblock_{i}' groups")
    return len(idx)


def _map_nodes(tree: Any, fn: Callable[[dict], dict]) -> Any:
    """Apply ``fn`` to every dict-like node of ``tree`` (bottom-up), keeping containers."""
    if _is_leaf(tree):
        return tree
    if isinstance(tree, Mapping):
        node = {k: _map_nodes(v, fn) for k, v in tree.items()}
        node = fn(node)
        if type(tree) is not dict:  # FrozenDict and friends
            try:
                return type(tree)(node)
            except TypeError:
                return node
        return node
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple (optax states)
        return type(tree)(*(_map_nodes(v, fn) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_nodes(v, fn) for v in tree)
    return tree


def _scan_node(node: dict) -> dict:
    n = _depth(node)
    if not n:
        return node
    blocks = [node.pop(f"encoderblock_{i}") for i in range(n)]
    treedef = jax.tree.structure(blocks[0], is_leaf=_is_leaf)
    for i, b in enumerate(blocks[1:], 1):
        if jax.tree.structure(b, is_leaf=_is_leaf) != treedef:
            raise ValueError(f"encoderblock_{i} differs in structure from encoderblock_0; "
                             "cannot stack them")
    flat = [jax.tree.leaves(b, is_leaf=_is_leaf) for b in blocks]
    node[SCANNED_BLOCK] = jax.tree.unflatten(treedef, [_stack(list(ls)) for ls in zip(*flat)])
    return node


def _unroll_node(node: dict) -> dict:
    if SCANNED_BLOCK not in node or not isinstance(node[SCANNED_BLOCK], Mapping):
        return node
    stacked = node.pop(SCANNED_BLOCK)
    leaves, treedef = jax.tree.flatten(stacked, is_leaf=_is_leaf)
    if not leaves:
        return node
    sizes = {int(np.shape(x.value if isinstance(x, nn.Partitioned) else x)[0]) for x in leaves}
    if len(sizes) != 1:
        raise ValueError(f"'encoderblock' leaves have different leading (depth) sizes "
                         f"{sorted(sizes)}")
    n = sizes.pop()
    per_leaf = [_unstack(x, n) for x in leaves]
    for i in range(n):
        node[f"encoderblock_{i}"] = jax.tree.unflatten(treedef, [p[i] for p in per_leaf])
    return node


def _run(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn(tree)``; under one ``jax.jit`` when the leaves are jax arrays (one compile for
    the whole tree instead of an eager stack / slice op per leaf shape)."""
    leaves = jax.tree.leaves(tree)
    if leaves and all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
                      for x in leaves):
        return jax.jit(fn)(tree)
    return fn(tree)


def to_scanned(tree: Any) -> Any:
    """Every group ``encoderblock_{0..n-1}`` in ``tree`` -> one ``encoderblock`` stacked [n, ...].

    Works on nested dicts at any depth (all towers at once) inside tuples /
    NamedTuples (optimizer states); leaves may be numpy / jax arrays,
    ``jax.ShapeDtypeStruct`` or ``nn.Partitioned`` (whose names gain a leading
    "layers"). Nodes already scanned are left as they are.
    """
    return _run(lambda t: _map_nodes(t, _scan_node), tree)


def to_unrolled(tree: Any) -> Any:
    """Inverse of ``to_scanned``: every ``encoderblock`` [n, ...] -> ``encoderblock_{0..n-1}``."""
    return _run(lambda t: _map_nodes(t, _unroll_node), tree)


def is_scanned(tree: Any) -> bool:
    """Whether any dict node of ``tree`` holds a scanned ``encoderblock`` group."""
    found = []

    def visit(node):
        if SCANNED_BLOCK in node:
            found.append(True)
        return node
    _map_nodes(tree, visit)
    return bool(found)


def match_layout(tree: Any, target: Any) -> Any:
    """``tree`` with each encoder converted to the layout the same node of ``target`` has.

    ``target`` is a tree of the same model (e.g. ``models.abstract_variables``'s
    params, or a freshly initialised state); nodes are matched by their key path,
    so the image and text towers may differ. Nodes absent from ``target`` are
    left as they are.
    """
    return _run(lambda t: _match(t, target), tree)


def _match(tree: Any, target: Any) -> Any:
    if isinstance(tree, Mapping) and isinstance(target, Mapping):
        node = dict(tree)
        if _depth(node) and SCANNED_BLOCK in target and not _depth(dict(target)):
            node = _scan_node(node)
        elif SCANNED_BLOCK in node and isinstance(node[SCANNED_BLOCK], Mapping) \
                and _depth(dict(target)):
            node = _unroll_node(node)
        return {k: _match(v, target[k]) if k in target else v for k, v in node.items()}
    if (isinstance(tree, (list, tuple)) and isinstance(target, (list, tuple))
            and len(tree) == len(target) and not _is_leaf(tree)):
        items = [_match(a, b) for a, b in zip(tree, target)]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return tree
