"""Defaults for every data-related config field; recipes start here and override.

    config = vlm_jax.data.config.default_config()   # data, pp, tokenizer, evals
    config.seed, config.batch_size = 0, 256            # recipe top-level fields also read

The pipeline also reads two top-level fields that every recipe has: ``seed``
(the shuffle order and augmentation randomness) and ``batch_size`` (global).
Fields that may be unset are ml_collections placeholders, so they can still be
overridden from the command line (``--config.data.tfds.data_dir=/data``).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def default_config() -> ml_collections.ConfigDict:
    """ConfigDict with fields ``data``, ``pp``, ``tokenizer`` and ``evals`` (zeroshot,
    retrieval, linear_probe)."""
    c = ml_collections.ConfigDict()

    # ---- data: where examples come from, and how they are read.
    c.data = ml_collections.ConfigDict()
    # "shapes" (embedded procedural captions, the default) | "tfds" | "folder" |
    # "webdataset" (tar shards, streamed) | "array_record".
    c.data.source = "shapes"
    c.data.shapes = ml_collections.ConfigDict()
    c.data.shapes.train_size = 100_000_000  # virtual length of the "train" split
    c.data.shapes.heldout_size = 5_000  # length of the "heldout" split (zero-shot eval)
    c.data.shapes.seed = 0  # dataset seed: which images exist (not the shuffle order)
    c.data.shapes.image_size = config_dict.placeholder(int)  # render size; None: pp.image_size
    c.data.tfds = ml_collections.ConfigDict()
    c.data.tfds.name = ""  # e.g. "cifar10", "coco_captions"
    c.data.tfds.split = "train"  # training split (TFDS split string)
    c.data.tfds.data_dir = config_dict.placeholder(str)  # None: TFDS default
    c.data.tfds.image_key = "image"
    c.data.tfds.text_key = config_dict.placeholder(str)  # caption feature ("a/b" nested); None: use label
    c.data.tfds.label_key = "label"  # ClassLabel feature; "" for none
    c.data.tfds.caption_template = "a photo of a {}."  # caption from the class name when no text_key
    c.data.folder = ml_collections.ConfigDict()
    c.data.folder.path = ""  # folder of images
    c.data.folder.captions = "captions.jsonl"  # .jsonl or .csv, relative to path
    # Without a captions file, DIR/train/<class>/* and DIR/val/<class>/* (ImageFolder
    # layout): labels from the sorted class names, captions from this template.
    c.data.folder.caption_template = "a photo of a {}."
    # webdataset tar shards (vlm_jax/data/webdataset.py), streamed; for training only.
    c.data.webdataset = ml_collections.ConfigDict()
    # Brace pattern ("/data/shard-{000000..000123}.tar") or "::"-separated patterns
    # ("::".join(a_list)); local paths or fsspec URLs (gs:// needs gcsfs, s3:// s3fs).
    c.data.webdataset.shards = ""
    c.data.webdataset.image_ext = "jpg;jpeg;png;webp"  # image member: first extension found
    c.data.webdataset.text_ext = "txt;json"  # caption member: first found (UTF-8 text or JSON)
    c.data.webdataset.caption_field = "caption"  # .json members: the caption's field ("a/b" nested)
    c.data.webdataset.label_ext = ""  # e.g. "cls": integer label text; "" for no labels
    # Samples in the shuffle buffer, after a per-epoch shard shuffle (with data.shuffle;
    # <= 1: shard shuffle only). Checkpoints hold it as (shard, offset, size) references.
    c.data.webdataset.shuffle_buffer = 1000
    # ArrayRecord files written by ``python -m vlm_jax.data.convert`` (vlm_jax/data/array_record.py).
    c.data.array_record = ml_collections.ConfigDict()
    # A directory of *.array_record files, a file, a glob or brace pattern ("::" joins several).
    c.data.array_record.path = ""
    c.data.shuffle = True  # global shuffle (by config.seed, a new order every epoch)
    c.data.num_threads = 2  # threads that read + preprocess examples (0: in the caller's thread)
    c.data.prefetch_buffer_size = 256  # examples read ahead by those threads
    # Worker processes that read, decode and augment training examples and stack them
    # into batches (grain mp_prefetch; one shared-memory transfer per batch), each with
    # num_threads reader threads (<= 1: its own thread). 0: read in this process's
    # threads only. Processes escape the GIL (Python-heavy augmentation, many cores);
    # each takes seconds to start and keeps its own data.cache_decoded. Same batches
    # as 0 (webdataset: the same for a given worker count). experiments/input_pipeline.py.
    c.data.num_workers = 0
    c.data.max_consecutive_skips = 1000  # this many corrupt examples in a row is an error
    # Keep each training image in memory once decoded (uint8, already resized to
    # pp.image_size when pp.crop is "resize" or "random_pad"), so later epochs skip
    # file reads, decoding and resizing. For small datasets only: memory grows to
    # the whole split (60k images of 32x32: ~0.25 GB). Batches are the same as without.
    c.data.cache_decoded = False

    # ---- pp: image preprocessing (training; evaluation uses eval_crop and no flip).
    c.pp = ml_collections.ConfigDict()
    c.pp.image_size = 32  # output side in pixels
    c.pp.crop = "resize"  # "resize" (squash) | "center" | "random_resized" | "random_pad"
    # None: crop, or "center" for random_resized and "resize" for random_pad.
    c.pp.eval_crop = config_dict.placeholder(str)
    c.pp.crop_padding = 4  # random_pad: pad this many pixels, then take a random crop
    c.pp.crop_scale = (0.08, 1.0)  # random_resized: area fraction range
    c.pp.crop_ratio = (0.75, 4 / 3)  # random_resized: aspect ratio (w/h) range
    c.pp.resize_method = "bilinear"  # "nearest" | "bilinear" | "bicubic" | "lanczos"
    c.pp.flip = False  # random left-right flip (off: shapes captions say "left"/"right")
    c.pp.value_range = (-1.0, 1.0)  # pixels 0-255 map linearly onto this range, float32
    # Decode JPEGs at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling) when the crop needs at
    # most 1/3 of the file's resolution: the same crop region, pixels within ~1 level of
    # 255 of the exact path, ~2x less work for images far larger than pp.image_size
    # (web images; ImageNet-sized files at 224 px decode in full). False: exact.
    c.pp.fast_decode = False
    c.pp.max_pixels = 89_478_485  # larger images are corrupt examples (decompression bombs)
    # Training-only policy on the cropped uint8 image (vlm_jax.data.augment):
    # "none" | "trivialaugment" (TrivialAugmentWide) | "randaugment".
    c.pp.augment = "none"
    c.pp.randaug_num_ops = 2  # randaugment: ops per image
    c.pp.randaug_magnitude = 9  # randaugment: magnitude bin (of 31)

    # ---- tokenizer: captions -> int32 [B, max_len].
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.kind = "bytes"  # "bytes" (vocab 258, no file) | "sentencepiece"
    c.tokenizer.model_path = ""  # SentencePiece .model file (kind "sentencepiece")
    c.tokenizer.max_len = 64  # tokens per caption, EOS included (shapes captions are <= 60 bytes)

    # ---- evals: evaluators (vlm_jax.evaluators). Those with enabled=True run during
    # training every ``eval_every`` steps and in ``python -m vlm_jax.evaluate``.
    # Each may read another source via its ``data`` (a ConfigDict shaped like ``data``;
    # None: ``config.data``); ``vlm_jax.evaluators.tfds_data("cifar10")`` makes one.
    c.evals = ml_collections.ConfigDict()
    # evals.zeroshot: zero-shot classification on a labelled split.
    c.evals.zeroshot = ml_collections.ConfigDict()
    c.evals.zeroshot.enabled = True
    c.evals.zeroshot.split = "heldout"  # shapes: "heldout"; TFDS: e.g. "test"
    c.evals.zeroshot.num_examples = 2000  # first N examples of the split; -1 for all
    c.evals.zeroshot.batch_size = 256  # images per encode call
    c.evals.zeroshot.templates = config_dict.placeholder(tuple)  # None: the source's templates
    # Optional ConfigDict shaped like ``data`` to evaluate on another source (e.g.
    # train on a folder, evaluate on TFDS cifar10); None: ``config.data``.
    c.evals.zeroshot.data = None

    # evals.retrieval: image->text and text->image recall@{1,5,10} on paired data
    # (shapes: the held-out images with their own captions; TFDS coco_captions: every
    # caption of each image, text_key "captions/text").
    c.evals.retrieval = ml_collections.ConfigDict()
    c.evals.retrieval.enabled = True
    c.evals.retrieval.split = "heldout"  # shapes: "heldout"; TFDS: e.g. "val"
    c.evals.retrieval.num_examples = 500  # first N images of the split; -1 for all
    c.evals.retrieval.batch_size = 256  # images / captions per encode call
    c.evals.retrieval.ks = (1, 5, 10)  # recall@k values reported
    c.evals.retrieval.data = None

    # evals.linear_probe: a linear classifier (closed-form ridge regression on
    # one-hot targets) on frozen image embeddings; off by default during training.
    c.evals.linear_probe = ml_collections.ConfigDict()
    c.evals.linear_probe.enabled = False
    c.evals.linear_probe.train_split = "train"  # shapes: "train"; TFDS: e.g. "train[:10000]"
    c.evals.linear_probe.test_split = "heldout"  # shapes: "heldout"; TFDS: e.g. "test"
    c.evals.linear_probe.num_train = 2000  # first N examples of train_split; -1 for all
    c.evals.linear_probe.num_test = 1000  # first N examples of test_split; -1 for all
    c.evals.linear_probe.batch_size = 256
    # Ridge penalties tried (relative to the mean eigenvalue of the feature covariance);
    # the one with the best accuracy on the last ``val_fraction`` of the train split wins.
    c.evals.linear_probe.l2_regs = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    c.evals.linear_probe.val_fraction = 0.2
    c.evals.linear_probe.data = None

    # evals.classification (task "classification"): top-1 / top-5 accuracy and the
    # cross-entropy on a labelled split, logged as "val/top1", "val/top5", "val/loss",
    # and a confusion-matrix PNG (WORKDIR/confusion/step_<N>.png) at each evaluation.
    c.evals.classification = ml_collections.ConfigDict()
    c.evals.classification.enabled = True
    c.evals.classification.split = config_dict.placeholder(str)  # None: the source's held-out split
    c.evals.classification.num_examples = -1  # first N examples of the split; -1 for all
    c.evals.classification.batch_size = 256
    c.evals.classification.confusion_matrix = True
    c.evals.classification.data = None
    return c
