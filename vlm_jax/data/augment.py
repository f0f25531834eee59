"""Augmentations for training image classifiers from scratch (e.g. a ViT on 32x32 images).

Two halves, at the two ends of the input path:

  host, one example (pipeline worker threads, after resize/crop, before ``normalize``):

      uint8 [H, W, 3] --apply_policy(pp.augment, rng)--> uint8 [H, W, 3]

    "trivialaugment" (TrivialAugmentWide, one op per image at a random strength) or
    "randaugment" (``num_ops`` ops at a fixed strength). The ops are Pillow's own
    (ImageOps, ImageEnhance, Image.transform/rotate). ``rng`` is the per-example
    ``np.random.Generator`` the pipeline derives from (seed, position), so a resumed
    run draws exactly the same ops.

  device, one batch (inside the jitted train step):

      images float [B, H, W, C], targets float [B, K]
        --mixup_or_cutmix(key)--> mixed images, soft targets

    Pure JAX with static shapes. Each example is mixed with its mirror in the batch
    (example i with B-1-i), the pairing timm uses: no second batch, no gather, and
    the pairing needs no randomness because the batch order already is random.

``one_hot_smoothed`` turns int labels into the [B, K] targets the mixers take.

The op list, magnitude ranges and the magnitude -> parameter mapping follow
torchvision.transforms.autoaugment; the mixing rules follow timm.data.mixup in its
'batch' mode. tests/test_augment.py checks each op against torchvision and the
mixers against timm.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = ["POLICIES", "OPS", "apply_op", "trivial_augment", "rand_augment", "apply_policy",
           "one_hot_smoothed", "mixup", "cutmix", "mixup_or_cutmix"]

POLICIES = ("none", "trivialaugment", "randaugment")

# Both policies draw uniformly from these 14 ops (torchvision's order).
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
       "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
# Ops whose magnitude gets a random sign: shearing/translating/rotating either way,
# and enhancing (factor 1 + m) or weakening (factor 1 - m).
_SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                     "Brightness", "Color", "Contrast", "Sharpness"})
# Nearest neighbour keeps geometric ops from blurring tiny images (torchvision's default).
_NEAREST = Image.Resampling.NEAREST

# ---------------------------------------------------------------------------------------
# Host side: one uint8 image, numpy randomness.
# ---------------------------------------------------------------------------------------


def _affine(img: Image.Image, coeffs: tuple[float, ...], fill: tuple[int, ...]) -> Image.Image:
    # Pillow's AFFINE data maps each *output* pixel (x, y) to the input pixel it reads:
    # (a x + b y + c, d x + e y + f).
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, _NEAREST, fillcolor=fill)


_OP_FNS = {
    "Identity": lambda img, m, fill: img,
    # Shear about the top-left corner, as the original AutoAugment; m is the shear
    # coefficient (tan of the shear angle), not an angle.
    "ShearX": lambda img, m, fill: _affine(img, (1.0, m, 0.0, 0.0, 1.0, 0.0), fill),
    "ShearY": lambda img, m, fill: _affine(img, (1.0, 0.0, 0.0, m, 1.0, 0.0), fill),
    # Whole pixels, truncated toward zero as torchvision does, so there is no resampling.
    "TranslateX": lambda img, m, fill: _affine(img, (1.0, 0.0, -float(int(m)), 0.0, 1.0, 0.0), fill),
    "TranslateY": lambda img, m, fill: _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, -float(int(m))), fill),
    "Rotate": lambda img, m, fill: img.rotate(m, _NEAREST, fillcolor=fill),
    # Enhancers interpolate between a degenerate image (black, grey, mean grey, blurred)
    # and the input with factor 1 + m: m = 0 is the identity, m < 0 weakens.
    "Brightness": lambda img, m, fill: ImageEnhance.Brightness(img).enhance(1.0 + m),
    "Color": lambda img, m, fill: ImageEnhance.Color(img).enhance(1.0 + m),
    "Contrast": lambda img, m, fill: ImageEnhance.Contrast(img).enhance(1.0 + m),
    "Sharpness": lambda img, m, fill: ImageEnhance.Sharpness(img).enhance(1.0 + m),
    "Posterize": lambda img, m, fill: ImageOps.posterize(img, int(m)),
    "Solarize": lambda img, m, fill: ImageOps.solarize(img, m),
    "AutoContrast": lambda img, m, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, fill: ImageOps.equalize(img),
}
assert tuple(_OP_FNS) == OPS


def _fill_tuple(fill: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(fill, (int, np.integer)):
        fill = (int(fill),) * 3
    fill = tuple(int(v) for v in fill)
    if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
        raise ValueError(f"augmentation fill must be an int or 3 ints in 0-255, got {fill!r}")
    return fill


def apply_op(img: Image.Image, name: str, magnitude: float,
             fill: int | Sequence[int] = (128, 128, 128)) -> Image.Image:
    """Applies one augmentation op to an RGB PIL image; returns a PIL image of the same size.

    What ``magnitude`` means, per op (ranges are those the policies draw from):
      ShearX, ShearY: shear coefficient; output (x, y) reads input (x + m y, y) (ShearX)
        or (x, m x + y) (ShearY). |m| <= 0.99 (TrivialAugment), <= 0.3 (RandAugment).
      TranslateX, TranslateY: pixels, truncated toward zero; positive moves the content
        right / down.
      Rotate: degrees counter-clockwise about the image centre.
      Brightness, Color, Contrast, Sharpness: enhancement factor 1 + m, m in (-1, 1).
      Posterize: bits kept per channel, int 1-8.
      Solarize: threshold in 0-255; pixel values >= it are inverted (255 - v).
      Identity, AutoContrast, Equalize: ignored.
    Geometric ops sample with nearest neighbour and paint uncovered pixels ``fill``.
    """
    if name not in _OP_FNS:
        raise ValueError(f"unknown augmentation op {name!r}; expected one of {OPS}")
    if img.mode != "RGB":
        raise ValueError(f"augmentation ops expect an RGB image, got mode {img.mode!r}")
    return _OP_FNS[name](img, float(magnitude), _fill_tuple(fill))


@functools.lru_cache(maxsize=64)
def _magnitudes(num_bins: int, hw: tuple[int, int], wide: bool) -> dict[str, tuple[float, ...]]:
    """op -> its ``num_bins`` magnitudes, weakest first; ops without a magnitude are absent."""
    if num_bins < 2:
        raise ValueError(f"num_magnitude_bins must be >= 2, got {num_bins}")
    h, w = hw
    if wide:  # TrivialAugmentWide's ranges. Translation is in absolute pixels.
        shear, tx, ty, rot, enh, post = 0.99, 32.0, 32.0, 135.0, 0.99, 6
    else:  # RandAugment's: translation up to 150/331 of the side (AutoAugment's 331 px setup).
        shear, tx, ty, rot, enh, post = 0.3, 150.0 / 331.0 * w, 150.0 / 331.0 * h, 30.0, 0.9, 4
    lin = lambda hi: tuple(np.linspace(0.0, hi, num_bins).tolist())
    # Posterize keeps 8 bits at the weakest bin down to 8 - post at the strongest.
    bits = 8 - np.round(np.arange(num_bins) / ((num_bins - 1) / post)).astype(int)
    return {"ShearX": lin(shear), "ShearY": lin(shear), "TranslateX": lin(tx), "TranslateY": lin(ty),
            "Rotate": lin(rot), "Brightness": lin(enh), "Color": lin(enh), "Contrast": lin(enh),
            "Sharpness": lin(enh), "Posterize": tuple(bits.tolist()),
            # Threshold 255 leaves all but pure white alone; 0 inverts everything.
            "Solarize": tuple(np.linspace(255.0, 0.0, num_bins).tolist())}


def _draw_op(rng: np.random.Generator, tables: dict[str, tuple[float, ...]],
             bin_index: int | None) -> tuple[str, float]:
    name = OPS[int(rng.integers(len(OPS)))]
    table = tables.get(name)
    if table is None:
        return name, 0.0
    m = table[int(rng.integers(len(table)))] if bin_index is None else table[bin_index]
    if name in _SIGNED and rng.integers(2):
        m = -m
    return name, m


def _trivial_ops(rng: np.random.Generator, num_magnitude_bins: int) -> list[tuple[str, float]]:
    """TrivialAugmentWide's draw: one (op, magnitude), op and bin both uniform."""
    # The wide ranges do not depend on the image size: one cache entry for all sizes.
    return [_draw_op(rng, _magnitudes(num_magnitude_bins, (0, 0), True), None)]


