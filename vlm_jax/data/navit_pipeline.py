"""NaViT input pipeline: variable-resolution images, token dropping, packing.

Training (``train_dataset``), per process:

    source indices --shuffle(seed)--> repeat --> [process_index::process_count]
      --read + decode (keep the native size) + resolution sampling + patchify
        (in ``data.num_threads`` threads)-->
      --PackedDataset: read a window of ``navit.window`` images, token-drop each
        (rate per image, see below), first-fit pack into sequences of
        ``model.image.seq_len`` tokens with ``model.image.max_images`` slots,
        the patches kept uint8 (``navit.patch_dtype``)-->
      --batch ``batch_size // process_count`` sequences + tokenize each slot's caption

and yields

    {"image": {"patches" uint8 [S, L, P*P*3], "segment_ids" int32 [S, L],
               "positions" int32 [S, L, 2], "grid_sizes" int32 [S, M, 2]},
     "tokens": int32 [S, M, max_len]   (all 0 in empty slots),
     "valid": bool [S, M]              (slot holds an image)}

``config.batch_size`` counts *sequences* for a NaViT recipe; the number of images
per step varies with their sizes. Every step is a pure function of the seed and
the stream position; the iterator state resumes exactly.

Items carry uint8 patches (4x less memory in the prefetch buffer and the packing
window than float32); the kept tokens of each image are gathered in one pass,
straight into the packed sequence. With ``navit.patch_dtype = "uint8"`` (the
default) the packed patches stay pixels 0-255: the host writes, buffers and sends
to the device a quarter of the bytes, and the train step maps them onto
``pp.value_range`` on the device (``packing.to_value_range``, the same float32
arithmetic as ``preprocess.normalize``). ``"float32"`` normalises on the host as
the patches are packed (the same values).

Token dropping happens here, before packing, so the dropped tokens cost no
compute (NaViT's "continuous token dropping"). It is for training only;
``eval_items`` and ``vlm_jax.inference`` never drop tokens or sample resolutions.

Config (``default_config()``, a recipe's ``config.navit``):

    navit.window              256    images packed together (packing buffer)
    navit.patch_dtype         "uint8" | "float32": packed patches as pixels, mapped onto
                                     pp.value_range on the device, or normalised on the host
    navit.shapes_sizes        ()     shapes source only: render example i at
                                     shapes_sizes[i % len] pixels (mixed resolutions)
    navit.resolution.kind     "none" | "uniform" | "choice" | "truncnorm": sample the
                                     side s of the image (its longer side), aspect kept
    navit.resolution.min_side / max_side   pixel range (uniform, truncnorm bounds)
    navit.resolution.sides    ()     choices for "choice"
    navit.resolution.mean / std          truncnorm in pixels
    navit.token_drop.kind     "none" | "constant" | "beta" | "resolution"
    navit.token_drop.rate     0.5    constant rate (and the mean scale of the others)
    navit.token_drop.beta_a / beta_b      Beta(a, b) per-image rate ("beta")
    navit.token_drop.min_rate / max_rate  "resolution": rate grows linearly with the
    navit.token_drop.min_tokens / max_tokens   image's token count between these
    navit.token_drop.schedule "constant" | "linear" | "cosine": the rate is multiplied
                                     by a factor going from schedule_start to
                                     schedule_end over schedule_steps training steps
    navit.token_drop.max_drop 0.9    cap on any image's rate; >= 1 token is always kept
"""

from __future__ import annotations

import logging
import math
from typing import Any

import grain
import ml_collections
import numpy as np

from vlm_jax.data import packing, preprocess, shapes
from vlm_jax.data.pipeline import Skipped, _seed32
from vlm_jax.data.sources import build_source
from vlm_jax.data.tokenizers import build_tokenizer

__all__ = ["default_config", "TokenDrop", "sample_side", "patchify_uint8", "train_dataset",
           "eval_items", "NaViTBatchIterator"]

_log = logging.getLogger(__name__)
_SKIP_ERRORS = (preprocess.CorruptExampleError, OSError)
RESOLUTION_KINDS = ("none", "uniform", "choice", "truncnorm")
DROP_KINDS = ("none", "constant", "beta", "resolution")
SCHEDULES = ("constant", "linear", "cosine")


