r"""NaViT packing vs padding each image to the max length (NaFlex style), side by side.

    python experiments/navit_benchmark.py                  # CPU, ~1-2 minutes
    python experiments/navit_benchmark.py --num_images=2000 --width=768 --depth=12  # accelerator

A stream of images with sides uniform in [32, 256] px (independently, so the
aspect ratio varies), patch 16, sequences of 256 tokens. The same NaViT encoder
(one set of weights) embeds the stream three ways:

  pad-to-max   one image per sequence, padded to 256 tokens (NaFlex batching)
  packed       first-fit packing, up to 16 images per sequence
  packed+drop  packed after dropping 50% of every image's tokens (training only)

It prints the packing fill (share of real tokens), sequences needed, and
images/s for each, with the ratios. The patches are packed as uint8 pixels, as the
training pipeline packs them by default (``navit.patch_dtype``; the model casts
them exactly); ``--float32`` packs float32 patches instead, as this script did
before. (Host-side patchify/packing cost, old against new implementation:
experiments/navit_packing.py.) Each way runs in fixed-size batches of
``--batch`` sequences under one jit (compiled before timing).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_images", type=int, default=400)
    ap.add_argument("--min_side", type=int, default=32)
    ap.add_argument("--max_side", type=int, default=256)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--max_images", type=int, default=16)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="sequences per forward pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", default="xla")
    ap.add_argument("--float32", action="store_true", help="pack float32 patches, not uint8")
    args = ap.parse_args()

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from vlm_jax.data import packing
    from vlm_jax.data.navit_pipeline import TokenDrop, default_config
    from vlm_jax.models.navit import NaViT

    rng = np.random.default_rng(0)
    sides = rng.integers(args.min_side, args.max_side + 1, size=(args.num_images, 2))
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sides]
    dtype = np.float32 if args.float32 else np.uint8
    t0 = time.perf_counter()
    items = [packing.image_to_item(im, patch_size=args.patch, max_patches=args.seq_len, dtype=dtype)
             for im in images]
    prep_s = time.perf_counter() - t0
    drop_cfg = default_config().token_drop
    drop_cfg.kind, drop_cfg.rate = "constant", 0.5
    drop = TokenDrop(drop_cfg)
    dropped = [drop(it, np.random.default_rng([1, i])) for i, it in enumerate(items)]

    t0 = time.perf_counter()
    ways = {
        "pad-to-max": packing.pack_items(items, seq_len=args.seq_len, max_images=1, dtype=dtype),
        "packed": packing.pack_items(items, seq_len=args.seq_len, max_images=args.max_images, dtype=dtype),
        "packed+drop": packing.pack_items(dropped, seq_len=args.seq_len, max_images=args.max_images,
                                          dtype=dtype),
    }
    pack_s = time.perf_counter() - t0

    model = NaViT(width=args.width, depth=args.depth, mlp_dim=4 * args.width, num_heads=args.heads,
                  patch_size=args.patch, posemb="learn", posemb_size=args.seq_len,
                  attention=args.attention, max_images=args.max_images)
    dummy = {k: v[:1] for k, v in ways["packed"].items()}
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), dummy))
    keys = ("patches", "segment_ids", "positions", "grid_sizes")

    @jax.jit
    def encode(p, batch):
        return model.apply(p, batch)[0]

    def run(batch_np):
        n = batch_np["segment_ids"].shape[0]
        total = -(-n // args.batch) * args.batch
        padded = {k: np.concatenate([batch_np[k], np.zeros((total - n,) + batch_np[k].shape[1:],
                                                           batch_np[k].dtype)]) for k in keys}
        chunks = [{k: jnp.asarray(padded[k][i:i + args.batch]) for k in keys}
                  for i in range(0, total, args.batch)]
        return chunks

    print(f"devices: {jax.devices()[0].device_kind} x{len(jax.devices())}; "
          f"{args.num_images} images, sides U[{args.min_side},{args.max_side}] px, patch "
          f"{args.patch}, seq_len {args.seq_len}; NaViT width {args.width} depth {args.depth}; "
          f"attention={args.attention}")
    print(f"patchify {prep_s:.2f}s, pack (3 ways) {pack_s * 1e3:.0f} ms, {np.dtype(dtype).name} patches "
          f"(one first call: mostly fresh memory for the outputs; experiments/navit_packing.py "
          f"times packing properly)")
    results = {}
    for name, batch_np in ways.items():
        chunks = run(batch_np)
        jax.block_until_ready(encode(params, chunks[0]))      # compile
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            outs = [encode(params, c) for c in chunks]
            jax.block_until_ready(outs)
            times.append(time.perf_counter() - t)
        sec = float(np.median(times))
        results[name] = dict(fill=packing.fill_rate(batch_np), seqs=batch_np["segment_ids"].shape[0],
                             ips=args.num_images / sec, sec=sec)
    base = results["pad-to-max"]["ips"]
    print(f"{'way':<12} {'fill':>6} {'sequences':>10} {'seconds':>8} {'images/s':>10} {'vs pad':>7}")
    for name, r in results.items():
        print(f"{name:<12} {r['fill']:6.3f} {r['seqs']:10d} {r['sec']:8.3f} {r['ips']:10.1f} "
              f"{r['ips'] / base:6.2f}x")
    print(f"packed / pad-to-max images/s: {results['packed']['ips'] / base:.2f}x; "
          f"token dropping 0.5 speed-up over packed: "
          f"{results['packed+drop']['ips'] / results['packed']['ips']:.2f}x")


if __name__ == "__main__":
    main()
