r"""NaViT-B/16 SigLIP: packed variable-resolution images with token dropping.

    python -m vlm_jax.train --config configs/navit_b16.py --workdir /tmp/navit_b16 \
        --config.data.source=tfds --config.data.tfds.name=NAME --config.data.tfds.text_key=caption \
        --config.tokenizer.model_path=/path/to/spm_32k.model
    python -m vlm_jax.train --config configs/navit_b16.py:runlocal --workdir /tmp/navit_local

Images keep their aspect ratio: each is resized so its longer side is a
sampled length (uniform in [64, 384] px during training), cut into 16 px
patches (at most 256), then NaViT-style token dropping (a Beta(2, 2) rate per
image, so 50% of tokens on average) removes tokens before first-fit packing
into sequences of 256 tokens with up to 16 images each. ``batch_size`` counts
packed sequences (each step sees a varying number of images, ~2-4 per sequence
here); the sigmoid loss (ring-chunked) ignores empty slots.

The model is ViT-B/16 shapes with factorized learned position embeddings
(row + column tables of 64 entries), attention only within each image and a
MAP head with one probe query per image slot (vlm_jax/models/navit.py). Zero-
shot evaluation feeds fixed-size ``pp.image_size`` images, one per sequence.

Variants (``:ARG``, comma-separated):
  runlocal         tiny model on the embedded shapes data rendered at 16-48 px
  naflex           SigLIP 2 NaFlex instead: one image per sequence, a learned
                   16 x 16 position grid resized to each image
  batch_size=INT   global number of packed sequences (default 4096)
"""

from vlm_jax import config_util
from vlm_jax.data import navit_pipeline


def get_config(arg=None):
  arg = config_util.parse_arg(arg, runlocal=False, naflex=False, batch_size=4096)
  c = config_util.base_config()
  c.seed = 0
  c.batch_size = arg.batch_size
  c.total_steps = 200_000
  c.log_every = 100
  c.eval_every = 5000
  c.checkpoint_every = 1000

  c.data.source = "tfds"
  c.data.tfds.name = "coco_captions"
  c.data.tfds.text_key = "captions/text"
  c.data.num_threads = 16
  c.pp.image_size = 224                  # zero-shot evaluation images (fixed size)
  c.pp.value_range = (-1.0, 1.0)
  c.tokenizer.kind = "sentencepiece"
  c.tokenizer.max_len = 64

  m = c.model
  m.image.type = "naflex" if arg.naflex else "navit"
  m.image.variant = "B/16"
  m.image.image_size = 256 if arg.naflex else 224
  m.image.posemb = "learn"
  m.image.posemb_coords = "absolute"
  m.image.posemb_size = None             # 64 (factorized) / 16 (naflex grid)
  m.image.pool_type = "map"
  m.image.attention = "auto"             # cuDNN fused attention on GPU, xla elsewhere
  m.image.seq_len = 256
  m.image.max_images = 16
  m.text.variant = "B"
  m.text.vocab_size = 32000
  m.text.max_len = 64
  m.out_dim = 768

  c.navit = navit_pipeline.default_config()
  c.navit.window = 512
  c.navit.resolution.kind = "uniform"
  c.navit.resolution.min_side = 64
  c.navit.resolution.max_side = 384
  c.navit.token_drop.kind = "beta"
  c.navit.token_drop.beta_a = 2.0
  c.navit.token_drop.beta_b = 2.0

  o = c.optimizer
  o.lr = 1e-3
  o.warmup_steps = 10_000
  o.b2 = 0.95
  # The paper's decoupled decay of 1e-4 (times the schedule's multiplier);
  # optax's adamw multiplies weight_decay by the learning rate, hence / lr.
  o.weight_decay = 1e-4 / o.lr

  if arg.runlocal:
    c.total_steps = 30
    c.batch_size = 8
    c.log_every = 5
    c.eval_every = 0
    c.checkpoint_every = 0
    c.data.source = "shapes"
    c.data.num_threads = 0
    c.data.shapes.train_size = 10_000
    c.pp.image_size = 32
    c.tokenizer.kind = "bytes"
    c.tokenizer.max_len = 32
    m.image.variant = None
    m.image.width, m.image.depth, m.image.mlp_dim, m.image.num_heads = 64, 2, 128, 4
    m.image.patch_size = 8
    m.image.image_size = 32
    m.image.posemb_size = 8 if not arg.naflex else 4
    m.image.attention = "xla"
    m.image.seq_len = 48
    m.image.max_images = 8
    m.text.variant = None
    m.text.width, m.text.depth, m.text.mlp_dim, m.text.num_heads = 64, 1, 128, 2
    m.text.vocab_size = 258
    m.text.max_len = 32
    m.out_dim = 64
    c.navit.window = 64
    c.navit.shapes_sizes = (16, 24, 32, 48)
    c.navit.resolution.kind = "none"
    c.navit.token_drop.kind = "constant"
    c.navit.token_drop.rate = 0.25
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 3
    c.evals.zeroshot.num_examples = 96
  return c
