r"""Images/s per host of our input pipeline against torch's DataLoader, and whether
the train step waits for data.

    python experiments/input_pipeline.py                      # ~3 minutes on 2 cores
    python experiments/input_pipeline.py --workers 8 --images 2048 --batch 128 --dir /tmp/ipb

1. Data: ``--images`` JPEGs of ImageNet-like sizes (widths 420-580, 70% 4:3
   landscape, the rest 3:2, square or portrait: ~500x400 on average; smooth colour fields with texture and noise, quality 90,
   ~90 KB like ImageNet's) in the ImageFolder layout ``DIR/train/<class>/*.jpg``, and
   the same images as webdataset tar shards (``DIR/shards/*.tar``: key.jpg + key.cls).
   Kept in ``--dir`` between runs (a temporary folder by default).
2. Throughput, training-style preprocessing to 224: random resized crop (scale
   0.08-1, aspect 3/4-4/3), random flip, normalisation, batches of ``--batch``, with
   ``--workers`` worker processes on every side:
     torch     torchvision.datasets.ImageFolder + RandomResizedCrop(224),
               RandomHorizontalFlip, ToTensor, Normalize; DataLoader(num_workers,
               shuffle) -- what a PyTorch user runs.
     ours      vlm_jax.data.pipeline.train_dataset on the same folder,
               data.num_workers = --workers (grain mp_prefetch), exact decode.
     ours fast the same with pp.fast_decode (reduced-size JPEG decoding).
     ours wds  the tar shards (data.source="webdataset"), pp.fast_decode.
     threads   our pipeline without worker processes (data.num_threads = --workers).
   Each round builds every loader afresh (``first batch``: its start-up), drops the
   first ``--warmup`` batches (start-up and what the workers buffered meanwhile: torch
   2 batches per worker, ours up to 4) and times the next ``--batches``: the steady
   state, the consumer waiting on the producers. Rounds interleave the loaders
   (alternating order) so load from other processes hits them alike; the table gives
   the median over rounds, the ratio to torch, and the CPU seconds per image of the
   whole process tree (steadier than images/s on a shared machine).
3. Per-image CPU cost in one thread: PIL (torchvision's loader) against our decode,
   and our whole preprocessing exact and with reduced-size decoding (--fast_sizes), on
   these files and on 1600x1200 ones (web-sized), to show where reduced-size decoding
   wins and how far it is from the exact pixels.
4. Does the train step wait? A small ViT classifier (patch 32 at 224) trained by
   ``vlm_jax.train.make_train_step``: ms per step fed by the pipeline (``ours fast``)
   against the same step fed one cached batch already on the device. On a CPU host
   the workers and the step share the cores, so the difference is contention as well
   as waiting; ``data wait`` is the time spent inside ``next(iterator)``.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- data

def _photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A photo-like uint8 image: smooth colour fields, mid-scale texture, sensor noise."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    mid = rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3), dtype=np.uint8)
    img = (0.7 * np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
           + 0.3 * np.asarray(Image.fromarray(mid).resize((w, h), Image.BILINEAR), np.float32)
           + 6 * rng.standard_normal((h, w, 3), dtype=np.float32))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_data(root: str, n: int, classes: int = 10, per_shard: int = 128) -> dict:
    """Writes (once) the class folder and the tar shards; returns their paths and stats."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    folder, shards = os.path.join(root, "train"), os.path.join(root, "shards")
    done = os.path.join(root, f".done-{n}-{classes}")
    rng = np.random.default_rng(0)
    if not os.path.exists(done):
        os.makedirs(shards, exist_ok=True)
        tar, sizes = None, []
        for i in range(n):
            w = int(rng.integers(420, 581))  # mostly landscape 4:3, like ImageNet
            h = int(round(w * float(rng.choice([0.75, 0.667, 1.0, 1.333], p=[0.7, 0.1, 0.1, 0.1]))))
            buf = io.BytesIO()
            Image.fromarray(_photo(rng, w, h)).save(buf, "JPEG", quality=90)
            data, label = buf.getvalue(), i % classes
            d = os.path.join(folder, f"class{label:02d}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as f:
                f.write(data)
            if i % per_shard == 0:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(os.path.join(shards, f"shard-{i // per_shard:04d}.tar"), "w")
            for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            sizes.append((w, h, len(data)))
        tar.close()
        np.save(os.path.join(root, "sizes.npy"), np.asarray(sizes))
        open(done, "w").close()
    sizes = np.load(os.path.join(root, "sizes.npy"))
    return dict(folder=root, shards=sorted(os.path.join(shards, f) for f in os.listdir(shards)),
                mean_w=float(sizes[:, 0].mean()), mean_h=float(sizes[:, 1].mean()),
                mean_kb=float(sizes[:, 2].mean() / 1e3))


# -------------------------------------------------------------------------- loaders

def our_config(data: dict, args, *, fast: bool, workers: int, threads: int, source: str = "folder"):
    from vlm_jax.data import config as data_config  # pylint: disable=import-outside-toplevel
    c = data_config.default_config()
    c.seed, c.batch_size = 0, args.batch
    c.data.source = source
    c.data.folder.path = data["folder"]
    c.data.webdataset.shards = "::".join(data["shards"])
    c.data.webdataset.label_ext = "cls"
    c.data.webdataset.text_ext = "cls"
    c.data.num_workers, c.data.num_threads = workers, threads
    c.pp.image_size, c.pp.crop, c.pp.flip = 224, "random_resized", True
    c.pp.fast_decode = fast
    c.data.prefetch_buffer_size = 2 * args.batch  # threads: two batches ahead, like torch's workers
    return c


def our_loader(data, args, **kw):
    from vlm_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    return iter(pipeline.train_dataset(our_config(data, args, **kw), collate=pipeline.label_collate))


def torch_loader(data, args):
    import torch  # pylint: disable=import-outside-toplevel
    from torchvision import datasets, transforms  # pylint: disable=import-outside-toplevel
    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(os.path.join(data["folder"], "train"), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=True)

    def forever():  # epochs back to back, the same workers
        while True:
            yield from loader
    return forever()


def measure(make, args) -> tuple[float, float, float]:
    """(images/s, CPU ms per image) over --batches batches after --warmup, and the
    seconds to the first batch, of a freshly built loader."""
    t0 = time.perf_counter()
    it = make()
    next(it)
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        next(it)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for _ in range(args.batches):
        next(it)
    rate = args.batches * args.batch / (time.perf_counter() - t0)
    cpu = (_cpu_seconds() - c0) / (args.batches * args.batch) * 1e3
    getattr(it, "close", lambda: None)()  # our iterator; torch's generator shuts its workers down
    del it
    return rate, cpu, first


def throughput(data, args) -> dict:
    """Each round builds every loader afresh (the order alternating between rounds), drops
    --warmup batches (start-up and what the workers buffered: the steady state follows,
    the consumer waiting on the producers) and times --batches."""
    makers = {
        "torch DataLoader": lambda: torch_loader(data, args),
        "ours (exact decode)": lambda: our_loader(data, args, fast=False, workers=args.workers, threads=1),
        "ours (fast_decode)": lambda: our_loader(data, args, fast=True, workers=args.workers, threads=1),
        "ours wds shards (fast)": lambda: our_loader(data, args, fast=True, workers=args.workers,
                                                     threads=1, source="webdataset"),
        "ours threads, no workers": lambda: our_loader(data, args, fast=True, workers=0,
                                                       threads=args.workers),
    }
    try:
        import vlm_jax.data.webdataset  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        makers.pop("ours wds shards (fast)")
    rates, cpu_ms, firsts = ({k: [] for k in makers} for _ in range(3))
    for r in range(args.rounds):
        names = list(makers) if r % 2 == 0 else list(makers)[::-1]
        for name in names:
            rate, cpu, first = measure(makers[name], args)
            rates[name].append(rate)
            cpu_ms[name].append(cpu)
            firsts[name].append(first)
        print(f"  round {r + 1}/{args.rounds} images/s: " + ", ".join(
            f"{name} {rates[name][-1]:.0f}" for name in makers), flush=True)
    loaders = makers
    firsts = {k: statistics.median(v) for k, v in firsts.items()}
    base = statistics.median(rates["torch DataLoader"])
    print(f"\nThroughput, {args.workers} worker processes each, batches of {args.batch}, random "
          f"resized crop to 224 + flip + normalise; median of {args.rounds} interleaved rounds "
          f"({os.cpu_count()} CPUs):")
    cpu_base = statistics.median(cpu_ms["torch DataLoader"])
    print(f"  {'loader':26s} {'images/s':>9s} {'vs torch':>9s} {'min-max':>13s} "
          f"{'CPU ms/image':>13s} {'vs torch':>9s} {'first batch':>12s}")
    for name in loaders:
        med, cpu = statistics.median(rates[name]), statistics.median(cpu_ms[name])
        print(f"  {name:26s} {med:9.1f} {med / base:8.2f}x {min(rates[name]):6.0f}-"
              f"{max(rates[name]):<6.0f} {cpu:13.2f} {cpu_base / cpu:8.2f}x {firsts[name]:10.1f} s")
    print("  (CPU ms/image: user + system time of this process and all its workers per image;\n"
          "   vs torch = torch's / ours, higher is better. On a shared machine images/s swings\n"
          "   with the load; CPU per image does not, and bounds images/s once the cores are busy.)")
    return {k: statistics.median(v) for k, v in rates.items()}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its live descendants."""
    import psutil  # pylint: disable=import-outside-toplevel
    total = 0.0
    me = psutil.Process()
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


# --------------------------------------------------------------------- decode costs

def decode_costs(data, args) -> None:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from vlm_jax.data import preprocess  # pylint: disable=import-outside-toplevel
    files = []
    for d, _, fs in os.walk(os.path.join(data["folder"], "train")):
        files += [os.path.join(d, f) for f in fs]
    blobs = [open(f, "rb").read() for f in sorted(files)[:64]]  # pylint: disable=consider-using-with

    def per_image(fn, files=blobs, reps=3):  # CPU time of this thread: steady under load
        best = float("inf")
        for _ in range(reps):
            t0 = time.process_time()
            for i, b in enumerate(files):
                fn(b, i)
            best = min(best, time.process_time() - t0)
        return best / len(files) * 1e3

    def pil(b, _):
        return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))

    def ours(b, i, size=224, fast=False):
        return preprocess.preprocess_image(b, image_size=size, crop="random_resized", flip=True,
                                           rng=np.random.default_rng(i), fast_decode=fast)

    print("\nOne thread, CPU ms per image (decode; decode + random resized crop + flip + normalise):")
    print(f"  PIL decode (torchvision's loader)       {per_image(pil):6.2f}")
    print(f"  our decode (simplejpeg, same pixels)    {per_image(lambda b, _: preprocess.decode_image(b)):6.2f}")
    rng = np.random.default_rng(1)
    web = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(_photo(rng, 1600, 1200)).save(buf, "JPEG", quality=90)
        web.append(buf.getvalue())
    for label, files in (("these files", blobs), ("1600x1200", web)):
        for size in args.fast_sizes:
            exact = per_image(lambda b, i, s=size: ours(b, i, s, False), files)
            fast = per_image(lambda b, i, s=size: ours(b, i, s, True), files)
            diff = np.mean([np.abs(ours(b, i, size, False) - ours(b, i, size, True)).mean() * 127.5
                            for i, b in enumerate(files)])
            print(f"  {label:11s} to {size:3d}px: exact {exact:6.2f}, fast_decode {fast:6.2f} "
                  f"({exact / fast:.2f}x); mean |fast - exact| {diff:.2f} levels of 255")


# ------------------------------------------------------------------ train-step wait

def train_step_wait(data, args) -> None:
    import jax  # pylint: disable=import-outside-toplevel
    from vlm_jax import config_util, models, optim, parallel, tasks, train  # pylint: disable=import-outside-toplevel
    from vlm_jax.data import pipeline  # pylint: disable=import-outside-toplevel

    c = config_util.recipe(os.path.join(ROOT, "configs", "vit_cifar10.py"), "cpu")
    c.data.source, c.data.folder.path = "folder", data["folder"]
    c.data.num_workers, c.data.num_threads = args.workers, 1
    c.pp.image_size, c.pp.crop, c.pp.flip = 224, "random_resized", True
    c.pp.fast_decode, c.data.cache_decoded = True, False
    c.batch_size = args.batch
    m = c.model.image
    m.image_size, m.patch_size = 224, 32
    task = tasks.get(c)
    task.prepare_config(c)
    mesh = parallel.make_mesh(c.mesh)
    model = models.build(c.model)
    tx, lr_fn = optim.build(c.optimizer, 1000)
    state, shardings = train.create_train_state(c, model, tx, mesh, jax.random.PRNGKey(0))
    step = train.make_train_step(c, model, tx, lr_fn, mesh, shardings)
    it = iter(pipeline.train_dataset(c, collate=pipeline.label_collate))
    cached = parallel.global_batch(next(it), mesh)
    state, metrics = step(state, cached)  # compile
    jax.block_until_ready(metrics)
    for _ in range(args.warmup):  # drain the prefetch buffers
        next(it)
    n = args.steps

    def run(feed):
        nonlocal state
        wait, t0 = 0.0, time.perf_counter()
        for _ in range(n):
            t1 = time.perf_counter()
            batch = feed()
            wait += time.perf_counter() - t1
            state, out = step(state, batch)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / n * 1e3, wait / n * 1e3

    rows = {"cached batch": [], "pipeline": []}
    for r in range(args.rounds):
        rows["cached batch"].append(run(lambda: cached))
        rows["pipeline"].append(run(lambda: parallel.global_batch(next(it), mesh)))
    it.close()
    base = statistics.median(t for t, _ in rows["cached batch"])
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"\nTrain step ({n_params:,}-param ViT, patch 32 at 224, batch {args.batch}, "
          f"{args.workers} workers, {n} steps x {args.rounds} interleaved rounds):")
    print(f"  {'fed by':14s} {'ms/step':>8s} {'vs cached':>10s} {'data wait ms/step':>18s}")
    for name, vals in rows.items():
        t = statistics.median(v for v, _ in vals)
        w = statistics.median(v for _, v in vals)
        print(f"  {name:14s} {t:8.1f} {t / base:9.2f}x {w:18.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default=None, help="data folder, kept (default: a temporary one)")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10,
                   help="batches dropped per loader and round (> what any loader buffers)")
    p.add_argument("--batches", type=int, default=10, help="batches timed per loader and round")
    p.add_argument("--steps", type=int, default=8, help="train steps timed per round")
    p.add_argument("--fast_sizes", type=int, nargs="*", default=[224, 128])
    p.add_argument("--skip", nargs="*", default=[], choices=["throughput", "decode", "train"])
    args = p.parse_args()
    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="input_pipeline_")
        args.dir = tmp.name
    t0 = time.perf_counter()
    data = make_data(args.dir, args.images)
    print(f"{args.images} JPEGs, mean {data['mean_w']:.0f}x{data['mean_h']:.0f}, "
          f"{data['mean_kb']:.0f} KB, in {args.dir} ({len(data['shards'])} tar shards); "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    if "throughput" not in args.skip:
        throughput(data, args)
    if "decode" not in args.skip:
        decode_costs(data, args)
    if "train" not in args.skip:
        train_step_wait(data, args)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
