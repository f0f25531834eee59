"""NaViT "Patch n' Pack": cut images of any size into patches and pack several
images into fixed-length token sequences.

    batch = pack(images, patch_size=16, seq_len=256, max_images=16)
    batch["patches"]      float32 [S, L, P*P*3]   flattened patches, (row, col, channel) order
                          (uint8 with ``dtype=np.uint8``: pixels as given, 4x fewer bytes)
    batch["segment_ids"]  int32   [S, L]          0 = padding, k = the image in slot k - 1
    batch["positions"]    int32   [S, L, 2]       (patch row, patch col) in its image's grid
    batch["image_index"]  int32   [S, M]          input index of the image in each slot, -1 = empty
    batch["grid_sizes"]   int32   [S, M, 2]       (rows, cols) of each slot's patch grid, 0 = empty

Sizing (``fit_grid``): an image of H x W pixels gets a grid of
round(H / P) x round(W / P) patches (at least 1 x 1): sizes that are not a
multiple of the patch size are resized to the *nearest* multiple, so at most
half a patch is added or lost per side. A grid with more than ``seq_len``
patches (or a side longer than ``max_side``) is shrunk keeping the aspect ratio
as closely as integer grids allow. The image is then resized (PIL, bilinear,
antialiased when shrinking) to exactly (rows * P, cols * P) pixels.

Packing (``pack_lengths``) is greedy first-fit: items are visited longest first
(ties in input order; ``sort=False`` keeps input order) and each goes into the
first open sequence with room for its tokens and a free slot; when none has room
a new sequence is opened, so no image is ever dropped. The result is a pure
function of the input: deterministic.

Cost: ``pack`` lays the sequences out from the grid sizes alone, then resizes
each image (uint8 stays uint8) and cuts it into patches with one strided copy
straight into its place in the output; positions come from a cache per
grid size. What is left per image is PIL's resize and writing the output
(experiments/navit_packing.py measures both against the previous implementation).
``pack_items`` accepts uint8 items, a "keep" index array per item (token dropping
without a copy) and ``value_range`` (normalise while writing).

``dtype=np.uint8`` (``pack``, ``pack_items``, ``PackedDataset``) keeps uint8 pixels
uint8 in the packed output: a quarter of the bytes to write, to hold in prefetch
buffers and to send to the device, where the model casts them to its dtype
(exactly: 0-255 are exact in bfloat16 too) and ``to_value_range`` maps them onto
a value range. This is how the NaViT training pipeline packs by default. Writing
float32 is the larger cost: a fresh float32 output touches four times the fresh
memory pages, which is most of what a first call spends.

``PackedDataset`` does the same over a stream (a grain IterDataset): it reads a
window of ``window`` items, packs them, yields the sequences one by one, then
reads the next window. Its iterator state (the parent's state at the window
start and how many of the window's sequences were already yielded) resumes
exactly.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Sequence

import grain
import numpy as np
from PIL import Image

from vlm_jax.data import preprocess

__all__ = [
    "fit_grid", "resize_image", "patchify", "grid_positions", "image_to_item", "pack_lengths", "pack_items", "pack",
    "fill_rate", "to_value_range", "PackedDataset",
]


# --------------------------------------------------------------------------- one image


def fit_grid(height: int, width: int, patch_size: int, max_patches: int,
             max_side: int | None = None) -> tuple[int, int]:
    """Patch grid (rows, cols) for an image of ``height`` x ``width`` pixels.

    Nearest multiple of ``patch_size`` per side (at least one patch); grids with
    more than ``max_patches`` patches or a side above ``max_side`` patches are
    scaled down keeping the aspect ratio (each side then rounded down, and the
    longer side reduced further until the product fits).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if patch_size <= 0 or max_patches <= 0:
        raise ValueError(f"patch_size ({patch_size}) and max_patches ({max_patches}) must be > 0")
    gh = max(1, int(math.floor(height / patch_size + 0.5)))
    gw = max(1, int(math.floor(width / patch_size + 0.5)))
    scale = 1.0
    if gh * gw > max_patches:
        scale = math.sqrt(max_patches / (gh * gw))
    if max_side is not None and max(gh, gw) * scale > max_side:
        scale = max_side / max(gh, gw)
    if scale < 1.0:
        gh = max(1, int(math.floor(gh * scale + 1e-9)))
        gw = max(1, int(math.floor(gw * scale + 1e-9)))
    while gh * gw > max_patches or (max_side is not None and max(gh, gw) > max_side):
        if gh >= gw:
            gh -= 1
        else:
            gw -= 1
    return gh, gw


