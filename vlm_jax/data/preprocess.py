"""Image preprocessing: decode, resize/crop, flip, normalise.

All functions work on one image (numpy, host side). The pipeline runs them in its
worker threads. Anything that cannot be decoded raises ``CorruptExampleError``,
which the training pipeline catches, counts and skips.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

CROP_MODES = ("resize", "center", "random_resized", "random_pad")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class CorruptExampleError(Exception):
    """An example that cannot be read or decoded (truncated file, missing file, bad bytes).

    The training pipeline skips such examples and counts them; other errors are bugs
    and propagate.
    """


def _to_pil_rgb(img: Image.Image, what: str) -> np.ndarray:
    try:
        img.load()  # Force a full decode: truncated files fail here, not later.
        if img.mode != "RGB":
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                # Composite transparent pixels on white rather than leaking garbage colours.
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, img)
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's decode errors.
        raise CorruptExampleError(f"cannot decode image {what}: {type(e).__name__}: {e}") from e
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CorruptExampleError(f"image {what} decoded to unexpected shape {arr.shape}")
    return arr


def _array_to_rgb(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CorruptExampleError(
            f"image {what} has shape {arr.shape}; expected [H, W], [H, W, 1|2|3|4]")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            raise CorruptExampleError(
                f"image {what} is {arr.dtype}; pass uint8 pixels (0-255), not normalised floats")
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
            raise CorruptExampleError(f"image {what} ({arr.dtype}) has values outside 0-255")
        arr = arr.astype(np.uint8)
    c = arr.shape[-1]
    if c == 1:
        return np.repeat(arr, 3, axis=-1)
    if c == 2:  # grey + alpha
        return np.repeat(arr[..., :1], 3, axis=-1)
    if c == 4:
        return np.ascontiguousarray(arr[..., :3])
    return arr


def decode_image(image: Any, *, what: str = "") -> np.ndarray:
    """Decodes an image to uint8 RGB [H, W, 3].

    Args:
      image: encoded bytes (JPEG/PNG/...), a file path (str or os.PathLike), a PIL
        image, or a numpy array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] of
        integer pixels 0-255. Grayscale is repeated to 3 channels; alpha is
        dropped (arrays) or composited on white (encoded images).
      what: a name for error messages (file path, dataset index).

    Raises:
      CorruptExampleError: unreadable file, undecodable or truncated bytes, bad shape.
    """
    what = what or type(image).__name__
    if isinstance(image, np.ndarray):
        if image.dtype == object or image.dtype.kind in "SU":  # e.g. TFDS bytes scalar
            image = image.item()
        else:
            return _array_to_rgb(image, what)
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            img = Image.open(io.BytesIO(bytes(image)))
        except (OSError, ValueError, SyntaxError) as e:
            raise CorruptExampleError(f"cannot decode image {what}: {type(e).__name__}: {e}") from e
        return _to_pil_rgb(img, what)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CorruptExampleError(f"cannot read image file {path}: {e}") from e
        try:
            img = Image.open(io.BytesIO(data))
        except (OSError, ValueError, SyntaxError) as e:
            raise CorruptExampleError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from e
        return _to_pil_rgb(img, path)
    if isinstance(image, Image.Image):
        return _to_pil_rgb(image, what)
    raise TypeError(f"cannot decode an image of type {type(image).__name__} ({what})")


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {size!r}")
    return h, w


def _resize(img: np.ndarray, hw: tuple[int, int], method: str) -> np.ndarray:
    if img.shape[:2] == hw:
        return img
    if method not in _RESAMPLE:
        raise ValueError(f"pp.resize_method must be one of {tuple(_RESAMPLE)}, got {method!r}")
    out = Image.fromarray(img).resize((hw[1], hw[0]), resample=_RESAMPLE[method])
    return np.asarray(out, dtype=np.uint8)


def _random_resized_box(rng: np.random.Generator, h: int, w: int,
                        scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop with area fraction in ``scale`` and
    aspect (w/h) log-uniform in ``ratio``; falls back to the central crop."""
    area = h * w
    log_r = np.log(np.asarray(ratio, np.float64))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = float(np.exp(rng.uniform(log_r[0], log_r[1])))
        cw = int(round(np.sqrt(target * aspect)))
        ch = int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s, s


