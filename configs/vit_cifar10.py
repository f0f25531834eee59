r"""A ViT trained from scratch to classify 32x32 images into 10 classes (CIFAR-10).

    python -m vlm_jax.train --config configs/vit_cifar10.py --workdir /tmp/cifar10
    # any folder in the class layout DIR/train/<class>/*.png, DIR/val/<class>/*.png:
    python -m vlm_jax.train --config configs/vit_cifar10.py:cpu --workdir /tmp/small \
        --config.data.source=folder --config.data.folder.path=DIR

The seed article trains a plain patch-4 ViT with cross-entropy and Adam and
reaches 60-65% on CIFAR-10. This recipe is the modern small-data ViT recipe
instead: patch 4 (64 tokens), global average pooling, AdamW with warmup and
cosine decay, weight decay 0.05, label smoothing, random shifts and flips,
TrivialAugment, and mixup / cutmix.

Variants (``--config configs/vit_cifar10.py:ARG``):
  (none)     the accelerator recipe: ViT width 384, depth 7 (ViT-Lite-7/4 size),
             batch 512 for 200 epochs of CIFAR-10 (TFDS ``cifar10``; val = test split)
  cpu        a small plain ViT (width 128, depth 4, 4 heads, patch 8, GAP; 558,218
             params with 10 classes) for a small 10-class set of small images (any
             size and format, resized to 32x32) on a 2-core CPU: 1200 steps of 128
             (2.5 epochs of 60k images), evaluated at steps 600 and 1200; the whole
             command in about 4-5 minutes (measured below)
  resnet     the same recipe with a CNN image encoder (ResNet-18 with a small-image
             root), for the seed's ViT-versus-CNN comparison on small data; with cpu
             (``cpu,resnet``) a ResNet-10-sized net (312,490 params)
  runlocal   a tiny model for a few steps on the embedded shapes data, for tests

Measured, the commands above on real MNIST written as a class folder (28x28 grey
PNG, 60k train / 10k val; experiments/make_small_image_folders.py), 2-core AMD EPYC,
machine otherwise idle (CPU = user + sys seconds):

  recipe        params    wall    CPU    val/top1 (mid-run, end)
  :cpu          558,218   262 s   470 s  0.9455, 0.9805
  :cpu,resnet   312,490   250 s   430 s  0.9914, 0.9942

Other folders, :cpu at 900 steps (runs shared the machine: wall times are upper
bounds): scikit-learn digits (real 8x8, upscaled; 1.4k/0.4k) 0.992 in 370 s;
distorted font-rendered digits (60k/10k) 0.879; coloured shapes on clutter (36x36
RGB JPEG, 50k/10k) 0.17: colour data that hard needs far more than 5 CPU-minutes.
On MNIST, patch 4 (64 tokens) in the same time: width 128, 300 steps of 128: 0.84;
width 64, 500 steps of 128: 0.93. Patch 8: 900 steps 0.975, 1500 steps 0.983.
"""

from vlm_jax import config_util


