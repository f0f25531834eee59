r"""Connectors compared on one budget: captioning the embedded shapes data.

    python experiments/connectors.py                       # every connector, 600 steps each
    python experiments/connectors.py --steps 300 --connectors mlp,perceiver

Each connector trains configs/captioner_shapes.py (the demo's image tower, 16
tokens of width 128, a 2-layer byte-level decoder of width 64, prefix mode)
from scratch for the same number of steps and batch size, in this process,
one after another, then greedy-captions the held-out images. One table
(markdown) on stdout:

    connector          what the decoder receives
    visual tokens      tokens sent to the language model (of the tower's 16)
    connector params   parameters of the connector alone
    attr accuracy      held-out "caption/attr_accuracy" (colour and shape named)
    token accuracy     held-out teacher-forced "caption/token_accuracy"
    images/s           training throughput over the run (the whole model's step;
                       measured one run after another on the same machine)

Runs write to a temporary directory (``--workdir`` keeps them).

Measured 2026-11-26 on a 2-core CPU. Accuracy comes from ``--steps 400
--eval_examples 300`` (the machine was shared then, so its images/s are not
comparable); images/s comes from a second run on the quiet machine, ``--steps 160``
(the last quarter of the steps):

| connector | visual tokens | connector params | attr accuracy | token accuracy | images/s |
| --- | ---: | ---: | ---: | ---: | ---: |
| mlp (full tokens) | 16 | 12,416 | 0.563 | 0.910 | 374 |
| linear | 16 | 8,256 | 0.683 | 0.919 | 395 |
| attention_pool 8 | 8 | 207,296 | 0.643 | 0.919 | 433 |
| perceiver 8 | 8 | 404,288 | 0.727 | 0.927 | 342 |
| qformer 8 | 8 | 538,688 | 0.560 | 0.915 | 288 |
| pixel_shuffle 2x2 | 4 | 32,768 | 0.763 | 0.927 | 508 |

400 steps sits on the steep part of the learning curve (the default recipe's mlp
goes 0.318 -> 1.000 between steps 250 and 1000), so the accuracy differences are
partly noise. At the full 1000 steps both mlp and perceiver 8 reach 1.000.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name shown, recipe connector, extra recipe args
CONNECTORS = {
    "mlp (full tokens)": ("mlp", ""),
    "linear": ("linear", ""),
    "attention_pool 8": ("attention_pool", "tokens=8"),
    "perceiver 8": ("perceiver", "tokens=8"),
    "qformer 8": ("qformer", "tokens=8"),
    "pixel_shuffle 2x2": ("pixel_shuffle", ""),
}
_SHORT = {"mlp": "mlp (full tokens)", "linear": "linear", "attention_pool": "attention_pool 8",
          "perceiver": "perceiver 8", "qformer": "qformer 8", "pixel_shuffle": "pixel_shuffle 2x2"}


def _recipe(arg: str):
  path = os.path.join(ROOT, "configs", "captioner_shapes.py")
  spec = importlib.util.spec_from_file_location("captioner_shapes_recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def run_one(name: str, steps: int, workdir: str, eval_examples: int) -> dict:
  # pylint: disable=import-outside-toplevel
  import jax
  from vlm_jax import models, train
  from vlm_jax.models import connectors
  kind, extra = CONNECTORS[name]
  arg = ",".join(a for a in (f"connector={kind}", extra, f"steps={steps}") if a)
  c = _recipe(arg)
  c.log_every = max(steps // 4, 1)
  c.eval_every = steps
  c.checkpoint_every = 0
  c.evals.caption.num_examples = eval_examples
  model = models.build(c.model)
  shapes = models.abstract_variables(model, c)["params"]
  n_conn = models.count_params(shapes["connector"])
  n_in = 16  # the demo tower's 4 x 4 token grid
  tokens = connectors.num_output_tokens(c.model.connector, n_in)
  t0 = time.time()
  last = train.train_and_evaluate(c, workdir)
  seconds = time.time() - t0
  jax.clear_caches()
  return {"connector": name, "tokens": tokens, "params": n_conn,
          "attr": last["caption/attr_accuracy"], "token_acc": last["caption/token_accuracy"],
          "img_s": last.get("train/images_per_sec", float("nan")), "seconds": seconds}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--connectors", default=",".join(_SHORT),
                 help=f"comma-separated, of {sorted(_SHORT)}")
  p.add_argument("--eval_examples", type=int, default=500)
  p.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
  args = p.parse_args(argv)
  names = []
  for k in args.connectors.split(","):
    if k.strip() not in _SHORT:
      p.error(f"unknown connector {k!r}; known: {sorted(_SHORT)}")
    names.append(_SHORT[k.strip()])
  base = args.workdir or tempfile.mkdtemp(prefix="connectors_")
  rows = []
  for name in names:
    rows.append(run_one(name, args.steps, os.path.join(base, name.split()[0]),
                        args.eval_examples))
    print(f"done {name}: {rows[-1]}", flush=True)
  print(f"\n{args.steps} steps x batch 128 each, held-out attr accuracy on "
        f"{args.eval_examples} images\n")
  print("| connector | visual tokens | connector params | attr accuracy | token accuracy "
        "| images/s (train) |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for r in rows:
    print(f"| {r['connector']} | {r['tokens']} | {r['params']:,} | {r['attr']:.3f} | "
          f"{r['token_acc']:.3f} | {r['img_s']:.0f} |")


if __name__ == "__main__":
  main()
