r"""Compile time of the SigLIP train step with the encoder blocks unrolled vs scanned.

    python experiments/scan_compile.py                              # g-opt/14, full depth
    python experiments/scan_compile.py --variants B/16,So400m/14,g-opt/14
    python experiments/scan_compile.py --variants g-opt/14 --depth 8  # fewer layers, same widths

For each ``--variants`` entry, builds the SigLIP recipe (configs/siglip_b16.py) with
that image tower and a text tower of the same size (as experiments/train_throughput.py
does), once with ``model.image.scan = model.text.scan = False`` and once with True,
and times ``vlm_jax.train.make_train_step``'s full train step (forward, backward,
AdamW, the chosen loss) being traced + lowered and compiled by XLA, without running
it: on abstract (shape-only) train states, so not even the parameters are allocated.
The two layouts are compiled alternately (``--reps`` rounds), each time from a freshly
built step, with jax's compilation caches off, and printed side by side with the ratio.
Also printed: XLA's temporary-buffer bytes of each compiled step (memory_analysis).

Identical outputs (``--check_depth`` > 0, on by default): the same recipe with the
variant's widths, heads and MLP dims but ``--check_depth`` layers per tower (and a
small vocabulary and image, so it runs here) is initialised unrolled, its whole train
state (params and AdamW moments) converted with ``models.scan.to_scanned``, and one
train step run in each layout on the same batch. Printed: the loss of each and the
largest difference of the losses, metrics and updated parameters (scanned ones
converted back with ``to_unrolled``).

Timings on a shared machine are noisy; the ratio of the interleaved runs is the claim.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def build_config(variant: str, *, scan: bool, depth: int, batch: int, image_size: int,
                 dtype: str, vocab: int | None = None, remat_policy: str = ""):
  """The SigLIP recipe with image ``variant``, a same-size text tower and the scan flag."""
  import train_throughput  # pylint: disable=import-outside-toplevel

  args = argparse.Namespace(variant=variant, text_variant="", image_size=image_size,
                            remat=False, dtype=dtype, batch=batch, loss="sigmoid",
                            loss_impl="chunked", grad_accum_steps=1, fsdp=1, tensor=1)
  c = train_throughput.build_config(args)
  m = c.model
  for tower in (m.image, m.text):
    tower.scan = scan
    tower.remat_policy = remat_policy
    if depth:
      tower.depth = depth
  if vocab:
    m.text.vocab_size = vocab
  return c


def _parts(config):
  import jax  # pylint: disable=import-outside-toplevel
  from vlm_jax import models, optim, parallel, train  # pylint: disable=import-outside-toplevel
  mesh = parallel.make_mesh(config.mesh)
  model = models.build(config.model)
  tx, lr_fn = optim.build(config.optimizer, config.total_steps)
  shardings = train.train_state_shardings(config, model, tx, mesh)
  size, m = config.model.image.image_size, config.model
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jax.numpy.float32,
                                         sharding=parallel.batch_sharding(mesh, 4)),
           "tokens": jax.ShapeDtypeStruct((config.batch_size, m.text.max_len), jax.numpy.int32,
                                          sharding=parallel.batch_sharding(mesh, 2))}
  return mesh, model, tx, lr_fn, shardings, batch


def compile_once(config) -> dict:
  """Trace + lower and compile the train step of ``config`` on abstract inputs; seconds."""
  import jax  # pylint: disable=import-outside-toplevel
  from vlm_jax import models, train  # pylint: disable=import-outside-toplevel
  mesh, model, tx, lr_fn, shardings, batch = _parts(config)
  abstract = jax.eval_shape(lambda: train.create_train_state(
      config, model, tx, mesh, jax.random.PRNGKey(0))[0])
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       abstract, shardings)
  step = train.make_train_step(config, model, tx, lr_fn, mesh, shardings)
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = step.lower(state, batch)
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  mem = compiled.memory_analysis()
  return dict(lower_s=t1 - t0, compile_s=t2 - t1, total_s=t2 - t0, cpu_s=c2 - c0,
              lower_cpu_s=c1 - c0, compile_cpu_s=c2 - c1,
              temp_bytes=getattr(mem, "temp_size_in_bytes", float("nan")),
              params=models.count_params(abstract.params))


def check_outputs(variant: str, depth: int, batch: int, image_size: int, vocab: int,
                  remat_policy: str) -> dict:
  """One train step unrolled vs scanned (state converted with to_scanned); max differences."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from vlm_jax import train  # pylint: disable=import-outside-toplevel
  from vlm_jax.models import scan  # pylint: disable=import-outside-toplevel

  results = {}
  rng = np.random.RandomState(0)
  data = {"image": rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32),
          "tokens": rng.randint(1, vocab, (batch, 64)).astype(np.int32)}
  state0 = None
  for scanned in (False, True):
    config = build_config(variant, scan=scanned, depth=depth, batch=batch, image_size=image_size,
                          dtype="float32", vocab=vocab,
                          remat_policy=remat_policy if scanned else "")
    mesh, model, tx, lr_fn, shardings, abstract_batch = _parts(config)
    if state0 is None:
      state0, _ = train.create_train_state(config, model, tx, mesh, jax.random.PRNGKey(0))
      state0 = jax.device_get(state0)  # numpy: kept for the scanned run
      state = state0
    else:
      state = state0.replace(params=scan.to_scanned(state0.params),
                             opt_state=scan.to_scanned(state0.opt_state))
    state = jax.device_put(state, shardings)
    step = train.make_train_step(config, model, tx, lr_fn, mesh, shardings)
    new_state, metrics = step(state, jax.device_put(
        data, {k: v.sharding for k, v in abstract_batch.items()}))
    params = jax.device_get(new_state.params)
    results[scanned] = (params if not scanned else scan.to_unrolled(params),
                        {k: float(v) for k, v in jax.device_get(metrics).items()})
    del new_state, state, step
    gc.collect()
  (pu, mu), (ps, ms) = results[False], results[True]
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), pu, ps))
  # The step's update (new - old params), to judge the differences against.
  update = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), pu,
                                            state0.params)))
  same_tree = jax.tree.structure(pu) == jax.tree.structure(ps)
  return dict(loss_unrolled=mu["train/loss"], loss_scanned=ms["train/loss"],
              metric_diff=max(abs(mu[k] - ms[k]) for k in mu), param_diff=max(diffs),
              update=update, same_tree=same_tree, n_leaves=len(diffs))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="g-opt/14",
                      help="comma-separated image variants, e.g. B/16,So400m/14,g-opt/14")
  parser.add_argument("--depth", type=int, default=0,
                      help="layers per tower for the timing (0: the variant's own)")
  parser.add_argument("--batch", type=int, default=2, help="global batch of the compiled step")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--reps", type=int, default=1, help="alternating rounds per layout")
  parser.add_argument("--remat_policy", default="",
                      help="remat policy of both layouts' towers (models/scan.py); '' = none")
  parser.add_argument("--check_depth", type=int, default=2,
                      help="layers per tower of the run that checks identical outputs (0: skip)")
  parser.add_argument("--check_image_size", type=int, default=56)
  parser.add_argument("--check_vocab", type=int, default=1000)
  parser.add_argument("--check_batch", type=int, default=4)
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="simulate this many CPU devices (sets XLA_FLAGS; CPU only)")
  args = parser.parse_args()
  if args.cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=import-outside-toplevel
  from vlm_jax.models import vit  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_enable_compilation_cache", False)  # no persistent cache hits
  dev = jax.devices()[0]
  print(f"device: {jax.device_count()} x {dev.device_kind} ({dev.platform}); "
        f"{os.cpu_count()} CPUs; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"train step: SigLIP recipe, sigmoid loss (chunked), AdamW, batch {args.batch}, "
        f"{args.image_size} px, {args.dtype}, remat_policy {args.remat_policy or 'none'}; "
        "lower + compile only, nothing run\n")

  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  rows = []
  for variant in variants:
    times = {False: [], True: []}
    info = {}
    for rep in range(args.reps):
      for scanned in (False, True):
        config = build_config(variant, scan=scanned, depth=args.depth, batch=args.batch,
                              image_size=args.image_size, dtype=args.dtype,
                              remat_policy=args.remat_policy)
        r = compile_once(config)
        times[scanned].append(r)
        info[scanned] = r
        print(f"  {variant:<10} rep {rep} {'scanned ' if scanned else 'unrolled'}: "
              f"lower {r['lower_s']:7.1f} s  compile {r['compile_s']:7.1f} s wall; "
              f"{r['lower_cpu_s']:7.1f} + {r['compile_cpu_s']:7.1f} CPU s; "
              f"temp {r['temp_bytes'] / 2**30:6.2f} GiB", flush=True)
        jax.clear_caches()
        gc.collect()
    depth = args.depth or vit.decode_variant(variant)["depth"]
    best = {k: min(v, key=lambda r: r["total_s"]) for k, v in times.items()}
    rows.append((variant, depth, info[False]["params"], best))

  print(f"\n{'variant':<11}{'depth':>6}{'params':>15}  {'unrolled s':>11}{'scanned s':>10}"
        f"{'ratio':>7}  {'CPU s u/s':>14}{'ratio':>7}  {'(lower u/s)':>13}{'(compile u/s)':>15}"
        f"{'temp GiB u/s':>14}")
  for variant, depth, params, best in rows:
    u, s = best[False], best[True]
    print(f"{variant:<11}{depth:>6}{params:>15,}  {u['total_s']:>11.1f}{s['total_s']:>10.1f}"
          f"{u['total_s'] / s['total_s']:>6.1f}x  {u['cpu_s']:>7.1f}/{s['cpu_s']:<6.1f}"
          f"{u['cpu_s'] / s['cpu_s']:>6.1f}x  {u['lower_s']:>6.1f}/{s['lower_s']:<6.1f}"
          f"{u['compile_s']:>8.1f}/{s['compile_s']:<6.1f}"
          f"{u['temp_bytes'] / 2**30:>7.2f}/{s['temp_bytes'] / 2**30:<6.2f}")
  print("(wall seconds: trace + lower + XLA compile of the whole train step, best of "
        f"{args.reps} per layout; CPU s: the same in process CPU time, which a busy machine "
        "distorts less; ratio = unrolled / scanned)")

  if args.check_depth:
    for variant in variants:
      r = check_outputs(variant, args.check_depth, args.check_batch, args.check_image_size,
                        args.check_vocab, args.remat_policy)
      print(f"\nidentical outputs, {variant} widths at depth {args.check_depth} per tower, "
            f"{args.check_image_size} px, vocab {args.check_vocab}, batch {args.check_batch}, "
            "float32, one train step from the same state (to_scanned of params + AdamW moments):")
      print(f"  loss unrolled {r['loss_unrolled']:.6f}  scanned {r['loss_scanned']:.6f}  "
            f"max |metric diff| {r['metric_diff']:.2e}")
      print(f"  updated params: {r['n_leaves']} leaves, same tree after to_unrolled: "
            f"{r['same_tree']}, max |diff| {r['param_diff']:.2e} (largest update of the "
            f"step {r['update']:.2e})")


if __name__ == "__main__":
  main()
