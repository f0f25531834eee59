"""Image preprocessing: decode, resize/crop, flip, normalise.

All functions work on one image (numpy, host side). The pipeline runs them in its
reader threads or worker processes. Anything that cannot be decoded raises
``CorruptExampleError``, which the training pipeline catches, counts and skips.

Decoding (``decode_image``): JPEGs go through simplejpeg (libjpeg-turbo, the same
pixels as PIL's decoder, ~1.5x faster) when it is installed, everything else through
PIL. EXIF orientation is applied; CMYK, 16-bit, palette and alpha images become
8-bit RGB; images over ``max_pixels`` (decompression bombs) are corrupt examples.

Reduced-size decoding (``preprocess_image(..., fast_decode=True)``, ``pp.fast_decode``):
when the crop needs at most 1/3 of the file's resolution, a JPEG is decoded at 1/2,
1/4 or 1/8 scale by libjpeg's DCT scaling (far less work), keeping at least 1.5x the
resolution the crop needs. Crop boxes are drawn on the full-size image first (the same
rng draws), so the same region is cropped; pixels differ from the exact path by under
one level of 255 on average (tests/test_input_workers.py bounds it at 2 levels). It
wins on images far larger than the output (web images to 224 px: ~2x per image); for
ImageNet-sized files at 224 px there is nothing to skip and it decodes in full.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

try:  # Optional: a faster JPEG decoder with the same output as PIL's.
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None

CROP_MODES = ("resize", "center", "random_resized", "random_pad")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# Images with more pixels than this are refused (``pp.max_pixels``): PIL's own default
# decompression-bomb limit (~89.5 Mpx, e.g. 9459 x 9459).
DEFAULT_MAX_PIXELS = 89_478_485
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_EXIF_ORIENTATION = 0x0112
# Orientations whose transform swaps height and width.
_TRANSPOSED = (5, 6, 7, 8)


class CorruptExampleError(Exception):
    """An example that cannot be read or decoded (truncated file, missing file, bad bytes,
    an image over the pixel limit).

    The training pipeline skips such examples and counts them; other errors are bugs
    and propagate.
    """


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Applies EXIF ``orientation`` (1-8) to [H, W, C], as ``ImageOps.exif_transpose`` does."""
    if orientation in (2, 3, 4):
        arr = {2: arr[:, ::-1], 3: arr[::-1, ::-1], 4: arr[::-1]}[orientation]
    elif orientation in _TRANSPOSED:
        t = arr.transpose(1, 0, 2)
        arr = {5: t, 6: t[:, ::-1], 7: t[::-1, ::-1], 8: t[::-1]}[orientation]
    else:
        return arr
    return np.ascontiguousarray(arr)


def _check_pixels(h: int, w: int, max_pixels: int | None, what: str) -> None:
    if max_pixels is not None and h * w > max_pixels:
        raise CorruptExampleError(f"image {what} has {w}x{h} = {w * h} pixels, over the limit "
                                  f"of {max_pixels} (pp.max_pixels; a decompression bomb?)")


def _gray16_to_rgb(arr: np.ndarray) -> np.ndarray:
    """16-bit grey (PIL "I;16*", or "I" from 16-bit PNGs) -> uint8 RGB, keeping the top 8 bits."""
    arr = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    return np.repeat(arr[..., None], 3, axis=-1)


def _to_pil_rgb(img: Image.Image, what: str) -> np.ndarray:
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
        img.load()  # Force a full decode: truncated files fail here, not later.
        if img.mode.startswith("I;16") or img.mode == "I":
            arr = _gray16_to_rgb(np.asarray(img))
        else:
            if img.mode != "RGB":
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    img = img.convert("RGBA")
                    # Composite transparent pixels on white rather than leaking garbage colours.
                    bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(bg, img)
                img = img.convert("RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except _DECODE_ERRORS as e:  # PIL's decode errors.
        raise CorruptExampleError(f"cannot decode image {what}: {type(e).__name__}: {e}") from e
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CorruptExampleError(f"image {what} decoded to unexpected shape {arr.shape}")
    return _orient(arr, orientation)


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


def _is_encoded(image: Any) -> bool:
    return isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)) or (
        isinstance(image, np.ndarray) and (image.dtype == object or image.dtype.kind in "SU"))


