r"""Memory and compile plan of the SigLIP train step on N devices, without the hardware.

    python experiments/scale_plan.py                                   # the default table
    python experiments/scale_plan.py --models So400m/14 --meshes fsdp --devices 8 --batch 256
    python experiments/scale_plan.py --models g-opt/14 --devices 256 --batch 32768 --tensor 4

For each model and mesh, the full train step (``vlm_jax.train.make_train_step``:
both towers, the chunked sigmoid loss, gradient clipping, AdamW) of the SigLIP
recipe (configs/siglip_b16.py with the image tower replaced by ``--models`` and a
text tower of the same size, as SigLIP So400m has) is lowered and compiled for
``--devices`` simulated CPU devices, from ``jax.ShapeDtypeStruct`` arguments that
carry their shardings: no parameter is ever materialised, so g-opt/14 plans on a
laptop. Per device it prints:

* params+opt: bytes of this device's shards of the parameters and the AdamW
  moments (exact shard shapes from the NamedShardings; the step and rng too).
* temp: ``compiled.memory_analysis().temp_size_in_bytes`` (activations kept for
  the backward pass, gathered FSDP weights, gradients in flight).
* peak: arguments + temp + outputs not aliased to donated arguments (the state
  is donated, so its outputs reuse its buffers), and the verdicts: does it fit a
  16 GiB TPU v5e chip / an 80 GB H100, after ``--headroom`` (default 10%) of the
  capacity is set aside for the runtime, fragmentation and the input pipeline.
* compile: seconds for ``lower().compile()`` on this CPU.
* collectives in the partitioned HLO: all-gather, reduce-scatter, all-reduce,
  all-to-all and collective-permute, as count / bytes (result bytes per
  device), inside loops multiplied by their trip count (scanned layers, the
  chunked loss's ring).

For FSDP rows it also prints per-device params+opt divided by (total / N): 1.00
is a perfect 1/N split.

Meshes (``--tensor`` sets the TP degree, default 2):

  dp       (("data", N),)                  everything replicated, batch split N ways
  fsdp     (("fsdp", N),)                  params split on "embed" (vlm_jax.parallel rules)
  fsdp_tp  (("fsdp", N/T), ("tensor", T))  and "mlp"/"heads"/"vocab" split T ways

``--remat_policy`` (none | full | dots_saveable | dots_with_no_batch_dims_saveable
| offload, ``model.*.remat_policy``) and ``--scan`` / ``--no-scan``
(``model.*.scan``; on by default) set both towers.

Caveats. Memory comes from XLA's CPU compiler: its buffer assignment and fusion
are not a TPU's or GPU's, and CPU XLA keeps weights and some activations in
float32 where a TPU would use bf16, so ``temp`` is an estimate (on the high
side) of what those backends allocate; params+opt is exact. The SPMD
partitioning, and so which collectives run, is the partitioner every backend
runs; but XLA:CPU does not turn all-reduce + dynamic-slice into reduce-scatter
(GPU and TPU do), so FSDP's gradient reduce-scatters show up as all-reduces
here, and gathered weights as float32. Compile times are this machine's CPU
compile, with XLA's CPU code generation optimisations off by default
(``--full_opt`` turns them on): they compare layouts (scan vs unrolled), not
what a TPU compile takes.

Run time of the default (B/16, So400m/14, g-opt/14 x dp, fsdp, fsdp_tp on 8
devices, global batch 256, bf16, scan on): 3.5 CPU-minutes (15 minutes wall on
a shared 2-core machine). ``--no-scan`` (every layer unrolled) costs several
times more for the big models.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30
# Usable accelerator memory per device (bytes).
CAPACITY = (("v5e 16GiB", 16 * GIB), ("H100 80GB", 80 * 10 ** 9))
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
MESHES = ("dp", "fsdp", "fsdp_tp")
_FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _recipe():
  from vlm_jax import config_util  # pylint: disable=import-outside-toplevel
  return config_util.recipe(os.path.join(ROOT, "configs", "siglip_b16.py"))


def mesh_spec(name: str, devices: int, tensor: int) -> list[tuple[str, int]]:
  if name == "dp":
    return [("data", devices)]
  if name == "fsdp":
    return [("fsdp", devices)]
  if name == "fsdp_tp":
    if devices % tensor:
      raise ValueError(f"--devices={devices} is not divisible by --tensor={tensor}")
    return [("fsdp", devices // tensor), ("tensor", tensor)]
  raise ValueError(f"unknown mesh {name!r}; choose from {MESHES}")


def build_config(variant: str, args, mesh: str):
  """configs/siglip_b16.py with ``variant`` in both towers, at ``args``' batch and dtype."""
  c = _recipe()
  m = c.model
  size = variant.split("/")[0]
  m.image.variant = variant
  m.image.image_size = c.pp.image_size = args.image_size
  m.text.variant = size
  m.out_dim = None  # the text width
  m.dtype = args.dtype
  c.batch_size = args.batch
  c.mesh = mesh_spec(mesh, args.devices, args.tensor)
  for tower in (m.image, m.text):
    _set_layers(tower, args)
  return c


