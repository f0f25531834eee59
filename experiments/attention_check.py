r"""The fused attention kernels (cuDNN, jax.nn's xla) against the reference, on real towers.

    python experiments/attention_check.py                          # GPU: cudnn, xla, reference
    python experiments/attention_check.py --variant S/16 --batch 4 --image_size 64   # CPU smoke

``model.image.attention`` / ``model.text.attention`` choose the kernel of every
attention layer (ViT, NaViT and text towers): "reference" is flax's einsums with
a float32 softmax, "xla" and "cudnn" are ``jax.nn.dot_product_attention``'s
backends (cudnn: the fused flash-attention kernel, GPU only, bf16/fp16 inputs).

One set of random SigLIP weights (``--variant`` image tower, the same size of
text tower) and one random batch are run through:

  truth          reference attention, float32 compute
  reference      reference attention, ``--dtype`` (bf16) compute: the error bf16 itself makes
  xla / cudnn    the fused kernels, ``--dtype`` compute

For each: the image and text embeddings and the gradient of a fixed random
projection of both, as ||x - truth|| / ||truth||. A fused kernel passes when its
errors are at most ``--slack`` times the bf16 reference's (plus 1e-3). A NaViT
batch (several images of different sizes packed per sequence, so the kernels get
a block-diagonal mask) is checked the same way. Last, the image tower's forward +
backward time per kernel (median of ``--repeats``), side by side.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _rel(a, b) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
            for x, y in zip(la, lb))
  den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in lb)
  return float(np.sqrt(num / max(den, 1e-30)))


def _config(args, kind: str, dtype: str, navit: bool) -> dict:
  size = args.variant.split("/")[0]
  img = dict(variant=args.variant, image_size=args.image_size, attention=kind)
  if navit:
    img.update(type="navit", seq_len=args.seq_len, max_images=8, posemb_size=64)
  return dict(image=img, text=dict(variant=size, attention=kind), dtype=dtype)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variant", default="B/16")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--seq_len", type=int, default=256, help="NaViT tokens per packed sequence")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
  ap.add_argument("--kinds", default="", help="comma list (default: cudnn,xla on GPU; xla on CPU)")
  ap.add_argument("--slack", type=float, default=2.0)
  ap.add_argument("--repeats", type=int, default=10)
  args = ap.parse_args()

  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from vlm_jax import models  # pylint: disable=import-outside-toplevel
  from vlm_jax.data import packing  # pylint: disable=import-outside-toplevel

  gpu = jax.default_backend() == "gpu"
  kinds = [k for k in (args.kinds or ("cudnn,xla" if gpu else "xla")).split(",") if k]
  print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
        f"SigLIP {args.variant} {args.image_size}px, batch {args.batch}, {args.dtype}")
  rng = np.random.default_rng(0)
  failures = []

  def check(title, build, inputs, apply):
    """Errors of each kernel against the float32 reference; returns the models built."""
    truth_model = build("reference", "float32")
    v = nn.meta.unbox(jax.jit(truth_model.init)(jax.random.key(0), *inputs["init"]))
    outs = jax.eval_shape(lambda v: apply(truth_model, v), v)
    weights = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), outs)

    def value_and_grad(model):
      def loss(v):
        out = apply(model, v)
        return sum(jnp.sum(o.astype(jnp.float32) * w)
                   for o, w in zip(jax.tree.leaves(out), jax.tree.leaves(weights))), out
      return jax.jit(jax.value_and_grad(loss, has_aux=True))(v)

    (_, truth), g_truth = value_and_grad(truth_model)
    rows = {}
    for kind in ["reference"] + kinds:
      (_, out), g = value_and_grad(build(kind, args.dtype))
      rows[kind] = [_rel(o, t) for o, t in zip(out, truth)] + [_rel(g, g_truth)]
    names = ["image emb", "text emb", "grads"] if len(outs) == 2 else ["image emb", "grads"]
    print(f"\n{title}: relative error against float32 reference attention")
    print(f"  {'kernel':<12}" + "".join(f"{n:>12}" for n in names) + "   verdict")
    for kind, errs in rows.items():
      ok = kind == "reference" or all(
          e <= args.slack * r + 1e-3 for e, r in zip(errs, rows["reference"]))
      if not ok:
        failures.append(f"{title}/{kind}")
      verdict = "(bf16 floor)" if kind == "reference" else ("PASS" if ok else "FAIL")
      print(f"  {kind:<12}" + "".join(f"{e:>12.2e}" for e in errs) + f"   {verdict}")
    return v

  # Two-tower ViT + text: image and text embeddings and every parameter's gradient.
  images = jnp.asarray(rng.uniform(-1, 1, (args.batch, args.image_size, args.image_size, 3)),
                       jnp.float32)
  max_len = models.resolve_config(_config(args, "reference", "float32", False))["text"]["max_len"]
  tokens = jnp.asarray(rng.integers(1, 30000, (args.batch, max_len)), jnp.int32)
  vit_build = lambda kind, dtype: models.build(_config(args, kind, dtype, False))
  v = check("ViT + text towers", vit_build, {"init": (images[:1], tokens[:1])},
            lambda m, v: (m.apply(v, images, method="encode_image"),
                          m.apply(v, tokens, method="encode_text")))

  # NaViT: images of many sizes packed per sequence (block-diagonal masks).
  sides = rng.integers(32, args.image_size + 1, size=(args.batch, 2))
  raw = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sides]
  packed = packing.pack(raw, patch_size=int(args.variant.split("/")[1]), seq_len=args.seq_len,
                        max_images=8)
  packed = {k: jnp.asarray(x) for k, x in packed.items()}
  navit_build = lambda kind, dtype: models.build(_config(args, kind, dtype, True))
  check(f"NaViT, {len(raw)} images packed into {packed['patches'].shape[0]} sequences",
        navit_build, {"init": (images[:1], tokens[:1])},
        lambda m, v: (m.apply(v, packed, method="encode_image"),))

  # Speed: the image tower's forward + backward per kernel.
  print(f"\nimage tower forward + backward, batch {args.batch}, {args.dtype} "
        f"(median of {args.repeats})")
  base = None
  for kind in ["reference"] + kinds:
    model = vit_build(kind, args.dtype)
    step = jax.jit(jax.grad(lambda v: jnp.sum(
        model.apply(v, images, method="encode_image").astype(jnp.float32))))
    jax.block_until_ready(step(v))
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(step(v))
      times.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median(times))
    base = base or ms
    print(f"  {kind:<12}{ms:>10.2f} ms   {base / ms:>5.2f}x the reference")
  if failures:
    print(f"\nFAIL: {failures}")
    sys.exit(1)
  print("\nall kernels within the bf16 error of the reference")


if __name__ == "__main__":
  main()