def _rand_ops(rng: np.random.Generator, hw: tuple[int, int], num_ops: int, magnitude: int,
              num_magnitude_bins: int) -> list[tuple[str, float]]:
    """RandAugment's draw: ``num_ops`` uniform ops (with repetition) at bin ``magnitude``."""
    if not 0 <= magnitude < num_magnitude_bins:
        raise ValueError(f"randaugment magnitude must be in [0, num_magnitude_bins={num_magnitude_bins}),"
                         f" got {magnitude}")
    if num_ops < 0:
        raise ValueError(f"randaugment num_ops must be >= 0, got {num_ops}")
    tables = _magnitudes(num_magnitude_bins, hw, False)
    return [_draw_op(rng, tables, magnitude) for _ in range(num_ops)]


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"augmentation expects a uint8 [H, W, 3] numpy image, got {desc}")


def _run(image: np.ndarray, ops: list[tuple[str, float]], fill: int | Sequence[int]) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(image))
    for name, m in ops:
        img = apply_op(img, name, m, fill)
    return np.asarray(img, dtype=np.uint8)


def trivial_augment(image: np.ndarray, rng: np.random.Generator, *, num_magnitude_bins: int = 31,
                    fill: int | Sequence[int] = (128, 128, 128)) -> np.ndarray:
    """TrivialAugmentWide (Müller & Hutter, 2021): one op of ``OPS``, uniformly chosen, at a
    magnitude drawn uniformly from its ``num_magnitude_bins`` bins over the wide ranges
    (shear 0.99, translate 32 px, rotate 135 deg, enhance factors 1 +- 0.99, posterize down
    to 2 bits, solarize any threshold), with a random sign for signed ops.

    Args:
      image: uint8 [H, W, 3].
      rng: the example's generator; the same state gives the same output.
      fill: colour of pixels uncovered by shear/translate/rotate.
    Returns:
      uint8 [H, W, 3].
    """
    _check_image(image)
    return _run(image, _trivial_ops(rng, num_magnitude_bins), fill)


