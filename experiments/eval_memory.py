"""Zero-shot evaluation memory against the size of the evaluation set: streamed vs in memory.

    python experiments/eval_memory.py                        # 5k, 20k, 50k at 32 px (a few minutes, 2 cores)
    python experiments/eval_memory.py --sizes 2000,8000      # quicker
    python experiments/eval_memory.py --image_size 224 --sizes 5000,50000 --old_limit_gb 8
    python experiments/eval_memory.py --sizes 5000 --processes 2   # also: 2 processes, half each

The task is ImageNet-sized and generated: N validation images over 1,000 classes
(ImageNet's class names, ``vlm_jax/data/imagenet2012_classnames.txt``), zero-shot
with 80 prompt templates (1,000 x 80 = 80,000 prompts). Image i is the shapes
renderer's held-out image i (``vlm_jax.data.shapes``, drawn on demand at
``--image_size``), labelled i % 1000. The model is the runlocal SigLIP of
``configs/siglip_shapes.py`` with random weights, its image tower reading a 4x4
grid of patches at any image size: the experiment measures memory, not accuracy
(top-1 is near chance, 0.001, and must agree between the two ways).

Two ways, each size in a fresh process, its peak resident memory (VmHWM) measured
from after set-up and compilation (reset through /proc/self/clear_refs):

  streamed    ``ZeroShotEvaluator`` as it is now: batches of ``--batch`` images
              read, decoded and preprocessed in threads, class embeddings built
              ``--batch`` prompts at a time, only running counts kept.
  in memory   what the evaluator did before: every image preprocessed into one
              float32 [N, H, W, 3] array (``pipeline.zeroshot_data``), all 80,000
              prompts embedded in one call, then the images. Run only while
              N x H x W x 3 x 4 bytes is under ``--old_limit_gb``; otherwise the
              table gives that number alone.

With ``--processes P`` the streamed evaluation of the first size also runs as P
jax processes on this machine (``jax.distributed``, CPU collectives over gloo),
each reading every P-th example; their top-1 must equal the one-process top-1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 1000
QUALITIES = ("", "good ", "bad ", "blurry ", "bright ", "dark ", "cropped ", "close-up ",
             "low-resolution ", "large ")
FORMS = ("photo", "picture", "image", "drawing", "rendering", "painting", "sketch", "snapshot")
# 10 qualities x 8 forms = 80 templates ("a bad sketch of a {}.").
TEMPLATES = tuple(f"a {q}{f} of a {{}}." for q in QUALITIES for f in FORMS)


class GeneratedImageNet:
  """N examples over 1,000 classes, rendered on demand (nothing stored).

  ``source[i]`` -> dict(image=uint8 [S, S, 3] (shapes' held-out image i),
  text=str, label=i % C); ``classnames`` are ImageNet's first C (all 1,000 unless
  ``num_classes``), ``templates`` the 80 above.
  """

  def __init__(self, num_examples: int, image_size: int, num_classes: int = NUM_CLASSES):
    from vlm_jax.data import classnames  # pylint: disable=import-outside-toplevel
    self.num_examples, self.image_size = int(num_examples), int(image_size)
    self.classnames = list(classnames.imagenet_synsets().values())[:num_classes]
    self.templates = list(TEMPLATES)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    from vlm_jax.data import shapes  # pylint: disable=import-outside-toplevel
    index = int(index)
    label = index % len(self.classnames)
    image = shapes.render_example(0, "heldout", index, self.image_size)["image"]
    return dict(image=image, text=f"a photo of a {self.classnames[label]}.", label=label)

  def __repr__(self) -> str:
    return f"GeneratedImageNet(n={self.num_examples}, image_size={self.image_size})"


def _status_kb(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM (peak resident set) to the current resident set


def _setup(args):
  """(config, model, params, encoder, tokenizer) on all local devices."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, ROOT)
  from vlm_jax import models, parallel  # pylint: disable=import-outside-toplevel
  from vlm_jax.data import tokenizers  # pylint: disable=import-outside-toplevel
  from vlm_jax.evaluators import Encoder  # pylint: disable=import-outside-toplevel
  config = _recipe()
  config.pp.image_size = config.model.image.image_size = args.image_size
  # A 4x4 grid of patches at any image size: the image tower stays cheap, the data is the point.
  config.model.image.stem, config.model.image.patch_size = "patch", args.image_size // 4
  config.evals.zeroshot.batch_size = args.batch
  config.data.num_threads = args.threads
  model = models.build(config.model)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
                        models.abstract_variables(model, config))["params"]
  mesh = parallel.make_mesh([("data", -1)])
  params = jax.device_put(params, parallel.replicated(mesh))
  encoder = Encoder(model, mesh=mesh, batch_size=args.batch)
  return config, model, params, encoder, tokenizers.build_tokenizer(config.tokenizer)


