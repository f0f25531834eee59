"""Random-access data sources: TFDS datasets and folders of images with captions.

Every source is a grain ``RandomAccessDataSource``: ``len(source)`` and
``source[i] -> dict(image=..., text=str, label=int)`` (label -1 when unknown).
``image`` is a uint8 [H, W, 3] array. Sources with labels also carry
``classnames`` (list[str]) and ``templates`` (zero-shot prompt templates).

``build_source(config.data, split)`` picks one from the config (see config.py).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np

from vlm_jax.data import classnames, preprocess, shapes

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class CaptionsFileError(ValueError):
    """A malformed captions file; the message names the file and line."""


def _get_path(example: dict, key: str) -> Any:
    """example[key], or a nested lookup for "a/b/c" when no such flat key exists."""
    if key in example:
        return example[key]
    node: Any = example
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys.extend(_flat_keys(v, prefix + k + "/"))
    return keys


def _as_text(value: Any, index: int, what: str) -> str:
    """A str from a TFDS text value; a list/array of captions gives caption ``index % n``."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) == 0:
            raise preprocess.CorruptExampleError(f"{what}: empty caption list")
        value = value[index % len(value)]
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise TypeError(f"{what}: caption is {type(value).__name__}, expected text")
    return value


class TfdsSource:
    """A TFDS dataset read with ``tfds.data_source`` (ArrayRecord random access, no TensorFlow).

    Args:
      name: TFDS name, e.g. "cifar10" or "coco_captions:2017" (prepared in ArrayRecord format).
      split: TFDS split string, e.g. "train", "test[:1000]".
      data_dir: TFDS data directory (None: TFDS default).
      image_key: feature holding the image.
      text_key: feature holding the caption (a string, or a list of strings of
        which example i uses caption ``i % n``); "a/b" reaches nested features.
        None: captions come from ``caption_template`` over the class name.
      label_key: ClassLabel feature (None: no labels, label -1).
      caption_template: caption for labelled data when ``text_key`` is None.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None,
                 image_key: str = "image", text_key: str | None = None,
                 label_key: str | None = "label", caption_template: str = "a photo of a {}."):
        import tensorflow_datasets as tfds  # Local import: heavy, and only needed here.

        if not name:
            raise ValueError("data.tfds.name is empty")
        self.name, self.split = name, split
        self._ds = tfds.data_source(name, split=split, data_dir=data_dir or None)
        features = self._ds.dataset_info.features
        available = _flat_keys(dict(features.items())) if hasattr(features, "items") else []

        def _check(field: str, key: str | None) -> None:
            if key and available and key not in available:
                raise KeyError(f"data.tfds.{field}={key!r} is not a feature of {name}; "
                               f"features: {available}")

        _check("image_key", image_key)
        _check("text_key", text_key)
        _check("label_key", label_key)
        if not text_key and not label_key:
            raise ValueError(f"TFDS {name}: set data.tfds.text_key (captions) or "
                             "data.tfds.label_key (captions from caption_template)")
        self.image_key, self.text_key, self.label_key = image_key, text_key or None, label_key or None
        self.caption_template = caption_template
        self.classnames: list[str] | None = None
        if self.label_key:
            feat = features
            for part in self.label_key.split("/"):
                feat = feat[part]
            names = getattr(feat, "names", None)
            if names is not None:
                names = classnames.readable(name, names)
                self.classnames = [n.replace("_", " ") for n in names]
            elif not self.text_key:
                raise ValueError(f"data.tfds.label_key={label_key!r} of {name} is not a ClassLabel "
                                 "(no class names), so it cannot make captions; set text_key")
            if not self.text_key and "{}" not in caption_template:
                raise ValueError(f"data.tfds.caption_template {caption_template!r} has no '{{}}'")
        self.templates = DEFAULT_TEMPLATES

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.read(index)

    def read(self, index: int, *, all_texts: bool = False) -> dict[str, Any]:
        """``source[index]``; with ``all_texts`` also "texts": every caption of the example
        (retrieval counts an image as found by any of its captions)."""
        index = int(index)
        what = f"{self.name}[{self.split}][{index}]"
        ex = self._ds[index]
        image = preprocess.decode_image(_get_path(ex, self.image_key), what=what)
        label = -1
        if self.label_key:
            label = int(np.asarray(_get_path(ex, self.label_key)))
        if self.text_key:
            value = _get_path(ex, self.text_key)
            text = _as_text(value, index, what)
            if isinstance(value, np.ndarray) and value.ndim == 0:
                value = value.item()
            many = isinstance(value, (list, tuple, np.ndarray))
            texts = [_as_text(value, i, what) for i in range(len(value))] if many else [text]
        else:
            text = shapes.fix_articles(self.caption_template.format(self.classnames[label]))
            texts = [text]
        out = dict(image=image, text=text, label=label)
        if all_texts:
            out["texts"] = texts
        return out

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


class FolderSource:
    """A folder of images with a captions file; images are decoded on access.

    Args:
      path: the folder; image paths in the captions file are relative to it
        (absolute paths are kept).
      captions: the captions file, relative to ``path`` or absolute. Either
        JSON lines (".jsonl"/".json": one object per line with "image" and
        "caption", optionally "label") or CSV (".csv": a header with columns
        "image" and "caption", optionally "label"). ``None`` looks for
        captions.jsonl, then captions.csv. "label" holds a class name; the
        sorted distinct names become ``classnames`` and labels index them.

    Raises:
      CaptionsFileError: (at construction) a malformed file, naming file and line.
    ``source[i]`` raises ``CorruptExampleError`` for a missing or undecodable image.
    """

    def __init__(self, path: str, captions: str | None = "captions.jsonl"):
        if not path:
            raise ValueError("data.folder.path is empty")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"data.folder.path {path!r} is not a directory")
        self.path = os.fspath(path)
        if captions is None:
            for cand in ("captions.jsonl", "captions.csv"):
                if os.path.exists(os.path.join(path, cand)):
                    captions = cand
                    break
            else:
                raise FileNotFoundError(f"no captions.jsonl or captions.csv in {path!r}")
        self.captions_file = captions if os.path.isabs(captions) else os.path.join(path, captions)
        if not os.path.isfile(self.captions_file):
            raise FileNotFoundError(f"captions file {self.captions_file!r} does not exist")
        ext = os.path.splitext(self.captions_file)[1].lower()
        if ext in (".jsonl", ".json"):
            rows = self._read_jsonl(self.captions_file)
        elif ext == ".csv":
            rows = self._read_csv(self.captions_file)
        else:
            raise CaptionsFileError(f"{self.captions_file}: unknown captions format {ext!r}; "
                                    "use .jsonl or .csv")
        if not rows:
            raise CaptionsFileError(f"{self.captions_file}: no examples")
        self._images = [r[0] for r in rows]
        self._captions = [r[1] for r in rows]
        labels = [r[2] for r in rows]
        if all(lab is None for lab in labels):
            self.classnames = None
            self._labels = [-1] * len(rows)
        else:
            missing = [r[3] for r in rows if r[2] is None]
            if missing:
                raise CaptionsFileError(f"{self.captions_file}:{missing[0]}: 'label' is missing "
                                        "(other lines have one; give every line a label or none)")
            self.classnames = sorted(set(labels))
            ids = {c: i for i, c in enumerate(self.classnames)}
            self._labels = [ids[lab] for lab in labels]
        self.templates = DEFAULT_TEMPLATES

    @staticmethod
    def _field(value: Any, name: str, file: str, line: int, optional: bool = False) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            if optional:
                return None
            raise CaptionsFileError(f"{file}:{line}: missing or empty {name!r}")
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise CaptionsFileError(f"{file}:{line}: {name!r} must be a string, got {type(value).__name__}")
        return str(value)

    @classmethod
    def _read_jsonl(cls, file: str) -> list[tuple]:
        rows = []
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CaptionsFileError(f"{file}:{line_no}: invalid JSON: {e.msg}") from e
                if not isinstance(obj, dict):
                    raise CaptionsFileError(f"{file}:{line_no}: expected a JSON object with "
                                            "'image' and 'caption'")
                for key in ("image", "caption"):
                    if key not in obj:
                        raise CaptionsFileError(f"{file}:{line_no}: missing key {key!r}")
                rows.append((cls._field(obj["image"], "image", file, line_no),
                             cls._field(obj["caption"], "caption", file, line_no),
                             cls._field(obj.get("label"), "label", file, line_no, optional=True),
                             line_no))
        return rows

    @classmethod
    def _read_csv(cls, file: str) -> list[tuple]:
        rows = []
        with open(file, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for col in ("image", "caption"):
                if col not in header:
                    raise CaptionsFileError(f"{file}:1: missing column {col!r} in header {header}")
            for row in reader:
                line_no = reader.line_num
                if None in row:
                    raise CaptionsFileError(f"{file}:{line_no}: more fields than header columns")
                rows.append((cls._field(row.get("image"), "image", file, line_no),
                             cls._field(row.get("caption"), "caption", file, line_no),
                             cls._field(row.get("label"), "label", file, line_no, optional=True),
                             line_no))
        return rows

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.encoded(index)
        ex["image"] = preprocess.decode_image(ex["path"], what=ex["path"])
        return ex

    def encoded(self, index: int) -> dict[str, Any]:
        """``source[index]`` with "image" still the file path (the pipeline decodes it)."""
        index = int(index)
        rel = self._images[index]
        full = rel if os.path.isabs(rel) else os.path.join(self.path, rel)
        return dict(image=full, text=self._captions[index], label=self._labels[index], path=full)

    def __repr__(self) -> str:
        return f"FolderSource({self.path!r}, captions={self.captions_file!r}, n={len(self)})"


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm")
# Split name -> the subfolders that may hold it, first found wins.
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "valid", "test"),
               "validation": ("validation", "val", "valid", "test"),
               "test": ("test", "val", "validation", "valid")}


def is_class_folder(path: str) -> bool:
    """True for the ImageNet layout: ``path/train/<class>/...`` (no captions file needed)."""
    return os.path.isdir(os.path.join(path, "train"))


class ClassFolderSource:
    """Images in one subfolder per class (torchvision's ImageFolder / ImageNet layout).

        DIR/train/<class name>/*.{jpg,jpeg,png,...}    DIR/val/<class name>/*

    Classes are the sorted subfolder names of ``DIR/train`` (the same list for every
    split, so label ids agree); ``source[i]`` -> {"image": uint8 [H,W,3], "text":
    caption_template filled with the class name, "label": int, "path": str}.
    Files are listed recursively in sorted order; hidden files and other extensions
    are ignored.

    Args:
      path: DIR.
      split: "train", or "val" (also found as validation/, valid/ or test/), "test".
      caption_template: the caption of an image of class c (contrastive training).
    Raises:
      FileNotFoundError / ValueError naming the folder at fault.
    """

    def __init__(self, path: str, split: str = "train", caption_template: str = "a photo of a {}."):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"data.folder.path {path!r} is not a directory")
        names = _SPLIT_DIRS.get(split, (split,))
        found = [n for n in names if os.path.isdir(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(
                f"{path!r} has no {' / '.join(n + '/' for n in names)} folder for split {split!r} "
                "(expected DIR/train/<class>/... and DIR/val/<class>/...)")
        self.path, self.split = os.fspath(path), split
        self.split_dir = os.path.join(path, found[0])
        class_root = os.path.join(path, "train") if is_class_folder(path) else self.split_dir
        self.classnames = sorted(d.name for d in os.scandir(class_root)
                                 if d.is_dir() and not d.name.startswith("."))
        if not self.classnames:
            raise ValueError(f"{class_root!r} has no class subfolders")
        ids = {c: i for i, c in enumerate(self.classnames)}
        self._files, self._labels = [], []
        for d in sorted(os.scandir(self.split_dir), key=lambda e: e.name):
            if not d.is_dir() or d.name.startswith("."):
                continue
            if d.name not in ids:
                raise ValueError(f"{d.path!r}: class {d.name!r} is not among the training "
                                 f"classes of {class_root!r}")
            for root, dirs, files in os.walk(d.path):
                dirs[:] = sorted(x for x in dirs if not x.startswith("."))
                for f in sorted(files):
                    if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                        self._files.append(os.path.join(root, f))
                        self._labels.append(ids[d.name])
        if not self._files:
            raise ValueError(f"{self.split_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        if "{}" not in caption_template:
            raise ValueError(f"data.folder.caption_template {caption_template!r} has no '{{}}'")
        self.caption_template = caption_template
        self.templates = (caption_template,)

    @property
    def labels(self) -> np.ndarray:
        """int32 [N]: the class id of every image (no decoding)."""
        return np.asarray(self._labels, np.int32)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.encoded(index)
        ex["image"] = preprocess.decode_image(ex["path"], what=ex["path"])
        return ex

    def encoded(self, index: int) -> dict[str, Any]:
        """``source[index]`` with "image" still the file path (the pipeline decodes it)."""
        index = int(index)
        full, label = self._files[index], self._labels[index]
        text = shapes.fix_articles(self.caption_template.format(self.classnames[label]))
        return dict(image=full, text=text, label=label, path=full)

    def __repr__(self) -> str:
        return (f"ClassFolderSource({self.split_dir!r}, n={len(self)}, "
                f"classes={len(self.classnames)})")


class CachedSource:
    """Wraps a source and keeps each example, its image decoded, after its first read.

    ``source[i]`` is read from ``inner`` once; its image is decoded to uint8
    [H, W, 3] (and, with ``image_size``, squashed to that size with ``method``, as
    ``preprocess.resize_crop`` mode "resize" does) and stored read-only, so later
    epochs do no file reading, decoding or resizing. Examples that fail to read
    (``CorruptExampleError``, ``OSError``) are not stored: they fail again on every
    read, as without the cache. Other attributes (``classnames``, ``labels``, ...)
    are the inner source's. Safe for the pipeline's reader threads (a racing
    first read stores the same value twice).
    """

    def __init__(self, inner: Any, image_size: Any = None, method: str = "bilinear"):
        self.inner = inner
        self.image_size = image_size
        self.method = method
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def num_cached(self) -> int:
        return len(self._cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        ex = self._cache.get(index)
        if ex is None:
            ex = dict(self.inner[index])
            image = preprocess.decode_image(ex["image"], what=str(ex.get("path", index)))
            if self.image_size is not None:
                image = preprocess.resize_crop(image, self.image_size, "resize", method=self.method)
            image = np.ascontiguousarray(image)
            image.flags.writeable = False  # shared by every later read
            ex["image"] = image
            self._cache[index] = ex
        return dict(ex)

    def __repr__(self) -> str:
        return f"CachedSource({self.inner!r}, image_size={self.image_size!r})"


def default_eval_split(data_config: Any) -> str:
    """The held-out split of ``config.data``'s source: shapes "heldout", a class
    folder "val", TFDS the preset's evaluation split (e.g. cifar10 "test")."""
    kind = data_config.source
    if kind == "shapes":
        return "heldout"
    if kind == "folder":
        return "val"
    from vlm_jax.evaluators.data import TFDS_PRESETS  # pylint: disable=import-outside-toplevel
    name = data_config.tfds.name.split(":")[0].split("/")[0]
    return TFDS_PRESETS.get(name, {}).get("split", "test")


def build_source(data_config: Any, split: str | None = None, *, image_size: int | None = None):
    """A source from ``config.data``.

    Args:
      data_config: the ``data`` ConfigDict (fields in config.py).
      split: which split. None: the training split (shapes "train", TFDS
        ``data.tfds.split``). Shapes: "train" | "heldout"; TFDS: any TFDS split
        string; a folder with a captions file: ignored (the folder is one split);
        a class folder (``DIR/train/<class>/``): "train" | "val" | "test".
      image_size: render size for the shapes source when ``data.shapes.image_size``
        is None (the pipeline passes ``pp.image_size``).
    Returns:
      ShapesSource | TfdsSource | FolderSource | ClassFolderSource | ArrayRecordSource
      (``data.array_record.path``; one split, ``split`` is ignored).
    """
    kind = data_config.source
    if kind == "shapes":
        c = data_config.shapes
        split = split or "train"
        size = c.get("image_size") or image_size or 32
        if isinstance(size, (tuple, list)):
            if len(set(size)) != 1:
                raise ValueError(f"shapes renders square images; got image size {size}")
            size = size[0]
        n = c.train_size if split == "train" else c.heldout_size
        return shapes.ShapesSource(split, num_examples=n, image_size=size, seed=c.seed)
    if kind == "tfds":
        c = data_config.tfds
        return TfdsSource(c.name, split or c.split, data_dir=c.get("data_dir"),
                          image_key=c.image_key, text_key=c.get("text_key"),
                          label_key=c.get("label_key"), caption_template=c.caption_template)
    if kind == "folder":
        c = data_config.folder
        captions = c.get("captions")
        if c.path and captions and not os.path.isabs(captions):
            captions_path = os.path.join(c.path, captions)
        else:
            captions_path = captions
        if captions_path and os.path.isfile(captions_path):
            return FolderSource(c.path, captions)
        if c.path and is_class_folder(c.path):
            return ClassFolderSource(c.path, split or "train",
                                     c.get("caption_template") or "a photo of a {}.")
        if not c.path:
            raise ValueError("data.folder.path is empty")
        raise FileNotFoundError(
            f"data.folder.path {c.path!r} has neither a captions file ({captions!r}, see "
            "data.folder.captions) nor one subfolder per class under train/ "
            "(DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg)")
    if kind == "array_record":
        from vlm_jax.data.array_record import ArrayRecordSource  # pylint: disable=import-outside-toplevel
        if not data_config.array_record.path:
            raise ValueError("data.array_record.path is empty")
        return ArrayRecordSource(data_config.array_record.path)
    if kind == "webdataset":
        raise ValueError("data.source='webdataset' is a stream for training (pipeline."
                         "example_dataset), not a random-access source: evaluate on another source "
                         "(evals.*.data) or convert the shards (python -m vlm_jax.data.convert)")
    raise ValueError("data.source must be 'shapes', 'tfds', 'folder', 'webdataset' or "
                     f"'array_record', got {kind!r}")
