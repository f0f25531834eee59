"""The embedded default dataset: procedurally rendered coloured shapes with captions.

Every example is a pure function of ``(seed, split, index)``, so the source is a
random-access grain data source that can be shuffled, sharded and resumed without
storing anything. An image holds 1-3 objects that share one colour and one kind
(the zero-shot class, e.g. "red triangle"), with a size, a position (for single
objects), and a low-contrast background texture. Captions come from varied
templates and always name the colour and the kind:

    "two small red triangles on a striped background"
    "a large blue ring in the center"

Zero-shot classification over the 8 colours x 6 kinds = 48 classes is the
built-in evaluation (``CLASSNAMES``, ``ZEROSHOT_TEMPLATES``, ``class_prompts``).

Rendering is vectorised numpy over precomputed pixel grids with analytic
signed-distance masks (anti-aliased edges): several thousand 32x32 images per
second on one core.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    # Well separated in hue or brightness; per-image jitter stays far from the
    # neighbours, and every colour contrasts with the grey backgrounds.
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 225, 30),
    "green": (30, 170, 50),
    "cyan": (0, 215, 225),
    "blue": (35, 70, 235),
    "purple": (150, 45, 205),
    "white": (245, 245, 245),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
KIND_PLURALS = {k: (k + "es" if k.endswith("s") else k + "s") for k in KINDS}
SIZES: tuple[str, ...] = ("small", "large")
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "noisy", "gradient")
# 3x3 grid of positions for a single small object: (name, row, col).
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SPLITS = ("train", "heldout")
_COLOUR_NAMES = tuple(COLOURS)

# Zero-shot class c = colour_index * len(KINDS) + kind_index.
CLASSNAMES: tuple[str, ...] = tuple(f"{c} {k}" for c in COLOURS for k in KINDS)
# Prompts in the captions' own style (no trailing period, words the captions use).
ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a {}",
    "{}",
    "there is a {}",
)

_SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
_SINGLE_TEMPLATES = (
    "a {size} {colour} {kind} {pos}",
    "a {colour} {kind} on a {texture} background",
    "a photo of a {colour} {kind}",
    "a {size} {colour} {kind}",
    "{colour} {kind}",
    "there is a {colour} {kind} {pos}",
    "a {colour} {kind} {pos} on a {texture} background",
    "a {size} {kind} in {colour}",
    "one {colour} {kind}",
)
_MULTI_TEMPLATES = (
    "{count} {size} {colour} {kinds} on a {texture} background",
    "{count} {colour} {kinds}",
    "a photo of {count} {colour} {kinds}",
    "{count} {size} {colour} {kinds}",
    "there are {count} {colour} {kinds}",
    "some {colour} {kinds} on a {texture} background",
)
_ARTICLE_RE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")
_SPLIT_IDS = {"train": 0, "heldout": 1}


def fix_articles(text: str) -> str:
    """Returns ``text`` with "a" before a vowel turned into "an" ("a orange" -> "an orange")."""
    return _ARTICLE_RE.sub(lambda m: m.group(1) + "n ", text)


def class_prompts(
    classnames: Sequence[str] = CLASSNAMES,
    templates: Sequence[str] = ZEROSHOT_TEMPLATES,
) -> list[list[str]]:
    """Zero-shot prompts: ``[C][T]`` strings, template t filled with class c.

    Articles are fixed after filling ("a photo of a orange ring." -> "... an orange ring.")
    so the prompts read like the training captions.
    """
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"zero-shot template {t!r} has no '{{}}' placeholder")
    return [[fix_articles(t.format(c)) for t in templates] for c in classnames]


def _check_size(image_size: int) -> int:
    if int(image_size) != image_size or image_size < 16:
        raise ValueError(f"shapes image_size must be an integer >= 16, got {image_size!r}")
    return int(image_size)


@functools.lru_cache(maxsize=8)
def _grids(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), float32 [size, size], in pixels."""
    c = np.arange(size, dtype=np.float32) + 0.5
    return np.broadcast_to(c[:, None], (size, size)).copy(), np.broadcast_to(c[None, :], (size, size)).copy()