def _read(image: Any, what: str) -> tuple[bytes, str]:
    """(encoded bytes, name) from bytes, a path or a numpy bytes scalar."""
    if isinstance(image, np.ndarray):  # e.g. a TFDS bytes scalar
        image = image.item()
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with open(path, "rb") as f:
                return f.read(), path
        except OSError as e:
            raise CorruptExampleError(f"cannot read image file {path}: {e}") from e
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), what
    raise TypeError(f"cannot decode an image of type {type(image).__name__} ({what})")


# plan(H, W) -> (min_h, min_w): the least resolution the caller needs, given the
# full (oriented) size; None: the full resolution.
Plan = Callable[[int, int], "tuple[int, int] | None"]


# Reduced-size decoding keeps at least this many times the resolution the output needs,
# so the final resize still filters (DCT scaling alone is a blockwise average, a few
# levels away from PIL's antialiasing filter); at 1.5 the mean difference from the exact
# path stays under ~1 level of 255 (experiments/input_pipeline.py prints it).
_FAST_MARGIN = 1.5


def _reduction(need: tuple[int, int] | None, h: int, w: int) -> int:
    """The largest JPEG DCT scale-down r in (8, 4, 2) that keeps >= _FAST_MARGIN x
    ``need``; else 1."""
    if need is None:
        return 1
    need_h, need_w = math.ceil(need[0] * _FAST_MARGIN), math.ceil(need[1] * _FAST_MARGIN)
    for r in (8, 4, 2):
        if math.ceil(h / r) >= need_h and math.ceil(w / r) >= need_w:
            return r
    return 1


def _decode_jpeg(data: bytes, what: str, max_pixels: int | None, plan: Plan | None):
    """simplejpeg decode of a baseline/progressive YCbCr or grey JPEG; None for other
    JPEGs (CMYK, YCCK: PIL handles those)."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise CorruptExampleError(f"cannot decode image {what}: {e}") from e
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None
    orientation = 1
    if b"Exif" in data[:65536]:  # APP1 comes right after SOI; most files have none.
        try:
            orientation = int(Image.open(io.BytesIO(data)).getexif().get(_EXIF_ORIENTATION, 1) or 1)
        except _DECODE_ERRORS:
            orientation = 1
    _check_pixels(h, w, max_pixels, what)
    oh, ow = (w, h) if orientation in _TRANSPOSED else (h, w)
    r = _reduction(plan(oh, ow) if plan else None, oh, ow)
    try:
        if r == 1:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
        else:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(h / r),
                                         min_width=math.ceil(w / r), min_factor=r)
    except ValueError as e:  # truncated or corrupt data (strict mode)
        raise CorruptExampleError(f"cannot decode image {what}: {e}") from e
    return _orient(arr, orientation), (oh, ow)


def _decode(image: Any, what: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
            plan: Plan | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 RGB [h, w, 3], (H, W)): the image at (H, W) = its full oriented size, or
    reduced to (h, w) >= plan(H, W) when it is a JPEG and ``plan`` allows."""
    what = what or type(image).__name__
    if isinstance(image, np.ndarray) and not _is_encoded(image):
        arr = _array_to_rgb(image, what)
        return arr, arr.shape[:2]
    if isinstance(image, Image.Image):
        _check_pixels(image.height, image.width, max_pixels, what)
        arr = _to_pil_rgb(image, what)
        return arr, arr.shape[:2]
    data, what = _read(image, what)
    if simplejpeg is not None and data[:3] == b"\xff\xd8\xff":
        out = _decode_jpeg(data, what, max_pixels, plan)
        if out is not None:
            return out
    try:
        img = Image.open(io.BytesIO(data))
        _check_pixels(img.height, img.width, max_pixels, what)
        full = img.size[::-1]
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
        if orientation in _TRANSPOSED:
            full = full[::-1]
        if plan is not None and img.format == "JPEG":
            need = plan(*full)
            r = _reduction(need, *full)
            if r > 1:  # DCT scaling: PIL picks the largest scale with size >= the request
                raw = (math.ceil(full[0] / r), math.ceil(full[1] / r))
                if orientation in _TRANSPOSED:
                    raw = raw[::-1]
                img.draft(img.mode, (raw[1], raw[0]))
    except CorruptExampleError:
        raise
    except _DECODE_ERRORS as e:
        raise CorruptExampleError(f"cannot decode image {what}: {type(e).__name__}: {e}") from e
    return _to_pil_rgb(img, what), tuple(full)