def _resize(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``resize_image`` without the float32 conversion: uint8 stays uint8 (and an
    image already of size ``hw`` is returned as it is)."""
    if image.shape[:2] == tuple(hw):
        return image
    size = (hw[1], hw[0])
    if image.dtype == np.uint8:
        out = Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.Resampling.BILINEAR)
        return np.asarray(out)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), mode="F")
                        .resize(size, Image.Resampling.BILINEAR)) for c in range(image.shape[-1])]
    return np.stack(chans, axis=-1).astype(np.float32, copy=False)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """[H, W, C] uint8 or float -> float32 [h, w, C], PIL bilinear (antialiased when shrinking).

    uint8 images are resized as 8-bit RGB (values stay 0-255, rounded), floats per
    channel in 32-bit float.
    """
    return _resize(image, hw).astype(np.float32, copy=False)


def _check_image(image: Any, what: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} must be an H x W x 3 array, got shape {arr.shape}")
    if not (arr.dtype == np.uint8 or np.issubdtype(arr.dtype, np.floating)):
        arr = arr.astype(np.float32)
    return arr


def _write_patches(dst: np.ndarray, image: np.ndarray, patch_size: int) -> None:
    """Cut ``image`` [gh * P, gw * P, C] into patches straight into ``dst`` [gh * gw, P*P*C]
    (a C-contiguous block, e.g. rows of a packed sequence): one strided copy that also
    casts to ``dst``'s dtype, no intermediate arrays."""
    p = patch_size
    gh, gw, c = image.shape[0] // p, image.shape[1] // p, image.shape[2]
    view = dst.view()
    view.shape = (gh, gw, p, p * c)  # raises rather than copy, so the writes land in dst
    np.copyto(view, image.reshape(gh, p, gw, p * c).swapaxes(1, 2), casting="unsafe")


def patchify(image: np.ndarray, patch_size: int, grid: tuple[int, int],
             dtype: Any = np.float32) -> np.ndarray:
    """Resize ``image`` [H, W, 3] to ``grid`` * patch_size pixels and cut it into patches.

    Returns ``dtype`` (float32; uint8 for uint8 images, to normalise later)
    [rows * cols, P*P*3], row-major over the grid; each patch is flattened in
    (pixel row, pixel col, channel) order, as SigLIP 2's processor does.
    """
    gh, gw = grid
    p = patch_size
    img = _resize(_check_image(image, "image"), (gh * p, gw * p))
    if np.dtype(dtype) == np.uint8 and img.dtype != np.uint8:
        raise ValueError(f"uint8 patches need a uint8 image, got {img.dtype}")
    out = np.empty((gh * gw, p * p * img.shape[-1]), dtype)
    _write_patches(out, img, p)
    return out


@functools.lru_cache(maxsize=4096)
def _positions(rows: int, cols: int) -> np.ndarray:
    rc = np.stack(np.divmod(np.arange(rows * cols, dtype=np.int32), np.int32(cols)), axis=-1)
    rc.flags.writeable = False
    return rc


def grid_positions(grid: tuple[int, int]) -> np.ndarray:
    """int32 [rows * cols, 2]: (row, col) of every patch, row-major."""
    return _positions(int(grid[0]), int(grid[1])).copy()


def image_to_item(image: Any, *, patch_size: int, max_patches: int,
                  max_side: int | None = None, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """One image -> {"patches" [n, P*P*3] (``dtype``: float32, or uint8 for uint8
    images), "positions" int32 [n, 2], "grid" int32 [2]}."""
    arr = _check_image(image, "image")
    grid = fit_grid(arr.shape[0], arr.shape[1], patch_size, max_patches, max_side)
    return {"patches": patchify(arr, patch_size, grid, dtype), "positions": grid_positions(grid),
            "grid": np.asarray(grid, np.int32)}


# --------------------------------------------------------------------------- packing


def pack_lengths(lengths: Sequence[int], seq_len: int, max_images: int,
                 sort: bool = True) -> list[list[int]]:
    """Greedy first-fit packing of items with ``lengths`` tokens into sequences.

    Args:
      lengths: tokens per item, each in [1, seq_len].
      seq_len: tokens per sequence L.
      max_images: items per sequence at most (M).
      sort: visit items longest first (first-fit decreasing; ties in input
        order); False: in input order.
    Returns:
      One list of item indices per sequence, in the order they were placed.
    """
    lens = np.asarray([int(n) for n in lengths], np.int64)
    bad = np.flatnonzero((lens < 1) | (lens > seq_len))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"item {i} has {lens[i]} tokens; must be in [1, seq_len={seq_len}]")
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    order = np.argsort(-lens, kind="stable") if sort else np.arange(len(lens))
    if max_images == 1:  # one item per sequence: nothing to search
        return [[i] for i in order.tolist()]
    room = np.zeros(max(len(lens), 1), np.int64)   # free tokens; 0 once a bin has M items
    count = [0] * len(lens)
    bins: list[list[int]] = []
    for i, n in zip(order.tolist(), lens[order].tolist()):
        k = int(np.argmax(room[:len(bins)] >= n)) if bins else 0
        if not bins or room[k] < n:  # fits nowhere: a new sequence
            k = len(bins)
            bins.append([])
            room[k] = seq_len
        bins[k].append(i)
        count[k] += 1
        room[k] = room[k] - n if count[k] < max_images else 0
    return bins


_OUT_DTYPES = (np.dtype(np.float32), np.dtype(np.uint8))


def _out_dtype(dtype: Any, value_range: Any = None) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _OUT_DTYPES:
        raise ValueError(f"packed patches are float32 or uint8, got dtype {dt}")
    if dt == np.uint8 and value_range is not None:
        raise ValueError("value_range maps pixels to floats; it needs dtype float32, not uint8 "
                         "(uint8 patches are mapped on the device: packing.to_value_range)")
    return dt


def _empty(num: int, seq_len: int, max_images: int, dim: int,
           dtype: Any = np.float32) -> dict[str, np.ndarray]:
    # np.zeros, not np.empty + zeroing the tails: fresh zero pages that are never
    # written (padding) cost nothing, and large outputs are always fresh pages.
    return {
        "patches": np.zeros((num, seq_len, dim), dtype),
        "segment_ids": np.zeros((num, seq_len), np.int32),
        "positions": np.zeros((num, seq_len, 2), np.int32),
        "image_index": np.full((num, max_images), -1, np.int32),
        "grid_sizes": np.zeros((num, max_images, 2), np.int32),
    }


def _write_tokens(dst: np.ndarray, src: np.ndarray, keep: np.ndarray | None,
                  scale: np.float32 | None, lo: np.float32 | None, i: int) -> None:
    """dst[:] = src[keep] (all rows if keep is None), cast to float32, mapped by
    ``x * scale + lo`` when ``scale`` is given (uint8 ``src`` only)."""
    if scale is None:
        if keep is None:
            dst[...] = src
        elif src.dtype == dst.dtype:
            np.take(src, keep, axis=0, out=dst)  # gathered straight into place
        else:
            dst[...] = src[keep]
        return
    if src.dtype != np.uint8:
        raise ValueError(f"item {i} has {src.dtype} patches; value_range needs uint8 patches")
    np.multiply(src if keep is None else src[keep], scale, out=dst, casting="unsafe")
    dst += lo


def pack_items(items: Sequence[dict], *, seq_len: int, max_images: int, sort: bool = True,
               indices: Sequence[int] | None = None, bins: list[list[int]] | None = None,
               value_range: Sequence[float] | None = None,
               dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Pack patchified items (``image_to_item`` dicts, maybe token-dropped) into sequences.

    An item may hold "keep": the indices of the tokens to pack (token dropping
    without copying the item first); it then takes ``len(keep)`` tokens.
    Patches of any numeric dtype are cast to float32 as they are written; with
    ``value_range=(lo, hi)`` the patches must be uint8 and are mapped from 0-255 to
    [lo, hi] as they are written (float32 ``x * ((hi - lo) / 255) + lo``, exactly
    ``preprocess.normalize``); padding stays 0. ``dtype=np.uint8`` writes uint8
    patches instead (uint8 items only, no ``value_range``; see ``to_value_range``).
    ``indices[i]`` is recorded in ``image_index`` for item i (default i).
    ``bins`` (from ``pack_lengths``) may be given to reuse a packing.
    Returns the dict described in the module docstring (S = number of sequences).
    """
    if not items:
        raise ValueError("pack needs at least one image")
    dim = int(items[0]["patches"].shape[-1])
    keeps = [it.get("keep") for it in items]
    lens = [len(it["patches"]) if k is None else len(k) for it, k in zip(items, keeps)]
    if bins is None:
        bins = pack_lengths(lens, seq_len, max_images, sort)
    out_dtype = _out_dtype(dtype, value_range)
    scale, lo = (None, None) if value_range is None else preprocess.pixel_affine(value_range)
    out = _empty(len(bins), seq_len, max_images, dim, out_dtype)
    patches, positions, segments = out["patches"], out["positions"], out["segment_ids"]
    for s, members in enumerate(bins):
        pos = 0
        for slot, i in enumerate(members):
            src, src_pos, keep = items[i]["patches"], items[i]["positions"], keeps[i]
            if src.shape[-1] != dim:
                raise ValueError(f"item {i} has patch dim {src.shape[-1]}, expected {dim}")
            if out_dtype == np.uint8 and src.dtype != np.uint8:
                raise ValueError(f"item {i} has {src.dtype} patches; dtype uint8 needs uint8 patches")
            n = lens[i]
            _write_tokens(patches[s, pos:pos + n], src, keep, scale, lo, i)
            if keep is not None:
                src_pos = src_pos[keep]
            positions[s, pos:pos + n] = src_pos
            segments[s, pos:pos + n] = slot + 1
            pos += n
        out["grid_sizes"][s, :len(members)] = [items[i]["grid"] for i in members]
        out["image_index"][s, :len(members)] = (members if indices is None
                                                else [indices[i] for i in members])
    return out


def pack(images: Sequence[Any], *, patch_size: int, seq_len: int, max_images: int,
         max_side: int | None = None, sort: bool = True,
         dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Patchify and pack images of any sizes (see the module docstring).

    Only the grid sizes are needed to pack, so the sequences are laid out first and
    each image is then resized (as uint8 when given uint8) and cut into patches
    straight into its place in the output: no per-image float copies.

    Args:
      images: list of H x W x 3 arrays (uint8 or float; values are kept as given,
        normalise before packing).
      patch_size: P, pixels per patch side.
      seq_len: tokens per sequence L; larger images are shrunk to fit.
      max_images: slots per sequence M.
      max_side: optional cap on patches per grid side (e.g. the size of a
        learned position table).
      sort: first-fit decreasing (default) or first-fit in input order.
      dtype: of the patches: float32, or uint8 (uint8 images only; the pixels as
        given, a quarter of the bytes; the model casts them exactly).
    Returns:
      dict of numpy arrays: patches ``dtype`` [S, L, P*P*3], segment_ids int32
      [S, L], positions int32 [S, L, 2], image_index int32 [S, M] (input index,
      -1 empty), grid_sizes int32 [S, M, 2]. Every input image is in exactly one slot.
    """
    if len(images) == 0:
        raise ValueError("pack needs at least one image")
    out_dtype = _out_dtype(dtype)
    arrays = [_check_image(im, f"images[{i}]") for i, im in enumerate(images)]
    if out_dtype == np.uint8:
        bad = next((i for i, a in enumerate(arrays) if a.dtype != np.uint8), None)
        if bad is not None:
            raise ValueError(f"images[{bad}] is {arrays[bad].dtype}; dtype uint8 needs uint8 images")
    grids = [fit_grid(a.shape[0], a.shape[1], patch_size, seq_len, max_side) for a in arrays]
    bins = pack_lengths([gh * gw for gh, gw in grids], seq_len, max_images, sort)
    p = patch_size
    out = _empty(len(bins), seq_len, max_images, p * p * 3, out_dtype)
    patches, positions, segments = out["patches"], out["positions"], out["segment_ids"]
    for s, members in enumerate(bins):
        pos = 0
        for slot, i in enumerate(members):
            gh, gw = grids[i]
            n = gh * gw
            _write_patches(patches[s, pos:pos + n], _resize(arrays[i], (gh * p, gw * p)), p)
            positions[s, pos:pos + n] = _positions(gh, gw)
            segments[s, pos:pos + n] = slot + 1
            pos += n
        out["grid_sizes"][s, :len(members)] = [grids[i] for i in members]
        out["image_index"][s, :len(members)] = members
    return out


def fill_rate(batch: dict[str, np.ndarray]) -> float:
    """Fraction of the S x L token slots that hold image tokens (not padding)."""
    return float(np.mean(batch["segment_ids"] > 0))


def to_value_range(batch: dict, value_range: Sequence[float]) -> dict:
    """A packed batch whose uint8 patches are mapped onto ``value_range`` (jax, on device).

    ``float32 x * ((hi - lo) / 255) + lo``, the arithmetic of ``preprocess.normalize``
    and of ``pack_items(value_range=...)``, with padding tokens kept at 0 (as the
    host-normalised packing leaves them). Batches whose patches are not uint8 are
    returned as they are, so a train step can call it on either kind.
    """
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    patches = batch["patches"]
    if patches.dtype != jnp.uint8:
        return batch
    scale, lo = preprocess.pixel_affine(value_range)
    x = patches.astype(jnp.float32) * scale + lo
    x = jnp.where((jnp.asarray(batch["segment_ids"]) > 0)[..., None], x, jnp.float32(0))
    return dict(batch, patches=x)


# --------------------------------------------------------------------------- streams


class PackedIterator(grain.DatasetIterator):
    """Iterator of ``PackedDataset``: yields one packed sequence at a time.

    Each element: patches [L, P*P*3], segment_ids [L], positions [L, 2],
    image_index [M] (position of the item in the stream of non-skipped items),
    grid_sizes [M, 2], and for each of ``slot_keys`` a list of M values (None
    for empty slots). ``num_skipped`` counts items the ``skip`` predicate rejected.
    """

    def __init__(self, parent: grain.DatasetIterator, ds: "PackedDataset"):
        super().__init__(parent)
        self._ds = ds
        self._window_state = None
        self._seqs: list[dict] = []
        self._emitted = 0
        self._items_before = 0      # non-skipped items consumed so far
        self._window_items_before = 0
        self._seqs_before = 0       # sequences yielded before this window
        self._skipped_before = 0
        self._skipped = 0

    @property
    def num_skipped(self) -> int:
        return self._skipped

    @property
    def num_sequences(self) -> int:
        """Sequences yielded so far (the training-step clock of token-drop schedules)."""
        return self._seqs_before + self._emitted

    def _read_window(self) -> None:
        ds = self._ds
        self._seqs_before += self._emitted
        self._skipped_before = self._skipped
        self._window_items_before = self._items_before
        self._window_state = self._parent.get_state()
        items = []
        while len(items) < ds.window:
            try:
                ex = next(self._parent)
            except StopIteration:
                break
            if ds.skip is not None and ds.skip(ex):
                self._skipped += 1
                continue
            if ds.transform is not None:
                ex = ds.transform(ex, self._items_before + len(items), self._seqs_before)
            items.append(ex)
        if not items:
            raise StopIteration
        index = list(range(self._items_before, self._items_before + len(items)))
        batch = pack_items(items, seq_len=ds.seq_len, max_images=ds.max_images, sort=ds.sort,
                           indices=index, value_range=ds.value_range, dtype=ds.dtype)
        seqs = []
        for s in range(batch["segment_ids"].shape[0]):
            seq = {k: v[s] for k, v in batch.items()}
            for key in ds.slot_keys:
                seq[key] = [None if j < 0 else items[j - self._items_before].get(key)
                            for j in seq["image_index"]]
            seqs.append(seq)
        self._items_before += len(items)
        self._seqs = seqs
        self._emitted = 0

    def __next__(self) -> dict:
        if self._emitted >= len(self._seqs):
            self._read_window()
        seq = self._seqs[self._emitted]
        self._emitted += 1
        return seq

    def get_state(self) -> dict:
        if self._window_state is None:  # nothing read yet
            return {"parent": self._parent.get_state(), "emitted": 0, "items_before": 0,
                    "seqs_before": 0, "skipped_before": self._skipped, "started": False}
        return {"parent": self._window_state, "emitted": self._emitted,
                "items_before": self._window_items_before,
                "seqs_before": self._seqs_before, "skipped_before": self._skipped_before,
                "started": True}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._seqs, self._emitted, self._window_state = [], 0, None
        self._items_before = int(state["items_before"])
        self._seqs_before = int(state["seqs_before"])
        self._skipped = self._skipped_before = int(state["skipped_before"])
        if state["started"]:
            self._read_window()      # re-reads and re-packs the same window
            self._emitted = int(state["emitted"])


class PackedDataset(grain.IterDataset):
    """Packs a stream of patchified items into sequences (a grain IterDataset transform).

    Args:
      parent: IterDataset of items: dicts with "patches" [n, P*P*3], "positions"
        [n, 2] and "grid" [2] (``image_to_item``), optionally "keep" (token indices
        to pack, see ``pack_items``), plus any other fields.
      seq_len, max_images: L and M.
      window: items read and packed together (the packing buffer); larger fills
        better, costs memory and latency.
      slot_keys: item fields passed through per slot (e.g. ("text",)).
      transform: optional ``fn(item, item_position, sequences_so_far) -> item``
        applied before packing (token dropping; ``sequences_so_far`` is the clock
        for schedules over training steps).
      skip: optional predicate: items for which it is True are counted and skipped.
      sort: first-fit decreasing within a window (default) or input order.
      value_range: optional (lo, hi): items hold uint8 patches, mapped onto [lo, hi]
        as they are packed (``pack_items``).
      dtype: of the packed patches, float32 or uint8 (uint8 items, no value_range).
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, max_images: int,
                 window: int = 256, slot_keys: Iterable[str] = (),
                 transform: Callable | None = None, skip: Callable | None = None,
                 sort: bool = True, value_range: Sequence[float] | None = None,
                 dtype: Any = np.float32):
        super().__init__(parent)
        if window < 1:
            raise ValueError(f"packing window must be >= 1, got {window}")
        self.seq_len, self.max_images, self.window = int(seq_len), int(max_images), int(window)
        self.slot_keys = tuple(slot_keys)
        self.transform, self.skip, self.sort = transform, skip, sort
        self.value_range = None if value_range is None else tuple(float(v) for v in value_range)
        self.dtype = _out_dtype(dtype, self.value_range)

    def __iter__(self) -> PackedIterator:
        return PackedIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"PackedDataset(seq_len={self.seq_len}, max_images={self.max_images}, window={self.window})"
