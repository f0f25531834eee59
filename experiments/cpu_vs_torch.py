r"""SigLIP on CPU: vlm_jax against the PyTorch references, side by side in one run.

    python experiments/cpu_vs_torch.py                                   # B/16, 224 px, batch 8, 2 threads
    python experiments/cpu_vs_torch.py --variant S/16 --image_size 64 --steps 1   # quick smoke
    python experiments/cpu_vs_torch.py --profile /tmp/prof               # + jax traces and op tables
    python experiments/cpu_vs_torch.py --attention flax                  # our attention before issue 12
    python experiments/cpu_vs_torch.py --no_tune_cpu                     # without vlm_jax.cpu_runtime.tune()

One set of random SigLIP weights (transformers' ``SiglipModel`` with its own
init, written with save_pretrained and read with ``vlm_jax.interop.hf.load``;
the same tensors renamed into open_clip's ViT-B-16-SigLIP layout) runs in:

(a) inference: the image embedding, ``SiglipModel.get_image_features`` (torch,
    ``inference_mode``) against our jitted ``encode_image``;
(b) training: one step of forward + backward + AdamW (global-norm clipping,
    decoupled weight decay on kernels and the token table) of the whole
    two-tower model with the sigmoid loss: open_clip's CustomTextCLIP
    (timm ViT + open_clip text tower) with open_clip's ``SigLipLoss`` and
    ``torch.optim.AdamW`` against ``vlm_jax.train.make_train_step`` with the
    configs/siglip_b16.py optimizer;
(c) the ceiling: a 2048^3 float32 matmul in jax and in torch.

Parity comes first: the image embeddings against transformers, and the train
step's loss and gradient norm (before clipping) against open_clip on the same
batch. open_clip builds this model with exact GELU; its GELUs are switched to
the tanh form SigLIP (and transformers, and we) use, so all three compute the
same function.

torch runs in processes of its own (spawned; each times its own calls), so
that it keeps its own allocator: by default one process with glibc's defaults,
as open_clip and transformers users run it, and one with the malloc settings
vlm_jax applies to itself (``cpu_runtime.keep_freed_memory``), the stronger
baseline (``--torch_malloc``). This process applies ``cpu_runtime.tune()`` as
``python -m vlm_jax.train`` does on a CPU host (``--no_tune_cpu``: not).

Then every measure runs once per round, interleaved (jax and torch inference,
jax and torch train step, the matmuls), for ``--steps`` rounds after one
untimed warm-up each; the table gives the median over rounds. A shared or busy
machine moves all numbers, so read the ratios, which are taken within one run.

``--threads N`` (default 2) pins the process to N cores (sched_setaffinity, if
the machine has more; XLA sizes its thread pool from this mask) and calls
``torch.set_num_threads(N)``.

FLOP/s: model FLOPs counted analytically (matmuls: 2 per parameter per token
forward, 6 for forward + backward; attention scores and mixing:
4 x depth x width x seq^2 per example forward, 12 x in training); XLA's
``cost_analysis`` of our compiled programs is printed beside it. "share of jax
mm" = achieved model FLOP/s / jax's 2048^3 matmul FLOP/s in the same run (and
for torch, against torch's own matmul rate as well).
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pin_threads(n: int) -> list[int]:
  """Restrict this process to ``n`` of its allowed cores; returns the cores used."""
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) > n:
    cores = cores[:n]
    os.sched_setaffinity(0, cores)
  return cores


# ------------------------------------------------------------------ models

def hf_config(variant: str, image_size: int):
  """transformers SiglipConfig of our ``variant`` ("B/16", "S/16", ...) and its text tower."""
  import transformers  # pylint: disable=import-outside-toplevel
  from vlm_jax import models  # pylint: disable=import-outside-toplevel
  v = models.decode_variant(variant)
  t = models.decode_text_variant(variant.split("/")[0])
  if v["width"] != t["width"]:
    raise SystemExit(f"--variant {variant}: SigLIP has no image projection, so the image and "
                     f"text widths must match ({v['width']} vs {t['width']})")
  return transformers.SiglipConfig(
      vision_config=dict(hidden_size=v["width"], intermediate_size=v["mlp_dim"],
                         num_hidden_layers=v["depth"], num_attention_heads=v["num_heads"],
                         patch_size=v["patch_size"], image_size=image_size),
      text_config=dict(hidden_size=t["width"], intermediate_size=t["mlp_dim"],
                       num_hidden_layers=t["depth"], num_attention_heads=t["num_heads"],
                       vocab_size=32000, max_position_embeddings=64, bos_token_id=None,
                       eos_token_id=None, pad_token_id=None))


def open_clip_model(hf_model, variant: str, image_size: int):
  """open_clip's ViT-B-16-SigLIP (resized to ``variant``) holding ``hf_model``'s weights."""
  import open_clip  # pylint: disable=import-outside-toplevel
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  hc = hf_model.config
  v, t = hc.vision_config, hc.text_config
  cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-16-SigLIP"))
  cfg.pop("custom_text", None)
  cfg["embed_dim"] = t.hidden_size
  cfg["vision_cfg"]["image_size"] = image_size
  cfg["text_cfg"].update(width=t.hidden_size, heads=t.num_attention_heads,
                         layers=t.num_hidden_layers, mlp_ratio=t.intermediate_size / t.hidden_size)
  model = open_clip.model.CustomTextCLIP(**cfg, output_dict=True)
  if (variant, image_size) != ("B/16", 224):  # same timm class, other sizes
    model.visual.trunk = timm.create_model(
        cfg["vision_cfg"]["timm_model_name"], pretrained=False, num_classes=0, global_pool="map",
        img_size=image_size, patch_size=v.patch_size, embed_dim=v.hidden_size,
        depth=v.num_hidden_layers, num_heads=v.num_attention_heads,
        mlp_ratio=v.intermediate_size / v.hidden_size)
  for module in list(model.modules()):  # SigLIP's tanh GELU (open_clip builds exact GELU)
    for name, child in module.named_children():
      if isinstance(child, torch.nn.GELU):
        setattr(module, name, torch.nn.GELU(approximate="tanh"))
  model.load_state_dict(open_clip_state_dict(hf_model.state_dict(), v.num_hidden_layers,
                                             t.num_hidden_layers), strict=True)
  return model


def open_clip_state_dict(hf: dict, img_depth: int, txt_depth: int) -> dict:
  """transformers SiglipModel tensors renamed (and q/k/v concatenated) into open_clip's layout."""
  import torch  # pylint: disable=import-outside-toplevel
  out = {"logit_scale": hf["logit_scale"].reshape(()), "logit_bias": hf["logit_bias"].reshape(())}
  vm, tm = "vision_model.", "text_model."

  def lin(dst, src):
    out[dst + ".weight"], out[dst + ".bias"] = hf[src + ".weight"], hf[src + ".bias"]

  def qkv(src):
    names = [f"{src}.{p}_proj" for p in "qkv"]
    return (torch.cat([hf[n + ".weight"] for n in names]),
            torch.cat([hf[n + ".bias"] for n in names]))

  vt = "visual.trunk."
  lin(vt + "patch_embed.proj", vm + "embeddings.patch_embedding")
  out[vt + "pos_embed"] = hf[vm + "embeddings.position_embedding.weight"][None]
  for i in range(img_depth):
    s, d = f"{vm}encoder.layers.{i}.", f"{vt}blocks.{i}."
    lin(d + "norm1", s + "layer_norm1")
    out[d + "attn.qkv.weight"], out[d + "attn.qkv.bias"] = qkv(s + "self_attn")
    lin(d + "attn.proj", s + "self_attn.out_proj")
    lin(d + "norm2", s + "layer_norm2")
    lin(d + "mlp.fc1", s + "mlp.fc1")
    lin(d + "mlp.fc2", s + "mlp.fc2")
  lin(vt + "norm", vm + "post_layernorm")
  h, width = vm + "head.", hf[vm + "post_layernorm.weight"].shape[0]
  out[vt + "attn_pool.latent"] = hf[h + "probe"]
  w, b = hf[h + "attention.in_proj_weight"], hf[h + "attention.in_proj_bias"]
  out[vt + "attn_pool.q.weight"], out[vt + "attn_pool.q.bias"] = w[:width], b[:width]
  out[vt + "attn_pool.kv.weight"], out[vt + "attn_pool.kv.bias"] = w[width:], b[width:]
  lin(vt + "attn_pool.proj", h + "attention.out_proj")
  lin(vt + "attn_pool.norm", h + "layernorm")
  lin(vt + "attn_pool.mlp.fc1", h + "mlp.fc1")
  lin(vt + "attn_pool.mlp.fc2", h + "mlp.fc2")

  out["text.token_embedding.weight"] = hf[tm + "embeddings.token_embedding.weight"]
  out["text.positional_embedding"] = hf[tm + "embeddings.position_embedding.weight"]
  for i in range(txt_depth):
    s, d = f"{tm}encoder.layers.{i}.", f"text.transformer.resblocks.{i}."
    lin(d + "ln_1", s + "layer_norm1")
    out[d + "attn.in_proj_weight"], out[d + "attn.in_proj_bias"] = qkv(s + "self_attn")
    lin(d + "attn.out_proj", s + "self_attn.out_proj")
    lin(d + "ln_2", s + "layer_norm2")
    lin(d + "mlp.c_fc", s + "mlp.fc1")
    lin(d + "mlp.c_proj", s + "mlp.fc2")
  lin("text.ln_final", tm + "final_layer_norm")
  lin("text.text_projection", tm + "head")
  return {k: v.detach().clone().contiguous() for k, v in out.items()}


