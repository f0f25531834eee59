r"""SigLIP B/16 (Zhai et al. 2023): the paper's recipe for a pod.

    python -m vlm_jax.train --config configs/siglip_b16.py --workdir gs://bucket/siglip_b16 \
        --config.data.source=tfds --config.data.tfds.name=NAME --config.data.tfds.text_key=caption \
        --config.tokenizer.model_path=/path/to/spm_32k.model

Model: ViT-B/16 at 224 px with a MAP head; a 12-layer text transformer over
64 SentencePiece tokens (vocabulary 32,000), pooled at the last token, with a
768-d head; sigmoid loss with t' = log 10 and b = -10. 203,155,970 parameters,
exactly transformers' default SiglipModel.

Optimisation: batch 32,768, Adam(b2 = 0.95) with decoupled weight decay 1e-4,
peak learning rate 1e-3, linear warm-up then cosine decay; the sigmoid loss in
its ring-chunked form, so no device gathers the global batch. Data: TFDS
(``data.source="tfds"``) or a folder of images with a captions file
(``data.source="folder"``, ``data.folder.path``).

Variants (``:ARG``, comma-separated):
  runlocal        a tiny model with the same structure on the embedded data
  res=INT         image resolution (default 224)
  batch_size=INT  global batch (default 32768)
"""

from vlm_jax import config_util


def get_config(arg=None):
  arg = config_util.parse_arg(arg, runlocal=False, res=224, batch_size=32768)
  c = config_util.base_config()
  c.seed = 0
  c.batch_size = arg.batch_size
  # 9B examples seen at batch 32k.
  c.total_steps = 9_000_000_000 // c.batch_size
  c.log_every = 100
  c.eval_every = 5000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3

  # Real data: TFDS image-text or a folder; set the names on the command line.
  c.data.source = "tfds"
  c.data.tfds.name = "coco_captions"
  c.data.tfds.split = "train"
  c.data.tfds.image_key = "image"
  c.data.tfds.text_key = "captions/text"
  c.data.num_threads = 16
  c.pp.image_size = arg.res
  c.pp.crop = "resize"
  c.pp.value_range = (-1.0, 1.0)
  c.tokenizer.kind = "sentencepiece"
  c.tokenizer.max_len = 64
  c.evals.zeroshot.data = None

  m = c.model
  m.image.variant = "B/16"
  m.image.image_size = arg.res
  m.image.pool_type = "map"
  m.image.posemb = "learn"
  m.text.variant = "B"
  m.text.vocab_size = 32000
  m.text.max_len = 64
  m.text.pool_type = "last"
  m.out_dim = 768
  m.temperature_init = 10.0
  m.bias_init = -10.0
  m.dtype = "bfloat16"

  o = c.optimizer
  o.lr = 1e-3
  o.b1, o.b2 = 0.9, 0.95
  # The paper's decoupled decay of 1e-4 (times the schedule's multiplier);
  # optax's adamw multiplies weight_decay by the learning rate, hence / lr.
  o.weight_decay = 1e-4 / o.lr
  o.warmup_steps = 5000
  o.decay = "cosine"
  o.grad_clip_norm = 1.0

  c.loss = "sigmoid"
  c.loss_impl = "chunked"
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))

  if arg.runlocal:
    # Same structure, tiny sizes, embedded data and byte tokenizer.
    c.total_steps = 10
    c.batch_size = 16
    c.log_every, c.eval_every, c.checkpoint_every = 5, 10, 5
    c.data.source = "shapes"
    c.data.num_threads = 2
    c.pp.image_size = 32
    c.tokenizer.kind = "bytes"
    c.tokenizer.max_len = 16
    m.image.variant = None
    m.image.width, m.image.depth, m.image.mlp_dim, m.image.num_heads = 32, 2, 64, 2
    m.image.patch_size = 8
    m.image.image_size = 32
    m.text.variant = None
    m.text.width, m.text.depth, m.text.mlp_dim, m.text.num_heads = 32, 2, 64, 2
    m.text.vocab_size = 258
    m.text.max_len = 16
    m.out_dim = 32
    m.dtype = "float32"
    o.warmup_steps = 2
    c.evals.zeroshot.num_examples = 96
  return c
