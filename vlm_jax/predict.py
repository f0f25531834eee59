r"""Zero-shot classification of image files with a trained two-tower model.

    python -m vlm_jax.predict --workdir /tmp/shapes --labels "red circle,blue square" a.png b.jpg
    python -m vlm_jax.predict --workdir /tmp/shapes --labels "a cat,a dog" --json *.jpg
    python -m vlm_jax.predict --workdir DIR --labels "cat,dog" --templates "a photo of a {}." \
        --templates "a drawing of a {}." --step 800 IMAGE ...

One image through it: the file is decoded with Pillow (any size or format;
grayscale, palette and RGBA become RGB, alpha composited on white), embedded by
``inference.encode_images`` (resized as the run's image tower needs) and
L2-normalised to ``zimg`` [D]. Each label k has a text embedding ``zcls[k]``:
the mean over its prompts of their unit text embeddings, renormalised (as the
zero-shot evaluator's ``class_embeddings``). The scores are

    probs[k] = softmax_k(t * <zimg, zcls[k]>)          t = exp(params["t"])

a softmax over the labels given, using the model's learned temperature, so each
image's scores sum to 1 and are comparable across labels, whichever loss
(sigmoid or softmax) trained the model. The logit bias of SigLIP cancels in the
softmax; SigLIP's own per-pair sigmoid(t * cos + b) would score each label on
its own (they need not sum to 1, and are often all near 0 for a small model),
so it is not what is reported. The argmax is the label of highest cosine.

Prompts: by default the templates the zero-shot evaluator uses for this run
(``config.evals.zeroshot.templates``, else the training source's: the shapes
templates, a class folder's caption template, else "a photo of a {}.");
``--templates`` (repeatable, each with one "{}") replaces them. A label is
filled into every template after dropping a leading "a "/"an " (the templates
bring their own article, fixed to "a"/"an" afterwards): "a cat" and "cat" give
the same prompts. A label that is already a sentence, i.e. ends in ".", "!" or
"?", is used verbatim as its only prompt ("a blurry photo of my cat.").

Prompt embeddings are cached in ``WORKDIR/cache/prompts_<hash>.npz`` (or
``--cache_dir``), keyed by the checkpoint (workdir, step and its files' mtime),
the tokenizer config and the exact prompt list, so a rerun with the same
labels encodes no text. A cache that cannot be written is only a warning.

Output: a table (image, best label, its probability, the runners-up), or with
``--json`` one JSON list ``[{"image": path, "label": best, "scores": {label:
prob, ...}}]`` in input order. Unreadable files are reported on stderr and
left out; the exit status is then 1.

``--explain DIR`` also writes ``DIR/<image name>.explain.png`` per image: the
image overlaid with ``vlm_jax.explain.similarity_map`` between its patches and
the predicted label's (template-averaged) embedding; the row gains
``"explanation": path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
from absl import app, flags

from vlm_jax import cpu_runtime, inference, logs
from vlm_jax.data import shapes, sources
from vlm_jax.data.preprocess import CorruptExampleError, decode_image
from vlm_jax.numeric import normalize

__all__ = ["zero_shot", "label_embeddings", "label_prompts", "default_templates", "read_image",
           "load_model", "run", "cli"]

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "Training run directory (its checkpoint and config).",
                    flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
flags.DEFINE_list("labels", None, "Comma-separated class labels, e.g. \"a cat,a dog\".",
                  flag_values=FLAGS)
flags.DEFINE_multi_string("templates", None, "Prompt template with one '{}' (repeat the flag "
                          "for several; default: the run's zero-shot templates).",
                          flag_values=FLAGS)
flags.DEFINE_bool("json", False, "Print one JSON list instead of a table.", flag_values=FLAGS)
flags.DEFINE_string("cache_dir", None, "Where prompt embeddings are cached (default "
                    "WORKDIR/cache).", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "Images per forward pass.", flag_values=FLAGS)
flags.DEFINE_string("explain", None, "Folder for one PNG per image: where the model sees its "
                    "predicted label (vlm_jax.explain: patch-to-label similarity), overlaid on "
                    "the image.", flag_values=FLAGS)

_SENTENCE_END = (".", "!", "?")


# ---------------------------------------------------------------- prompts ---

def default_templates(config) -> list[str]:
  """The zero-shot evaluator's templates for a run's ``config``, without building its
  data source: ``evals.zeroshot.templates``, else the source's own."""
  zs = (config.get("evals") or {}).get("zeroshot") or {}
  if zs.get("templates"):
    return list(zs["templates"])
  data = config.get("data") or {}
  if data.get("source") == "shapes":
    return list(shapes.ZEROSHOT_TEMPLATES)
  folder = data.get("folder") or {}
  if (data.get("source") == "folder" and folder.get("path")
      and not (folder.get("captions") and os.path.isfile(
          os.path.join(folder["path"], folder["captions"])))
      and sources.is_class_folder(folder["path"])):
    return [folder.get("caption_template") or sources.DEFAULT_TEMPLATES[0]]
  return list(sources.DEFAULT_TEMPLATES)


