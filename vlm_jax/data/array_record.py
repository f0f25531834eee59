"""ArrayRecord files as a random-access source (``data.source = "array_record"``).

ArrayRecord is grain's native random-access format; ``python -m vlm_jax.data.convert``
writes it from an image folder, from webdataset shards or from TFDS. Being random
access, it goes through the same MapDataset pipeline as folders and TFDS: a global
shuffle by (seed, epoch), exact resume, processes reading disjoint positions.

Record format (one record per example, ``encode_record``/``decode_record``): a
one-line UTF-8 JSON header, a newline, then the members' bytes back to back:

    {"key": "000123", "members": [["jpg", 48213], ["txt", 37], ["cls", 1]]}\\n<jpg bytes><txt bytes><cls bytes>

Members are named by extension as in a webdataset sample: the encoded image file as
stored in the input (one of ``IMAGE_EXTS``; never re-encoded), "txt" the caption's
bytes (UTF-8), "cls" the integer label as text (absent: no label). JSON escapes
newlines, so the first newline ends the header. Directory DIR also holds
``DIR/metadata.json``: {"format": "vlm_jax.array_record.v1", "num_records": N,
"classnames": [...] or null, "source": ...}.

A record that cannot be used (no image, a caption that is empty or not UTF-8, an
undecodable image) raises ``CorruptExampleError`` on access, which the training
pipeline skips and counts: the converter copies examples without judging them, so
training on converted data skips exactly what training on the input would.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Sequence

from vlm_jax.data import preprocess
from vlm_jax.data.webdataset import example_from_members, expand_braces, is_url

__all__ = ["ArrayRecordSource", "encode_record", "decode_record", "resolve_paths", "IMAGE_EXTS",
           "FORMAT", "SUFFIX"]

FORMAT = "vlm_jax.array_record.v1"
SUFFIX = ".array_record"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")


def encode_record(key: str, members: dict[str, bytes]) -> bytes:
    """One record: JSON header line + the members' bytes (see the module docstring)."""
    header = {"key": key, "members": [[ext, len(data)] for ext, data in members.items()]}
    return json.dumps(header, ensure_ascii=True).encode("ascii") + b"\n" + b"".join(members.values())


def decode_record(record: bytes, what: str = "record") -> tuple[str, dict[str, bytes]]:
    """(key, {extension: bytes}) of a record; CorruptExampleError if malformed."""
    end = record.find(b"\n")
    try:
        header = json.loads(record[:end].decode("utf-8")) if end >= 0 else None
        members, pos = {}, end + 1
        for ext, size in header["members"]:
            members[str(ext)] = bytes(record[pos:pos + int(size)])
            pos += int(size)
        key = str(header["key"])
    except (ValueError, TypeError, KeyError) as e:
        raise preprocess.CorruptExampleError(f"{what}: malformed record header: {e}") from e
    if pos != len(record):
        raise preprocess.CorruptExampleError(f"{what}: record is {len(record)} bytes, its header "
                                             f"describes {pos}")
    return key, members


def resolve_paths(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """ArrayRecord files of ``data.array_record.path``: a directory (its *.array_record,
    sorted), a file, a glob or brace pattern, or several of these ("::"-separated or a
    list); in order."""
    specs = os.fspath(spec).split("::") if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    for s in specs:
        for p in expand_braces(os.fspath(s)) if s else []:
            if is_url(p):
                paths.append(p)
            elif os.path.isdir(p):
                paths.extend(sorted(glob.glob(os.path.join(p, "*" + SUFFIX))))
            elif any(ch in p for ch in "*?["):
                paths.extend(sorted(glob.glob(p)))
            elif os.path.isfile(p):
                paths.append(p)
            else:
                raise FileNotFoundError(f"data.array_record.path: {p} does not exist")
    if not paths:
        raise FileNotFoundError(f"data.array_record.path {spec!r} names no {SUFFIX} files")
    return paths


class ArrayRecordSource:
    """Random access to converted examples: ``source[i] -> {"image": encoded bytes,
    "text": str, "label": int, "key": str}`` (label -1 without a "cls" member).

    Args:
      path: see ``resolve_paths``. ``metadata.json`` beside the first file gives
        ``classnames`` (None when the input had none).
    """

    def __init__(self, path: str | Sequence[str]):
        import grain  # pylint: disable=import-outside-toplevel
        self.paths = resolve_paths(path)
        self._ds = grain.sources.ArrayRecordDataSource(self.paths)
        self.classnames = None
        meta = os.path.join(os.path.dirname(self.paths[0]), "metadata.json")
        if not is_url(meta) and os.path.isfile(meta):
            with open(meta, encoding="utf-8") as f:
                self.classnames = json.load(f).get("classnames") or None
        from vlm_jax.data.sources import DEFAULT_TEMPLATES  # pylint: disable=import-outside-toplevel
        self.templates = DEFAULT_TEMPLATES

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        what = f"{self.paths[0] if len(self.paths) == 1 else 'array_record'}[{index}]"
        key, members = decode_record(self._ds[index], what)
        ex = example_from_members(members, image_ext=IMAGE_EXTS, text_ext="txt",
                                  label_ext="cls" if "cls" in members else "", what=f"{what} {key}")
        ex["key"] = key
        return ex

    def __getstate__(self) -> dict:
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"])

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} files, n={len(self)})"