def rand_augment(image: np.ndarray, rng: np.random.Generator, *, num_ops: int = 2, magnitude: int = 9,
                 num_magnitude_bins: int = 31, fill: int | Sequence[int] = (128, 128, 128)) -> np.ndarray:
    """RandAugment (Cubuk et al., 2020): ``num_ops`` ops drawn uniformly from ``OPS`` (with
    repetition), applied in turn, all at magnitude bin ``magnitude`` of ``num_magnitude_bins``
    (shear 0.3, translate 150/331 of the side, rotate 30 deg, enhance factors 1 +- 0.9,
    posterize down to 4 bits, solarize down to threshold 0), random sign for signed ops.

    Args:
      image: uint8 [H, W, 3].
      rng: the example's generator; the same state gives the same output.
      magnitude: bin index in [0, num_magnitude_bins); 9 of 31 is the usual "m9".
      fill: colour of pixels uncovered by shear/translate/rotate.
    Returns:
      uint8 [H, W, 3].
    """
    _check_image(image)
    return _run(image, _rand_ops(rng, image.shape[:2], num_ops, magnitude, num_magnitude_bins), fill)


def apply_policy(image: np.ndarray, policy: str, rng: np.random.Generator | None, **kw: Any) -> np.ndarray:
    """Applies the augmentation policy named by ``pp.augment`` to one image.

    Args:
      image: uint8 [H, W, 3].
      policy: "none" (returns ``image`` itself), "trivialaugment" or "randaugment".
      rng: the example's generator (unused for "none").
      **kw: keyword arguments of ``trivial_augment`` / ``rand_augment`` (ignored for "none").
    Returns:
      uint8 [H, W, 3], a deterministic function of (image, policy, rng state, kw).
    """
    if policy == "none":
        return image
    fns = {"trivialaugment": trivial_augment, "randaugment": rand_augment}
    if policy not in fns:
        raise ValueError(f"pp.augment must be one of {POLICIES}, got {policy!r}")
    if rng is None:
        raise ValueError(f"pp.augment={policy!r} needs an rng (np.random.Generator)")
    return fns[policy](image, rng, **kw)