def decode_image(image: Any, *, what: str = "", max_pixels: int | None = DEFAULT_MAX_PIXELS
                 ) -> np.ndarray:
    """Decodes an image to uint8 RGB [H, W, 3] at full resolution.

    Args:
      image: encoded bytes (JPEG/PNG/...), a file path (str or os.PathLike), a PIL
        image, or a numpy array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] of
        integer pixels 0-255. Grayscale is repeated to 3 channels; alpha is
        dropped (arrays) or composited on white (encoded images); EXIF orientation
        is applied; CMYK and palette images are converted; 16-bit grey keeps its
        top 8 bits.
      what: a name for error messages (file path, dataset index).
      max_pixels: images with more pixels are refused (None: no limit of ours;
        PIL still refuses over twice its ``Image.MAX_IMAGE_PIXELS``).

    Raises:
      CorruptExampleError: unreadable file, undecodable or truncated bytes, bad shape,
        too many pixels.
    """
    return _decode(image, what, max_pixels)[0]
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
    box: tuple[int, int, int, int] | None = None,
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
    ``box``: "random_resized" with the (top, left, height, width) box already drawn.
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
        if rng is None and box is None:
            raise ValueError("crop mode 'random_resized' needs an rng (np.random.Generator)")
        top, left, ch, cw = box or _random_resized_box(rng, h, w, scale, ratio)
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


def pixel_affine(value_range: Sequence[float]) -> tuple[np.float32, np.float32]:
    """(scale, lo) in float32 with ``x * scale + lo`` mapping pixels 0-255 onto
    ``value_range`` (lo, hi): the one arithmetic of every normalisation here."""
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"pp.value_range must be (lo, hi) with hi > lo, got {tuple(value_range)}")
    return np.float32((hi - lo) / 255.0), np.float32(lo)


def normalize(image: np.ndarray, value_range: Sequence[float] = (-1.0, 1.0)) -> np.ndarray:
    """uint8 [..., 3] in 0-255 -> float32 linearly mapped onto ``value_range`` (lo, hi)."""
    scale, lo = pixel_affine(value_range)
    return image.astype(np.float32) * scale + lo