def resize_crop(
    image: np.ndarray,
    size: int | Sequence[int],
    mode: str = "resize",
    *,
    rng: np.random.Generator | None = None,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    method: str = "bilinear",
    padding: int = 4,
) -> np.ndarray:
    """Resizes/crops uint8 [H, W, 3] to uint8 [h, w, 3], (h, w) = ``size``.

    Modes:
      "resize": squash the whole image to (h, w) (aspect not kept).
      "center": resize the short side to fit, then take the central (h, w) crop.
      "random_resized": a random box with area fraction in ``scale`` and aspect
        ratio in ``ratio`` (Inception-style), resized to (h, w). Needs ``rng``;
        the same rng state gives the same crop.
      "random_pad": squash to (h, w), pad ``padding`` black pixels on every side and
        take a random (h, w) crop: the classic CIFAR augmentation (a shift of up to
        ``padding`` pixels). Needs ``rng``.
    """
    hw = _size_hw(size)
    h, w = image.shape[:2]
    if mode == "resize":
        return _resize(image, hw, method)
    if mode == "center":
        f = max(hw[0] / h, hw[1] / w)
        rh, rw = max(hw[0], int(round(h * f))), max(hw[1], int(round(w * f)))
        img = _resize(image, (rh, rw), method)
        top, left = (rh - hw[0]) // 2, (rw - hw[1]) // 2
        return np.ascontiguousarray(img[top:top + hw[0], left:left + hw[1]])
    if mode == "random_resized":
        if rng is None:
            raise ValueError("crop mode 'random_resized' needs an rng (np.random.Generator)")
        top, left, ch, cw = _random_resized_box(rng, h, w, scale, ratio)
        return _resize(np.ascontiguousarray(image[top:top + ch, left:left + cw]), hw, method)
    if mode == "random_pad":
        if rng is None:
            raise ValueError("crop mode 'random_pad' needs an rng (np.random.Generator)")
        img = _resize(image, hw, method)
        if padding <= 0:
            return img
        img = np.pad(img, ((padding, padding), (padding, padding), (0, 0)))
        top, left = (int(v) for v in rng.integers(0, 2 * padding + 1, size=2))
        return np.ascontiguousarray(img[top:top + hw[0], left:left + hw[1]])
    raise ValueError(f"pp.crop must be one of {CROP_MODES}, got {mode!r}")


def normalize(image: np.ndarray, value_range: Sequence[float] = (-1.0, 1.0)) -> np.ndarray:
    """uint8 [..., 3] in 0-255 -> float32 linearly mapped onto ``value_range`` (lo, hi)."""
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"pp.value_range must be (lo, hi) with hi > lo, got {tuple(value_range)}")
    return image.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)


def preprocess_image(
    image: Any,
    *,
    image_size: int | Sequence[int],
    crop: str = "resize",
    value_range: Sequence[float] = (-1.0, 1.0),
    flip: bool = False,
    rng: np.random.Generator | None = None,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    method: str = "bilinear",
    padding: int = 4,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    what: str = "",
) -> np.ndarray:
    """decode -> resize/crop -> optional random horizontal flip -> augment -> normalise.

    Args:
      image: anything ``decode_image`` accepts.
      image_size: output side (int) or (h, w).
      crop: one of ``CROP_MODES`` (see ``resize_crop``).
      value_range: (lo, hi) the pixel range 0-255 is mapped onto.
      flip: flip left-right with probability 1/2 (needs ``rng``).
      rng: source of randomness for the random crops, ``flip`` and ``augment``.
      padding: "random_pad": the shift range in pixels.
      augment: optional ``fn(uint8 [h, w, 3], rng) -> uint8 [h, w, 3]`` applied to the
        cropped image (e.g. ``augment.apply_policy`` with RandAugment).
    Returns:
      float32 [h, w, 3].
    Raises:
      CorruptExampleError: the image cannot be decoded.
    """
    img = decode_image(image, what=what)
    img = resize_crop(img, image_size, crop, rng=rng, scale=scale, ratio=ratio, method=method,
                      padding=padding)
    if flip:
        if rng is None:
            raise ValueError("pp.flip needs an rng (np.random.Generator)")
        if rng.random() < 0.5:
            img = img[:, ::-1]
    if augment is not None:
        img = augment(np.ascontiguousarray(img), rng)
    return normalize(img, value_range)
