"""The PyTorch world's tensor layouts, shared by the importers of torch checkpoints
(``hf``, ``open_clip``, ``torchvision``): safetensors I/O without torch, and rules
that map torch state-dict keys to our '/'-joined parameter paths, both ways.

    torch Linear weight [out, in]        -> Dense kernel [in, out] (transpose)
    q/k/v_proj weight [D, D]             -> attention query/key/value kernel [D, H, Dh]; bias [H, Dh]
    nn.MultiheadAttention in_proj [3D, D] -> query / key / value (split in three)
    out_proj weight [D, D]               -> attention out kernel [H, Dh, D]
    LayerNorm weight / bias              -> scale / bias

A ``Rule`` maps a list of torch tensors to a list of ours (``to_ours``) and back
(``to_torch``), so one rule can split or merge tensors (packed q/k/v).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Callable, Mapping

import numpy as np


def safetensors_files(path: str) -> list[str]:
    """The .safetensors files of a save_pretrained directory (single or sharded) or ``path``."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is neither a directory nor a .safetensors file")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(os.listdir(path))
    raise FileNotFoundError(
        f"{path} has no model.safetensors or model.safetensors.index.json (found: {found}); "
        "re-save the model with transformers' save_pretrained(safe_serialization=True)")


def _read_raw(file: str, key: str, dtype) -> np.ndarray:
    """One tensor straight from the safetensors layout (for dtypes numpy lacks, e.g. BF16)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(n))[key]
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        buf = f.read(end - start)
    return np.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def read_safetensors(path: str, keep: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """The tensors of a save_pretrained directory (single file or shards) or one file.

    ``keep(key)`` picks which tensors are read (default all): the others are never
    loaded, so a VLM's vision side can be read without its language model.
    Floating tensors come back as float32 numpy arrays (bf16/f16 are widened).
    """
    import ml_dtypes
    from safetensors import safe_open

    out = {}
    for file in safetensors_files(path):
        with safe_open(file, framework="np") as f:
            for k in f.keys():
                if keep is not None and not keep(k):
                    continue
                dt = f.get_slice(k).get_dtype()
                if dt == "BF16":
                    x = _read_raw(file, k, ml_dtypes.bfloat16)
                else:
                    x = f.get_tensor(k)
                if np.issubdtype(x.dtype, np.floating) or dt == "BF16":
                    x = np.asarray(x, np.float32)
                out[k] = x
    return out


def write_safetensors(tensors: Mapping[str, np.ndarray], file: str) -> None:
    from safetensors.numpy import save_file
    save_file({k: np.asarray(v, np.float32, order="C") for k, v in tensors.items()}, file,
              metadata={"format": "pt"})



# ---------------------------------------------------------------- rules

@dataclasses.dataclass(frozen=True)
class Rule:
    """torch keys ``hf`` <-> our '/'-joined paths ``ours`` (lists in, lists out)."""
    hf: tuple[str, ...]
    ours: tuple[str, ...]
    to_ours: Callable[[list], list]
    to_hf: Callable[[list], list]


def one(hf: str, ours: str, f=lambda x: x, g=lambda x: x) -> Rule:
    return Rule((hf,), (ours,), lambda xs: [f(xs[0])], lambda ys: [g(ys[0])])


T = np.transpose


def linear(hf: str, ours: str, bias: bool = True) -> list[Rule]:
    rules = [one(f"{hf}.weight", f"{ours}/kernel", T, T)]
    if bias:
        rules.append(one(f"{hf}.bias", f"{ours}/bias"))
    return rules


def layernorm(hf: str, ours: str) -> list[Rule]:
    return [one(f"{hf}.weight", f"{ours}/scale"), one(f"{hf}.bias", f"{ours}/bias")]


def qkv_kernel(heads):  # [D_out, D_in] <-> [D_in, H, Dh]
    return (lambda w: w.T.reshape(w.shape[1], heads, -1),
            lambda k: k.reshape(k.shape[0], -1).T)


def qkv_bias(heads):
    return lambda b: b.reshape(heads, -1), lambda b: b.reshape(-1)


def out_kernel(heads):  # [D, H*Dh] <-> [H, Dh, D]
    return (lambda w: w.T.reshape(heads, -1, w.shape[0]),
            lambda k: k.reshape(-1, k.shape[-1]).T)


def attention(hf: str, ours: str, heads: int, out: str = "out_proj") -> list[Rule]:
    """Separate q/k/v projections and an output projection named ``out``
    (transformers' attention modules; open_clip's attention pool calls it c_proj)."""
    rules = []
    for t, n in (("q", "query"), ("k", "key"), ("v", "value")):
        rules.append(one(f"{hf}.{t}_proj.weight", f"{ours}/{n}/kernel", *qkv_kernel(heads)))
        rules.append(one(f"{hf}.{t}_proj.bias", f"{ours}/{n}/bias", *qkv_bias(heads)))
    rules.append(one(f"{hf}.{out}.weight", f"{ours}/out/kernel", *out_kernel(heads)))
    rules.append(one(f"{hf}.{out}.bias", f"{ours}/out/bias"))
    return rules


def packed_attention(src: str, ours: str, heads: int) -> list[Rule]:
    """torch nn.MultiheadAttention: ``in_proj`` [3D, D] holds q, k, v stacked on the
    output axis -> our query / key / value kernels [D, H, Dh] and biases [H, Dh]."""
    fk, gk = qkv_kernel(heads)
    fb, gb = qkv_bias(heads)
    names = [f"{ours}/{n}/{p}" for n in ("query", "key", "value") for p in ("kernel", "bias")]

    def to_ours(xs):
        w, b = xs
        out = []
        for wi, bi in zip(np.split(w, 3, axis=0), np.split(b, 3, axis=0)):
            out += [fk(wi), fb(bi)]
        return out

    def to_torch(ys):
        return [np.concatenate([gk(k) for k in ys[0::2]], axis=0),
                np.concatenate([gb(b) for b in ys[1::2]], axis=0)]

    return [Rule((f"{src}.in_proj_weight", f"{src}.in_proj_bias"), tuple(names), to_ours,
                 to_torch),
            one(f"{src}.out_proj.weight", f"{ours}/out/kernel", *out_kernel(heads)),
            one(f"{src}.out_proj.bias", f"{ours}/out/bias")]


def add_batch(x):
    return x[None]


def drop_batch(x):
    return x[0]


def hf_encoder(hf: str, ours: str, depth: int, heads: int) -> list[Rule]:
    """transformers' CLIP/SigLIP-style encoder ``{hf}.layers.{i}`` <-> our ``layers.Encoder``."""
    rules = []
    for i in range(depth):
        h, o = f"{hf}.layers.{i}", f"{ours}/encoderblock_{i}"
        rules += layernorm(f"{h}.layer_norm1", f"{o}/LayerNorm_0")
        rules += attention(f"{h}.self_attn", f"{o}/MultiHeadDotProductAttention_0", heads)
        rules += layernorm(f"{h}.layer_norm2", f"{o}/LayerNorm_1")
        rules += linear(f"{h}.mlp.fc1", f"{o}/MlpBlock_0/Dense_0")
        rules += linear(f"{h}.mlp.fc2", f"{o}/MlpBlock_0/Dense_1")
    return rules


