"""Webdataset tar shards as a streaming training source (``data.source = "webdataset"``).

Shards are tar files in the webdataset / img2dataset layout: the members whose names
share the part before the first dot of the file name form one sample, e.g.
``000123.jpg`` + ``000123.txt`` (+ ``000123.json``, ``000123.cls``). Shards are named by
brace patterns ("/data/shard-{000000..000123}.tar", "{a,b}"), several joined by "::"
(or a Python list), on the local disk or behind any fsspec URL (gs:// needs the gcsfs
package, s3:// needs s3fs).

The stream of one process (``WebDataset``):

    shards[process_index::process_count]
      --epoch e: shard order permuted by (seed, e) (kept as listed with shuffle off)-->
      samples of each shard in tar order --seeded shuffle buffer, drained at each
      epoch's end--> (position, sample) --read + decode + augment (pipeline)--> examples

Reading is in two parts. The stream parses tar headers only (it seeks over member
data) and yields sample references (shard, byte offset, byte size); the pipeline's
reader threads (or worker processes) then read each sample's bytes with one ranged
read and decode it. The stream is cheap (tens of microseconds a sample), so every
reader thread runs it whole and keeps the positions ``i::num_threads`` (grain's
``set_slice``), which makes the output independent of the number of threads. Worker
processes (``data.num_workers``) split it the same way, worker w keeping positions
w::num_workers, but batch consecutive positions of their own, so there the batches
depend on the worker count (pipeline._worker_runs). On remote storage every thread's
header scan streams the shard through fsspec's read-ahead as well: for heavy remote
use, copy the shards close to the hosts or convert them to ArrayRecord.

Exact resume: ``get_state()`` holds (epoch, shard, byte offset of the next sample in
that shard), the stream position and the shuffle buffer as (shard, offset, size)
references, so ``set_state`` re-reads nothing but what it names. Augmentation
randomness comes from (seed, position), as in the random-access pipeline, so a
restored iterator (after a checkpoint restore, e.g. following kill -9) yields the
same examples as an uninterrupted one.

An epoch is one pass over the process's shards; the shuffle buffer is drained at its
end, so every epoch holds each sample exactly once.

Shuffling semantics. With ``data.shuffle = False`` and one process the stream is the
shards in the order given and the samples in tar order: the same examples, in the
same order, as the ArrayRecord files ``python -m vlm_jax.data.convert --from
webdataset`` writes from them, so training on either gives identical batches. With
shuffling, webdataset is shard shuffle + buffer shuffle (``data.webdataset.
shuffle_buffer`` samples) while ArrayRecord is a global shuffle: each epoch has the
same examples, in a different order.

Robustness. Corrupt samples are skipped and counted in the training iterator's
``num_skipped`` ("data/skipped"): undecodable or truncated images, decompression
bombs, a missing image or caption member, empty captions, text that is not UTF-8,
unparsable JSON; a truncated shard yields its complete samples and counts one skip
for the rest. A missing shard is a ``FileNotFoundError`` naming it, raised when the
dataset is built.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import tarfile
from typing import Any, Iterable, Iterator, Sequence

import grain
import numpy as np

from vlm_jax.data import preprocess

__all__ = ["WebDataset", "ShardSamples", "expand_shards", "example_from_members", "scan_shard",
           "write_shards", "split_key"]

_PACKAGE_FOR = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "az": "adlfs",
                "abfs": "adlfs", "hf": "huggingface_hub", "http": "aiohttp", "https": "aiohttp"}
_BLOCK = 512
_M64 = (1 << 64) - 1
# A sample handle packs (shard index, byte offset, byte size) into one int.
_OFF_BITS = _SIZE_BITS = 44


# --------------------------------------------------------------------------- files


def expand_braces(pattern: str) -> list[str]:
    """"a{00..02}b" -> a00b a01b a02b (zero padding kept); "{x,y}" -> x y; nested and
    repeated groups expand left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        parts = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        parts = body.split(",")
    return [x for p in parts for x in expand_braces(head + p + tail)]


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """The shard paths of ``data.webdataset.shards``: a brace pattern, a list of
    patterns, or a string of patterns separated by "::" (webdataset's convention)."""
    if isinstance(spec, str):
        spec = [s for s in spec.split("::") if s.strip()]
    paths = [p for s in spec for p in expand_braces(str(s).strip())]
    if not paths:
        raise ValueError("data.webdataset.shards is empty (give a brace pattern such as "
                         "'/data/shard-{000000..000099}.tar' or a list of paths)")
    return paths


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem(path: str):
    """(fsspec filesystem, path within it) for a URL; a clear error when the package
    that reads its scheme is not installed."""
    import fsspec  # pylint: disable=import-outside-toplevel
    try:
        return fsspec.core.url_to_fs(path)
    except ImportError as e:
        scheme = path.split("://", 1)[0]
        pkg = _PACKAGE_FOR.get(scheme, f"the fsspec implementation for {scheme}://")
        raise ImportError(f"reading {path} needs the {pkg} package (pip install {pkg}); "
                          f"fsspec says: {e}") from e


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def check_shards_exist(paths: Sequence[str]) -> None:
    """Raises FileNotFoundError naming the first missing shard (one directory listing
    per distinct parent directory, so remote buckets are not probed shard by shard)."""
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        by_dir.setdefault(os.path.dirname(p.rstrip("/")), []).append(p)
    for parent, members in by_dir.items():
        if not is_url(parent):
            missing = [p for p in members if not os.path.isfile(_local(p))]
        else:
            fs, root = filesystem(parent)
            try:
                names = {os.path.basename(n.rstrip("/")) for n in fs.ls(root, detail=False)}
            except FileNotFoundError:
                names = set()
            missing = [p for p in members if os.path.basename(p) not in names]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"webdataset shard {missing[0]} does not exist{more} "
                                    "(data.webdataset.shards)")


