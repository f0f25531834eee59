r"""Fine-tuning the demo model on shifted shapes: freeze a tower, LoRA, or everything.

    python -m vlm_jax.train --config configs/siglip_shapes.py --workdir /tmp/shapes
    python -m vlm_jax.train --config configs/finetune.py:lora --workdir /tmp/shapes_lora \
        --config.init.workdir=/tmp/shapes

Starts from the demo's weights (``init.workdir``, a run of configs/siglip_shapes.py;
the model here is that recipe's, so every tensor fits) and adapts them to a
shifted version of the embedded shapes data: the images are rendered at 16x16
and upscaled to the model's 32x32 (blurred edges, thin shapes lost), and their
pixels are mapped onto (-0.5, 0.5) instead of (-1, 1) (half the contrast). The
captions and the 48 zero-shot classes are unchanged, and the held-out split the
evaluators read is shifted the same way. (The shapes source has no colour
option; both shifts use existing fields, data.shapes.image_size and pp.value_range.)

Variants (``--config configs/finetune.py:ARG``, combinable: ``lora,runlocal``):
  freeze_vision  the image tower fixed (no gradients, no optimizer state); the text
                 tower, both projections and t, b train. Locking the image tower is
                 LiT's recipe, here from a contrastive start.
  lora           rank-8 LoRA (alpha 16) on both towers' attention and MLP Dense
                 kernels; every base weight fixed, t and b train
  full           every parameter trains (the default)
  runlocal       the tiny model of siglip_shapes.py:runlocal and a few steps
                 (init.workdir must then be a runlocal run)
"""

import os

from vlm_jax import config_util

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "siglip_shapes.py")


def get_config(arg=None):
  arg = config_util.parse_arg(arg, freeze_vision=False, lora=False, full=False, runlocal=False,
                              rank=8)
  if sum((arg.freeze_vision, arg.lora, arg.full)) > 1:
    raise ValueError(f"configs/finetune.py: choose one of freeze_vision, lora, full; got {arg}")
  c = config_util.recipe(DEMO, "runlocal" if arg.runlocal else None)  # the demo's model

  # The shift.
  c.data.shapes.image_size = 16
  c.pp.value_range = (-0.5, 0.5)
  c.data.shapes.seed = 1                 # other images, too

  c.total_steps = 10 if arg.runlocal else 300
  c.eval_every = 10 if arg.runlocal else 100
  c.checkpoint_every = 5 if arg.runlocal else 100
  c.log_every = 5 if arg.runlocal else 25
  o = c.optimizer
  o.warmup_steps = 2 if arg.runlocal else 30
  o.lr = 3e-4                            # a start that is already good: a small step

  if arg.freeze_vision:
    c.finetune.freeze = r"^img/"
  elif arg.lora:
    c.finetune.lora.rank = arg.rank
    c.finetune.lora.alpha = 2.0 * arg.rank
    c.finetune.train = r"^(t|b)$"        # the loss's temperature and bias
    o.lr = 3e-3                          # LoRA factors start at zero: larger steps
    o.weight_decay = 0.0
  return c
