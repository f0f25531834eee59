r"""A small image captioner trained on the embedded shapes data (task "captioning").

    python -m vlm_jax.train --config configs/captioner_shapes.py --workdir /tmp/cap

The demo's image tower (configs/siglip_shapes.py: a conv stem and a 3-layer ViT,
16 tokens of width 128 for a 32x32 image) -> a connector -> a 2-layer causal
byte-level decoder of width 64 that writes the caption. Trained from scratch
with plain autoregressive next-token prediction (CapPa's parallel prediction is
the ``cappa`` variant). The held-out metric "caption/attr_accuracy" counts
greedy captions that name the image's colour and shape (and no other).

Measured (1000 steps x 128 images): on a quiet 2-core CPU the command above
takes 6 m 00 s wall and reaches held-out caption/attr_accuracy 1.000 (500
images), token accuracy 0.953, at ~380 images/s. A run on a shared machine
passed 0.318 / 0.838 / 0.994 at steps 250 / 500 / 750.

Variants (``--config configs/captioner_shapes.py:ARG``, combinable with commas):
  connector=NAME  mlp (default: LLaVA-1.5's two-layer projector on all 16 tokens),
                  linear, attention_pool, perceiver, qformer, pixel_shuffle, or none
                  (mode=cross only: the tower's width differs from the decoder's)
  tokens=K        probes / latents / queries of attention_pool, perceiver, qformer (8)
  mode=cross      Flamingo: the decoder cross-attends (tanh-gated) to the connector's
                  output; the connector defaults to a Perceiver Resampler
  stage1=WORKDIR  LLaVA stage 1: the image tower loaded from a run of
                  configs/siglip_shapes.py (``init.workdir``) and frozen
                  (``finetune.freeze="^img/"``); connector and decoder train
  cappa           CapPa-style pretraining: 75% of the rows predict the whole caption
                  from the image alone (parallel prediction), the rest autoregressively
  steps=N         training steps (default 1000)
  runlocal        a tiny model and a few steps, for smoke runs and tests
"""

import os

from vlm_jax import config_util
from vlm_jax.tasks import captioning

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "siglip_shapes.py")


def get_config(arg=None):
  arg = config_util.parse_arg(arg, runlocal=False, connector="", mode="prefix", stage1="",
                              cappa=False, tokens=8, steps=0)
  if arg.mode not in ("prefix", "cross"):
    raise ValueError(f"configs/captioner_shapes.py: mode must be prefix or cross, got {arg.mode!r}")
  c = config_util.base_config()
  c.task = "captioning"
  c.seed = 0
  c.total_steps = arg.steps or 1000
  c.batch_size = 128
  c.log_every = 50
  c.eval_every = c.total_steps
  c.checkpoint_every = 500

  c.pp.image_size = 32
  c.tokenizer.kind = "bytes"
  c.tokenizer.max_len = 32              # captions name colour and shape within ~30 bytes

  m = c.model
  # The demo's image tower (configs/siglip_shapes.py, runlocal's for runlocal), so a
  # demo checkpoint loads by path (stage1=); the captioner takes its tokens (pool "none").
  m.image.update(config_util.recipe(DEMO, "runlocal" if arg.runlocal else None)
                 .model.image)
  # The decoder (model.text's shape fields).
  m.text.variant = None
  m.text.width, m.text.depth, m.text.mlp_dim, m.text.num_heads = 64, 2, 256, 2
  m.text.vocab_size = 258               # ByteTokenizer
  m.text.max_len = 32
  m.captioner.mode = arg.mode
  m.captioner.parallel_fraction = 0.75 if arg.cappa else 0.0
  conn = arg.connector or ("perceiver" if arg.mode == "cross" else "mlp")
  m.connector.type = conn
  m.connector.feature_layers = "final"  # the tower's final-normed tokens
  m.connector.num_tokens = arg.tokens
  m.connector.num_heads = 2
  m.connector.depth = 2 if conn in ("mlp", "perceiver", "qformer") else 1

  o = c.optimizer
  o.lr = 1e-3
  o.warmup_steps = 100
  o.b2 = 0.95
  o.weight_decay = 1e-4

  c.evals.caption = captioning.eval_config()
  c.evals.caption.num_examples = 500

  if arg.stage1:
    c.init.workdir = arg.stage1
    c.finetune.freeze = r"^img/"

  if arg.runlocal:
    c.total_steps = arg.steps or 6
    c.batch_size = 16
    c.log_every = 3
    c.eval_every = c.total_steps
    c.checkpoint_every = 3
    c.optimizer.warmup_steps = 2
    m.text.width, m.text.depth, m.text.mlp_dim, m.text.num_heads = 32, 1, 64, 2
    m.connector.num_heads = 2
    m.connector.depth = 1
    c.evals.caption.num_examples = 24
    c.evals.caption.batch_size = 24
  return c
