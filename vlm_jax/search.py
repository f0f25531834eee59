r"""Image search over a folder: an embedding index on disk, queried by text or by image.

    python -m vlm_jax.search index --workdir /tmp/shapes --images ~/pictures --index /tmp/pics.idx
    python -m vlm_jax.search query --index /tmp/pics.idx --text "a red circle" -k 5
    python -m vlm_jax.search query --index /tmp/pics.idx --image query.jpg --json --sheet top.png
    python -m vlm_jax.search query --index /tmp/pics.idx --text "a red circle" --backend ann

One image through ``index``: FOLDER is walked recursively (sorted; hidden files
skipped; the extensions of ``data.sources.IMAGE_EXTENSIONS``); a file is decoded
by Pillow, shrunk while decoding when a side exceeds ``MAX_SIDE`` (the model sees
far fewer pixels anyway), embedded by ``inference.encode_images`` in batches of
``--batch_size`` and L2-normalised. Every ``--shard_size`` images the embeddings
are written as one shard and the manifest is rewritten to list it, each file
under a temporary name and then renamed. An interrupted run (Ctrl-C flushes the
images encoded so far; a kill loses at most one shard) is resumed by rerunning
the same command, and a rerun after new files arrive encodes only those: a path
already in the index is never encoded again (so a file edited in place keeps its
old embedding, and a deleted one stays findable: build a fresh index after such
changes). Unreadable files are reported on stderr and skipped (and tried again on
the next run).

INDEX is a directory:

  manifest.json     {"format": 1, "workdir": abs path, "step": int, "dim": D,
                     "shards": [{"name": "00000", "count": n}, ...]}
  emb_00000.npy     float32 [n, D] unit-norm image embeddings of shard 00000
  paths_00000.json  its n image paths (absolute), a JSON list
  ann.usearch       (``--backend ann``) the usearch HNSW graph over all rows, key =
  ann.json          row number; {"count": rows it holds}; extended when rows are added

``query`` loads the model of the manifest's workdir/step, embeds the text (the run's
tokenizer) or the image (read as ``index`` reads files, so an indexed image finds
itself with score 1) and returns the k best rows by cosine similarity:
``--backend exact`` (default) multiplies all N x D float32 embeddings by the query;
``--backend ann`` asks the usearch graph (optional: ``pip install 'vlm_jax[search]'``)
for k candidates and rescores them exactly, so the scores of both backends are
cosines in [-1, 1] and agree wherever they return the same path.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from vlm_jax import inference, logs, predict
from vlm_jax.data.preprocess import CorruptExampleError
from vlm_jax.data.sources import IMAGE_EXTENSIONS

__all__ = ["build_index", "query", "load_embeddings", "list_images", "exact_topk", "AnnIndex",
           "contact_sheet", "cli"]

FORMAT = 1
MAX_SIDE = 1024  # images are shrunk to this side while decoding (indexing and --image queries)
MANIFEST = "manifest.json"

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "index: the training run whose model embeds the images "
                    "(default when resuming: the index's).", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "index: checkpoint step (default: the latest; when "
                     "resuming: the index's).", flag_values=FLAGS)
flags.DEFINE_string("images", None, "index: folder of images, read recursively.",
                    flag_values=FLAGS)
flags.DEFINE_string("index", None, "The index directory.", flag_values=FLAGS)
flags.DEFINE_string("text", None, "query: find images matching this text.", flag_values=FLAGS)
flags.DEFINE_string("image", None, "query: find images similar to this image file.",
                    flag_values=FLAGS)
flags.DEFINE_integer("k", 10, "query: how many results.", flag_values=FLAGS)
flags.DEFINE_bool("json", False, "query: print [{\"path\": ..., \"score\": ...}] best first.",
                  flag_values=FLAGS)
flags.DEFINE_string("sheet", None, "query: write a contact sheet PNG of the results here.",
                    flag_values=FLAGS)
flags.DEFINE_enum("backend", "exact", ["exact", "ann"], "exact: brute-force cosine; ann: "
                  "usearch HNSW (built/extended on demand; needs vlm_jax[search]).",
                  flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "index: images per forward pass.", flag_values=FLAGS)
flags.DEFINE_integer("shard_size", 1024, "index: images per shard (the unit of resumption).",
                     flag_values=FLAGS)
flags.DEFINE_integer("num_threads", 4, "index: image decoding threads.", flag_values=FLAGS)

_INDEX_ONLY = ("workdir", "step", "images", "batch_size", "shard_size", "num_threads")
_QUERY_ONLY = ("text", "image", "k", "json", "sheet")


# ------------------------------------------------------------ the index ---

def _write_atomic(path: str, write) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def read_manifest(index: str) -> dict | None:
  """The manifest of index directory ``index``, or None when there is none yet."""
  path = os.path.join(index, MANIFEST)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: unknown index format {manifest.get('format')!r}; "
                     f"this vlm_jax reads format {FORMAT}")
  return manifest


def load_embeddings(index: str) -> tuple[np.ndarray, list[str], dict]:
  """(embeddings float32 [N, D] unit-norm, N paths, manifest) of an index directory."""
  manifest = read_manifest(index)
  if manifest is None:
    raise FileNotFoundError(f"--index {index}: no {MANIFEST}; build it with "
                            "python -m vlm_jax.search index --workdir DIR --images FOLDER "
                            f"--index {index}")
  embs, paths = [], []
  for shard in manifest["shards"]:
    emb = np.load(os.path.join(index, f"emb_{shard['name']}.npy"))
    with open(os.path.join(index, f"paths_{shard['name']}.json")) as f:
      names = json.load(f)
    if len(emb) != shard["count"] or len(names) != shard["count"]:
      raise ValueError(f"--index {index}: shard {shard['name']} holds {len(emb)} embeddings and "
                       f"{len(names)} paths, the manifest says {shard['count']}")
    embs.append(emb)
    paths.extend(names)
  dim = int(manifest["dim"] or 0)
  emb = np.concatenate(embs) if embs else np.zeros((0, dim), np.float32)
  return emb.astype(np.float32, copy=False), paths, manifest


def list_images(folder: str) -> list[str]:
  """Absolute paths of the image files under ``folder`` (recursive, sorted, no hidden)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--images {folder!r} is not a directory")
  out = []
  for root, dirs, files in os.walk(os.path.abspath(folder)):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    out.extend(os.path.join(root, f) for f in sorted(files)
               if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
  return out


class _Progress:
  """One self-overwriting stderr line: done/total, rate, unreadable count."""

  def __init__(self, total: int, stream=None):
    self.total, self.stream, self.t0 = total, stream or sys.stderr, time.time()

  def update(self, done: int, bad: int) -> None:
    rate = done / max(time.time() - self.t0, 1e-9)
    self.stream.write(f"\rindexed {done}/{self.total} images ({rate:.1f}/s), "
                      f"{bad} unreadable")
    self.stream.flush()

  def close(self) -> None:
    self.stream.write("\n")
    self.stream.flush()


def _read_or_error(path: str):
  try:
    return predict.read_image(path, max_side=MAX_SIDE)
  except CorruptExampleError as e:
    return e


def build_index(index: str, images: str, workdir: str | None = None, step: int | None = None,
                *, batch_size: int = 64, shard_size: int = 1024, num_threads: int = 4,
                backend: str = "exact", err=None) -> dict:
  """``search index``: adds the not yet indexed images under ``images`` to ``index``.

  Args:
    index: the index directory (created if missing).
    images: a folder of images, read recursively.
    workdir, step: the run whose model embeds the images; required for a new index,
      and must match (or be left out) when adding to an existing one.
    batch_size: images per forward pass; shard_size: images per written shard.
    num_threads: decoding threads.
    backend: "ann" also builds/extends the usearch graph.
  Returns:
    {"added": int, "skipped": [messages of unreadable files], "total": rows in the index}.
  """
  err = err or sys.stderr
  manifest = read_manifest(index)
  if manifest is not None:
    if workdir and os.path.abspath(workdir) != manifest["workdir"]:
      raise ValueError(f"--workdir {workdir} differs from the workdir {manifest['workdir']} "
                       f"that built --index {index}; embeddings of different models do not mix")
    if step is not None and step != manifest["step"]:
      raise ValueError(f"--step {step} differs from the step {manifest['step']} that built "
                       f"--index {index}")
    workdir, step = manifest["workdir"], manifest["step"]
  elif not workdir:
    raise app.UsageError("--workdir is required to build a new index")
  if batch_size < 1 or shard_size < 1:
    raise ValueError(f"--batch_size ({batch_size}) and --shard_size ({shard_size}) must be >= 1")
  files = list_images(images)
  done = set()
  if manifest is not None:
    done = set(load_embeddings(index)[1])
  todo = [p for p in files if p not in done]
  print(f"{len(files)} images under {images}: {len(files) - len(todo)} already indexed, "
        f"{len(todo)} to index", file=err)
  skipped: list[str] = []
  added = 0
  if todo:
    ckpt, _, _ = predict.load_model(workdir, step)
    if manifest is None:
      os.makedirs(index, exist_ok=True)
      manifest = {"format": FORMAT, "workdir": os.path.abspath(workdir), "step": ckpt.step,
                  "dim": None, "shards": []}
    value_range = tuple(ckpt.config.pp.get("value_range", (-1.0, 1.0)))
    pending_emb, pending_paths = [], []

    def flush():
      if not pending_paths:
        return
      emb = np.concatenate(pending_emb).astype(np.float32)
      name = f"{len(manifest['shards']):05d}"
      _write_atomic(os.path.join(index, f"emb_{name}.npy"), lambda f: np.save(f, emb))
      names = json.dumps(pending_paths).encode()
      _write_atomic(os.path.join(index, f"paths_{name}.json"), lambda f: f.write(names))
      manifest["shards"].append({"name": name, "count": len(pending_paths)})
      manifest["dim"] = int(emb.shape[1])
      text = json.dumps(manifest, indent=1).encode()
      _write_atomic(os.path.join(index, MANIFEST), lambda f: f.write(text))
      pending_emb.clear()
      pending_paths.clear()

    progress = _Progress(len(todo), err)
    try:
      with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        for start in range(0, len(todo), batch_size):
          batch = todo[start:start + batch_size]
          arrays, ok = [], []
          for path, im in zip(batch, pool.map(_read_or_error, batch)):
            if isinstance(im, CorruptExampleError):
              skipped.append(str(im))
              err.write(f"\rskipping unreadable {path}: {im}\n")
            else:
              arrays.append(im)
              ok.append(path)
          if arrays:
            pending_emb.append(inference.encode_images(
                ckpt.model, ckpt.variables, arrays, batch_size=batch_size,
                value_range=value_range, normalize=True))
            pending_paths.extend(ok)
            added += len(ok)
          if len(pending_paths) >= shard_size:
            flush()
          progress.update(start + len(batch), len(skipped))
    except KeyboardInterrupt:
      flush()
      progress.close()
      print(f"interrupted: {added} images added to {index}; rerun the same command to "
            "index the rest", file=err)
      raise
    flush()
    progress.close()
  total = sum(s["count"] for s in manifest["shards"]) if manifest else 0
  if skipped:
    print(f"skipped {len(skipped)} unreadable files", file=err)
  if backend == "ann" and total:
    AnnIndex.open(index, *load_embeddings(index)[:1])
  return {"added": added, "skipped": skipped, "total": total}


# -------------------------------------------------------------- searching ---

def exact_topk(emb: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Brute-force cosine top-k: ``emb`` float32 [N, D] and ``q`` [D] unit-norm ->
  (rows int64 [k'], scores float32 [k']), best first, k' = min(k, N); ties by row."""
  scores = emb @ np.asarray(q, np.float32)                   # [N]
  k = min(int(k), len(scores))
  if k <= 0:
    return np.zeros(0, np.int64), np.zeros(0, np.float32)
  top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
  order = np.lexsort((top, -scores[top]))
  return top[order].astype(np.int64), scores[top[order]]


def _usearch_index_class():
  try:
    from usearch.index import Index  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("--backend ann needs the usearch package: pip install "
                      "'vlm_jax[search]' (or pip install usearch)") from e
  return Index


class AnnIndex:
  """Approximate nearest neighbours (usearch HNSW, inner product on unit vectors,
  vectors stored as float16) over the rows of an embedding matrix; key = row number.

    ann = AnnIndex.build(emb)            # emb float32 [N, D] unit-norm
    rows = ann.search(q, k)              # int64 [k'] candidate rows, best first
  """

  def __init__(self, index, count: int):
    self.index, self.count = index, count

  @classmethod
  def build(cls, emb: np.ndarray, *, threads: int = 0) -> "AnnIndex":
    """A new graph over all rows of ``emb`` [N, D]."""
    index = _usearch_index_class()(ndim=int(emb.shape[1]), metric="ip", dtype="f16")
    ann = cls(index, 0)
    ann.add(emb, threads=threads)
    return ann

  def add(self, emb: np.ndarray, *, threads: int = 0) -> None:
    """Adds rows ``self.count:`` of ``emb`` [N, D] (the rows not yet in the graph)."""
    new = np.ascontiguousarray(emb[self.count:], np.float32)
    if len(new):
      self.index.add(np.arange(self.count, self.count + len(new), dtype=np.uint64), new,
                     threads=threads)
    self.count = len(emb)

  def search(self, q: np.ndarray, k: int) -> np.ndarray:
    """Rows int64 [k'] of the (approximate) k nearest to ``q`` [D], best first."""
    if self.count == 0:
      return np.zeros(0, np.int64)
    matches = self.index.search(np.asarray(q, np.float32), min(int(k), self.count))
    return np.asarray(matches.keys, np.int64).reshape(-1)

  @classmethod
  def open(cls, index_dir: str, emb: np.ndarray) -> "AnnIndex":
    """The graph saved in ``index_dir`` (built, or extended with the rows added since,
    and saved back when it is missing or behind ``emb``)."""
    Index = _usearch_index_class()
    path, meta = os.path.join(index_dir, "ann.usearch"), os.path.join(index_dir, "ann.json")
    ann = None
    if os.path.isfile(path) and os.path.isfile(meta):
      with open(meta) as f:
        count = int(json.load(f)["count"])
      if count <= len(emb):
        ann = cls(Index.restore(path), count)
    if ann is not None and ann.count == len(emb):
      return ann
    if ann is None:
      ann = cls.build(emb)
    else:
      ann.add(emb)
    ann.index.save(path + ".tmp")
    os.replace(path + ".tmp", path)
    text = json.dumps({"count": ann.count}).encode()
    _write_atomic(meta, lambda f: f.write(text))
    return ann


def query(index: str, *, text: str | None = None, image: str | None = None, k: int = 10,
          backend: str = "exact") -> list[dict]:
  """``search query``: the k indexed images most similar to ``text`` or ``image``.

  Returns [{"path": str, "score": cosine float}] best first (at most k).
  """
  if (text is None) == (image is None):
    raise app.UsageError("query takes exactly one of --text or --image")
  if k < 1:
    raise ValueError(f"-k must be >= 1, got {k}")
  emb, paths, manifest = load_embeddings(index)
  ckpt, tokenizer, _ = predict.load_model(manifest["workdir"], manifest["step"])
  if text is not None:
    q = inference.encode_texts(ckpt.model, ckpt.variables, [text], tokenizer=tokenizer,
                               normalize=True)[0]
  else:
    try:
      arr = predict.read_image(image, max_side=MAX_SIDE)
    except CorruptExampleError as e:
      raise ValueError(f"--image: {e}") from e
    q = inference.encode_images(ckpt.model, ckpt.variables, [arr], normalize=True,
                                value_range=tuple(ckpt.config.pp.get("value_range",
                                                                     (-1.0, 1.0))))[0]
  if backend == "ann":
    rows = AnnIndex.open(index, emb).search(q, k)
    scores = emb[rows] @ q
    order = np.lexsort((rows, -scores))
    rows, scores = rows[order], scores[order]
  elif backend == "exact":
    rows, scores = exact_topk(emb, q, k)
  else:
    raise ValueError(f"--backend must be 'exact' or 'ann', got {backend!r}")
  return [{"path": paths[int(r)], "score": float(s)} for r, s in zip(rows, scores)]


def contact_sheet(results: Sequence[dict], out: str, *, cell: int = 160, cols: int = 5) -> None:
  """Writes a PNG grid of the results' images, each captioned "rank. score"
  (unreadable ones drawn as a grey cell). Each image is scaled to fit a
  ``cell`` x ``cell`` square, keeping its aspect: large ones shrink (bilinear),
  small ones grow (nearest, so a 32-pixel image shows its pixels)."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  n = max(len(results), 1)
  cols = min(cols, n)
  rows = -(-n // cols)
  pad, caption = 4, 14
  sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + caption + pad) + pad),
                    "white")
  draw = ImageDraw.Draw(sheet)
  for i, r in enumerate(results):
    x = pad + (i % cols) * (cell + pad)
    y = pad + (i // cols) * (cell + caption + pad)
    try:
      thumb = Image.fromarray(predict.read_image(r["path"], max_side=4 * cell))
      f = cell / max(thumb.size)
      size = (max(1, round(thumb.width * f)), max(1, round(thumb.height * f)))
      thumb = thumb.resize(size, Image.Resampling.NEAREST if f > 1 else
                           Image.Resampling.BILINEAR)
      sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
    except CorruptExampleError:
      draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(200, 200, 200))
    draw.text((x, y + cell + 1), f"{i + 1}. {r['score']:.3f}", fill="black")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  sheet.save(out, format="PNG")


# ---------------------------------------------------------------- the CLI ---

def _run_flags(argv):
  if len(argv) < 2 or argv[1] not in ("index", "query"):
    raise app.UsageError("usage: python -m vlm_jax.search index|query ... (see --help)")
  if len(argv) > 2:
    raise app.UsageError(f"Unexpected arguments: {argv[2:]}")
  command = argv[1]
  wrong = _QUERY_ONLY if command == "index" else _INDEX_ONLY
  given = [f"--{name}" for name in wrong if FLAGS[name].present]
  if given:
    raise app.UsageError(f"{' '.join(given)} do(es) not apply to 'search {command}'")
  if not FLAGS.index:
    raise app.UsageError("--index is required")
  if command == "index":
    if not FLAGS.images:
      raise app.UsageError("--images FOLDER is required")
    return build_index(FLAGS.index, FLAGS.images, FLAGS.workdir, FLAGS.step,
                       batch_size=FLAGS.batch_size, shard_size=FLAGS.shard_size,
                       num_threads=FLAGS.num_threads, backend=FLAGS.backend)
  results = query(FLAGS.index, text=FLAGS.text, image=FLAGS.image, k=FLAGS.k,
                  backend=FLAGS.backend)
  if FLAGS.json:
    print(json.dumps(results, indent=1))
  else:
    for i, r in enumerate(results):
      print(f"{i + 1:4d}  {r['score']:.4f}  {r['path']}")
  if FLAGS.sheet:
    contact_sheet(results, FLAGS.sheet)
    print(f"contact sheet -> {FLAGS.sheet}", file=sys.stderr)
  return results


def _parse(argv: Sequence[str]) -> list[str]:
  return predict.parse_argv(FLAGS, argv, __doc__)


def cli(argv: Sequence[str]):
  """Runs the command line ``argv`` (``argv[0]`` the program name) in-process; flags
  not given take their defaults. Returns ``build_index``'s dict or ``query``'s list."""
  FLAGS.unparse_flags()
  return _run_flags(_parse(argv))


def main(argv):
  logs.quiet_libraries()
  try:
    _run_flags(argv)
  except KeyboardInterrupt:
    sys.exit(130)


if __name__ == "__main__":
  app.run(main, flags_parser=predict.absl_flags_parser(_parse))
