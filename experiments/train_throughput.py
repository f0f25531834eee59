r"""Images/s and MFU of the real SigLIP train step on synthetic batches.

    python experiments/train_throughput.py --variant B/16 --batch 256 --dtype bfloat16 --steps 20
    python experiments/train_throughput.py --variant B/16 --batch 256 --attention cudnn   # GPU
    python experiments/train_throughput.py --variant S/16 --batch 8 --image_size 64 --steps 3   # CPU smoke
    python experiments/train_throughput.py --variant B/16 --batch 256 --profile /tmp/prof   # + op kinds

Builds the SigLIP B/16 recipe (configs/siglip_b16.py) with the image tower
replaced by ``--variant`` (and the text tower by the same size, or
``--text_variant``), compiles ``vlm_jax.train.make_train_step`` (AdamW, the
chosen loss, optional gradient accumulation) on a mesh over all local devices,
and times ``--steps`` steps on one random batch that lives on the devices, after
``--warmup`` untimed steps, with ``jax.block_until_ready``.

MFU = model FLOPs per step / step time / peak FLOP/s of the devices. Two FLOP
counts are printed side by side:

* XLA: ``compiled.cost_analysis()["flops"]`` of the compiled step (the
  partitioned per-device program, times the device count). It counts what runs:
  rematerialised forwards, the optimizer and the loss too; a loop body (the
  ring loss, ``grad_accum_steps > 1``) is counted once, not per iteration.
* analytic: 6 x (matmul parameters x the tokens they see) + 12 x depth x width
  x seq^2 per example for attention scores (forward 1x, backward 2x), per tower.

Peak FLOP/s: dense bf16 tensor-core/MXU numbers from the vendors' data sheets
for the device kind jax reports (``--peak_tflops`` overrides, per device). With
``--dtype float32`` the MFU is still against that bf16 peak. On CPU only
images/s is meaningful.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 peak per device in TFLOP/s (vendor data sheets; no sparsity).
# Matched as substrings of jax's device_kind, most specific first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),     # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),     # same compute as H100 SXM5, more/faster memory
    ("GH200", 989.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),       # v5p reports "TPU v5"
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
)


def peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak TFLOP/s of one device of this kind, or None when unknown."""
  for key, value in PEAK_BF16_TFLOPS:
    if key.lower() in device_kind.lower():
      return value
  return None


def _recipe():
  from vlm_jax import config_util  # pylint: disable=import-outside-toplevel
  return config_util.recipe(os.path.join(ROOT, "configs", "siglip_b16.py"))


def build_config(args):
  """The B/16 recipe with the variant, sizes, dtype and parallelism of ``args``."""
  c = _recipe()
  m = c.model
  size = args.variant.split("/")[0]
  m.image.variant = args.variant
  m.image.image_size = c.pp.image_size = args.image_size
  m.image.remat = m.text.remat = args.remat
  m.image.remat_policy = m.text.remat_policy = args.remat_policy
  m.image.scan = m.text.scan = args.scan
  m.image.attention = m.text.attention = args.attention
  m.text.variant = args.text_variant or size
  m.out_dim = None              # the text width
  m.image.head = bool(args.text_variant)  # project when the widths may differ
  m.dtype = args.dtype
  c.batch_size = args.batch
  c.loss = args.loss
  c.loss_impl = args.loss_impl
  c.grad_accum_steps = args.grad_accum_steps
  c.optimizer.warmup_steps = 0
  c.mesh = [("data", -1), ("fsdp", args.fsdp), ("tensor", args.tensor)]
  return c


