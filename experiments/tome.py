r"""Token Merging (ToMe): ViT throughput and zero-shot accuracy against the merge rate r.

    python experiments/tome.py                       # both tables, ~10-15 min on 2 cores
    python experiments/tome.py --skip_accuracy       # throughput only
    python experiments/tome.py --workdir DIR         # where the 64-token tower is cached

1. Throughput: a B/16 ViT (MAP head, random weights) at 224 px (196 tokens, 12
   blocks) on this machine's CPU, images/s at r = 0, several constant r, the
   constant r that leaves at most half the tokens after the last block, and the
   decreasing schedule that removes as many tokens but merges most in the first
   blocks (ToMe's inflection -1), and the most ToMe can merge (half the tokens in
   every block), as a bound. All variants are compiled first, then timed in
   interleaved rounds (variant 1, 2, ..., 1, 2, ...), so load from other processes
   hits them alike; the median of the rounds is reported.

2. Zero-shot top-1 (48 classes) on the embedded shapes data of a TRAINED SigLIP
   two-tower whose image tower sees 64 tokens: the demo recipe
   configs/siglip_shapes.py with stem_strides (2, 2, 1) (an 8 x 8 grid instead of
   4 x 4). It is trained once into --workdir with
       python -m vlm_jax.train --config configs/siglip_shapes.py --workdir DIR \
           --config.model.image.stem_strides='(2,2,1)' --config.eval_every=1200
   (skipped when DIR already holds a checkpoint), then evaluated with
   model.image.tome_r set to each r, the same checkpoint every time.

Measured 2026-11-26 (one run per table; the 2-core CPU was shared with other jobs,
load average ~9, so absolute images/s are low and only the ratios matter; the
64-token tower was trained with the command above on an H200 GPU, 1200 steps,
zero-shot 0.889 there; evaluated here on the CPU):

| B/16 at 224, schedule | tokens after block 12 | mean tokens per block | images/s | speed-up |
| --- | ---: | ---: | ---: | ---: |
| r=0 (plain) | 196 | 196 | 1.05 | 1.00x |
| r=2 | 172 | 185 | 1.12 | 1.06x |
| r=4 | 148 | 174 | 1.19 | 1.13x |
| r=6 | 124 | 163 | 1.29 | 1.22x |
| r=8 | 100 | 152 | 1.46 | 1.39x |
| r=9 (halves) | 88 | 146 | 1.64 | 1.56x |
| decreasing (halves) 16,15,14,11,11,9,7,6,5,3,1,0 | 98 | 133 | 1.77 | 1.68x |
| r=98 (max: half the tokens in every block) | 1 | 33 | 7.47 | 7.09x |

| 64-token shapes tower, schedule | tokens after block 3 | zero-shot top-1 | change (points) |
| --- | ---: | ---: | ---: |
| r=0 (plain) | 64 | 0.8895 | +0.0 |
| r=2 | 58 | 0.8890 | -0.0 |
| r=4 | 52 | 0.8890 | -0.0 |
| r=6 | 46 | 0.8880 | -0.1 |
| r=8 | 40 | 0.8885 | -0.1 |
| r=11 (halves) | 31 | 0.8885 | -0.1 |
| decreasing (halves) 21,11,0 | 32 | 0.8895 | +0.0 |
| r=32 (max: half the tokens in every block) | 8 | 0.8865 | -0.3 |

The shapes task is easy for merging: one shape on a plain background, whose
tokens merge almost losslessly (image embeddings at r=32 keep cosine 0.9999 to
r=0's on random inputs), so the accuracy cost here is a lower bound of what
natural images would show.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from vlm_jax import checkpoint, evaluate
from vlm_jax.models import tome, vit

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_OVERRIDES = ("--config.model.image.stem_strides=(2,2,1)", "--config.eval_every=1200")


def _schedules(num_tokens: int, depth: int, constants) -> list[tuple[str, object]]:
    """[(label, tome_r)]: r = 0, the given constants, the halving constant r, the
    halving decreasing schedule and the most merging ToMe allows (half per block)."""
    half_r = tome.constant_r_for(num_tokens, depth, 0.5)
    out = [("r=0 (plain)", 0)]
    out += [(f"r={r}", r) for r in constants if 0 < r < half_r]
    out.append((f"r={half_r} (halves)", half_r))
    sched = tome.decreasing_schedule(num_tokens, depth, 0.5)
    out.append(("decreasing (halves) " + ",".join(map(str, sched)), sched))
    out.append((f"r={num_tokens // 2} (max: half the tokens in every block)", num_tokens // 2))
    return out


def throughput(batch: int, rounds: int, constants) -> list[dict]:
    """images/s of a random-weight B/16 ViT at 224 px for each schedule, interleaved."""
    kw = vit.decode_variant("B/16")
    base = vit.ViT(**kw, image_size=224, pool_type="map")
    images = jax.random.uniform(jax.random.key(0), (batch, 224, 224, 3))
    params = jax.jit(base.init)(jax.random.key(1), images[:1])
    rows = []
    for label, r in _schedules(196, kw["depth"], constants):
        model = base.clone(tome_r=r)
        fn = jax.jit(lambda p, x, m=model: m.apply(p, x)[0])
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, images))                   # compile + warm-up
        counts = tome.token_counts(196, tome.parse_r(r, kw["depth"]) or (0,) * kw["depth"])
        rows.append(dict(label=label, r=r, fn=fn, times=[], tokens=counts[-1],
                         mean_tokens=float(np.mean([196] + counts[:-1])),
                         compile_s=time.perf_counter() - t0))
        print(f"  compiled {label}: {rows[-1]['compile_s']:.1f}s", flush=True)
    for i in range(rounds):
        for row in rows:
            t0 = time.perf_counter()
            jax.block_until_ready(row["fn"](params, images))
            row["times"].append(time.perf_counter() - t0)
        print(f"  round {i + 1}/{rounds}: " + ", ".join(
            f"{batch / row['times'][-1]:.2f}" for row in rows) + " img/s", flush=True)
    for row in rows:
        row["img_s"] = batch / statistics.median(row["times"])
        row["speedup"] = row["img_s"] / rows[0]["img_s"]
    return rows


def ensure_trained(workdir: str) -> None:
    """Trains the 64-token demo variant into ``workdir`` unless a checkpoint is there."""
    ckpts = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)):
        print(f"using the trained tower cached in {workdir}", flush=True)
        return
    cmd = [sys.executable, "-m", "vlm_jax.train", "--config",
           os.path.join(_REPO, "configs", "siglip_shapes.py"), "--workdir", workdir,
           *TRAIN_OVERRIDES]
    print("training the 64-token tower:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=_REPO)


def zeroshot(workdir: str, constants) -> list[dict]:
    """Zero-shot top-1 of the trained tower in ``workdir`` for each schedule."""
    config = evaluate.with_eval_defaults(checkpoint.read_config(workdir))
    img = config.model.image
    if "tome_r" not in img:             # a workdir trained before the field existed
        with img.unlocked():
            img.tome_r = 0
    gh, gw = (img.image_size // (int(np.prod(img.stem_strides)) * img.patch_size),) * 2
    mesh = evaluate.eval_mesh(config)
    ckpt = checkpoint.load(workdir, mesh=mesh)
    from vlm_jax import models  # pylint: disable=import-outside-toplevel
    rows = []
    for label, r in _schedules(gh * gw, img.depth, constants):
        with img.ignore_type():
            img.tome_r = r
        t0 = time.perf_counter()
        metrics = evaluate.evaluate(config, models.build(config.model), ckpt.variables,
                                    mesh=mesh, names=["zeroshot"])
        counts = tome.token_counts(gh * gw, tome.parse_r(r, img.depth) or (0,) * img.depth)
        rows.append(dict(label=label, r=r, top1=float(metrics["zeroshot/top1"]),
                         tokens=counts[-1], seconds=time.perf_counter() - t0))
        print(f"  {label}: top-1 {rows[-1]['top1']:.4f} ({rows[-1]['seconds']:.0f}s)",
              flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(_REPO, "runs", "tome_shapes8x8"))
    parser.add_argument("--batch", type=int, default=8, help="images per throughput call")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--constants", default="2,4,6,8", help="constant r values in between")
    parser.add_argument("--skip_throughput", action="store_true")
    parser.add_argument("--skip_accuracy", action="store_true")
    args = parser.parse_args(argv)
    constants = [int(v) for v in args.constants.split(",") if v]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs",
          flush=True)
    if not args.skip_throughput:
        print("\n== B/16 at 224 px (196 tokens, 12 blocks, MAP head), random weights, "
              f"batch {args.batch}, median of {args.rounds} interleaved rounds", flush=True)
        rows = throughput(args.batch, args.rounds, constants)
        print("\n| schedule | tokens after block 12 | mean tokens per block | images/s "
              "| speed-up |\n| --- | ---: | ---: | ---: | ---: |")
        for row in rows:
            print(f"| {row['label']} | {row['tokens']} | {row['mean_tokens']:.0f} | "
                  f"{row['img_s']:.2f} | {row['speedup']:.2f}x |")
    if not args.skip_accuracy:
        print(f"\n== zero-shot top-1 (48 classes), trained 64-token SigLIP tower in "
              f"{args.workdir}", flush=True)
        ensure_trained(args.workdir)
        rows = zeroshot(args.workdir, constants)
        base = rows[0]["top1"]
        print("\n| schedule | tokens after the last block | zero-shot top-1 | change (points) |"
              "\n| --- | ---: | ---: | ---: |")
        for row in rows:
            print(f"| {row['label']} | {row['tokens']} | {row['top1']:.4f} | "
                  f"{100 * (row['top1'] - base):+.1f} |")


if __name__ == "__main__":
    main()