def _recipe():
  """configs/siglip_shapes.py:runlocal."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      "siglip_shapes", os.path.join(ROOT, "configs", "siglip_shapes.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("runlocal")


def _split(config, n, num_classes=NUM_CLASSES, **kw):
  from vlm_jax.data import eval_stream  # pylint: disable=import-outside-toplevel
  source = GeneratedImageNet(n, config.pp.image_size, num_classes)
  return eval_stream.EvalSplit(source, config.pp,
                               num_examples=n, what="eval_memory",
                               num_threads=config.data.num_threads,
                               prefetch_buffer_size=config.data.prefetch_buffer_size, **kw)


def run_streamed(config, model, params, encoder, tokenizer, n, num_classes=NUM_CLASSES) -> float:
  from vlm_jax.evaluators import ZeroShotEvaluator  # pylint: disable=import-outside-toplevel
  ev = ZeroShotEvaluator(config, model, data=_split(config, n, num_classes), encoder=encoder,
                         tokenizer=tokenizer)
  return ev.run(params)["zeroshot/top1"]


def run_in_memory(config, model, params, encoder, tokenizer, n, num_classes=NUM_CLASSES) -> float:
  """The previous evaluator: all images in one array, all prompts in one call."""
  # pylint: disable=import-outside-toplevel
  import numpy as np
  from vlm_jax.data import shapes
  from vlm_jax.numeric import normalize
  split = _split(config, n, num_classes, process_index=0, process_count=1)
  images, labels = [], []
  for batch in split.batches(256):
    for i in np.flatnonzero(batch["valid"]):
      images.append(batch["image"][i])
      labels.append(batch["label"][i])
  images, labels = np.stack(images), np.asarray(labels, np.int32)
  prompts = [p for row in shapes.class_prompts(split.classnames, split.templates) for p in row]
  z = normalize(encoder.tokens(params, tokenizer.encode(prompts)))
  cls = normalize(z.reshape(len(split.classnames), len(split.templates), -1).mean(axis=1))
  img = encoder.images(params, images)
  return float(np.mean(np.argmax(normalize(img) @ cls.T, axis=-1) == labels))


def child(args) -> None:
  """One measurement in this (fresh) process; prints one JSON line."""
  if args.processes > 1:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{args.port}", num_processes=args.processes,
                               process_id=args.process_id)
  import gc  # pylint: disable=import-outside-toplevel
  setup = _setup(args)
  fn = run_streamed if args.way == "streamed" else run_in_memory
  fn(*setup, 2 * args.batch, num_classes=4)  # compiles every shape, outside the measurement
  gc.collect()
  _reset_peak()
  base = _status_kb("VmRSS")
  t0 = time.perf_counter()
  top1 = fn(*setup, args.n)
  seconds = time.perf_counter() - t0
  print("RESULT " + json.dumps(dict(
      way=args.way, n=args.n, top1=top1, seconds=seconds, base_mb=base / 1024,
      peak_mb=_status_kb("VmHWM") / 1024, process=args.process_id)), flush=True)


def _spawn(args, way, n, processes=1):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  port = 0
  if processes > 1:
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
  procs = []
  for p in range(processes):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--way", way, "--n", str(n),
           "--image_size", str(args.image_size), "--batch", str(args.batch),
           "--threads", str(args.threads), "--processes", str(processes),
           "--process_id", str(p), "--port", str(port)]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  rows = []
  for proc in procs:
    out, err = proc.communicate()
    got = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not got:
      raise RuntimeError(f"{way} n={n} failed:\n{err[-3000:]}")
    rows += got
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", default="5000,20000,50000", help="evaluation set sizes")
  ap.add_argument("--image_size", type=int, default=32)
  ap.add_argument("--batch", type=int, default=256, help="images (and prompts) per step")
  ap.add_argument("--threads", type=int, default=2, help="reader threads (data.num_threads)")
  ap.add_argument("--old_limit_gb", type=float, default=0.3,
                  help="run the in-memory way only while its images fit in this")
  ap.add_argument("--processes", type=int, default=1,
                  help=">1: also run the first size streamed on this many processes")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--way", default="streamed", help=argparse.SUPPRESS)
  ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(args)
    return
  sizes = [int(s) for s in args.sizes.split(",")]
  image_mb = args.image_size ** 2 * 3 * 4 / 2**20
  print(f"Zero-shot, {NUM_CLASSES} classes x {len(TEMPLATES)} templates, images "
        f"{args.image_size}x{args.image_size}, batch {args.batch}, {args.threads} reader threads; "
        "peak RSS above the set-up (MiB):")
  print(f"{'N':>7} | {'streamed':>9} {'top-1':>7} {'s':>6} | {'in memory':>9} {'top-1':>7} "
        f"{'s':>6} | {'N images f32':>12} | in mem / streamed")
  first = None
  for n in sizes:
    s = _spawn(args, "streamed", n)[0]
    first = first or s
    grow = s["peak_mb"] - s["base_mb"]
    need = n * image_mb
    line = f"{n:>7} | {grow:>9.1f} {s['top1']:>7.4f} {s['seconds']:>6.1f} | "
    if need <= args.old_limit_gb * 1024:
      o = _spawn(args, "in_memory", n)[0]
      ogrow = o["peak_mb"] - o["base_mb"]
      line += (f"{ogrow:>9.1f} {o['top1']:>7.4f} {o['seconds']:>6.1f} | {need:>12.1f} | "
               f"{ogrow / max(grow, 1e-9):.1f}x")
      if abs(o["top1"] - s["top1"]) > 1e-9:
        line += "  TOP-1 DIFFERS"
    else:
      line += (f"{'(not run)':>9} {'':>7} {'':>6} | {need:>12.1f} | "
               f"{need / max(grow, 1e-9):.1f}x *")
    print(line, flush=True)
  print("'N images f32': N x H x W x 3 x 4 bytes, what holding the set as float32 takes "
        f"(50,000 at 224 px: {50000 * 224 * 224 * 3 * 4 / 2**30:.1f} GiB). *: in memory not run "
        "(--old_limit_gb); the ratio is the images alone over streamed.")
  if args.processes > 1:
    rows = _spawn(args, "streamed", sizes[0], processes=args.processes)
    for r in rows:
      print(f"{args.processes} processes, N={sizes[0]}: process {r['process']} peak above set-up "
            f"{r['peak_mb'] - r['base_mb']:.1f} MiB, top-1 {r['top1']:.4f} "
            f"({'equal to' if abs(r['top1'] - first['top1']) < 1e-9 else 'DIFFERENT from'} "
            "one process)")


if __name__ == "__main__":
  main()