def apply_rules(rules: list[Rule], tensors: Mapping[str, np.ndarray],
                expected: Mapping[str, tuple], source: str,
                ignored_suffixes: tuple[str, ...] = ("position_ids",)) -> dict[str, np.ndarray]:
    """torch tensors -> our flat {'/'-path: array} through ``rules``, checked against
    ``expected`` shapes (our abstract params). Every tensor must be used, every
    expected path produced, every shape fit: otherwise CheckpointMismatchError
    naming the missing, unexpected and mismatched keys (``source`` says which file)."""
    from vlm_jax.interop import CheckpointMismatchError

    flat, missing, mismatched, used = {}, [], [], set()
    for rule in rules:
        absent = [k for k in rule.hf if k not in tensors]
        if absent:
            missing += absent
            continue
        used.update(rule.hf)
        xs = [np.asarray(tensors[k], np.float32) for k in rule.hf]
        try:
            ys = rule.to_ours(xs)
        except ValueError:  # e.g. a reshape into heads that does not fit
            ys = None
        for i, path in enumerate(rule.ours):
            want = expected.get(path)
            if ys is None or ys[i].shape != want:
                got = tuple(xs[min(i, len(xs) - 1)].shape)
                mismatched.append((f"{rule.hf[min(i, len(xs) - 1)]} (-> {path})", got, want))
            else:
                flat[path] = ys[i]
    unexpected = [k for k in tensors if k not in used and not k.endswith(ignored_suffixes)]
    not_covered = set(expected) - {p for r in rules for p in r.ours}
    if missing or unexpected or mismatched or not_covered:
        raise CheckpointMismatchError(source, missing + [f"(vlm_jax) {p}" for p in not_covered],
                                      unexpected, mismatched)
    return flat
