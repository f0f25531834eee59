"""Writes ArrayRecord files (vlm_jax/data/array_record.py) from an image folder, from
webdataset tar shards or from a TFDS dataset.

    python -m vlm_jax.data.convert --output DIR --from folder --input /data/cifar10_folders [--split train]
    python -m vlm_jax.data.convert --output DIR --from webdataset --input '/data/shard-{000000..000099}.tar'
    python -m vlm_jax.data.convert --output DIR --from tfds --input coco_captions --split train \\
        --text_key captions/text --label_key ''

then train with ``--config.data.source=array_record --config.data.array_record.path=DIR``.

Output: DIR/data-000000.array_record, ... (``--records_per_shard`` records each), in
the order of the input (the folder's captions file or sorted class folders, the
shards as listed then the samples in tar order, the TFDS split's order), so
``data.shuffle=False`` training reads the same examples in the same order as from
the input; DIR/metadata.json (record count, class names). Images are copied as
encoded in the input (TFDS images decoded to arrays are stored as PNG); examples are
not judged, so training skips and counts exactly the examples it would skip when
reading the input. A truncated webdataset shard contributes its complete samples.

Interrupted runs resume: each output file is written under a ".tmp" name and renamed
when complete, and DIR/progress.json records the files done and where in the input
the next one starts. Running the same command again continues from there (a
different input into the same DIR is an error).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Any

import numpy as np

from vlm_jax.data import array_record, webdataset

_PROGRESS = "progress.json"


def _ext_of(path: str) -> str:
    return os.path.splitext(path)[1].lower().lstrip(".") or "jpg"


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None  # stored without an image: training skips it, as it skips the missing file


def _folder_examples(args: argparse.Namespace, start: int):
    from vlm_jax.data import shapes, sources  # pylint: disable=import-outside-toplevel
    c = argparse.Namespace(path=args.input, captions=args.captions, caption_template=args.caption_template)
    captions = c.captions if os.path.isabs(c.captions) else os.path.join(c.path, c.captions)
    if os.path.isfile(captions):
        src = sources.FolderSource(c.path, c.captions)
        paths = [p if os.path.isabs(p) else os.path.join(src.path, p) for p in src._images]  # pylint: disable=protected-access
        texts, labels = src._captions, src._labels  # pylint: disable=protected-access
    elif sources.is_class_folder(c.path):
        src = sources.ClassFolderSource(c.path, args.split or "train", c.caption_template)
        paths, labels = src._files, src._labels  # pylint: disable=protected-access
        texts = [shapes.fix_articles(c.caption_template.format(src.classnames[lab])) for lab in labels]
    else:
        raise FileNotFoundError(f"--input {c.path!r} has neither {c.captions} nor train/<class>/ folders")

    def gen():
        for i in range(start, len(paths)):
            members = {}
            data = _read_bytes(paths[i])
            if data is not None:
                members[_ext_of(paths[i])] = data
            members["txt"] = texts[i].encode("utf-8")
            if labels[i] >= 0:
                members["cls"] = str(labels[i]).encode()
            yield os.path.relpath(paths[i], c.path), members, i + 1
    return gen(), len(paths), src.classnames


def _webdataset_examples(args: argparse.Namespace, resume: Any):
    paths = webdataset.expand_shards(args.input)
    webdataset.check_shards_exist(paths)
    opts = dict(image_ext=webdataset._exts(args.image_ext), text_ext=webdataset._exts(args.text_ext))  # pylint: disable=protected-access
    shard0, offset0 = resume if resume else (0, 0)

    def pick(members: dict[str, bytes], what: str) -> dict[str, bytes]:
        out = {}
        image = next((e for e in opts["image_ext"] if e in members), None)
        if image is not None:
            out[image] = members[image]
        text = next((e for e in opts["text_ext"] if e in members), None)
        if text is not None and not text.endswith("json"):
            out["txt"] = members[text]
        elif text is not None:  # the caption field as UTF-8; none when unusable (training skips)
            try:
                ex = webdataset.example_from_members({"png": b"", text: members[text]}, image_ext="png",
                                                     text_ext=text, caption_field=args.caption_field,
                                                     what=what)
                out["txt"] = ex["text"].encode("utf-8")
            except webdataset.preprocess.CorruptExampleError:
                pass
        if args.label_ext and args.label_ext in members:
            out["cls"] = members[args.label_ext]
        return out

    def gen():
        for s in range(shard0, len(paths)):
            for start, size in webdataset.scan_shard(paths[s], offset0 if s == shard0 else 0):
                nxt = (s, start + size)
                if size == 0:  # truncated shard: its complete samples are done
                    print(f"warning: {paths[s]} is truncated or corrupt from byte {start}; "
                          "its remaining samples are lost", file=sys.stderr)
                    break
                what = f"{paths[s]}@{start}"
                try:
                    key, members = webdataset.read_members(
                        webdataset.read_range(paths[s], start, size), what)
                except webdataset.preprocess.CorruptExampleError:
                    key, members = what, {}  # an empty record: training skips it, as here
                yield key or what, pick(members, what), nxt
    return gen(), None, None


def _tfds_examples(args: argparse.Namespace, start: int):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from vlm_jax.data import sources  # pylint: disable=import-outside-toplevel
    meta = sources.TfdsSource(args.input, args.split or "train", data_dir=args.data_dir,
                              image_key=args.image_key, text_key=args.text_key or None,
                              label_key=args.label_key or None, caption_template=args.caption_template)
    ds = meta._ds  # pylint: disable=protected-access
    try:  # the stored encoded image, not decoded and re-encoded
        raw = tfds.data_source(args.input, split=args.split or "train", data_dir=args.data_dir,
                               decoders={args.image_key: tfds.decode.SkipDecoding()})
        if len(raw):
            raw[0]  # pylint: disable=pointless-statement
        ds = raw
    except Exception:  # pylint: disable=broad-except
        pass  # decoded images, stored as PNG

    def gen():
        for i in range(start, len(ds)):
            ex = ds[i]
            image = sources._get_path(ex, args.image_key)  # pylint: disable=protected-access
            if isinstance(image, np.ndarray) and image.dtype.kind not in "OSU":
                buf = io.BytesIO()
                Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, "PNG")
                image, ext = buf.getvalue(), "png"
            else:
                image = image.item() if isinstance(image, np.ndarray) else image
                ext = "png" if image[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"
            label = int(np.asarray(sources._get_path(ex, meta.label_key))) if meta.label_key else -1  # pylint: disable=protected-access
            if meta.text_key:
                text = sources._as_text(sources._get_path(ex, meta.text_key), i, f"{args.input}[{i}]")  # pylint: disable=protected-access
            else:
                text = sources.shapes.fix_articles(meta.caption_template.format(meta.classnames[label]))
            members = {ext: image, "txt": text.encode("utf-8")}
            if label >= 0:
                members["cls"] = str(label).encode()
            yield f"{i:09d}", members, i + 1
    return gen(), len(ds), meta.classnames


def _progress_bar(total: int | None, initial: int):
    try:
        from tqdm import tqdm  # pylint: disable=import-outside-toplevel
        return tqdm(total=total, initial=initial, unit="ex", desc="convert", file=sys.stderr)
    except ImportError:
        return None


def convert(args: argparse.Namespace) -> dict[str, Any]:
    """Runs a conversion (resuming one in progress); returns metadata.json's content."""
    out = args.output
    os.makedirs(out, exist_ok=True)
    what = {k: getattr(args, k) for k in ("source", "input", "split", "records_per_shard", "image_ext",
                                          "text_ext", "caption_field", "label_ext", "captions",
                                          "caption_template", "image_key", "text_key", "label_key")}
    progress_file = os.path.join(out, _PROGRESS)
    progress = {"input": what, "files": 0, "records": 0, "next": None, "done": False}
    if os.path.exists(progress_file):
        with open(progress_file, encoding="utf-8") as f:
            old = json.load(f)
        if old["input"] != what:
            raise ValueError(f"{out} holds a conversion of another input ({old['input']}); "
                             "choose another --output directory")
        progress = old
        if progress["done"]:
            print(f"{out}: already complete ({progress['records']} records)", file=sys.stderr)
            with open(os.path.join(out, "metadata.json"), encoding="utf-8") as f:
                return json.load(f)
    for name in os.listdir(out):
        if name.endswith(".tmp"):
            os.remove(os.path.join(out, name))
    if args.source == "folder":
        examples, total, classnames = _folder_examples(args, progress["next"] or 0)
    elif args.source == "webdataset":
        examples, total, classnames = _webdataset_examples(args, progress["next"])
    elif args.source == "tfds":
        examples, total, classnames = _tfds_examples(args, progress["next"] or 0)
    else:
        raise ValueError(f"--from must be folder, webdataset or tfds, got {args.source!r}")

    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
    bar = _progress_bar(total, progress["records"])
    writer, tmp, in_file, nxt = None, None, 0, None

    def finish_file():
        writer.close()
        os.replace(tmp, tmp[:-len(".tmp")])
        progress.update(files=progress["files"] + 1, records=progress["records"] + in_file, next=nxt)
        _write_json(progress_file, progress)

    for key, members, nxt in examples:
        if writer is None:
            tmp = os.path.join(out, f"data-{progress['files']:06d}{array_record.SUFFIX}.tmp")
            writer, in_file = ArrayRecordWriter(tmp, "group_size:1"), 0
        writer.write(array_record.encode_record(str(key), members))
        in_file += 1
        if bar is not None:
            bar.update(1)
        if in_file == args.records_per_shard:
            finish_file()
            writer = None
    if writer is not None:
        finish_file()
    if bar is not None:
        bar.close()
    meta = {"format": array_record.FORMAT, "num_records": progress["records"],
            "classnames": classnames, "source": what}
    _write_json(os.path.join(out, "metadata.json"), meta)
    progress["done"] = True
    _write_json(progress_file, progress)
    print(f"{out}: {progress['records']} records in {progress['files']} files", file=sys.stderr)
    return meta