def default_config() -> ml_collections.ConfigDict:
    """The ``config.navit`` fields with their defaults (see the module docstring)."""
    c = ml_collections.ConfigDict()
    c.window = 256
    c.patch_dtype = "uint8"
    c.shapes_sizes = ()
    c.resolution = ml_collections.ConfigDict(dict(
        kind="none", min_side=64, max_side=256, sides=(), mean=128.0, std=64.0))
    c.token_drop = ml_collections.ConfigDict(dict(
        kind="none", rate=0.5, beta_a=2.0, beta_b=2.0, min_rate=0.0, max_rate=0.75,
        min_tokens=16, max_tokens=256, schedule="constant", schedule_start=1.0,
        schedule_end=1.0, schedule_steps=1, max_drop=0.9))
    return c


# --------------------------------------------------------------------------- sampling


def sample_side(cfg: Any, rng: np.random.Generator) -> int | None:
    """A longer-side length in pixels from ``navit.resolution`` (None for kind "none")."""
    kind = cfg.kind
    if kind == "none":
        return None
    lo, hi = int(cfg.min_side), int(cfg.max_side)
    if kind == "uniform":
        return int(rng.integers(lo, hi + 1))
    if kind == "choice":
        if not cfg.sides:
            raise ValueError("navit.resolution.sides is empty for kind 'choice'")
        return int(cfg.sides[int(rng.integers(len(cfg.sides)))])
    if kind == "truncnorm":
        for _ in range(100):  # rejection sampling into [lo, hi]
            s = rng.normal(float(cfg.mean), float(cfg.std))
            if lo <= s <= hi:
                return int(round(s))
        return int(np.clip(round(float(cfg.mean)), lo, hi))
    raise ValueError(f"navit.resolution.kind must be one of {RESOLUTION_KINDS}, got {kind!r}")


def _rescale(image: np.ndarray, side: int | None) -> np.ndarray:
    if side is None:
        return image
    h, w = image.shape[:2]
    f = side / max(h, w)
    hw = (max(1, int(round(h * f))), max(1, int(round(w * f))))
    return preprocess.resize_crop(image, hw, "resize")


class TokenDrop:
    """Per-image token-drop rates (NaViT's continuous token dropping) and the drop itself.

    ``rate(num_tokens, rng, step)``: the image's drop rate: "constant" ``rate``;
    "beta" a draw from Beta(beta_a, beta_b); "resolution" linear in the token count
    from ``min_rate`` at ``min_tokens`` to ``max_rate`` at ``max_tokens`` (clipped);
    each times the schedule factor at ``step``, clipped to [0, max_drop].
    ``keep(num_tokens, rng, step)``: the sorted indices of a random subset of
    the tokens to keep (at least one), or None to keep all; ``__call__(item, rng,
    step)`` returns the item cut down to them (the training pipeline instead hands
    the indices to the packer as ``item["keep"]``, which gathers them straight into
    the packed sequence).
    """

    def __init__(self, cfg: Any):
        self.cfg = cfg
        if cfg.kind not in DROP_KINDS:
            raise ValueError(f"navit.token_drop.kind must be one of {DROP_KINDS}, got {cfg.kind!r}")
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"navit.token_drop.schedule must be one of {SCHEDULES}, "
                             f"got {cfg.schedule!r}")
        if not 0.0 <= float(cfg.max_drop) < 1.0:
            raise ValueError(f"navit.token_drop.max_drop must be in [0, 1), got {cfg.max_drop}")

    @property
    def enabled(self) -> bool:
        return self.cfg.kind != "none"

    def factor(self, step: int) -> float:
        """Schedule multiplier at training ``step``."""
        c = self.cfg
        if c.schedule == "constant":
            return 1.0
        frac = min(max(step / max(int(c.schedule_steps), 1), 0.0), 1.0)
        if c.schedule == "cosine":
            frac = 0.5 * (1.0 - math.cos(math.pi * frac))
        return float(c.schedule_start) + (float(c.schedule_end) - float(c.schedule_start)) * frac

    def rate(self, num_tokens: int, rng: np.random.Generator, step: int = 0) -> float:
        c = self.cfg
        if c.kind == "none":
            return 0.0
        if c.kind == "constant":
            r = float(c.rate)
        elif c.kind == "beta":
            r = float(rng.beta(float(c.beta_a), float(c.beta_b)))
        else:
            span = max(int(c.max_tokens) - int(c.min_tokens), 1)
            frac = min(max((num_tokens - int(c.min_tokens)) / span, 0.0), 1.0)
            r = float(c.min_rate) + (float(c.max_rate) - float(c.min_rate)) * frac
        return float(np.clip(r * self.factor(step), 0.0, float(c.max_drop)))

    def keep(self, num_tokens: int, rng: np.random.Generator, step: int = 0) -> np.ndarray | None:
        n = int(num_tokens)
        r = self.rate(n, rng, step)
        keep = max(1, int(round(n * (1.0 - r))))
        if keep >= n:
            return None
        return np.sort(rng.choice(n, size=keep, replace=False))

    def __call__(self, item: dict, rng: np.random.Generator, step: int = 0) -> dict:
        idx = self.keep(len(item["patches"]), rng, step)
        if idx is None:
            return item
        return dict(item, patches=item["patches"][idx], positions=item["positions"][idx])