def _open(path: str):
    if is_url(path):
        fs, p = filesystem(path)
        return fs.open(p, "rb")
    return open(_local(path), "rb")


def read_range(path: str, start: int, size: int) -> bytes:
    """``size`` bytes of ``path`` from ``start`` (thread-safe; no shared file position)."""
    if is_url(path):
        fs, p = filesystem(path)
        return fs.cat_file(p, start=start, end=start + size)
    fd = os.open(_local(path), os.O_RDONLY)
    try:
        return os.pread(fd, size, start)
    finally:
        os.close(fd)


def _size(path: str) -> int:
    if is_url(path):
        fs, p = filesystem(path)
        return int(fs.size(p))
    return os.path.getsize(_local(path))


# --------------------------------------------------------------------------- tar parsing


def split_key(name: str) -> tuple[str, str]:
    """Member name -> (sample key, extension): "d/0001.seg.png" -> ("d/0001", "seg.png")."""
    head, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(head, stem) if head else stem), (ext.lower() if dot else "")


class _BadTar(Exception):
    """A header that is cut short or fails its checksum."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _pax_path(data: bytes) -> str | None:
    """The "path" record of a pax extended header ("<len> path=<name>\\n" records)."""
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def _members(read, offset: int, end: int | None = None) -> Iterator[tuple[int, str, int, int]]:
    """(member start, name, data offset, data size) of the regular files of a tar
    from byte ``offset``, where ``read(pos, n)`` gives bytes of it; pax and GNU long
    names apply to the next member (whose start is then theirs). Stops at the zero
    end block (or at byte ``end``); raises _BadTar at a cut or corrupt header."""
    pos, first, long_name = offset, offset, None
    while end is None or pos < end:
        block = read(pos, _BLOCK)
        if len(block) < _BLOCK:
            raise _BadTar(f"header cut short at byte {pos}")
        if not block.strip(b"\0"):
            return
        try:
            stored, size = _octal(block[148:156]), _octal(block[124:136])
        except ValueError as e:
            raise _BadTar(f"bad header at byte {pos}") from e
        if stored != sum(block) - sum(block[148:156]) + 256 and stored != sum(
                struct.unpack("148b8x356b", block)) + 256:  # unsigned or signed sums
            raise _BadTar(f"header checksum mismatch at byte {pos}")
        kind, data = block[156:157], pos + _BLOCK
        if kind in (b"L", b"x"):
            raw = read(data, size)
            if len(raw) < size:
                raise _BadTar(f"extended header cut short at byte {data}")
            long_name = (raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") if kind == b"L"
                         else _pax_path(raw) or long_name)
        elif kind in (b"0", b"\0", b"7"):
            name = long_name
            if name is None:
                name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            yield first, name, data, size
            long_name = None
        else:
            long_name = None  # directories, links, global headers: not sample members
        pos = data + -(-size // _BLOCK) * _BLOCK
        if kind not in (b"L", b"x"):
            first = pos


def scan_shard(path: str, offset: int = 0) -> Iterator[tuple[int, int]]:
    """(start, size) byte ranges of the samples of a tar shard, from byte ``offset``
    (a sample boundary) on, reading headers only. A truncated or garbled shard ends
    with one (start, 0) marker: the samples before the damage come first (a sample cut
    short by it is dropped), the rest is lost."""
    total = _size(path)
    with _open(path) as f:
        def read(pos: int, n: int) -> bytes:
            f.seek(pos)
            return f.read(n)

        key, start, end = None, offset, offset
        try:
            for first, name, data, size in _members(read, offset):
                k = split_key(name)[0]
                if k != key:
                    if key is not None:
                        yield start, end - start
                    key, start = k, first
                if data + size > total:  # cut inside this member: drop its sample
                    yield start, 0
                    return
                end = data + -(-size // _BLOCK) * _BLOCK
        except (_BadTar, ValueError):  # a bad or cut header: the members so far are whole
            if key is not None:
                yield start, end - start
            yield end, 0
            return
        if key is not None:
            yield start, end - start


def read_members(data: bytes, what: str) -> tuple[str, dict[str, bytes]]:
    """(key, {extension: bytes}) of one sample's tar bytes (first member of each extension)."""
    key, out = "", {}
    try:
        for _, name, pos, size in _members(lambda p, n: data[p:p + n], 0, len(data)):
            if pos + size > len(data):
                raise _BadTar(f"member {name} cut short")
            key, ext = split_key(name)
            if ext not in out:
                out[ext] = data[pos:pos + size]
    except (_BadTar, ValueError) as e:
        raise preprocess.CorruptExampleError(f"{what}: unreadable tar members: {e}") from e
    return key, out


