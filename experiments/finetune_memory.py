"""Trained parameters and optimizer-state bytes: LoRA and a frozen tower vs full fine-tuning.

    python experiments/finetune_memory.py [--config siglip_b16] [--rank 8]

Builds the recipe's model abstractly (``jax.eval_shape``: nothing is allocated,
nothing runs) three times, as ``train`` would: full fine-tuning, LoRA at
``--rank`` on both towers' attention and MLP Dense kernels
(``finetune.DEFAULT_TARGETS``; t and b train too, as configs/finetune.py:lora),
and the image tower frozen (``finetune.freeze="^img/"``). For each it counts
the parameters the optimizer updates and the bytes of the AdamW state
(``optim.build(..., trainable=finetune.trainable_fn(config))``: frozen leaves
hold no moments). Acceptance: LoRA rank 8 trains <= 2% of the parameters and
its optimizer state is <= 5% of the full fine-tune's.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from recipes import get_config  # noqa: E402  pylint: disable=wrong-import-position

from vlm_jax import finetune, models, optim  # noqa: E402  pylint: disable=wrong-import-position


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(config) -> dict:
  """{"params": all (base + LoRA), "base": the model's own, "trained", "opt_bytes"}."""
  model = models.build(config.model)
  params = finetune.boxed_abstract(model, config)["params"]
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                        is_leaf=lambda x: hasattr(x, "names"))
  fn = finetune.trainable_fn(config)
  mask = fn(params) if fn is not None else jax.tree.map(lambda _: True, params)
  tx, _ = optim.build(config.optimizer, config.total_steps, trainable=fn)
  flat, flat_mask = finetune._flat(params), finetune._flat(mask)  # pylint: disable=protected-access
  return {
      "params": sum(x.size for x in flat.values()),
      "base": sum(x.size for k, x in flat.items() if not finetune.is_lora(k)),
      "trained": sum(x.size for k, x in flat.items() if flat_mask[k]),
      "opt_bytes": _nbytes(jax.eval_shape(tx.init, params)),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="siglip_b16", help="a recipe in configs/")
  parser.add_argument("--rank", type=int, default=8)
  args = parser.parse_args()

  rows = []
  full = get_config(args.config)
  rows.append(("full", measure(full)))
  lora = get_config(args.config)
  lora.finetune.lora.rank = args.rank
  lora.finetune.lora.alpha = 2.0 * args.rank
  lora.finetune.train = r"^(t|b)$"
  rows.append((f"lora r={args.rank}", measure(lora)))
  frozen = get_config(args.config)
  frozen.finetune.freeze = r"^img/"
  rows.append(("freeze img/", measure(frozen)))

  base = rows[0][1]
  print(f"{args.config}: {base['base']:,} model parameters (float32); AdamW state of a "
        f"full fine-tune {base['opt_bytes'] / 2**20:,.1f} MiB")
  print(f"{'':14s}{'trained params':>16s}{'% of model':>12s}{'opt state MiB':>16s}"
        f"{'% of full':>11s}{'LoRA params':>13s}")
  for name, r in rows:
    print(f"{name:14s}{r['trained']:>16,d}{100 * r['trained'] / base['base']:>11.2f}%"
          f"{r['opt_bytes'] / 2**20:>16,.2f}{100 * r['opt_bytes'] / base['opt_bytes']:>10.2f}%"
          f"{r['params'] - r['base']:>13,d}")


if __name__ == "__main__":
  main()