def analytic_flops(params, config, batch: int) -> float:
  """Model FLOPs of one train step (forward + backward), by the 6N-per-token rule.

  Kernels in a tower see every token of it, except those applied to one pooled
  vector per example (MAP head query/out/MLP, tower heads). Embedding tables,
  position embeddings, biases and norms are not matmuls and are left out, as is
  the B x B loss.
  """
  from vlm_jax import models  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel

  r = models.resolve_config(config.model)
  img, txt = r["image"], r["text"]
  stride = img["patch_size"] * (math.prod(img["stem_strides"]) if img["stem"] == "conv" else 1)
  n_img = (img["image_size"] // stride) ** 2
  n_txt = txt["max_len"]
  per_token = {"img": 0, "txt": 0}
  per_example = {"img": 0, "txt": 0}
  for path, x in flax.traverse_util.flatten_dict(params, sep="/").items():
    if not path.endswith("kernel"):
      continue
    tower = path.split("/")[0]
    if tower not in per_token:
      continue
    pooled = ("/head/" in f"/{path}" or
              ("MAPHead" in path and not any(k in path for k in ("/key/", "/value/"))))
    (per_example if pooled else per_token)[tower] += x.size
  flops = 6 * (per_token["img"] * n_img + per_token["txt"] * n_txt
               + per_example["img"] + per_example["txt"])
  flops += 12 * img["depth"] * img["width"] * n_img ** 2
  flops += 12 * txt["depth"] * txt["width"] * n_txt ** 2
  if img["pool_type"] == "map":
    flops += 12 * img["width"] * n_img  # one probe query over the tokens
  return float(flops) * batch


def run(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  sys.path.insert(0, ROOT)
  from vlm_jax import cpu_runtime, models, optim, parallel, train  # pylint: disable=import-outside-toplevel

  if not args.no_tune_cpu:
    cpu_runtime.tune()  # as vlm_jax.train does (a no-op on accelerator hosts)
  train.use_compilation_cache(args.compilation_cache_dir)

  config = build_config(args)
  mesh = parallel.make_mesh(config.mesh)
  model = models.build(config.model)
  tx, lr_fn = optim.build(config.optimizer, config.total_steps)
  t0 = time.perf_counter()
  state, shardings = train.create_train_state(config, model, tx, mesh, jax.random.PRNGKey(0))
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  n_params = models.count_params(state.params)

  size = config.model.image.image_size
  vocab, max_len = config.model.text.vocab_size, config.model.text.max_len
  batch_shardings = {"image": parallel.batch_sharding(mesh, 4),
                     "tokens": parallel.batch_sharding(mesh, 2)}

  @jax.jit
  def synthetic(key):
    k1, k2 = jax.random.split(key)
    images = jax.random.uniform(k1, (args.batch, size, size, 3), jnp.float32, -1.0, 1.0)
    tokens = jax.random.randint(k2, (args.batch, max_len), 1, vocab, jnp.int32)
    return {"image": images, "tokens": tokens}

  batch = jax.device_put(synthetic(jax.random.PRNGKey(1)), batch_shardings)
  step = train.make_train_step(config, model, tx, lr_fn, mesh, shardings)
  print(f"{n_params:,} parameters on {jax.device_count()} x {jax.devices()[0].device_kind}; "
        "compiling the train step", flush=True)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  print(f"compiled in {compile_s:.1f} s; timing {args.steps} steps", flush=True)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  xla_flops = float((cost or {}).get("flops", float("nan"))) * jax.device_count()

  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / args.steps

  op_table = None
  if args.profile:  # after the timing, so the trace costs the numbers nothing
    from vlm_jax import profiling  # pylint: disable=import-outside-toplevel
    os.makedirs(args.profile, exist_ok=True)
    hlo = compiled.as_text()
    with open(os.path.join(args.profile, "train_step.hlo.txt"), "w") as f:
      f.write(hlo)
    try:
      with jax.profiler.trace(args.profile):
        for _ in range(3):
          state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
      op_table = (profiling.format_op_table(profiling.op_time_table(args.profile, hlo))
                  + "\n\n" + profiling.format_op_table(
                      profiling.op_time_table(args.profile, hlo, by="layer"), limit=20,
                      head="model path (blocks folded)"))
    except Exception as e:  # pylint: disable=broad-except
      op_table = f"  (profiling failed: {e!r}; the timing above stands)"

  dev = jax.devices()[0]
  peak = args.peak_tflops or (peak_tflops(dev.device_kind) if dev.platform != "cpu" else None)
  peak_total = peak * 1e12 * jax.device_count() if peak else None
  model_flops = analytic_flops(jax.device_get(state.params), config, args.batch)
  return dict(
      device=f"{jax.device_count()} x {dev.device_kind} ({dev.platform})",
      platform=dev.platform, params=n_params, init_s=init_s, compile_s=compile_s, step_s=step_s,
      images_per_s=args.batch / step_s, xla_flops=xla_flops, analytic_flops=model_flops,
      peak_tflops=peak, peak_total=peak_total, loss=float(metrics["train/loss"]),
      op_table=op_table)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="B/16", help="image tower, e.g. S/16, B/16, L/14, So400m/14")
  parser.add_argument("--text_variant", default="", help="text tower size (default: the image's)")
  parser.add_argument("--batch", type=int, default=256, help="global batch size")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--loss", default="sigmoid", choices=["sigmoid", "softmax"])
  parser.add_argument("--loss_impl", default="chunked", choices=["chunked", "gather", "dense"])
  parser.add_argument("--grad_accum_steps", type=int, default=1)
  parser.add_argument("--fsdp", type=int, default=1, help="fsdp mesh axis size")
  parser.add_argument("--tensor", type=int, default=1, help="tensor mesh axis size")
  parser.add_argument("--remat", action="store_true", help="rematerialise transformer blocks")
  parser.add_argument("--remat_policy", default="",
                      help="model.image/text.remat_policy: none | full | dots_saveable | "
                           "dots_with_no_batch_dims_saveable | offload ('' follows --remat)")
  parser.add_argument("--scan", action="store_true",
                      help="encoder blocks as one nn.scan (model.image/text.scan): compiles the "
                           "large variants (So400m/14, g-opt/14) far faster")
  parser.add_argument("--attention", default="reference",
                      choices=["reference", "xla", "cudnn", "auto"],
                      help="model.image/text.attention kernel (cudnn: GPU, bf16/fp16)")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="peak FLOP/s per device in TFLOP/s (default: from the device table)")
  parser.add_argument("--profile", default="",
                      help="directory: after timing, trace 3 steps with jax.profiler there, save "
                           "the compiled HLO beside it, and print where the time went by op kind")
  parser.add_argument("--compilation_cache_dir", default="",
                      help="jax's persistent compilation cache (config.compilation_cache_dir): "
                           "a second run loads the compiled init and train step from there")
  parser.add_argument("--no_tune_cpu", action="store_true",
                      help="leave out vlm_jax.cpu_runtime.tune() (config.tune_cpu=False in training)")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="simulate this many CPU devices (sets XLA_FLAGS; CPU only)")
  args = parser.parse_args()
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  if args.cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.cpu_devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"

  r = run(args)
  print(f"SigLIP {args.variant} (text {args.text_variant or args.variant.split('/')[0]}) "
        f"{args.image_size}px, batch {args.batch}, {args.dtype}, loss {args.loss}/{args.loss_impl}, "
        f"grad_accum_steps {args.grad_accum_steps}{', remat' if args.remat else ''}"
        f"{', remat_policy ' + args.remat_policy if args.remat_policy else ''}"
        f"{', scan' if args.scan else ''}, "
        f"attention {args.attention}")
  print(f"device          {r['device']}")
  print(f"parameters      {r['params']:,}")
  print(f"init            {r['init_s']:.1f} s  (create_train_state: compile and run)")
  print(f"compile         {r['compile_s']:.1f} s")
  print(f"step time       {r['step_s'] * 1e3:.1f} ms  (mean of {args.steps}, after {args.warmup} warm-up)")
  print(f"images/s        {r['images_per_s']:,.1f}")
  print(f"loss            {r['loss']:.4f}")
  print()
  print(f"{'FLOPs/step':<22}{'TFLOP':>10}{'TFLOP/s':>12}{'MFU':>9}")
  for name, flops in (("XLA cost_analysis", r["xla_flops"]), ("analytic 6N+attn", r["analytic_flops"])):
    rate = flops / r["step_s"]
    mfu = f"{100 * rate / r['peak_total']:8.1f}%" if r["peak_total"] else f"{'n/a':>9}"
    print(f"{name:<22}{flops / 1e12:>10.3f}{rate / 1e12:>12.2f}{mfu}")
  print(f"XLA / analytic = {r['xla_flops'] / r['analytic_flops']:.3f}")
  if r["platform"] == "gpu":
    print("On GPU XLA's cost analysis leaves out the matmuls and attention it hands to "
          "cuBLAS / cuDNN (custom calls): the analytic row is the MFU.")
  if args.grad_accum_steps > 1:
    print(f"grad_accum_steps={args.grad_accum_steps}: XLA counts the micro-batch loop body "
          "once, and the step runs one extra forward pass (the embedding cache) that the "
          "analytic model FLOPs leave out.")
  if r["op_table"]:
    print(f"where the time went (3 traced steps, {'kernel' if r['platform'] == 'gpu' else 'op'} "
          f"time by kind; trace and HLO in {args.profile}):")
    print(r["op_table"])
  if r["platform"] == "cpu" and not args.peak_tflops:
    print("On CPU MFU is not meaningful (no peak in the table); images/s is.")
  elif r["peak_total"]:
    print(f"peak            {r['peak_tflops']:.0f} TFLOP/s bf16 dense per device "
          f"{'(--peak_tflops)' if args.peak_tflops else '(device table)'}")
  else:
    print("Unknown device kind: pass --peak_tflops for MFU.")


if __name__ == "__main__":
  main()