# ---------------------------------------------------------------------------------------
# Device side: one batch, pure JAX, static shapes.
# ---------------------------------------------------------------------------------------


def one_hot_smoothed(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Label-smoothed one-hot targets: (1 - s) one_hot + s / K (as timm and optax.smooth_labels).

    Args:
      labels: int [B] in [0, num_classes); other values give rows of s / K only.
      num_classes: K.
      smoothing: s in [0, 1] (Python float).
    Returns:
      float32 [B, K]; rows sum to 1 (up to rounding).
    """
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label smoothing must be in [0, 1], got {smoothing}")
    # The two values are computed in double and rounded once, as timm does, so the targets
    # match timm's bit for bit (optax's float32 arithmetic can differ by one ulp).
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    hot = jnp.asarray(labels)[:, None] == jnp.arange(num_classes)
    return jnp.where(hot, jnp.float32(on), jnp.float32(off))


def _check_batch(images: jax.Array, targets: jax.Array) -> None:
    if images.ndim != 4 or targets.ndim != 2 or images.shape[0] != targets.shape[0]:
        raise ValueError(f"mixing expects images [B, H, W, C] and targets [B, K], got {images.shape} "
                         f"and {targets.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"mixing expects floating images (after normalisation), got {images.dtype}")


def _blend_targets(targets: jax.Array, lam: jax.Array, one_minus_lam: jax.Array) -> jax.Array:
    return targets * lam.astype(targets.dtype) + targets[::-1] * one_minus_lam.astype(targets.dtype)


def _mixup_with_lam(images: jax.Array, targets: jax.Array, lam: jax.Array | float):
    """lam * x + (1 - lam) * x[::-1] for images and targets alike; lam a scalar."""
    lam = jnp.asarray(lam, jnp.float32)
    one_minus = 1.0 - lam
    images = images * lam.astype(images.dtype) + images[::-1] * one_minus.astype(images.dtype)
    return images, _blend_targets(targets, lam, one_minus)


def _cutmix_box(lam: jax.Array | float, cy: jax.Array | int, cx: jax.Array | int, height: int, width: int):
    """(top, bottom, left, right), int32 scalars, of a box with sides sqrt(1 - lam) of the
    image's (floored), centred at (cy, cx) and clipped to the image, so its area may be
    less than (1 - lam) H W."""
    ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    cy, cx = jnp.asarray(cy, jnp.int32), jnp.asarray(cx, jnp.int32)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + (cut_h + 1) // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + (cut_w + 1) // 2, 0, width)
    return top, bottom, left, right


def _cutmix_with_box(images: jax.Array, targets: jax.Array, box):
    """Pastes box (top, bottom, left, right) of x[::-1] into x; targets mixed by the area
    actually pasted (lam = 1 - box area / image area)."""
    top, bottom, left, right = box
    _, h, w, _ = images.shape
    # A mask rather than a dynamic slice keeps every shape static under jit.
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    images = jnp.where(inside[None, :, :, None], images[::-1], images)
    area = ((bottom - top) * (right - left)).astype(jnp.float32)
    # Each of lam and 1 - lam from one division, not 1 - (rounded fraction).
    lam, one_minus = (h * w - area) / (h * w), area / (h * w)
    return images, _blend_targets(targets, lam, one_minus)


def mixup(rng: jax.Array, images: jax.Array, targets: jax.Array, alpha: float):
    """Mixup (Zhang et al., 2018) over the whole batch with one lam ~ Beta(alpha, alpha):
    example i becomes lam x_i + (1 - lam) x_{B-1-i}, and so does its target.

    The pairing needs B even to mix every example with another (timm requires it); with
    B odd the middle example is paired with itself. On a batch sharded over devices the
    reversal moves examples between devices (one collective permute per step).

    Args:
      rng: a jax PRNG key.
      images: float [B, H, W, C] (any value range).
      targets: float [B, K], one-hot or smoothed (rows summing to 1).
      alpha: Python float; <= 0 returns the inputs unchanged.
    Returns:
      (images, targets) of the input shapes and dtypes; target rows still sum to 1.
    """
    _check_batch(images, targets)
    if alpha <= 0:
        return images, targets
    return _mixup_with_lam(images, targets, jax.random.beta(rng, alpha, alpha))


def _cutmix_with_lam(rng: jax.Array, images: jax.Array, targets: jax.Array, lam: jax.Array):
    """CutMix for a given lam: the box centre is drawn uniformly over the image."""
    k_y, k_x = jax.random.split(rng)
    _, h, w, _ = images.shape
    cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
    return _cutmix_with_box(images, targets, _cutmix_box(lam, cy, cx, h, w))


def cutmix(rng: jax.Array, images: jax.Array, targets: jax.Array, alpha: float):
    """CutMix (Yun et al., 2019) over the whole batch: lam ~ Beta(alpha, alpha); a box of
    area about (1 - lam) H W, centred uniformly at random, is cut from x_{B-1-i} into x_i
    (same box for every example). The target weight is the area actually pasted after the
    box is clipped to the image.

    Args: as ``mixup``.
    Returns:
      (images, targets) of the input shapes and dtypes; target rows still sum to 1.
    """
    _check_batch(images, targets)
    if alpha <= 0:
        return images, targets
    k_lam, k_box = jax.random.split(rng)
    return _cutmix_with_lam(k_box, images, targets, jax.random.beta(k_lam, alpha, alpha))


def mixup_or_cutmix(rng: jax.Array, images: jax.Array, targets: jax.Array, *, mixup_alpha: float,
                    cutmix_alpha: float, switch_prob: float = 0.5, prob: float = 1.0):
    """timm's batch-mode Mixup: with probability ``prob`` the batch is mixed, by CutMix with
    probability ``switch_prob`` and by Mixup otherwise (when both are enabled); else it is
    returned unchanged. lam ~ Beta(alpha, alpha) with the chosen mixer's alpha.

    Args:
      rng: a jax PRNG key.
      images: float [B, H, W, C].
      targets: float [B, K], one-hot or smoothed (``one_hot_smoothed``).
      mixup_alpha, cutmix_alpha: Python floats; 0 disables that mixer (both 0: identity).
      switch_prob: probability of CutMix when both are enabled.
      prob: probability of mixing this batch at all (a Python 0 compiles to the identity).
    Returns:
      (images, targets) of the input shapes and dtypes; target rows still sum to 1.
    """
    _check_batch(images, targets)
    use_mix, use_cut = mixup_alpha > 0, cutmix_alpha > 0
    if not (use_mix or use_cut) or (isinstance(prob, (int, float)) and prob <= 0):
        return images, targets
    k_apply, k_switch, k_lam, k_box = jax.random.split(rng, 4)
    apply = jax.random.uniform(k_apply) < prob
    is_cut = jax.random.uniform(k_switch) < switch_prob if use_mix and use_cut else jnp.asarray(use_cut)
    # One Beta draw with the chosen alpha: Beta sampling (rejection loops) dominates the
    # compile time, so the graph holds one sampler, not one per mixer.
    alpha = jnp.where(is_cut, cutmix_alpha, mixup_alpha)
    lam = jax.random.beta(k_lam, alpha, alpha)
    branch = jnp.where(apply, jnp.where(is_cut, 2, 1), 0)
    return jax.lax.switch(branch, [
        lambda x, y, lam: (x, y),
        _mixup_with_lam,
        lambda x, y, lam: _cutmix_with_lam(k_box, x, y, lam),
    ], images, targets, lam)