def _fast_crop(image: Any, hw: tuple[int, int], mode: str, rng: np.random.Generator | None,
               scale: Sequence[float], ratio: Sequence[float], method: str, padding: int,
               max_pixels: int | None, what: str) -> np.ndarray:
    """``resize_crop(decode_image(image), ...)`` with a JPEG decoded at reduced size where
    the output needs at most half its resolution. Random boxes are drawn on the full
    size (the same rng draws as the exact path), then scaled onto the reduced image."""
    if mode in ("random_resized", "random_pad") and rng is None:
        raise ValueError(f"crop mode {mode!r} needs an rng (np.random.Generator)")
    box = None

    def plan(h: int, w: int) -> tuple[int, int]:
        nonlocal box
        if mode == "random_resized":
            box = _random_resized_box(rng, h, w, scale, ratio)
            return math.ceil(hw[0] * h / box[2]), math.ceil(hw[1] * w / box[3])
        if mode == "center":  # the short side fits the output
            f = max(hw[0] / h, hw[1] / w)
            return math.ceil(h * f), math.ceil(w * f)
        return hw  # "resize", "random_pad": the whole image squashed to hw

    img, (h, w) = _decode(image, what, max_pixels, plan)
    if mode not in ("random_resized", "center") or img.shape[:2] == (h, w):
        return resize_crop(img, hw, mode, rng=rng, scale=scale, ratio=ratio, method=method,
                           padding=padding, box=box)
    if method not in _RESAMPLE:
        raise ValueError(f"pp.resize_method must be one of {tuple(_RESAMPLE)}, got {method!r}")
    sy, sx = img.shape[0] / h, img.shape[1] / w
    if mode == "center":  # the region resize_crop takes: the central crop of the resized image
        f = max(hw[0] / h, hw[1] / w)
        rh, rw = max(hw[0], int(round(h * f))), max(hw[1], int(round(w * f)))
        top, left = (rh - hw[0]) // 2, (rw - hw[1]) // 2
        sy, sx = sy * h / rh, sx * w / rw
        top, left, ch, cw = top, left, hw[0], hw[1]
    else:
        top, left, ch, cw = box
    region = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
    out = Image.fromarray(img).resize((hw[1], hw[0]), resample=_RESAMPLE[method], box=region)
    return np.asarray(out, dtype=np.uint8)


def preprocess_image(
    image: Any,
    *,
    image_size: int | Sequence[int],
    crop: str = "resize",
    value_range: Sequence[float] | None = (-1.0, 1.0),
    flip: bool = False,
    rng: np.random.Generator | None = None,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    method: str = "bilinear",
    padding: int = 4,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    fast_decode: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    what: str = "",
) -> np.ndarray:
    """decode -> resize/crop -> optional random horizontal flip -> augment -> normalise.

    Args:
      image: anything ``decode_image`` accepts.
      image_size: output side (int) or (h, w).
      crop: one of ``CROP_MODES`` (see ``resize_crop``).
      value_range: (lo, hi) the pixel range 0-255 is mapped onto; None: return the
        uint8 image (normalise later, e.g. a whole batch at once).
      flip: flip left-right with probability 1/2 (needs ``rng``).
      rng: source of randomness for the random crops, ``flip`` and ``augment``.
      padding: "random_pad": the shift range in pixels.
      augment: optional ``fn(uint8 [h, w, 3], rng) -> uint8 [h, w, 3]`` applied to the
        cropped image (e.g. ``augment.apply_policy`` with RandAugment).
      fast_decode: decode JPEGs (bytes or paths) at 1/2, 1/4 or 1/8 size when the crop
        needs at most that resolution (``pp.fast_decode``). The same region is cropped
        and the same rng draws are made; pixels differ slightly from the full decode.
      max_pixels: images with more pixels are corrupt examples (``pp.max_pixels``).
    Returns:
      float32 [h, w, 3] in ``value_range`` (uint8 when ``value_range`` is None).
    Raises:
      CorruptExampleError: the image cannot be decoded.
    """
    hw = _size_hw(image_size)
    if fast_decode and _is_encoded(image):
        img = _fast_crop(image, hw, crop, rng, scale, ratio, method, padding, max_pixels, what)
    else:
        img = _decode(image, what, max_pixels)[0]
        img = resize_crop(img, hw, crop, rng=rng, scale=scale, ratio=ratio, method=method,
                          padding=padding)
    if flip:
        if rng is None:
            raise ValueError("pp.flip needs an rng (np.random.Generator)")
        if rng.random() < 0.5:
            img = img[:, ::-1]
    if augment is not None:
        img = augment(np.ascontiguousarray(img), rng)
    if value_range is None:
        return np.ascontiguousarray(img)
    return normalize(img, value_range)