def get_config(arg=None):
  arg = config_util.parse_arg(arg, runlocal=False, cpu=False, resnet=False)
  c = config_util.base_config()
  c.task = "classification"
  c.seed = 0

  # Data: TFDS cifar10 (train / test); override with a class folder.
  c.data.source = "tfds"
  c.data.tfds.name = "cifar10"
  c.data.tfds.split = "train"
  c.data.tfds.label_key = "label"
  c.evals.classification.split = None     # the source's held-out split (cifar10: test)
  c.evals.zeroshot.enabled = False
  c.evals.retrieval.enabled = False

  c.pp.image_size = 32
  c.pp.crop = "random_pad"                  # shifts of up to 4 pixels
  c.pp.crop_padding = 4
  c.pp.flip = True
  c.pp.augment = "trivialaugment"
  c.pp.value_range = (-1.0, 1.0)

  c.classification.label_smoothing = 0.1
  c.classification.mixup_alpha = 0.8
  c.classification.cutmix_alpha = 1.0
  c.classification.mix_prob = 1.0

  m = c.model
  m.num_classes = 10
  m.image.type = "vit"
  m.image.variant = None
  m.image.width, m.image.depth, m.image.mlp_dim, m.image.num_heads = 384, 7, 1152, 6
  m.image.patch_size = 4
  m.image.image_size = 32
  m.image.pool_type = "gap"
  m.image.posemb = "learn"
  m.image.act = "gelu"
  m.head_init = "zeros"

  epoch = 50_000
  c.batch_size = 512
  c.total_steps = 200 * epoch // c.batch_size
  c.log_every = 100
  c.eval_every = 5 * epoch // c.batch_size
  c.checkpoint_every = c.eval_every
  o = c.optimizer
  o.lr = 1e-3
  o.warmup_steps = 5 * epoch // c.batch_size
  o.b2 = 0.999
  o.weight_decay = 0.05
  o.grad_clip_norm = 1.0

  if arg.cpu:
    # Sized for a 2-core CPU: the whole command, start-up and evaluations
    # included, in about 5 minutes. Patch 8 (a 4x4 grid of 16 tokens): a train
    # step of 128 images takes ~0.25 CPU-seconds, at patch 4 (64 tokens) ~1.2, too
    # few images in 5 minutes to reach 0.95 on MNIST (0.84-0.93 measured, see the
    # docstring). About 2.5 epochs of a 60k-image set: no flip (digits and letters
    # are not mirror-symmetric), shifts of up to 2 pixels, no other augmentation
    # and no mixing (little to regularise in two epochs); decoded images stay in
    # memory, so only the first epoch reads and decodes files.
    m.image.width, m.image.depth, m.image.mlp_dim, m.image.num_heads = 128, 4, 256, 4
    m.image.patch_size = 8
    c.batch_size = 128
    c.total_steps = 1200
    c.log_every = 50
    c.eval_every = 600                     # divides total_steps: the last step evaluates
    c.checkpoint_every = 600
    c.pp.flip = False
    c.pp.crop_padding = 2
    c.pp.augment = "none"
    c.data.cache_decoded = True
    c.classification.mixup_alpha = 0.0
    c.classification.cutmix_alpha = 0.0
    c.classification.label_smoothing = 0.1
    o.lr = 2e-3
    o.warmup_steps = 50
    o.weight_decay = 0.05

  if arg.resnet:
    # ResNet-18 with the small-image root (3x3/1 conv, no max-pool: 32x32 -> 4x4),
    # BatchNorm statistics over the global batch; same data, augmentation and schedule.
    m.image.type = "resnet"
    m.image.variant = "18"
    m.image.root = "small"
    m.image.pool_type = "gap"
    m.image.zero_init_residual = True
    if arg.cpu:
      # XLA's CPU convolutions are slow (~10 GFLOP/s here against ~100 for matmuls), so
      # the CPU variant downsamples at once: torchvision's root (7x7/2 conv + 3x3/2
      # max-pool: 32x32 -> 8x8), then one basic block per stage at 32-64-128 channels.
      # A 2-core CPU trains it about as fast as the cpu ViT (~750 vs ~880 img/s).
      m.image.root = "imagenet"
      m.image.stage_depths = (1, 1, 1)
      m.image.base_width = 32

  if arg.runlocal:
    c.data.source = "shapes"
    c.evals.classification.num_examples = 96
    c.total_steps = 10
    c.batch_size = 16
    c.log_every = 5
    c.eval_every = 10
    c.checkpoint_every = 5
    o.warmup_steps = 2
    m.num_classes = None                   # from the data: 48 shapes classes
    m.image.width, m.image.depth, m.image.mlp_dim, m.image.num_heads = 32, 1, 64, 2
    c.pp.augment = "none"
  return c
