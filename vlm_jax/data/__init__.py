"""Input data: sources (embedded shapes, TFDS, image folders, webdataset tar shards,
ArrayRecord), preprocessing, tokenizers, grain pipelines, and NaViT packing (``packing``).

    from vlm_jax.data import pipeline, config
    cfg = config.default_config(); cfg.seed = 0; cfg.batch_size = 256
    it = iter(pipeline.train_dataset(cfg))
    batch = next(it)   # {"image": float32 [256,32,32,3], "tokens": int32 [256,64]}
"""

import importlib

from vlm_jax.data.preprocess import CorruptExampleError
from vlm_jax.data.shapes import CLASSNAMES, ZEROSHOT_TEMPLATES, class_prompts
from vlm_jax.data.sources import (CaptionsFileError, ClassFolderSource, FolderSource, TfdsSource,
                                  build_source)
from vlm_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, build_tokenizer

_LAZY = ("array_record", "augment", "config", "convert", "navit_pipeline", "packing", "pipeline",
         "preprocess", "shapes", "sources", "tokenizers", "webdataset")


def __getattr__(name):
    # Submodules by attribute, imported on first use (``vlm_jax.data.packing.pack``).
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