def _set_layers(tower, args) -> None:
  """Applies --scan / --remat_policy to a tower config, as far as the model has them."""
  if args.remat_policy:
    if "remat_policy" in tower:
      tower.remat_policy = args.remat_policy
    elif args.remat_policy == "full":
      tower.remat = True
    elif args.remat_policy != "none":
      raise SystemExit(f"--remat_policy={args.remat_policy}: this checkout's model config has "
                       "no remat_policy field (only remat on/off: none | full)")
  if "scan" in tower:
    tower.scan = args.scan is not False  # default: on
  elif args.scan:
    raise SystemExit("--scan: this checkout's model config has no model.image.scan field")


def scan_state(config) -> str:
  """"on" / "off" / "n/a" (no such config field) for the report."""
  if "scan" not in config.model.image:
    return "n/a"
  return "on" if config.model.image.scan else "off"


def _abstract_state(config, model, tx, shardings):
  """The TrainState as ShapeDtypeStructs carrying ``shardings`` (nothing allocated)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from vlm_jax import finetune, models, train  # pylint: disable=import-outside-toplevel

  inputs = models.init_inputs(config.model)

  def make(key):
    variables = dict(nn.unbox(finetune.init_variables(config, model, key, *inputs)))
    params = variables.pop("params")
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params), rng=key, model_state=variables)

  shapes = jax.eval_shape(make, jax.random.PRNGKey(0))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


def shard_bytes(tree) -> tuple[int, int]:
  """(bytes on the most loaded device, total bytes) of ShapeDtypeStructs with shardings.

  A dimension not divisible by its mesh axes is padded to the next multiple, as
  XLA pads uneven shards.
  """
  import jax  # pylint: disable=import-outside-toplevel
  per_device = collections.Counter()
  total = 0
  for x in jax.tree.leaves(tree):
    size = x.dtype.itemsize
    total += math.prod(x.shape) * size
    spec = tuple(x.sharding.spec) + (None,) * (len(x.shape) - len(x.sharding.spec))
    mesh = x.sharding.mesh
    local = 1
    for dim, axes in zip(x.shape, spec):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      parts = math.prod(mesh.shape[a] for a in axes)
      local *= -(-dim // parts)
    for d in x.sharding.device_set:  # same local size on every device
      per_device[d.id] += local * size
  return max(per_device.values()), total


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_WHILE = re.compile(r"\swhile\(.*body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)")


def count_collectives(hlo: str) -> dict[str, tuple[int, int]]:
  """{collective: (count, bytes)} of a compiled HLO module's text, per device.

  Bytes are the result shapes' sizes. An op inside a while loop with a known trip
  count (scan over layers, the ring loss) counts once per iteration.
  """
  comps: dict[str, list[str]] = {}
  entry, name = None, None
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m and not line.startswith(" "):
      name = m.group(1)
      comps[name] = []
      if line.startswith("ENTRY"):
        entry = name
    elif name is not None:
      comps[name].append(line)
  # Multiplicity of each computation: product of enclosing loop trip counts.
  mult = collections.Counter()

  def visit(comp, times, depth=0):
    if comp not in comps or depth > 50:
      return
    mult[comp] += times
    for line in comps[comp]:
      w = _WHILE.search(line)
      trip = _TRIP.search(line)
      for callee in _CALLS.findall(line):
        n = int(trip.group(1)) if (w and trip and callee == w.group(1)) else 1
        visit(callee, times * n, depth + 1)

  visit(entry, 1)
  out = {c: [0, 0] for c in COLLECTIVES}
  for comp, lines in comps.items():
    times = mult.get(comp, 0)
    for line in lines:
      m = _OP.search(line)
      if not m or not times:
        continue
      kind, result = m.group(2), m.group(1)
      if m.group(3):  # async start: the result tuple holds operands and outputs; count outputs
        shapes = _SHAPE.findall(result)
        shapes = shapes[len(shapes) // 2:] if len(shapes) > 1 else shapes
      else:
        shapes = _SHAPE.findall(result)
      nbytes = sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
                   for t, dims in shapes)
      out[kind][0] += times
      out[kind][1] += times * nbytes
  return {k: (v[0], v[1]) for k, v in out.items()}


def plan(variant: str, mesh_name: str, args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from vlm_jax import models, optim, parallel, tasks, train  # pylint: disable=import-outside-toplevel

  config = build_config(variant, args, mesh_name)
  mesh = parallel.make_mesh(config.mesh)
  model = models.build(config.model)
  tx, lr_fn = optim.build(config.optimizer, config.total_steps)
  shardings = train.train_state_shardings(config, model, tx, mesh)
  state = _abstract_state(config, model, tx, shardings)
  batch_shardings = tasks.get(config).batch_shardings(config, mesh)
  size, max_len = config.model.image.image_size, config.model.text.max_len
  batch = {
      "image": jax.ShapeDtypeStruct((args.batch, size, size, 3), jnp.float32,
                                    sharding=batch_shardings["image"]),
      "tokens": jax.ShapeDtypeStruct((args.batch, max_len), jnp.int32,
                                     sharding=batch_shardings["tokens"]),
  }
  step = train.make_train_step(config, model, tx, lr_fn, mesh, shardings)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  state_dev, state_total = shard_bytes(state)
  params_dev, params_total = shard_bytes(state.params)
  args_b = mem.argument_size_in_bytes
  out_b = mem.output_size_in_bytes - mem.alias_size_in_bytes
  peak = args_b + mem.temp_size_in_bytes + out_b
  return dict(
      model=variant, mesh=mesh_name, shape="x".join(str(s) for s in mesh.shape.values()),
      params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
      scan=scan_state(config),
      state_dev=state_dev, state_total=state_total, params_dev=params_dev,
      params_total=params_total, temp=mem.temp_size_in_bytes, args=args_b, out=out_b,
      peak=peak, compile_s=compile_s, collectives=count_collectives(compiled.as_text()),
      devices=jax.device_count())


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def _fmt_coll(count: int, nbytes: int) -> str:
  return f"{count}/{nbytes / GIB:.2f}G" if count else "-"


def report(rows: list[dict], args) -> None:
  print(f"SigLIP train step (AdamW, chunked sigmoid loss), {args.image_size}px, text 64 tokens, "
        f"global batch {args.batch}, {args.dtype}, scan {rows[0]['scan'] if rows else '?'}, "
        f"remat {args.remat_policy or 'none'}, {args.devices} simulated devices; "
        f"memory in GiB per device; headroom {args.headroom:.0%}")
  head = (f"{'model':<11}{'mesh':<9}{'shape':<6}{'params':>8} {'par+opt':>8}{'temp':>8}"
          f"{'peak':>8}{'compile':>9}  " + "".join(f"{c:>17}" for c in
                                               ("all-gather", "reduce-scatter", "all-reduce",
                                                "all-to-all", "coll-permute")))
  head += "  fits " + " / ".join(name for name, _ in CAPACITY)
  print(head)
  for r in rows:
    verdicts = " / ".join("yes" if r["peak"] <= cap * (1 - args.headroom) else "NO"
                          for _, cap in CAPACITY)
    coll = "".join(f"{_fmt_coll(*r['collectives'][c]):>17}" for c in COLLECTIVES)
    print(f"{r['model']:<11}{r['mesh']:<9}{r['shape']:<6}{r['params'] / 1e6:>7.0f}M "
          f"{_gib(r['state_dev']):>8}{_gib(r['temp']):>8}{_gib(r['peak']):>8}"
          f"{r['compile_s']:>8.1f}s  {coll}  {verdicts}")
  print("collectives: count/GiB of results per device per step (loops counted per iteration)")
  for r in rows:
    if r["mesh"] == "fsdp":
      ideal = r["state_total"] / r["devices"]
      print(f"FSDP {r['model']}: params+opt per device {_gib(r['state_dev'])} GiB = "
            f"{r['state_dev'] / ideal:.4f} x (total {_gib(r['state_total'])} GiB / "
            f"{r['devices']}); params alone {r['params_dev'] / (r['params_total'] / r['devices']):.4f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="B/16,So400m/14,g-opt/14",
                      help="comma-separated image variants; the text tower takes the same size")
  parser.add_argument("--meshes", default=",".join(MESHES), help=f"comma-separated, of {MESHES}")
  parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
  parser.add_argument("--tensor", type=int, default=2, help="TP degree of the fsdp_tp mesh")
  parser.add_argument("--batch", type=int, default=256, help="global batch")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                      help="compute dtype (parameters and optimizer state stay float32)")
  parser.add_argument("--remat_policy", default="",
                      help="rematerialisation of the encoder blocks: none | full | ... "
                           "(model.*.remat_policy where the config has it)")
  parser.add_argument("--scan", default=None, action=argparse.BooleanOptionalAction,
                      help="layers as one nn.scan (model.*.scan; the default where the model "
                           "config has the field); --no-scan unrolls them")
  parser.add_argument("--headroom", type=float, default=0.1,
                      help="fraction of device memory kept free in the verdicts")
  parser.add_argument("--full_opt", action="store_true",
                      help="compile with XLA's CPU code generation optimisations on (slower)")
  args = parser.parse_args()
  flags = os.environ.get("XLA_FLAGS", "")
  flags += f" --xla_force_host_platform_device_count={args.devices}"
  if not args.full_opt:
    flags += " " + _FAST_XLA
  os.environ["XLA_FLAGS"] = flags.strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, ROOT)

  rows = []
  for variant in args.models.split(","):
    for mesh_name in args.meshes.split(","):
      r = plan(variant.strip(), mesh_name.strip(), args)
      rows.append(r)
      print(f"  compiled {r['model']} {r['mesh']} in {r['compile_s']:.1f} s", file=sys.stderr,
            flush=True)
  report(rows, args)


if __name__ == "__main__":
  main()