def _exts(value: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.replace(",", ";").split(";")
    return tuple(v.strip().lower().lstrip(".") for v in value if v.strip())


def example_from_members(members: dict[str, bytes], *, image_ext: Any = "jpg;jpeg;png;webp",
                         text_ext: Any = "txt;json", caption_field: str = "caption",
                         label_ext: str = "", what: str = "") -> dict[str, Any]:
    """{"image": encoded bytes, "text": str, "label": int} from a sample's members.

    The image is the first member whose extension is in ``image_ext``, the caption the
    first in ``text_ext`` (UTF-8 text; for "json", the string field ``caption_field``,
    "a/b" for nested objects), the label the integer text of ``label_ext`` ("" for
    none: -1). Raises CorruptExampleError naming ``what`` for a missing image or
    caption, text that is not UTF-8, bad JSON, an empty caption or a bad label.
    """
    image = next((members[e] for e in _exts(image_ext) if e in members), None)
    if image is None:
        raise preprocess.CorruptExampleError(
            f"{what}: no image member (extensions {'/'.join(_exts(image_ext))}; has "
            f"{sorted(members)})")
    ext = next((e for e in _exts(text_ext) if e in members), None)
    if ext is None:
        raise preprocess.CorruptExampleError(
            f"{what}: no caption member (extensions {'/'.join(_exts(text_ext))}; has {sorted(members)})")
    try:
        text = members[ext].decode("utf-8")
    except UnicodeDecodeError as e:
        raise preprocess.CorruptExampleError(f"{what}.{ext}: caption is not UTF-8: {e}") from e
    if ext.endswith("json"):
        try:
            node: Any = json.loads(text)
            for part in caption_field.split("/"):
                node = node[part]
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise preprocess.CorruptExampleError(
                f"{what}.{ext}: no string field {caption_field!r}: {type(e).__name__}: {e}") from e
        if not isinstance(node, str):
            raise preprocess.CorruptExampleError(f"{what}.{ext}: field {caption_field!r} is "
                                                 f"{type(node).__name__}, not text")
        text = node
    if not text.strip():
        raise preprocess.CorruptExampleError(f"{what}.{ext}: empty caption")
    label = -1
    if label_ext:
        raw = members.get(label_ext.lower().lstrip("."))
        try:
            label = int(raw.decode("utf-8").strip())
        except (AttributeError, UnicodeDecodeError, ValueError) as e:
            raise preprocess.CorruptExampleError(f"{what}.{label_ext}: missing or not an integer "
                                                 "label") from e
    return {"image": image, "text": text, "label": label}


def member_options(c: Any) -> dict[str, Any]:
    """``example_from_members`` keywords from ``data.webdataset``."""
    return dict(image_ext=c.get("image_ext", "jpg;jpeg;png;webp"), text_ext=c.get("text_ext", "txt;json"),
                caption_field=c.get("caption_field", "caption"), label_ext=c.get("label_ext", "") or "")


# --------------------------------------------------------------------------- samples


def make_handle(shard: int, start: int, size: int) -> int:
    return (shard << (_OFF_BITS + _SIZE_BITS)) | (start << _SIZE_BITS) | size


def split_handle(handle: int) -> tuple[int, int, int]:
    handle = int(handle)
    mask = (1 << _SIZE_BITS) - 1
    return handle >> (_OFF_BITS + _SIZE_BITS), (handle >> _SIZE_BITS) & ((1 << _OFF_BITS) - 1), handle & mask


class ShardSamples:
    """``samples[handle] -> {"image": bytes, "text": str, "label": int}``: the random
    access the pipeline's reader calls a source. Handles come from ``WebDataset``;
    one ranged read per sample. Raises CorruptExampleError for bad samples and for
    the marker of a truncated shard."""

    def __init__(self, paths: Sequence[str], **member_kw: Any):
        self.paths = list(paths)
        self.member_kw = member_kw

    def __getitem__(self, handle: int) -> dict[str, Any]:
        shard, start, size = split_handle(handle)
        path = self.paths[shard]
        what = f"{path}@{start}"
        if size == 0:
            raise preprocess.CorruptExampleError(f"{path}: truncated or corrupt tar from byte {start} "
                                                 "on; the rest of the shard is skipped")
        _, members = read_members(read_range(path, start, size), what)
        return example_from_members(members, what=what, **self.member_kw)

    def __repr__(self) -> str:
        return f"ShardSamples({len(self.paths)} shards)"


def _mix64(x: int) -> int:
    """splitmix64: a cheap, well-mixed hash (the shuffle buffer's seeded picks)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class WebDataset(grain.IterDataset):
    """The per-process stream of (position, sample handle); see the module docstring.

    Args:
      paths: every shard, in order (``expand_shards``); this process takes
        ``paths[process_index::process_count]``.
      seed: shard order and shuffle buffer seed.
      shuffle: False: shards in the listed order, samples in tar order.
      buffer_size: shuffle buffer, in samples (<= 1: shard shuffle only).
    Elements: ``(position, handle)``; position ``p * process_count + process_index``
    for the process's p-th sample (unique across processes: the augmentation seed),
    handle for ``ShardSamples(self.paths)``.
    """

    def __init__(self, paths: Sequence[str], *, seed: int, shuffle: bool = True, buffer_size: int = 1000,
                 process_index: int = 0, process_count: int = 1, check_exist: bool = True):
        super().__init__()
        paths = list(paths)
        if len(paths) < process_count:
            raise ValueError(f"data.webdataset.shards has {len(paths)} shards, fewer than the "
                             f"{process_count} processes: each process needs at least one")
        self.paths = paths[process_index::process_count]
        if check_exist:
            check_shards_exist(self.paths)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.buffer_size = max(int(buffer_size), 1) if shuffle else 1
        self.process_index, self.process_count = process_index, process_count
        self.slice_start, self.slice_step = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Keep only positions ``sl`` of the current stream (grain's thread / worker split)."""
        del sequential_slice  # positions interleave either way
        start, step = sl.start or 0, sl.step or 1
        self.slice_start += start * self.slice_step
        self.slice_step *= step

    def __iter__(self) -> "_WebDatasetIterator":
        return _WebDatasetIterator(self)

    def __str__(self) -> str:
        return (f"WebDataset({len(self.paths)} shards, shuffle={self.shuffle}, "
                f"buffer={self.buffer_size}, slice={self.slice_start}::{self.slice_step})")


class _WebDatasetIterator(grain.DatasetIterator):

    def __init__(self, ds: WebDataset):
        super().__init__()
        self._ds = ds
        self._epoch, self._shard_pos, self._offset, self._n = 0, 0, 0, 0
        self._buf: list[tuple[int, int, int]] = []
        self._order = self._shard_order(0)
        self._scan: Iterator[tuple[int, int]] | None = None
        self._pick_seed = _mix64((ds.seed << 20) ^ ds.process_index)

    def _shard_order(self, epoch: int) -> list[int]:
        n = len(self._ds.paths)
        if not self._ds.shuffle:
            return list(range(n))
        return np.random.default_rng([self._ds.seed % 2**63, 0x5eed, epoch]).permutation(n).tolist()

    def _next_ref(self) -> tuple[int, int, int] | None:
        """The next sample of this epoch in shard order (None: the epoch is over)."""
        while self._shard_pos < len(self._order):
            shard = self._order[self._shard_pos]
            if self._offset >= 0:
                if self._scan is None:
                    self._scan = scan_shard(self._ds.paths[shard], self._offset)
                item = next(self._scan, None)
                if item is not None:
                    start, size = item
                    self._offset = start + size if size else -1  # -1: the shard is done
                    return shard, start, size
            self._shard_pos, self._offset, self._scan = self._shard_pos + 1, 0, None
        return None

    def _next_sample(self) -> tuple[int, int, int]:
        for _ in range(2):
            while len(self._buf) < self._ds.buffer_size:
                ref = self._next_ref()
                if ref is None:
                    break
                self._buf.append(ref)
            if self._buf:
                j = _mix64(self._pick_seed ^ self._n) % len(self._buf)
                ref, self._buf[j] = self._buf[j], self._buf[-1]
                self._buf.pop()
                return ref
            self._epoch += 1  # drained: the next epoch
            self._shard_pos, self._offset, self._scan = 0, 0, None
            self._order = self._shard_order(self._epoch)
        raise ValueError(f"the webdataset shards hold no samples: {self._ds.paths[:3]}...")

    def __next__(self) -> tuple[int, int]:
        ds = self._ds
        while True:
            ref = self._next_sample()
            p = self._n
            self._n += 1
            if p % ds.slice_step == ds.slice_start:
                return p * ds.process_count + ds.process_index, make_handle(*ref)

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "shard_pos": self._shard_pos, "offset": self._offset,
                "position": self._n, "buffer": list(self._buf), "num_shards": len(self._ds.paths)}

    def set_state(self, state: dict[str, Any]) -> None:
        if int(state["num_shards"]) != len(self._ds.paths):
            raise ValueError(f"the data state is for {state['num_shards']} shards per process, but "
                             f"this process has {len(self._ds.paths)} (data.webdataset.shards changed?)")
        self._epoch, self._shard_pos = int(state["epoch"]), int(state["shard_pos"])
        self._offset, self._n = int(state["offset"]), int(state["position"])
        self._buf = [tuple(int(v) for v in r) for r in state["buffer"]]
        self._order, self._scan = self._shard_order(self._epoch), None


# --------------------------------------------------------------------------- writing


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def write_shards(directory: str, samples: Iterable[tuple[str, dict[str, bytes]]], *,
                 samples_per_shard: int = 1000, prefix: str = "shard") -> list[str]:
    """Writes ``(key, {extension: bytes})`` samples as tar shards
    DIR/PREFIX-000000.tar, ... (test data and benchmarks); returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths: list[str] = []
    tf = None
    count = 0
    try:
        for key, members in samples:
            if tf is None or count == samples_per_shard:
                if tf is not None:
                    tf.close()
                paths.append(os.path.join(directory, f"{prefix}-{len(paths):06d}.tar"))
                tf, count = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT), 0
            for ext, data in members.items():
                _add(tf, f"{key}.{ext}", data)
            count += 1
    finally:
        if tf is not None:
            tf.close()
    return paths