def _sdf(kind: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) of shape ``kind`` of radius ``r``."""
    if kind == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if kind == "ring":
        return np.abs(np.sqrt(dx * dx + dy * dy) - 0.7 * r) - 0.3 * r
    ax, ay = np.abs(dx), np.abs(dy)
    if kind == "square":
        return np.maximum(ax, ay) - 0.82 * r
    if kind == "diamond":
        # L1 ball; scaled by 1/sqrt(2) so the value is a Euclidean distance.
        return (ax + ay - 1.15 * r) * np.float32(0.70710678)
    if kind == "cross":
        h = 0.34 * r
        return np.minimum(np.maximum(ax - r, ay - h), np.maximum(ax - h, ay - r))
    if kind == "triangle":
        # Apex at (0, -r), base at y = +0.75 r with half-width 1.0 r (pointing up).
        base, half = 0.75 * r, 1.0 * r
        height = base + r
        norm = float(np.hypot(height, half))
        side = (height * ax - half * (dy + r)) / norm
        return np.maximum(dy - base, side)
    raise ValueError(f"unknown shape kind {kind!r}; known: {KINDS}")


class _Draws:
    """Uniform [0, 1) numbers drawn in one call and handed out one at a time (fast)."""

    def __init__(self, rng: np.random.Generator, n: int = 32):
        self.rng = rng
        self._u = rng.random(n).tolist()
        self._i = 0

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        if self._i == len(self._u):
            self._u.extend(self.rng.random(len(self._u)).tolist())
        u = self._u[self._i]
        self._i += 1
        return lo + (hi - lo) * u

    def integer(self, n: int) -> int:
        return min(int(self.uniform() * n), n - 1)


def _background(d: _Draws, size: int, texture: str) -> np.ndarray:
    """Low-contrast textured grey background, float32 [size, size, 3] in [0, 255]."""
    yy, xx = _grids(size)
    grey = d.uniform(55.0, 125.0)
    base = np.array([grey + d.uniform(-6, 6), grey + d.uniform(-6, 6), grey + d.uniform(-6, 6)],
                    np.float32)
    amp = d.uniform(6.0, 12.0)
    scale = size / 32.0
    if texture == "plain":
        pattern = None
    elif texture == "striped":
        theta = d.integer(4) * 0.25 * np.pi
        period = d.uniform(4.0, 7.0) * scale
        k = 2 * np.pi / period
        u = xx * np.float32(np.cos(theta) * k) + yy * np.float32(np.sin(theta) * k)
        pattern = np.where(np.sin(u + np.float32(d.uniform(0, 2 * np.pi))) > 0, amp, -amp)
    elif texture == "checkered":
        period = d.uniform(3.0, 6.0) * scale
        k = np.float32(np.pi / period)
        s = np.sin((xx + np.float32(d.uniform(0, period))) * k) * np.sin(
            (yy + np.float32(d.uniform(0, period))) * k)
        pattern = np.where(s > 0, amp, -amp)
    elif texture == "dotted":
        period = d.uniform(4.0, 6.0) * scale
        half = np.float32(period / 2)
        fy = (yy + np.float32(d.uniform(0, period))) % np.float32(period) - half
        fx = (xx + np.float32(d.uniform(0, period))) % np.float32(period) - half
        pattern = np.where(fx * fx + fy * fy < (0.9 * scale) ** 2 + 0.5, 1.6 * amp, 0.0)
    elif texture == "noisy":
        pattern = d.rng.standard_normal((size, size), dtype=np.float32) * np.float32(0.8 * amp)
    elif texture == "gradient":
        theta = d.uniform(0, 2 * np.pi)
        k = 2.0 * amp / size
        pattern = (xx - size / 2) * np.float32(np.cos(theta) * k) + (yy - size / 2) * np.float32(
            np.sin(theta) * k)
    else:
        raise ValueError(f"unknown texture {texture!r}; known: {TEXTURES}")
    if pattern is None:
        return np.broadcast_to(base, (size, size, 3))
    return pattern.astype(np.float32)[..., None] + base


def _layout(d: _Draws, size: int, count: int, size_name: str):
    """Object centres ``[(cy, cx)]`` and radii in pixels, and the position name."""
    s = float(size)
    if count == 1 and size_name == "large":
        r = d.uniform(0.27, 0.32) * s
        cy, cx = (0.5 + d.uniform(-0.05, 0.05)) * s, (0.5 + d.uniform(-0.05, 0.05)) * s
        return [(cy, cx)], [r], "center"
    if count == 1:
        p = d.integer(len(POSITIONS))
        row, col = divmod(p, 3)
        r = d.uniform(0.15, 0.19) * s
        cy = (0.25 + 0.25 * row + d.uniform(-0.035, 0.035)) * s
        cx = (0.25 + 0.25 * col + d.uniform(-0.035, 0.035)) * s
        return [(cy, cx)], [r], POSITIONS[p]
    # Several small objects in distinct quadrants, so they never overlap.
    quadrants = [0, 1, 2, 3]
    centres, radii = [], []
    for _ in range(count):
        q = quadrants.pop(d.integer(len(quadrants)))
        row, col = divmod(q, 2)
        centres.append(((0.27 + 0.46 * row + d.uniform(-0.03, 0.03)) * s,
                        (0.27 + 0.46 * col + d.uniform(-0.03, 0.03)) * s))
        radii.append(d.uniform(0.14, 0.17) * s)
    return centres, radii, ""


def _caption(d: _Draws, colour: str, kind: str, size_name: str,
             count: int, position: str, texture: str) -> str:
    words = dict(
        colour=colour, kind=kind, kinds=KIND_PLURALS[kind], texture=texture,
        size=_SIZE_WORDS[size_name][d.integer(3)],
        count=COUNT_WORDS[count],
        pos=POSITION_PHRASES.get(position, ""),
    )
    templates = _SINGLE_TEMPLATES if count == 1 else _MULTI_TEMPLATES
    return fix_articles(templates[d.integer(len(templates))].format(**words))


def render_example(seed: int, split: str, index: int, image_size: int = 32) -> dict[str, Any]:
    """Renders one example, a pure function of its arguments.

    Args:
      seed: base seed of the dataset (non-negative int).
      split: "train" or "heldout"; the splits draw from disjoint random streams.
      index: non-negative example index.
      image_size: side of the square image in pixels (>= 16).

    Returns:
      dict(image=uint8 [S, S, 3], text=str caption, label=int in [0, 48)
      (``CLASSNAMES[label]`` is "<colour> <kind>"), colour=str, kind=str,
      size=str ("small"|"large"), count=int (1-3), position=str (one of
      ``POSITIONS``, or "" when count > 1), texture=str (one of ``TEXTURES``)).
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"shapes split must be one of {SPLITS}, got {split!r}")
    size = _check_size(image_size)
    d = _Draws(np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)]))
    colour_i = d.integer(len(COLOURS))
    kind_i = d.integer(len(KINDS))
    colour, kind = _COLOUR_NAMES[colour_i], KINDS[kind_i]
    u = d.uniform()
    count = 1 if u < 0.5 else (2 if u < 0.8 else 3)
    size_name = SIZES[d.integer(2)] if count == 1 else "small"
    texture = TEXTURES[d.integer(len(TEXTURES))]
    rgb = np.array([min(255.0, max(0.0, v + d.uniform(-12, 12))) for v in COLOURS[colour]], np.float32)

    img = _background(d, size, texture)
    centres, radii, position = _layout(d, size, count, size_name)
    yy, xx = _grids(size)
    alpha = None
    for (cy, cx), r in zip(centres, radii):
        a = np.float32(0.5) - _sdf(kind, yy - np.float32(cy), xx - np.float32(cx), float(r))
        alpha = a if alpha is None else np.maximum(alpha, a)
    alpha = np.minimum(np.maximum(alpha, np.float32(0.0)), np.float32(1.0))[..., None]
    img = img + (rgb - img) * alpha + np.float32(0.5)
    image = np.minimum(np.maximum(img, np.float32(0.0)), np.float32(255.0)).astype(np.uint8)

    text = _caption(d, colour, kind, size_name, count, position, texture)
    return dict(
        image=image, text=text, label=colour_i * len(KINDS) + kind_i,
        colour=colour, kind=kind, size=size_name, count=count,
        position=position, texture=texture,
    )


