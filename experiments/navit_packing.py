r"""Host cost of NaViT patchify + packing: the pre-change implementation against
today's, side by side in one run (host milliseconds per image; ratio old / new).

    python experiments/navit_packing.py                 # ~1 minute on 2 cores
    python experiments/navit_packing.py --num_images=1000 --repeats=9

Images: ``--num_images`` uint8 arrays with sides uniform in [32, 256] px
(independently), patch 16, sequences of 256 tokens, 16 slots (as
experiments/navit_benchmark.py). Every row times the same inputs with both
implementations, alternating old / new ``--repeats`` times; the median is shown.
Outputs are checked equal (bit for bit) before timing.

  pack()                      vlm_jax.data.packing.pack from raw uint8 images
                              (inference; encode_images does the same steps)
  pack(), no resize needed    the same on images whose sides are already
                              multiples of 16: patchify + pack without PIL's resize
  resize alone (both)         the PIL bilinear resize both versions call: the floor
  pack_items x3, float32      what navit_benchmark.py timed as "pack (3 ways)" before:
                              pad-to-max, packed, packed + 50% token drop (drop
                              included), float32 items and float32 outputs
  pack_items x3, uint8        the same line as navit_benchmark.py runs it now and the
                              training pipeline packs by default: uint8 items, uint8
                              outputs (new only: ``dtype=np.uint8``); old/new is
                              against the old float32 line
  floor: write x3 outputs     the least any packer does for that line: allocate the
                              three zeroed outputs and write each token row once
                              (float32; and uint8 for the uint8 line)
  train: read item            per image in the reader threads: resize + patchify +
                              normalise (old: float32 item; new: uint8 item)
  train: drop + pack          per image in the packing thread: 50% token drop +
                              packing a window of 256 (old: float32, normalised
                              before; new: "keep" indices into uint8 outputs, the
                              pipeline's default ``navit.patch_dtype = "uint8"``; the
                              mapping onto pp.value_range then runs on the device,
                              one fused multiply-add in the train step, not counted)
  train: drop + pack, f32     the same with ``navit.patch_dtype = "float32"``: cast and
                              normalised on the host as the tokens are written
  cold: pack_items x3         the first call in a fresh process (``--cold`` runs, each
                              in its own subprocess): old float32, new float32 and new
                              uint8 outputs. Mostly the OS handing out fresh memory
                              for the outputs (~0.3 GB touched in float32, a quarter
                              in uint8); on Linux with transparent huge pages in
                              "madvise" mode numpy's large arrays may also wait for
                              the kernel to compact memory, which makes these runs
                              slow and noisy

Outputs are checked equal before timing: bit for bit, and the uint8 outputs equal
the float32 ones as values (and, mapped by ``packing.to_value_range``, the
host-normalised training batches bit for bit).

The "old" functions below are a copy of vlm_jax/data/packing.py and the token drop
of vlm_jax/data/navit_pipeline.py as they were before the change (git a6e8553),
kept here only as the baseline; ``fit_grid`` and ``preprocess.normalize`` did not
change and are shared.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from vlm_jax.data import navit_pipeline, packing, preprocess

# --------------------------------------------------------------------------- pre-change implementation
# (copied from vlm_jax/data/packing.py at a6e8553; the baseline, not used by the library)


def old_resize_image(image, hw):
    if image.shape[:2] == tuple(hw):
        return image.astype(np.float32, copy=False)
    size = (hw[1], hw[0])
    if image.dtype == np.uint8:
        out = Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.Resampling.BILINEAR)
        return np.asarray(out, np.float32)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), mode="F")
                        .resize(size, Image.Resampling.BILINEAR)) for c in range(image.shape[-1])]
    return np.stack(chans, axis=-1).astype(np.float32, copy=False)


def old_check_image(image, what):
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} must be an H x W x 3 array, got shape {arr.shape}")
    if not (arr.dtype == np.uint8 or np.issubdtype(arr.dtype, np.floating)):
        arr = arr.astype(np.float32)
    return arr


def old_patchify(image, patch_size, grid):
    gh, gw = grid
    p = patch_size
    img = old_resize_image(old_check_image(image, "image"), (gh * p, gw * p))
    x = img.reshape(gh, p, gw, p, img.shape[-1]).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(x.reshape(gh * gw, p * p * img.shape[-1]), np.float32)


def old_grid_positions(grid):
    r, c = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    return np.stack([r.reshape(-1), c.reshape(-1)], axis=-1).astype(np.int32)


def old_image_to_item(image, *, patch_size, max_patches, max_side=None):
    arr = old_check_image(image, "image")
    grid = packing.fit_grid(arr.shape[0], arr.shape[1], patch_size, max_patches, max_side)
    return {"patches": old_patchify(arr, patch_size, grid), "positions": old_grid_positions(grid),
            "grid": np.asarray(grid, np.int32)}


def old_pack_lengths(lengths, seq_len, max_images, sort=True):
    lengths = [int(n) for n in lengths]
    for i, n in enumerate(lengths):
        if not 1 <= n <= seq_len:
            raise ValueError(f"item {i} has {n} tokens; must be in [1, seq_len={seq_len}]")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else range(len(lengths))
    room = np.zeros(max(len(lengths), 1), np.int64)
    count = np.zeros(max(len(lengths), 1), np.int64)
    bins = []
    for i in order:
        n = lengths[i]
        fits = np.flatnonzero((room[:len(bins)] >= n) & (count[:len(bins)] < max_images))
        if fits.size:
            k = int(fits[0])
        else:
            k = len(bins)
            bins.append([])
            room[k] = seq_len
        bins[k].append(i)
        room[k] -= n
        count[k] += 1
    return bins


def old_pack_items(items, *, seq_len, max_images, sort=True, indices=None):
    dim = int(items[0]["patches"].shape[-1])
    bins = old_pack_lengths([len(it["patches"]) for it in items], seq_len, max_images, sort)
    num = len(bins)
    out = {"patches": np.zeros((num, seq_len, dim), np.float32),
           "segment_ids": np.zeros((num, seq_len), np.int32),
           "positions": np.zeros((num, seq_len, 2), np.int32),
           "image_index": np.full((num, max_images), -1, np.int32),
           "grid_sizes": np.zeros((num, max_images, 2), np.int32)}
    for s, members in enumerate(bins):
        pos = 0
        for slot, i in enumerate(members):
            it = items[i]
            n = len(it["patches"])
            out["patches"][s, pos:pos + n] = it["patches"]
            out["positions"][s, pos:pos + n] = it["positions"]
            out["segment_ids"][s, pos:pos + n] = slot + 1
            out["image_index"][s, slot] = i if indices is None else indices[i]
            out["grid_sizes"][s, slot] = it["grid"]
            pos += n
    return out


def old_pack(images, *, patch_size, seq_len, max_images):
    items = [old_image_to_item(im, patch_size=patch_size, max_patches=seq_len) for im in images]
    return old_pack_items(items, seq_len=seq_len, max_images=max_images)


def old_drop(item, keep_idx):
    """Old TokenDrop.__call__ after the same random draw: gather a copy of the kept rows."""
    if keep_idx is None:
        return item
    return dict(item, patches=item["patches"][keep_idx], positions=item["positions"][keep_idx])


# --------------------------------------------------------------------------- timing


def _equal(a, b, what):
    if a.keys() != b.keys() or not all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype
                                       for k in a):
        raise AssertionError(f"{what}: old and new outputs differ")


COLD = ("old", "new float32", "new uint8")


def _cold_child(which: str, n: int) -> None:
    """One first call of pack_items x3 in this (fresh) process; prints seconds."""
    rng = np.random.default_rng(0)
    sides = rng.integers(32, 257, size=(n, 2))
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sides]
    dtype = np.uint8 if which == "new uint8" else np.float32
    items = [packing.image_to_item(im, patch_size=16, max_patches=256, dtype=dtype) for im in images]
    drop = _dropper()
    keeps = [drop.keep(len(it["patches"]), np.random.default_rng([1, i])) for i, it in enumerate(items)]
    t = time.perf_counter()
    if which == "old":
        old_pack_items(items, seq_len=256, max_images=1)
        old_pack_items(items, seq_len=256, max_images=16)
        old_pack_items([old_drop(it, k) for it, k in zip(items, keeps)], seq_len=256, max_images=16)
    else:
        packing.pack_items(items, seq_len=256, max_images=1, dtype=dtype)
        packing.pack_items(items, seq_len=256, max_images=16, dtype=dtype)
        packing.pack_items([it if k is None else dict(it, keep=k) for it, k in zip(items, keeps)],
                           seq_len=256, max_images=16, dtype=dtype)
    print(time.perf_counter() - t)


def _dropper(rate=0.5):
    cfg = navit_pipeline.default_config().token_drop
    cfg.kind, cfg.rate = "constant", rate
    return navit_pipeline.TokenDrop(cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_images", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cold", type=int, default=5, help="fresh-process runs per kind (0: skip)")
    ap.add_argument("--_cold_child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._cold_child:
        _cold_child(args._cold_child, args.num_images)
        return

    n, P, L, M, vr = args.num_images, 16, 256, 16, (-1.0, 1.0)
    rng = np.random.default_rng(0)
    sides = rng.integers(32, 257, size=(n, 2))
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sides]
    aligned = [rng.integers(0, 256, (16 * max(2, round(h / 16)), 16 * max(2, round(w / 16)), 3),
                            dtype=np.uint8) for h, w in sides]
    grids = [packing.fit_grid(h, w, P, L) for h, w in sides]
    tower = dict(patch_size=P, seq_len=L, max_side=None)
    drop = _dropper()
    keeps = [drop.keep(gh * gw, np.random.default_rng([1, i])) for i, (gh, gw) in enumerate(grids)]
    f_items = [packing.image_to_item(im, patch_size=P, max_patches=L) for im in images]
    f_norm = [dict(it, patches=preprocess.normalize(it["patches"].astype(np.uint8), vr)) for it in f_items]
    u_items = [navit_pipeline.patchify_uint8(im, tower) for im in images]
    u_keep = [it if k is None else dict(it, keep=k) for it, k in zip(u_items, keeps)]
    f_keep = [it if k is None else dict(it, keep=k) for it, k in zip(f_items, keeps)]

    def bench3_old():
        return [old_pack_items(f_items, seq_len=L, max_images=1),
                old_pack_items(f_items, seq_len=L, max_images=M),
                old_pack_items([old_drop(it, k) for it, k in zip(f_items, keeps)], seq_len=L, max_images=M)]

    def bench3_new():
        return [packing.pack_items(f_items, seq_len=L, max_images=1),
                packing.pack_items(f_items, seq_len=L, max_images=M),
                packing.pack_items(f_keep, seq_len=L, max_images=M)]

    u_bench = [it if k is None else dict(it, keep=k) for it, k in zip(u_items, keeps)]

    def bench3_u8():
        return [packing.pack_items(u_items, seq_len=L, max_images=1, dtype=np.uint8),
                packing.pack_items(u_items, seq_len=L, max_images=M, dtype=np.uint8),
                packing.pack_items(u_bench, seq_len=L, max_images=M, dtype=np.uint8)]

    lens3 = [[len(it["patches"]) for it in f_items]] * 2 + [
        [len(it["patches"]) if k is None else len(k) for it, k in zip(f_items, keeps)]]
    bins3 = [packing.pack_lengths(ln, L, m) for ln, m in zip(lens3, (1, M, M))]

    def floor3(dtype=np.float32):  # the least any packer must do: fresh zeroed outputs, every token row written once
        for bins, lens in zip(bins3, lens3):
            out = np.zeros((len(bins), L, P * P * 3), dtype)
            for s, b in enumerate(bins):
                out[s, :sum(lens[i] for i in b)] = 1

    def read_old():
        return [preprocess.normalize(old_image_to_item(im, patch_size=P, max_patches=L)["patches"]
                                     .round().astype(np.uint8), vr) for im in images]

    def read_new():
        return [navit_pipeline.patchify_uint8(im, tower)["patches"] for im in images]

    def window(fn, items):  # pack in windows of 256, as the training PackedDataset does
        return [fn(items[i:i + 256]) for i in range(0, len(items), 256)]

    def train_old():
        return window(lambda w: old_pack_items(w, seq_len=L, max_images=M),
                      [old_drop(it, k) for it, k in zip(f_norm, keeps)])

    def train_new():
        return window(lambda w: packing.pack_items(w, seq_len=L, max_images=M, dtype=np.uint8), u_keep)

    def train_new_f32():
        return window(lambda w: packing.pack_items(w, seq_len=L, max_images=M, value_range=vr), u_keep)

    rows = [
        ("pack()", lambda: old_pack(images, patch_size=P, seq_len=L, max_images=M),
         lambda: packing.pack(images, patch_size=P, seq_len=L, max_images=M)),
        ("pack(), no resize needed", lambda: old_pack(aligned, patch_size=P, seq_len=L, max_images=M),
         lambda: packing.pack(aligned, patch_size=P, seq_len=L, max_images=M)),
        ("resize alone (both)", None,
         lambda: [packing._resize(im, (g[0] * P, g[1] * P)) for im, g in zip(images, grids)]),
        ("pack_items x3, float32", bench3_old, bench3_new),
        ("pack_items x3, uint8", bench3_old, bench3_u8),
        ("floor: write x3 outputs", None, floor3),
        ("floor: write x3, uint8", None, lambda: floor3(np.uint8)),
        ("train: read item", read_old, read_new),
        ("train: drop + pack", train_old, train_new),
        ("train: drop + pack, f32", train_old, train_new_f32),
    ]
    # Same outputs (bit for bit) before timing.
    _equal(old_pack(images, patch_size=P, seq_len=L, max_images=M),
           packing.pack(images, patch_size=P, seq_len=L, max_images=M), "pack")
    for a, b in zip(bench3_old(), bench3_new()):
        _equal(a, b, "pack_items")
    for a, b in zip(bench3_old(), bench3_u8()):
        _equal(a, dict(b, patches=b["patches"].astype(np.float32)), "pack_items uint8")
    for a, b, c in zip(train_old(), train_new_f32(), train_new()):
        _equal(a, b, "training packing")
        c = packing.to_value_range(c, vr)
        _equal(a, dict(c, patches=np.asarray(c["patches"])), "training packing (uint8, mapped on device)")
    for a, b in zip(read_old(), [preprocess.normalize(p, vr) for p in read_new()]):
        np.testing.assert_array_equal(a, b)

    print(f"{n} uint8 images, sides U[32,256] px, patch {P}, seq_len {L}, max_images {M}; "
          f"median of {args.repeats} alternating runs; host ms per image, wall clock and "
          f"process CPU time (user + system, page faults included)")
    print(f"{'stage':<28} {'old':>7} {'new':>7} {'old/new':>7}   "
          f"{'old cpu':>7} {'new cpu':>7} {'old/new':>7}")
    for name, old_fn, new_fn in rows:
        t = {"old": ([], []), "new": ([], [])}
        for _ in range(args.repeats):
            for which, fn in (("old", old_fn), ("new", new_fn)):
                if fn is None:
                    continue
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                t[which][0].append(time.perf_counter() - w0)
                t[which][1].append(time.process_time() - c0)
        (nw, nc) = (np.median(v) * 1e3 / n for v in t["new"])
        if t["old"][0]:
            (ow, oc) = (np.median(v) * 1e3 / n for v in t["old"])
            print(f"{name:<28} {ow:7.3f} {nw:7.3f} {ow / nw:6.1f}x   {oc:7.3f} {nc:7.3f} {oc / nc:6.1f}x")
        else:
            print(f"{name:<28} {'':>7} {nw:7.3f} {'':>7}   {'':>7} {nc:7.3f}")
    mem_old = sum(it["patches"].nbytes for it in f_norm) / n / 1024
    mem_new = sum(it["patches"].nbytes for it in u_items) / n / 1024
    print(f"training item patches: {mem_old:.0f} KiB (old float32) vs {mem_new:.0f} KiB (new uint8) "
          f"per image")

    if args.cold:
        cold = {k: [] for k in COLD}
        for _ in range(args.cold):
            for which in COLD:
                cmd = [sys.executable, __file__, f"--num_images={n}", f"--_cold_child={which}"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                cold[which].append(float(out.stdout.split()[-1]))
        o, w32, w8 = (np.median(cold[k]) * 1e3 / n for k in COLD)
        print(f"cold: pack_items x3, first call in a fresh process, median of {args.cold} "
              f"(host ms per image): old {o:.3f}, new float32 {w32:.3f} ({o / w32:.1f}x), "
              f"new uint8 {w8:.3f} ({o / w8:.1f}x)")
        print("  runs (s): " + "; ".join(f"{k} {[round(x, 3) for x in cold[k]]}" for k in COLD))


if __name__ == "__main__":
    main()