# ------------------------------------------------------------------ FLOPs

def model_flops(params, config, batch: int) -> tuple[float, float]:
  """Analytic (inference image-embedding FLOPs, train-step FLOPs) for ``batch`` examples."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import flax  # pylint: disable=import-outside-toplevel
  import train_throughput  # pylint: disable=import-outside-toplevel
  from vlm_jax import models  # pylint: disable=import-outside-toplevel
  train = train_throughput.analytic_flops(params, config, batch)
  img = models.resolve_config(config.model)["image"]
  n = (img["image_size"] // img["patch_size"]) ** 2
  per_token = per_example = 0
  for path, x in flax.traverse_util.flatten_dict(params["img"], sep="/").items():
    if path.endswith("kernel"):
      pooled = "MAPHead" in path and not any(k in path for k in ("/key/", "/value/"))
      if pooled:
        per_example += x.size
      else:
        per_token += x.size
  infer = 2 * (per_token * n + per_example) + 4 * img["depth"] * img["width"] * n * n
  infer += 4 * img["width"] * n  # the MAP probe attends over the tokens
  return float(infer) * batch, train


# ------------------------------------------------------------------ torch side

def torch_worker(conn, hf_dir: str, variant: str, image_size: int, threads: int, opt: dict,
                 malloc: str, pixels, tokens) -> None:
  """One torch process: transformers inference and open_clip training on ``hf_dir``'s weights.

  Answers ``conn`` commands ("infer", "train", "mm", "embeddings", "stop") with
  (seconds, result); times are taken here, around the call alone.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  import open_clip  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, ROOT)
  from vlm_jax import cpu_runtime  # pylint: disable=import-outside-toplevel
  if malloc == "tuned":
    cpu_runtime.keep_freed_memory()
  torch.set_num_threads(threads)
  hf_model = transformers.SiglipModel.from_pretrained(hf_dir).eval()
  oc_model = open_clip_model(hf_model, variant, image_size)
  px_t, tok_t = torch.from_numpy(pixels), torch.from_numpy(tokens)
  decay = [p for n, p in oc_model.named_parameters() if n.endswith(".weight") and p.ndim >= 2]
  rest = [p for n, p in oc_model.named_parameters() if not (n.endswith(".weight") and p.ndim >= 2)]
  optim = torch.optim.AdamW([{"params": decay, "weight_decay": opt["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=opt["lr"], betas=(opt["b1"], opt["b2"]), eps=opt["eps"])
  siglip_loss = open_clip.loss.SigLipLoss()
  oc_model.train()
  a = torch.from_numpy(np.random.RandomState(1).randn(2048, 2048).astype(np.float32))

  def infer():
    with torch.inference_mode():
      out = hf_model.get_image_features(pixel_values=px_t)
    return getattr(out, "pooler_output", out)

  def train():
    out = oc_model(px_t, tok_t)
    loss = siglip_loss(out["image_features"], out["text_features"], out["logit_scale"],
                       out["logit_bias"])
    optim.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(oc_model.parameters(), opt["grad_clip_norm"])
    optim.step()
    return loss.item(), norm.item()

  def mm():
    return min(timed(lambda: torch.mm(a, a)) for _ in range(3)), None

  conn.send(("ready", torch.__version__, transformers.__version__, open_clip.__version__,
             hf_model.config._attn_implementation))  # pylint: disable=protected-access
  while True:
    cmd = conn.recv()
    if cmd == "stop":
      return
    if cmd == "embeddings":
      conn.send((0.0, infer().numpy()))
    elif cmd == "mm":
      conn.send(mm())
    else:
      fn = infer if cmd == "infer" else train
      t0 = time.perf_counter()
      out = fn()
      conn.send((time.perf_counter() - t0, None if cmd == "infer" else out))


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


class TorchSide:
  """A ``torch_worker`` child process (spawned, so no jax state or thread pool is shared)."""

  def __init__(self, malloc: str, hf_dir: str, variant: str, image_size: int, threads: int,
               opt: dict, pixels, tokens):
    import multiprocessing  # pylint: disable=import-outside-toplevel
    ctx = multiprocessing.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=torch_worker, daemon=True, args=(
        child, hf_dir, variant, image_size, threads, opt, malloc, pixels, tokens))
    self.proc.start()
    self.malloc = malloc
    self.info = self.conn.recv()[1:]

  def __call__(self, cmd: str):
    self.conn.send(cmd)
    return self.conn.recv()

  def close(self):
    self.conn.send("stop")
    self.proc.join(60)


# ------------------------------------------------------------------ run

def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="B/16", help="ViT variant with a same-width text "
                      "tower: S/16, B/16, L/16 ...")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3, help="timed rounds (each: one inference "
                      "batch and one train step per framework, and the matmuls)")
  parser.add_argument("--skip_train", action="store_true", help="inference and matmul only")
  parser.add_argument("--attention", default="default", choices=["default", "flax"],
                      help="flax: our attention as before issue 12 (flax's nn.dot_product_attention, "
                      "heads after the sequence), to measure the change")
  parser.add_argument("--torch_malloc", default="both", choices=["both", "default", "tuned"],
                      help="the torch processes' allocator: glibc's defaults (as open_clip and "
                      "transformers run), vlm_jax's settings (cpu_runtime.keep_freed_memory), "
                      "or one process of each (default)")
  parser.add_argument("--no_tune_cpu", action="store_true", help="leave out vlm_jax.cpu_runtime."
                      "tune() (synchronous dispatch and glibc's heap kept, which the train "
                      "program applies on CPU hosts), to measure it")
  parser.add_argument("--profile", default="", help="directory: write jax.profiler traces of "
                      "one inference batch and one train step, the compiled HLO, and print "
                      "where the time went (vlm_jax.profiling.op_time_table)")
  args = parser.parse_args()
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  cores = pin_threads(args.threads)

  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, ROOT)
  from vlm_jax import cpu_runtime  # pylint: disable=import-outside-toplevel
  tuned = [] if args.no_tune_cpu else cpu_runtime.tune()  # as `python -m vlm_jax.train` does
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from vlm_jax import config_util, optim, parallel, profiling, tasks  # pylint: disable=import-outside-toplevel
  from vlm_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  from vlm_jax.interop import hf  # pylint: disable=import-outside-toplevel

  if args.attention == "flax":
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    from vlm_jax.models import layers  # pylint: disable=import-outside-toplevel
    layers.dot_product_attention_f32 = functools.partial(nn.dot_product_attention,
                                                         force_fp32_for_softmax=True)
  torch.manual_seed(0)
  b, size = args.batch, args.image_size
  rs = np.random.RandomState(0)
  pixels = rs.uniform(-1, 1, (b, 3, size, size)).astype(np.float32)
  tokens = rs.randint(1, 32000, (b, 64)).astype(np.int64)   # no padding: every tower sees all
  config = config_util.recipe(os.path.join(ROOT, "configs", "siglip_b16.py"))
  config.unlock()
  oc = config.optimizer
  opt = {k: float(oc[k]) for k in ("weight_decay", "lr", "b1", "b2", "eps", "grad_clip_norm")}

  # --- one set of weights: transformers' own init, read by vlm_jax and by the torch processes
  mallocs = ["default", "tuned"] if args.torch_malloc == "both" else [args.torch_malloc]
  with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
    hf_model = transformers.SiglipModel(hf_config(args.variant, size))
    hf_model.save_pretrained(d)
    hf_cfg = hf_model.config.to_dict()
    del hf_model
    model, variables = hf.load(d)
    sides = [TorchSide(m, d, args.variant, size, args.threads, opt, pixels, tokens)
             for m in mallocs]
  torch_v, tf_v, oc_v, attn = sides[0].info
  print(f"SigLIP {args.variant} (text tower of the same width), {size} px, batch {b}, float32, "
        f"{args.threads} threads (cores {cores} of {os.cpu_count()})")
  print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch_v}, "
        f"transformers {tf_v}, open_clip {oc_v}")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"vlm_jax attention: {args.attention}; transformers attention: {attn}")
  print(f"vlm_jax process: {', '.join(tuned) or 'no CPU host settings'} "
        "(vlm_jax.cpu_runtime.tune, as the train program applies them)")
  print("torch processes (one each, its own allocator): " + ", ".join(
      {"default": "glibc defaults", "tuned": "vlm_jax's malloc settings"}[m] for m in mallocs))

  px_j = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  batch_j = {"image": px_j, "tokens": jnp.asarray(tokens, jnp.int32)}

  # --- (a) inference
  infer = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
  infer_c = infer.lower(variables["params"], px_j).compile()

  def jax_infer():
    return jax.block_until_ready(infer_c(variables["params"], px_j))

  ref, ours = sides[0]("embeddings")[1], np.asarray(jax_infer())
  rel = float(np.max(np.linalg.norm(ours - ref, axis=-1) / np.linalg.norm(ref, axis=-1)))
  print(f"\nparity  image embeddings vs transformers get_image_features: max |diff| "
        f"{np.max(np.abs(ours - ref)):.2e}, max row-relative {rel:.2e}  "
        f"{'OK' if rel < 1e-4 else 'MISMATCH'}")

  # --- (b) train steps
  config.model = hf.model_config(hf_cfg)
  config.batch_size, config.mesh = b, (("data", -1), ("fsdp", 1), ("tensor", 1))
  config.optimizer.warmup_steps = 0
  mesh = parallel.make_mesh(config.mesh)
  tx, lr_fn = optim.build(oc, config.total_steps)
  shardings = train_lib.train_state_shardings(config, model, tx, mesh)
  params = variables["params"]
  make_state = jax.jit(lambda p: train_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=jax.random.PRNGKey(0),
      model_state={}), out_shardings=shardings)
  step = train_lib.make_train_step(config, model, tx, lr_fn, mesh, shardings)
  batch_j = jax.device_put(batch_j, tasks.get(config).batch_shardings(config, mesh))
  train_c = step.lower(make_state(params), batch_j).compile()
  infer_flops, train_flops = model_flops(jax.device_get(params), config, b)
  xla = {k: float((c.cost_analysis() or {}).get("flops", float("nan")))
         for k, c in (("infer", infer_c), ("train", train_c))}
  state = make_state(params)

  def jax_train():
    nonlocal state
    state, metrics = train_c(state, batch_j)
    jax.block_until_ready(metrics)
    return float(metrics["train/loss"]), float(metrics["train/grad_norm"])

  if not args.skip_train:
    lj, gj = jax_train()  # also the warm-up
    for side in sides:
      _, (lt, gt) = side("train")
      ok = abs(lj - lt) <= 1e-4 * abs(lt) + 1e-5 and abs(gj - gt) <= 1e-3 * abs(gt)
      print(f"parity  train step 0 vs open_clip (SigLipLoss), torch malloc {side.malloc}: loss "
            f"{lj:.6f} vs {lt:.6f}, grad norm {gj:.6f} vs {gt:.6f}  {'OK' if ok else 'MISMATCH'}")

  # --- (c) matmul ceiling
  n = 2048
  a_j = jnp.asarray(np.random.RandomState(1).randn(n, n).astype(np.float32))
  mm = jax.jit(lambda x: x @ x).lower(a_j).compile()

  def jax_mm():
    return min(timed(lambda: jax.block_until_ready(mm(a_j))) for _ in range(3))

  jax_infer(), jax_mm()  # warm-up
  for side in sides:
    side("infer"), side("mm")
  times = collections.defaultdict(list)
  for _ in range(args.steps):
    times["ji"].append(timed(jax_infer))
    for side in sides:
      times["ti", side.malloc].append(side("infer")[0])
    if not args.skip_train:
      times["jt"].append(timed(jax_train))
      for side in sides:
        times["tt", side.malloc].append(side("train")[0])
    times["jm"].append(jax_mm())
    for side in sides:
      times["tm", side.malloc].append(side("mm")[0])
  for side in sides:
    side.close()
  med = {k: statistics.median(v) for k, v in times.items()}
  mm_flops = 2.0 * n ** 3
  rate_jm = mm_flops / med["jm"]

  print(f"\nmedian of {args.steps} interleaved rounds; model FLOPs analytic "
        f"(inference {infer_flops / 1e9:,.1f} GFLOP, train step {train_flops / 1e9:,.1f} GFLOP; "
        f"XLA cost_analysis: {xla['infer'] / 1e9:,.1f} and {xla['train'] / 1e9:,.1f})")
  head = (f"{'measure':<34}{'torch malloc':>13}{'torch':>12}{'vlm_jax':>12}{'ratio':>8}"
          f"{'torch GF/s':>12}{'jax GF/s':>10}{'share of jax mm':>18}{'torch/own mm':>14}")
  print(head)
  print("-" * len(head))
  rows = [("image embedding vs transformers", "ti", "ji", infer_flops)]
  if not args.skip_train:
    rows.append(("train step vs open_clip", "tt", "jt", train_flops))
  for name, kt, kj, flops in rows:
    for m in mallocs:
      ips_t, ips_j = b / med[kt, m], b / med[kj]
      gt, gj = flops / med[kt, m], flops / med[kj]
      print(f"{name:<34}{m:>13}{ips_t:>8.2f} i/s{ips_j:>8.2f} i/s{ips_j / ips_t:>7.2f}x"
            f"{gt / 1e9:>12.1f}{gj / 1e9:>10.1f}{gj / rate_jm:>17.0%} "
            f"{gt / (mm_flops / med['tm', m]):>13.0%}")
  for m in mallocs:
    rate_tm = mm_flops / med["tm", m]
    print(f"{'2048^3 float32 matmul':<34}{m:>13}{rate_tm / 1e9:>8.1f} GF/s{rate_jm / 1e9:>7.1f} GF/s"
          f"{rate_jm / rate_tm:>7.2f}x")
  print("(ratio = vlm_jax / torch; i/s = images per second; share of jax mm = the model's "
        "achieved FLOP/s over jax's matmul FLOP/s; torch/own mm = torch's over torch's;\n"
        " torch malloc: default = glibc as open_clip/transformers users run it, tuned = with "
        "vlm_jax.cpu_runtime.keep_freed_memory())")
  print("per-round seconds (min..max): " + ", ".join(
      f"{k if isinstance(k, str) else '/'.join(k)} {min(v):.3f}..{max(v):.3f}"
      for k, v in times.items()))

  if args.profile:
    os.makedirs(args.profile, exist_ok=True)
    progs = [("infer", infer_c, jax_infer)]
    if not args.skip_train:
      progs.append(("train", train_c, jax_train))
    for name, compiled, fn in progs:
      trace_dir = os.path.join(args.profile, name)
      hlo = compiled.as_text()
      with open(os.path.join(args.profile, f"{name}.hlo.txt"), "w") as f:
        f.write(hlo)
      with jax.profiler.trace(trace_dir):
        fn()
      print(f"\nwhere the time went: {name} (trace in {trace_dir})")
      print(profiling.format_op_table(profiling.op_time_table(trace_dir, hlo)))
      print("\n" + profiling.format_op_table(profiling.op_time_table(trace_dir, hlo, by="layer"),
                                             limit=20, head="model path (blocks folded)"))


if __name__ == "__main__":
  main()
