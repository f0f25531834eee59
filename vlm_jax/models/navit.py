"""NaViT: a ViT over packed sequences of patches from images of any size.

Input: a packed batch from ``vlm_jax.data.packing.pack`` (a dict):

    patches      float [S, L, P*P*3]   flattened patches (pixel row, col, channel order)
    segment_ids  int   [S, L]          0 = padding, k = the image in slot k - 1
    positions    int   [S, L, 2]       (patch row, patch col) in its image's grid
    grid_sizes   int   [S, M, 2]       (rows, cols) of each slot's grid (0 = empty slot);
                                       needed for "fractional" and "naflex" posembs

or a plain image array [B, H, W, 3] (H, W multiples of the patch size), treated
as B sequences of one image each (used by ``init`` and by evaluators that feed
fixed-size images).

The tower: patch embedding (Dense on the flattened patch) + position embedding
-> encoder with attention only within an image (segment mask; padding tokens
attend only to padding, so no softmax row is empty) -> per-image pooling into
the M slots. Returns ``(x, out)``: x [S, M, D] for a packed batch (zeros in
empty slots) and ``out["valid"]`` [S, M] bool; for an image array x is [B, D].

Position embeddings (``posemb``):

  "learn"   factorized: learned row table + learned column table [posemb_size, D], summed.
  "sincos"  factorized fixed sin-cos: row and column codes in disjoint channel
            halves (the big_vision 2-D sincos layout [sin x, cos x, sin y, cos y]),
            so on a full grid with "absolute" coordinates it equals ViT's "sincos2d".
  "naflex"  SigLIP 2 NaFlex: one learned 2-D grid [posemb_size**2, D] resized per
            image to its patch grid, with the weights of torch's
            ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``
            (what transformers' Siglip2VisionEmbeddings does), so Siglip2 weights load.

Coordinates (``posemb_coords``, for "learn"/"sincos"): "absolute" uses the patch
row/col (learned tables clip at posemb_size - 1); "fractional" uses
row / rows * posemb_size (learned: its floor indexes the table), so every image
spans the whole table whatever its size.

Attention backends (``attention``): "reference" (flax dot-product attention,
float32 softmax, dense mask), "xla" (``jax.nn.dot_product_attention``,
implementation="xla", same mask), "cudnn" (its cuDNN fused kernel; GPU only,
a clear error elsewhere; calls the kernel cannot take, such as float32 inputs or a
MAP head's single query, run "xla") and "auto" (cudnn on a GPU, else xla).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import layers

POSEMB_TYPES = ("learn", "sincos", "naflex")
COORD_TYPES = ("absolute", "fractional")
POOL_TYPES = ("map", "gap")
ATTENTION_TYPES = ("reference", "xla", "cudnn", "auto")
PACKED_KEYS = ("patches", "segment_ids", "positions")


# --------------------------------------------------------------------------- attention


def _cudnn_takes(query, key) -> bool:
    """Whether cuDNN's fused kernel takes these [B, L, H, Dh] inputs (jax's checks):
    bf16/fp16, head dim a multiple of 8 and <= 128, even query and key lengths."""
    lq, lk, dh = query.shape[-3], key.shape[-3], query.shape[-1]
    return (query.dtype in (jnp.bfloat16, jnp.float16) and dh % 8 == 0 and dh <= 128
            and lq % 2 == 0 and lk % 2 == 0)


def _jax_attention(query, key, value, bias=None, mask=None, *, implementation, dtype=None,
                   dropout_rate=0.0, deterministic=True, **_):
    """flax ``attention_fn`` over ``jax.nn.dot_product_attention`` (no attention dropout).

    query [B, Lq, H, Dh], key/value [B, Lk, H, Dh], mask broadcastable to
    [B, H, Lq, Lk] (True = attend). Returns [B, Lq, H, Dh]. With "cudnn", a call
    the kernel cannot take (float32 inputs, odd lengths such as a MAP head's single
    query, head dim over 128) runs jax's "xla" kernel instead.
    """
    if dropout_rate > 0.0 and not deterministic:
        raise ValueError("attention dropout is not supported by the jax.nn attention backends")
    if mask is not None:
        mask = jnp.broadcast_to(mask, (query.shape[0], mask.shape[1], query.shape[1], key.shape[1]))
        mask = mask.astype(jnp.bool_)
    if implementation == "cudnn" and not _cudnn_takes(query, key):
        implementation = "xla"
    out = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                       implementation=implementation)
    return out.astype(dtype or query.dtype)


def attention_fn(kind: str) -> Callable:
    """The flax ``attention_fn`` for an attention backend name (see the module docstring).

    Raises ValueError for an unknown name, and for "cudnn" when the default jax
    backend is not a GPU.
    """
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"attention={kind!r} is not one of {ATTENTION_TYPES}")
    if kind == "reference":
        return layers.dot_product_attention_f32
    backend = jax.default_backend()
    if kind == "auto":
        kind = "cudnn" if backend == "gpu" else "xla"
    if kind == "cudnn" and backend != "gpu":
        raise ValueError(f"attention='cudnn' needs a GPU, but jax's default backend "
                         f"is {backend!r}; use 'xla' (or 'auto', which picks xla here)")
    return functools.partial(_jax_attention, implementation=kind)


# --------------------------------------------------------------------------- posembs


def sincos_1d(coord: jax.Array, n: int, temperature: float = 10_000.0) -> tuple[jax.Array, jax.Array]:
    """coord [...] float -> (sin, cos) [..., n] with frequencies 1/temperature**(k/(n-1))."""
    omega = 1.0 / (temperature ** (jnp.arange(n, dtype=jnp.float32) / max(n - 1, 1)))
    arg = coord.astype(jnp.float32)[..., None] * omega
    return jnp.sin(arg), jnp.cos(arg)


def sincos_factorized(rows: jax.Array, cols: jax.Array, width: int) -> jax.Array:
    """Per-token 2-D sincos [..., width] from float row/col coords [...] (width % 4 == 0).

    Channel layout [sin(col), cos(col), sin(row), cos(row)], as ``layers.posemb_sincos_2d``.
    """
    if width % 4:
        raise ValueError(f"sincos posemb needs width divisible by 4, got width={width}")
    sx, cx = sincos_1d(cols, width // 4)
    sy, cy = sincos_1d(rows, width // 4)
    return jnp.concatenate([sx, cx, sy, cy], axis=-1)


def antialias_bilinear_weights(index: jax.Array, out_size: jax.Array, in_size: int) -> jax.Array:
    """Weights over ``in_size`` source cells for output cell ``index`` of ``out_size`` cells.

    The 1-D weights of an antialiased bilinear resize with half-pixel centres
    (torch ``F.interpolate(..., mode="bilinear", align_corners=False,
    antialias=True)``, ``jax.image.resize(..., "bilinear", antialias=True)``):
    scale = in/out, support = max(scale, 1), centre = (index + 0.5) * scale - 0.5,
    w_k = max(0, 1 - |k - centre| / support), normalised to sum 1.
    index, out_size: int arrays of the same shape [...]; returns float32 [..., in_size].
    """
    out_size = jnp.maximum(out_size, 1).astype(jnp.float32)
    scale = in_size / out_size
    support = jnp.maximum(scale, 1.0)
    centre = (index.astype(jnp.float32) + 0.5) * scale - 0.5
    src = jnp.arange(in_size, dtype=jnp.float32)
    w = jnp.maximum(0.0, 1.0 - jnp.abs(src - centre[..., None]) / support[..., None])
    return w / jnp.sum(w, axis=-1, keepdims=True)


def resize_posemb_grid(grid: jax.Array, positions: jax.Array, sizes: jax.Array) -> jax.Array:
    """Per-token value of a [G, G, D] grid resized (antialiased bilinear) to each token's image.

    positions int [..., 2] (row, col) and sizes int [..., 2] (rows, cols) of the
    token's image -> float32 [..., D]. Equals ``jax.image.resize(grid, (rows, cols,
    D), "bilinear", antialias=True)[row, col]``, computed without dynamic shapes.
    """
    gh, gw = grid.shape[0], grid.shape[1]
    wr = antialias_bilinear_weights(positions[..., 0], sizes[..., 0], gh)
    wc = antialias_bilinear_weights(positions[..., 1], sizes[..., 1], gw)
    g = grid.astype(jnp.float32)
    return jnp.einsum("...h,...w,hwd->...d", wr, wc, g, optimize=True)


# --------------------------------------------------------------------------- pooling


class SlotMAPHead(nn.Module):
    """MAP pooling into M slots: one learned probe, repeated per slot, attends only
    to its image's tokens. Parameter names equal ``layers.MAPHead``'s.

    x [S, L, D], segment_ids [S, L], num_slots M -> [S, M, D] (empty slots are 0).
    """

    mlp_dim: int
    num_heads: int
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    attention_fn: Callable | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, segment_ids, num_slots: int):
        s, _, d = x.shape
        probe = self.param("probe", layers.named_init(nn.initializers.xavier_uniform(),
                                                      (None, None, "embed")), (1, 1, d), jnp.float32)
        probe = jnp.broadcast_to(probe, (s, num_slots, d)).astype(self.dtype)
        slot_ids = jnp.arange(1, num_slots + 1, dtype=segment_ids.dtype)
        mask = segment_ids[:, None, :] == slot_ids[None, :, None]        # [S, M, L]
        valid = jnp.any(mask, axis=-1)                                    # [S, M]
        mask = jnp.where(valid[..., None], mask, True)  # empty slots: no empty softmax row
        y = layers.attention(self.num_heads, dtype=self.dtype, attention_fn=self.attention_fn)(
            probe, x, mask=mask[:, None])
        z = layers.layer_norm(eps=self.ln_eps, dtype=self.dtype)(y)
        y = y + layers.MlpBlock(self.mlp_dim, act=self.act, dtype=self.dtype)(z)
        return jnp.where(valid[..., None], y, 0).astype(y.dtype)


def masked_mean_pool(x, segment_ids, num_slots: int):
    """Mean of each slot's tokens: x [S, L, D] -> [S, M, D] (empty slots are 0)."""
    onehot = (segment_ids[:, :, None] == jnp.arange(1, num_slots + 1)[None, None, :])
    onehot = onehot.astype(jnp.float32)                                   # [S, L, M]
    total = jnp.einsum("slm,sld->smd", onehot, x.astype(jnp.float32))
    count = jnp.sum(onehot, axis=1)[..., None]
    return (total / jnp.maximum(count, 1.0)).astype(x.dtype)