class ShapesSource:
    """Random-access source of procedural shape images (a grain RandomAccessDataSource).

    Args:
      split: "train" or "heldout" (disjoint random streams).
      num_examples: virtual length; defaults to 100,000,000 for "train", 5,000 for "heldout".
      image_size: rendered side in pixels (default 32).
      seed: base seed; the same (seed, split, index) always gives the same example.

    ``source[i]`` returns the dict described in ``render_example``.
    ``classnames`` and ``templates`` give the zero-shot task.
    """

    classnames: tuple[str, ...] = CLASSNAMES
    templates: tuple[str, ...] = ZEROSHOT_TEMPLATES

    def __init__(self, split: str = "train", num_examples: int | None = None,
                 image_size: int = 32, seed: int = 0):
        if split not in _SPLIT_IDS:
            raise ValueError(f"shapes split must be one of {SPLITS}, got {split!r}")
        if num_examples is None:
            num_examples = 100_000_000 if split == "train" else 5_000
        if int(num_examples) <= 0:
            raise ValueError(f"shapes num_examples must be positive, got {num_examples!r}")
        if int(seed) < 0:
            raise ValueError(f"shapes seed must be non-negative, got {seed!r}")
        self.split = split
        self.image_size = _check_size(image_size)
        self.seed = int(seed)
        self._len = int(num_examples)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"shapes[{self.split}] index {index} out of range [0, {self._len})")
        return render_example(self.seed, self.split, index, self.image_size)

    def __repr__(self) -> str:
        return (f"ShapesSource(split={self.split!r}, num_examples={self._len}, "
                f"image_size={self.image_size}, seed={self.seed})")