# --------------------------------------------------------------------------- reading


def _navit_cfg(config: Any) -> ml_collections.ConfigDict:
    cfg = default_config()
    given = config.get("navit")
    if given is not None:
        cfg.update(given.to_dict() if hasattr(given, "to_dict") else dict(given))
    return cfg


def _tower(config: Any) -> dict:
    img = config.model.image
    if img.get("type", "vit") not in ("navit", "naflex"):
        raise ValueError(f"the NaViT pipeline needs model.image.type 'navit' or 'naflex', "
                         f"got {img.get('type')!r}")
    from vlm_jax import models  # pylint: disable=import-outside-toplevel
    r = models.resolve_config(config.model)["image"]
    max_side = r["posemb_size"] if (r["posemb"] == "learn" and r["posemb_coords"] == "absolute") else None
    return dict(patch_size=r["patch_size"], seq_len=r["seq_len"], max_images=r["max_images"],
                max_side=max_side)


def patchify_uint8(image: np.ndarray, tower: dict) -> dict:
    """``packing.image_to_item`` with uint8 patches (pixels 0-255, resized as 8-bit
    RGB); normalised later, as they are packed (or by ``eval_items``)."""
    kw = dict(patch_size=tower["patch_size"], max_patches=tower["seq_len"], max_side=tower["max_side"])
    if image.dtype == np.uint8:
        return packing.image_to_item(image, dtype=np.uint8, **kw)
    item = packing.image_to_item(image, **kw)
    item["patches"] = item["patches"].round().astype(np.uint8)
    return item


class _Reader:
    """fn(position, source_index) -> item dict ({"patches" uint8, "positions", "grid",
    "text", "label"}) or Skipped. Training samples resolutions with rng(seed, position)."""

    def __init__(self, config: Any, source: Any, split: str | None, train: bool):
        self.source, self.train = source, train
        self.navit = _navit_cfg(config)
        self.tower = _tower(config)
        self.seed = _seed32(config.get("seed", 0), 3)
        self.shapes = None
        if config.data.source == "shapes" and self.navit.shapes_sizes:
            self.shapes = (int(config.data.shapes.seed), split or "train",
                           tuple(int(s) for s in self.navit.shapes_sizes))

    def read_raw(self, source_index: int) -> dict:
        if self.shapes is not None:
            seed, split, sizes = self.shapes
            return shapes.render_example(seed, split, source_index, sizes[source_index % len(sizes)])
        return self.source[source_index]

    def __call__(self, position: int, source_index: int):
        source_index = int(source_index)
        try:
            ex = self.read_raw(source_index)
            img = preprocess.decode_image(ex["image"], what=f"example {source_index}")
        except _SKIP_ERRORS as e:
            return Skipped(source_index, f"{type(e).__name__}: {e}")
        if self.train:
            rng = np.random.default_rng([self.seed, int(position)])
            img = _rescale(img, sample_side(self.navit.resolution, rng))
        item = patchify_uint8(img, self.tower)
        text = ex["text"]
        item["text"] = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        item["label"] = int(ex.get("label", -1))
        return item


# --------------------------------------------------------------------------- batching