def _write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlm_jax.data.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--from", dest="source", required=True, choices=("folder", "webdataset", "tfds"))
    p.add_argument("--input", required=True,
                   help="folder path | shard brace pattern or '::'-separated patterns | TFDS name")
    p.add_argument("--split", default=None, help="class folder: train/val; TFDS split (default train)")
    p.add_argument("--records_per_shard", type=int, default=10_000, help="records per output file")
    p.add_argument("--captions", default="captions.jsonl", help="folder: captions file")
    p.add_argument("--caption_template", default="a photo of a {}.",
                   help="class folder / TFDS without text_key: caption from the class name")
    p.add_argument("--image_ext", default="jpg;jpeg;png;webp", help="webdataset: image extensions")
    p.add_argument("--text_ext", default="txt;json", help="webdataset: caption extensions")
    p.add_argument("--caption_field", default="caption", help="webdataset .json: caption field")
    p.add_argument("--label_ext", default="", help="webdataset: label member extension, e.g. cls")
    p.add_argument("--data_dir", default=None, help="TFDS data directory")
    p.add_argument("--image_key", default="image", help="TFDS image feature")
    p.add_argument("--text_key", default="", help="TFDS caption feature ('' : captions from labels)")
    p.add_argument("--label_key", default="label", help="TFDS ClassLabel feature ('' for none)")
    args = p.parse_args(argv)
    if args.records_per_shard <= 0:
        p.error("--records_per_shard must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    convert(parse_args(argv))


if __name__ == "__main__":
    main()
