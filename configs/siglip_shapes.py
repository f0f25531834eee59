r"""The demo: a small SigLIP trained on the embedded shapes-and-captions data.

    python -m vlm_jax.train --config configs/siglip_shapes.py --workdir /tmp/shapes

Trains in under 10 minutes on a 2-core CPU and reaches >= 0.90 zero-shot
top-1 over 48 colour x shape classes on the held-out split.

The image tower is a hybrid: a small convolutional stem turns the 32x32 image
into a 4x4 grid of 128-d tokens for a 3-layer ViT with a MAP head. A plain patch-4
ViT learns colour at once but shape slowly; the stem fixes that.

Variants (``--config configs/siglip_shapes.py:ARG``):
  runlocal   a tiny model and a few steps, for smoke runs and tests
"""

from vlm_jax import config_util


def get_config(arg=None):
  arg = config_util.parse_arg(arg, runlocal=False)
  c = config_util.base_config()
  c.seed = 0
  c.total_steps = 1200
  c.batch_size = 128
  c.log_every = 50
  c.eval_every = 400
  c.checkpoint_every = 400

  c.pp.image_size = 32
  c.tokenizer.kind = "bytes"
  c.tokenizer.max_len = 48

  m = c.model
  m.image.variant = None
  m.image.width, m.image.depth, m.image.mlp_dim, m.image.num_heads = 128, 3, 256, 4
  m.image.patch_size = 1
  m.image.image_size = 32
  m.image.stem = "conv"
  m.image.stem_features = (32, 64, 128)
  m.image.stem_strides = (2, 2, 2)
  m.image.pool_type = "map"
  m.image.posemb = "learn"
  m.text.variant = None
  m.text.width, m.text.depth, m.text.mlp_dim, m.text.num_heads = 64, 2, 256, 2
  m.text.vocab_size = 258               # ByteTokenizer
  m.text.max_len = 48
  m.out_dim = 128
  m.image.head = False

  o = c.optimizer
  o.lr = 1e-3
  o.warmup_steps = 100
  o.b2 = 0.95
  o.weight_decay = 1e-4

  c.evals.zeroshot.num_examples = 2000

  if arg.runlocal:
    c.total_steps = 10
    c.batch_size = 16
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 5
    c.optimizer.warmup_steps = 2
    m.image.width, m.image.depth, m.image.mlp_dim, m.image.num_heads = 32, 1, 64, 2
    m.image.stem_features = (8, 16, 32)
    m.text.width, m.text.depth, m.text.mlp_dim, m.text.num_heads = 32, 1, 64, 2
    m.out_dim = 32
    c.evals.zeroshot.num_examples = 96
  return c