# --------------------------------------------------------------------------- inputs


def images_to_packed(images: jax.Array, patch_size: int) -> dict[str, jax.Array]:
    """[B, H, W, C] (H, W multiples of patch_size) -> a packed batch, one image per row."""
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {(h, w)} is not a multiple of the NaViT patch size {p}")
    gh, gw = h // p, w // p
    x = images.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
    r, col = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    pos = np.stack([r.reshape(-1), col.reshape(-1)], -1).astype(np.int32)
    return {"patches": x, "segment_ids": jnp.ones((b, gh * gw), jnp.int32),
            "positions": jnp.broadcast_to(jnp.asarray(pos), (b, gh * gw, 2)),
            "grid_sizes": jnp.broadcast_to(jnp.asarray([[gh, gw]], jnp.int32), (b, 1, 2))}


def _check_packed(batch: Mapping, patch_dim: int) -> None:
    missing = [k for k in PACKED_KEYS if k not in batch]
    if missing:
        raise ValueError(f"NaViT packed batch is missing {missing}; it has {sorted(batch)}")
    s, length = batch["segment_ids"].shape
    if batch["patches"].shape != (s, length, patch_dim):
        raise ValueError(f"packed 'patches' has shape {batch['patches'].shape}; expected "
                         f"{(s, length, patch_dim)} (patch_size**2 * 3 = {patch_dim})")
    if batch["positions"].shape != (s, length, 2):
        raise ValueError(f"packed 'positions' has shape {batch['positions'].shape}; "
                         f"expected {(s, length, 2)}")