class NaViTBatchIterator(grain.DatasetIterator):
    """Stacks ``batch_size`` packed sequences and tokenizes each slot's caption."""

    def __init__(self, parent: packing.PackedIterator, batch_size: int, tokenizer: Any):
        super().__init__(parent)
        self._batch_size, self._tokenizer = batch_size, tokenizer

    @property
    def num_skipped(self) -> int:
        return self._parent.num_skipped

    def __next__(self) -> dict:
        seqs = [next(self._parent) for _ in range(self._batch_size)]
        image = {k: np.stack([s[k] for s in seqs])
                 for k in ("patches", "segment_ids", "positions", "grid_sizes")}
        valid = np.stack([s["image_index"] >= 0 for s in seqs])
        texts = [t if t is not None else "" for s in seqs for t in s["text"]]
        tokens = np.asarray(self._tokenizer.encode(texts), np.int32)
        tokens = tokens.reshape(len(seqs), valid.shape[1], -1) * valid[..., None]
        return {"image": image, "tokens": tokens.astype(np.int32), "valid": valid}

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)


class NaViTTrainDataset(grain.IterDataset):
    """IterDataset of NaViT training batches (``iter()`` -> ``NaViTBatchIterator``)."""

    def __init__(self, parent: packing.PackedDataset, batch_size: int, tokenizer: Any):
        super().__init__(parent)
        self.batch_size, self.tokenizer = batch_size, tokenizer

    def __iter__(self) -> NaViTBatchIterator:
        return NaViTBatchIterator(self._parent.__iter__(), self.batch_size, self.tokenizer)


def train_dataset(config: Any, *, process_index: int = 0, process_count: int = 1) -> NaViTTrainDataset:
    """NaViT training batches for one process (see the module docstring).

    ``config``: a recipe with ``model.image.type`` "navit"/"naflex", ``seed``,
    ``batch_size`` (global number of packed sequences), ``data``, ``pp.value_range``,
    ``tokenizer`` and optionally ``navit``.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if config.batch_size <= 0 or config.batch_size % process_count:
        raise ValueError(f"config.batch_size={config.batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    local = config.batch_size // process_count
    navit_cfg = _navit_cfg(config)
    tower = _tower(config)
    seed = config.get("seed", 0)
    source = build_source(config.data, None, image_size=config.pp.image_size)
    ds = grain.MapDataset.range(len(source))
    if config.data.get("shuffle", True):
        ds = ds.shuffle(seed=_seed32(seed, 0))
    ds = ds.repeat(None)
    ds = ds.map_with_index(_Reader(config, source, None, train=True))
    if process_count > 1:
        ds = ds[process_index::process_count]
    threads = int(config.data.get("num_threads", 2))
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=int(config.data.get("prefetch_buffer_size", 256))
        if threads > 0 else 0))

    drop = TokenDrop(navit_cfg.token_drop)
    drop_seed = _seed32(seed, 4)

    def transform(item, item_position, sequences_so_far):
        if not drop.enabled:
            return item
        rng = np.random.default_rng([drop_seed, process_index, int(item_position)])
        keep = drop.keep(len(item["patches"]), rng, step=sequences_so_far // local)
        return item if keep is None else dict(item, keep=keep)

    value_range = tuple(float(v) for v in config.pp.value_range)
    preprocess.pixel_affine(value_range)  # a bad range fails here, not in the train step
    if navit_cfg.patch_dtype not in ("uint8", "float32"):
        raise ValueError(f"navit.patch_dtype must be 'uint8' or 'float32', got {navit_cfg.patch_dtype!r}")
    on_device = navit_cfg.patch_dtype == "uint8"
    packed = packing.PackedDataset(
        it_ds, seq_len=tower["seq_len"], max_images=tower["max_images"],
        window=int(navit_cfg.window), slot_keys=("text",), transform=transform,
        skip=lambda ex: isinstance(ex, Skipped), value_range=None if on_device else value_range,
        dtype=np.uint8 if on_device else np.float32)
    return NaViTTrainDataset(packed, local, build_tokenizer(config.tokenizer))


def eval_items(config: Any, split: str, num_examples: int) -> list[dict]:
    """The first ``num_examples`` examples of ``split`` as unpacked items (native size,
    no resolution sampling, no token dropping), patches normalised to
    ``pp.value_range``; corrupt ones are left out."""
    source = build_source(config.data, split, image_size=config.pp.image_size)
    read = _Reader(config, source, split, train=False)
    items = [read(i, i) for i in range(min(num_examples, len(source)))]
    items = [it for it in items if not isinstance(it, Skipped)]
    for it in items:
        it["patches"] = preprocess.normalize(it["patches"], config.pp.value_range)
    return items
