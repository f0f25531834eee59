r"""One attention layer's speed: vlm_jax's default against what a flax user runs.

    python experiments/attention_speed.py                     # B/16's shape: [8, 196, 12, 64]
    python experiments/attention_speed.py --shape 8,256,16,72 --rounds 9

Times, interleaved in one process (median of ``--rounds``, 10 calls each), the
forward and the forward + backward of

  vlm_jax      ``layers.dot_product_attention_f32`` (heads first, the softmax's
               division applied to the output; experiments/cpu_speed.md)
  flax         ``nn.dot_product_attention(force_fp32_for_softmax=True)``, the
               default of flax's MultiHeadDotProductAttention
  jax.nn       ``jax.nn.dot_product_attention(implementation="xla")``

after checking that all three give the same outputs. Rates are GFLOP/s of the
two matmuls (4 x B x H x Lq x Lk x Dh forward, 3x that with the backward).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm_jax import cpu_runtime  # noqa: E402

cpu_runtime.tune()  # as the train program does (a no-op off CPU-only hosts)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vlm_jax.models import layers  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="8,196,12,64", help="B,L,H,Dh")
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  b, l, h, d = (int(x) for x in args.shape.split(","))
  q, k, v = (jax.random.normal(key, (b, l, h, d)) for key in jax.random.split(jax.random.key(0), 3))
  fns = {
      "vlm_jax": lambda q, k, v: layers.dot_product_attention_f32(q, k, v),
      "flax": lambda q, k, v: nn.dot_product_attention(q, k, v, force_fp32_for_softmax=True),
      "jax.nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
  }
  progs = {}
  for name, f in fns.items():
    grad = jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * v), argnums=(0, 1, 2))
    progs[name, "forward"] = jax.jit(f).lower(q, k, v).compile()
    progs[name, "fwd+bwd"] = jax.jit(grad).lower(q, k, v).compile()
  ref = np.asarray(progs["flax", "forward"](q, k, v))
  for name in fns:
    diff = float(np.max(np.abs(np.asarray(progs[name, "forward"](q, k, v)) - ref)))
    print(f"parity  {name:<8} vs flax: max |diff| {diff:.1e}  {'OK' if diff < 1e-4 else 'MISMATCH'}")
  times = {key: [] for key in progs}
  for _ in range(args.rounds):
    for key, prog in progs.items():
      jax.block_until_ready(prog(q, k, v))
      t0 = time.perf_counter()
      for _ in range(10):
        out = prog(q, k, v)
      jax.block_until_ready(out)
      times[key].append((time.perf_counter() - t0) / 10)
  flops = 4.0 * b * h * l * l * d
  print(f"\n[B, L, H, Dh] = [{b}, {l}, {h}, {d}] on {jax.devices()[0].device_kind}, "
        f"median of {args.rounds} rounds")
  print(f"{'':<10}{'forward ms':>12}{'GF/s':>8}{'vs flax':>9}{'fwd+bwd ms':>13}{'GF/s':>8}"
        f"{'vs flax':>9}")
  for name in fns:
    row = f"{name:<10}"
    for part, mult in (("forward", 1), ("fwd+bwd", 3)):
      t, t_flax = statistics.median(times[name, part]), statistics.median(times["flax", part])
      row += f"{t * 1e3:>12.2f}{mult * flops / t / 1e9:>8.1f}{t_flax / t:>8.2f}x"
    print(row)


if __name__ == "__main__":
  main()