# --------------------------------------------------------------------------- the tower


class NaViT(nn.Module):
    """NaViT image tower over packed batches (see the module docstring).

    Params: ``embedding`` (Dense [P*P*3, D]), ``pos_embedding_row``/``_col``
    ("learn"), ``pos_embedding`` [1, G*G, D] ("naflex"), ``Transformer/...``,
    ``MAPHead_0/...`` (pool "map"), ``head`` (optional projection).

    ``max_images`` is the number of slots when the batch has no ``grid_sizes``
    (image-array inputs have 1); with ``seq_len`` it is also the packing default
    of ``vlm_jax.inference``. ``image_size`` is only the size of the dummy images
    ``models.init`` uses. ``channels`` is the pixel channels (3). ``scan`` /
    ``remat_policy``: as ``layers.Encoder`` (``Transformer/encoderblock/...`` stacked).
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int = 16
    posemb: str = "learn"
    posemb_coords: str = "absolute"
    posemb_size: int = 64
    pool_type: str = "map"
    head: int | None = None
    head_bias: bool = True
    patch_bias: bool = True
    dropout: float = 0.0
    act: str = "gelu_tanh"
    ln_eps: float = 1e-6
    remat: bool = False
    attention: str = "reference"
    max_images: int = 1
    seq_len: int = 256
    image_size: int = 224
    channels: int = 3
    dtype: Any = jnp.float32
    scan: bool = False
    remat_policy: str = ""

    def _check(self):
        for field, value, allowed in (("posemb", self.posemb, POSEMB_TYPES),
                                      ("posemb_coords", self.posemb_coords, COORD_TYPES),
                                      ("pool_type", self.pool_type, POOL_TYPES)):
            if value not in allowed:
                raise ValueError(f"NaViT {field}={value!r} is not one of {allowed}")

    def _posemb(self, positions, sizes):
        d = self.width
        if self.posemb == "naflex":
            g = self.posemb_size
            table = layers.learned_posemb(self, "pos_embedding", (1, g * g, d))
            return resize_posemb_grid(table.reshape(g, g, d), positions, sizes)
        coords = positions.astype(jnp.float32)
        if self.posemb_coords == "fractional":
            coords = coords / jnp.maximum(sizes, 1).astype(jnp.float32) * self.posemb_size
        if self.posemb == "sincos":
            return sincos_factorized(coords[..., 0], coords[..., 1], d)
        idx = jnp.clip(jnp.floor(coords).astype(jnp.int32), 0, self.posemb_size - 1)
        row = layers.learned_posemb(self, "pos_embedding_row", (self.posemb_size, d))
        col = layers.learned_posemb(self, "pos_embedding_col", (self.posemb_size, d))
        return jnp.take(row, idx[..., 0], axis=0) + jnp.take(col, idx[..., 1], axis=0)

    @nn.compact
    def __call__(self, batch, train: bool = False):
        self._check()
        squeeze = not isinstance(batch, Mapping)
        if squeeze:
            if batch.ndim != 4:
                raise ValueError(f"NaViT expects a packed batch dict or images [B, H, W, C], "
                                 f"got an array of shape {batch.shape}")
            batch = images_to_packed(jnp.asarray(batch), self.patch_size)
        patch_dim = self.patch_size * self.patch_size * self.channels
        _check_packed(batch, patch_dim)
        seg = jnp.asarray(batch["segment_ids"]).astype(jnp.int32)
        pos = jnp.asarray(batch["positions"]).astype(jnp.int32)
        if "grid_sizes" in batch:
            grid_sizes = jnp.asarray(batch["grid_sizes"]).astype(jnp.int32)
        elif self.posemb == "naflex" or self.posemb_coords == "fractional":
            raise ValueError("packed batch needs 'grid_sizes' for fractional / naflex posembs")
        else:
            grid_sizes = jnp.zeros((seg.shape[0], self.max_images, 2), jnp.int32)
        num_slots = grid_sizes.shape[1]
        out = {}

        x = nn.Dense(self.width, use_bias=self.patch_bias, dtype=self.dtype,
                     kernel_init=layers.named_init(nn.initializers.lecun_normal(), ("conv_in", "embed")),
                     bias_init=layers.named_init(nn.initializers.zeros, ("embed",)),
                     name="embedding")(jnp.asarray(batch["patches"]).astype(self.dtype))
        # Each token's image grid size (padding tokens: slot 0's, harmless).
        tok_sizes = jnp.take_along_axis(grid_sizes, jnp.clip(seg - 1, 0)[..., None], axis=1)
        pe = self._posemb(pos, tok_sizes)
        x = x + pe.astype(self.dtype)
        out["with_posemb"] = x
        x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)

        attn = attention_fn(self.attention)
        mask = (seg[:, :, None] == seg[:, None, :])[:, None]            # [S, 1, L, L]
        x, enc_out = layers.Encoder(
            depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
            dropout=self.dropout, act=self.act, ln_eps=self.ln_eps, attention_fn=attn,
            remat=self.remat, remat_policy=self.remat_policy, scan=self.scan, dtype=self.dtype,
            name="Transformer")(x, mask, train)
        out.update({f"encoder/{k}": v for k, v in enc_out.items()})
        out["encoded"] = x

        if self.pool_type == "map":
            x = SlotMAPHead(mlp_dim=self.mlp_dim, num_heads=self.num_heads, act=self.act,
                            ln_eps=self.ln_eps, attention_fn=attn, dtype=self.dtype,
                            name="MAPHead_0")(x, seg, num_slots)
        else:
            x = masked_mean_pool(x, seg, num_slots)
        valid = jnp.any(seg[:, None, :] == jnp.arange(1, num_slots + 1)[None, :, None], axis=-1)
        out["valid"] = valid
        out["pre_logits"] = x

        if self.head is not None:
            x = nn.Dense(self.head, use_bias=self.head_bias, dtype=self.dtype,
                         kernel_init=layers.named_init(nn.initializers.lecun_normal(), ("embed", "proj")),
                         bias_init=layers.named_init(nn.initializers.zeros, ("proj",)),
                         name="head")(x)
            x = jnp.where(valid[..., None], x, 0).astype(x.dtype)
            out["logits"] = x
        if squeeze:
            x = x[:, 0]
            out["valid"] = valid[:, 0]
        return x, out