def label_prompts(labels: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
  """[K][*] prompts per label: a label ending in ".", "!" or "?" is its own single
  prompt; any other is filled into every template (a leading "a "/"an " dropped,
  articles fixed afterwards: "a orange ring" -> "an orange ring").

  Raises ValueError for no labels, an empty label or a template without "{}".
  """
  if isinstance(labels, str):
    raise ValueError("labels must be a list of strings, got one string")
  if not labels:
    raise ValueError("--labels: no labels given")
  for t in templates:
    if "{}" not in t:
      raise ValueError(f"--templates: template {t!r} has no '{{}}' placeholder")
  if not templates:
    raise ValueError("--templates: no templates given")
  out = []
  for label in labels:
    text = " ".join(str(label).split())
    if not text:
      raise ValueError(f"--labels: empty label in {list(labels)!r}")
    if text.endswith(_SENTENCE_END):
      out.append([text])
      continue
    words = text.split(" ", 1)
    if len(words) == 2 and words[0].lower() in ("a", "an"):
      text = words[1]
    out.append([shapes.fix_articles(t.format(text)) for t in templates])
  return out


def _cache_path(cache_dir: str, model_id: str, tokenizer, prompts) -> str:
  key = json.dumps({"model": model_id, "tokenizer": repr(_tokenizer_id(tokenizer)),
                    "prompts": prompts}, sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  return os.path.join(cache_dir, f"prompts_{digest}.npz")


def _tokenizer_id(tokenizer) -> Any:
  if tokenizer is None:
    return None
  return (type(tokenizer).__name__, getattr(tokenizer, "max_len", None),
          getattr(tokenizer, "vocab_size", None), getattr(tokenizer, "model_path", None))


def params_fingerprint(variables) -> str:
  """A hash of the text tower's and temperature's values (what prompt embeddings
  depend on); for ``label_embeddings`` callers without a checkpoint identity."""
  import jax  # pylint: disable=import-outside-toplevel
  params = variables["params"]
  h = hashlib.sha256()
  for name in ("txt", "t"):
    for path, leaf in jax.tree_util.tree_leaves_with_path(params.get(name, {})):
      arr = np.asarray(leaf)
      h.update(f"{name}{jax.tree_util.keystr(path)}{arr.shape}{arr.dtype}".encode())
      h.update(arr.tobytes())
  return h.hexdigest()


def label_embeddings(model, variables, labels: Sequence[str],
                     templates: Sequence[str] | None = None, *, tokenizer=None,
                     cache_dir: str | None = None, model_id: str | None = None) -> np.ndarray:
  """float32 [K, D] unit-norm label embeddings: per label, the mean of its prompts'
  unit text embeddings (``label_prompts``), renormalised.

  Args:
    model, variables: a two-tower model and {"params": ...}.
    labels: K class labels; templates: prompt templates (default "a photo of a {}.").
    tokenizer: the run's tokenizer (default: ``encode_texts``'s byte tokenizer).
    cache_dir: when set, the result is read from / written to
      ``cache_dir/prompts_<hash>.npz``, the hash over ``model_id``, the tokenizer
      and the prompts; model_id defaults to ``params_fingerprint(variables)``.
  """
  templates = list(sources.DEFAULT_TEMPLATES if templates is None else templates)
  prompts = label_prompts(labels, templates)
  path = None
  if cache_dir:
    path = _cache_path(cache_dir, model_id or params_fingerprint(variables), tokenizer, prompts)
    cached = _read_cache(path, prompts)
    if cached is not None:
      return cached
  flat = [p for row in prompts for p in row]
  z = normalize(inference.encode_texts(model, variables, flat, tokenizer=tokenizer))
  rows, start = [], 0
  for row in prompts:
    rows.append(z[start:start + len(row)].mean(axis=0))
    start += len(row)
  out = normalize(np.stack(rows))
  if path:
    _write_cache(path, out, prompts)
  return out


def _read_cache(path: str, prompts) -> np.ndarray | None:
  if not os.path.isfile(path):
    return None
  try:
    with np.load(path) as f:
      if json.loads(str(f["prompts"])) != prompts:
        return None
      return np.asarray(f["embeddings"], np.float32)
  except (OSError, ValueError, KeyError) as e:
    warnings.warn(f"ignoring unreadable prompt cache {path}: {e}")
    return None


def _write_cache(path: str, emb: np.ndarray, prompts) -> None:
  tmp = f"{path}.tmp{os.getpid()}.npz"
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(tmp, embeddings=emb, prompts=np.asarray(json.dumps(prompts)))
    os.replace(tmp, path)
  except OSError as e:
    warnings.warn(f"could not write the prompt cache {path}: {e}")


# ----------------------------------------------------------------- images ---

def read_image(path: str, max_side: int | None = None) -> np.ndarray:
  """An image file -> uint8 [H, W, 3] RGB (Pillow; grayscale/palette/RGBA converted,
  alpha on white). ``max_side``: shrink larger images (aspect kept) while decoding.

  Raises CorruptExampleError naming the file when it cannot be read or decoded.
  """
  if not os.path.isfile(path):
    raise CorruptExampleError(f"image file {path} does not exist")
  if max_side is None:
    return decode_image(path, what=path)
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    img = Image.open(path)
    if max(img.size) > max_side:
      img.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale
      img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
  except (OSError, ValueError, SyntaxError) as e:
    raise CorruptExampleError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from e
  return decode_image(img, what=path)


def _temperature(variables) -> float:
  params = variables["params"]
  if "t" not in params:
    raise ValueError("zero-shot needs a two-tower (image-text) model with a temperature "
                     f"params['t']; this model's params are {sorted(params)}")
  return float(np.exp(np.asarray(params["t"]).reshape(-1)[0]))


def zero_shot(model, variables, images: Sequence[Any], labels: Sequence[str],
              templates: Sequence[str] | None = None, *, tokenizer=None,
              cache_dir: str | None = None, model_id: str | None = None,
              value_range: Sequence[float] = (-1.0, 1.0),
              batch_size: int | None = None) -> np.ndarray:
  """Zero-shot probabilities float32 [N, K]: softmax over the K labels of
  t * cos(image, label) (see the module docstring); each row sums to 1.

  Args:
    model, variables: a two-tower model and {"params": ...} (``checkpoint.load``'s
      ``.model`` / ``.variables``).
    images: N image file paths or arrays H x W x 3 / H x W (uint8 0-255, any size).
    labels: K labels; templates: as ``label_embeddings`` (default "a photo of a {}.").
    tokenizer, cache_dir, model_id: as ``label_embeddings``.
    value_range: where uint8 pixels are mapped (the run's ``pp.value_range``).
    batch_size: images per forward pass.
  """
  arrays = [read_image(im) if isinstance(im, (str, os.PathLike)) else im for im in images]
  zcls = label_embeddings(model, variables, labels, templates, tokenizer=tokenizer,
                          cache_dir=cache_dir, model_id=model_id)           # [K, D]
  zimg = inference.encode_images(model, variables, arrays, value_range=value_range,
                                 batch_size=batch_size, normalize=True)      # [N, D]
  logits = _temperature(variables) * (zimg @ zcls.T)                        # [N, K]
  logits -= logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------- the CLI ---

def load_model(workdir: str, step: int | None = None):
  """(LoadedCheckpoint, tokenizer, model_id) for a run: ``checkpoint.load`` plus the
  run's tokenizer and an identity string of the checkpoint (workdir, step, mtime)."""
  from vlm_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from vlm_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
  if not workdir:
    raise app.UsageError("--workdir is required")
  ckpt = checkpoint.load(workdir, step)
  tokenizer = tokenizers.build_tokenizer(ckpt.config.tokenizer)
  step_dir = os.path.join(checkpoint.checkpoint_dir(workdir), str(ckpt.step))
  mtime = os.stat(step_dir).st_mtime_ns if os.path.isdir(step_dir) else 0
  model_id = json.dumps({"workdir": os.path.abspath(workdir), "step": ckpt.step, "mtime": mtime,
                         "tokenizer": ckpt.config.tokenizer.to_dict()}, sort_keys=True)
  return ckpt, tokenizer, model_id


def _table(rows: list[dict]) -> str:
  width = max([len("IMAGE")] + [len(r["image"]) for r in rows])
  lwidth = max([len("LABEL")] + [len(r["label"]) for r in rows])
  lines = [f"{'IMAGE':{width}s}  {'LABEL':{lwidth}s}  PROB    OTHERS"]
  for r in rows:
    others = sorted(r["scores"].items(), key=lambda kv: -kv[1])[1:4]
    rest = ", ".join(f"{k} {v:.3f}" for k, v in others)
    lines.append(f"{r['image']:{width}s}  {r['label']:{lwidth}s}  {r['scores'][r['label']]:.3f}"
                 f"   {rest}")
  return "\n".join(lines)


def run(workdir: str, images: Sequence[str], labels: Sequence[str], *,
        templates: Sequence[str] | None = None, step: int | None = None,
        as_json: bool = False, cache_dir: str | None = None, batch_size: int = 32,
        explain_dir: str | None = None, out=None, err=None) -> tuple[list[dict], list[str]]:
  """``python -m vlm_jax.predict`` as a function.

  Returns (rows, errors): one row {"image": path, "label": str, "scores": {label:
  prob}} per readable image, in input order, and one message per unreadable file.
  Prints the table or JSON to ``out`` (stdout) and the errors to ``err`` (stderr).
  """
  out, err = out or sys.stdout, err or sys.stderr
  if not images:
    raise app.UsageError("no IMAGE given: python -m vlm_jax.predict --workdir DIR "
                         "--labels \"a cat,a dog\" IMAGE [IMAGE ...]")
  if not labels:
    raise app.UsageError("--labels is required, e.g. --labels \"a cat,a dog\"")
  if len(set(labels)) != len(labels):
    raise app.UsageError(f"--labels has duplicates: {list(labels)}")
  ckpt, tokenizer, model_id = load_model(workdir, step)
  templates = list(templates) if templates else default_templates(ckpt.config)
  label_prompts(labels, templates)  # bad labels/templates fail before any image is read
  paths, arrays, errors = [], [], []
  for path in images:
    try:
      arrays.append(read_image(path))
      paths.append(path)
    except CorruptExampleError as e:
      errors.append(str(e))
      print(f"predict: skipping {path}: {e}", file=err)
  rows = []
  if arrays:
    cache_dir = cache_dir or os.path.join(workdir, "cache")
    value_range = tuple(ckpt.config.pp.get("value_range", (-1.0, 1.0)))
    probs = zero_shot(ckpt.model, ckpt.variables, arrays, labels, templates,
                      tokenizer=tokenizer, model_id=model_id, cache_dir=cache_dir,
                      value_range=value_range, batch_size=batch_size)
    for path, p in zip(paths, probs):
      rows.append({"image": path, "label": labels[int(np.argmax(p))],
                   "scores": {label: float(v) for label, v in zip(labels, p)}})
    if explain_dir:
      _explain(ckpt, rows, arrays, labels, templates, explain_dir, tokenizer=tokenizer,
               model_id=model_id, cache_dir=cache_dir, value_range=value_range)
  if as_json:
    print(json.dumps(rows, indent=1), file=out)
  elif rows:
    print(_table(rows), file=out)
  return rows, errors


def _explain(ckpt, rows, arrays, labels, templates, out_dir, *, value_range, **label_kw):
  """Adds "explanation": PNG path to each row (see the module docstring)."""
  from vlm_jax import explain  # pylint: disable=import-outside-toplevel
  os.makedirs(out_dir, exist_ok=True)
  zcls = label_embeddings(ckpt.model, ckpt.variables, labels, templates, **label_kw)
  for row, image in zip(rows, arrays):
    text = zcls[labels.index(row["label"])]
    heat = explain.explain(ckpt.model, ckpt.variables, image, text=text, value_range=value_range)
    name = os.path.splitext(os.path.basename(row["image"]))[0] + ".explain.png"
    row["explanation"] = os.path.join(out_dir, name)
    explain.overlay(image, heat, row["explanation"])


def _run_flags(argv) -> tuple[list[dict], list[str]]:
  return run(FLAGS.workdir, argv[1:], FLAGS.labels or [], templates=FLAGS.templates,
             step=FLAGS.step, as_json=FLAGS.json, cache_dir=FLAGS.cache_dir,
             batch_size=FLAGS.batch_size, explain_dir=FLAGS.explain)


def parse_argv(flag_values: flags.FlagValues, argv: Sequence[str], doc: str) -> list[str]:
  """Parses ``argv`` into a program's own ``flag_values`` (for in-process ``cli``
  calls and ``app.run``); --help prints ``doc`` and the flags. Returns the
  positional arguments, program name first."""
  if any(a in ("-h", "--help", "--helpshort", "-?") for a in list(argv)[1:]):
    print(doc + "\nFlags:\n" + flag_values.get_help())
    sys.exit(0)
  try:
    return flag_values(list(argv))
  except flags.Error as e:
    raise app.UsageError(str(e)) from e


def absl_flags_parser(parse: Callable[[Sequence[str]], list[str]]):
  """``app.run``'s ``flags_parser`` for a program whose flags live in their own
  FlagValues (parsed by ``parse``); absl's global flags keep their defaults."""

  def parser(argv):
    try:
      rest = parse(argv)
      return flags.FLAGS(rest[:1]) + rest[1:]
    except (app.UsageError, flags.Error) as e:
      sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --help to see the flags.\n")
      sys.exit(1)

  return parser


def _parse(argv: Sequence[str]) -> list[str]:
  return parse_argv(FLAGS, argv, __doc__)


def cli(argv: Sequence[str]) -> tuple[list[dict], list[str]]:
  """Runs the command line ``argv`` (``argv[0]`` the program name) in-process; flags
  not given take their defaults. Returns ``run``'s (rows, errors)."""
  FLAGS.unparse_flags()
  return _run_flags(_parse(argv))


def main(argv):
  cpu_runtime.tune()  # a CPU-only host: synchronous dispatch, memory kept (no-op elsewhere)
  logs.quiet_libraries()
  _, errors = _run_flags(argv)
  if errors:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=absl_flags_parser(_parse))
