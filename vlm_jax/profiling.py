"""Profiling: jax.profiler traces of chosen train steps, and where a program's time went.

``config.profile_steps`` (default ``()``: off) names the train steps to trace,
as logged (step s is the update that takes ``state.step`` from s - 1 to s):
ints and "start:stop" strings (stop excluded), e.g. ``(5,)``, ``(5, 6)``,
``("10:13",)`` = steps 10, 11 and 12; on the command line
``--config.profile_steps="(5, 6)"``. Each run of consecutive steps from step s
becomes one trace in ``WORKDIR/profile/step_{s}/plugins/profile/<time>/``
(process 0 only), ending when the last traced step's results are ready, so it
holds the device time:

    tensorboard --logdir WORKDIR/profile     # the profile plugin (pip install tensorboard-plugin-profile)
    # or open the *.trace.json.gz there in https://ui.perfetto.dev

``op_time_table(trace_dir, hlo_text)`` sums an XLA:CPU trace's op events by
kind (matmul, attention softmax, GELU, LayerNorm, copies, ...); with the
compiled HLO text (``jax.jit(f).lower(...).compile().as_text()``) each fusion
is classified by the ops inside it. ``by="layer"`` sums the same events by the
model path that emitted them (``img/Transformer/encoderblock_*/MlpBlock_0/...``,
blocks folded together). experiments/cpu_vs_torch.py --profile and
train_throughput.py --profile print both tables.
"""

from __future__ import annotations

import collections
import glob
import os
import re
from typing import Callable, Iterable

import jax


# ------------------------------------------------------------------ profile_steps

def parse_steps(value) -> frozenset[int]:
  """``config.profile_steps`` -> the set of steps to trace; ValueError naming the field."""
  if value is None or value == "" or value == ():
    return frozenset()
  items = value if isinstance(value, (list, tuple)) else (value,)
  steps = set()
  for item in items:
    if isinstance(item, bool):
      item = None  # not a step number
    if isinstance(item, int) and item >= 1:
      steps.add(item)
      continue
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", item) if isinstance(item, str) else None
    if m and 1 <= int(m.group(1)) < int(m.group(2)):
      steps.update(range(int(m.group(1)), int(m.group(2))))
      continue
    if isinstance(item, str) and item.strip().isdigit() and int(item) >= 1:
      steps.add(int(item))
      continue
    raise ValueError(
        f"config.profile_steps={value!r}: {item!r} is neither a step number >= 1 nor a "
        "'start:stop' range with 1 <= start < stop; e.g. (5,), (5, 6) or ('10:13',)")
  return frozenset(steps)


class StepProfiler:
  """Wraps a train step function so that the chosen steps run under ``jax.profiler``.

      prof = StepProfiler(config.get("profile_steps"), workdir, start_step)
      train_step = prof.wrap(train_step)   # call as before
      ...
      prof.close()                         # stops a trace still open (e.g. on an error)

  The n-th call of the wrapped function is step ``start_step + n``.
  """

  def __init__(self, profile_steps, workdir: str, start_step: int = 0):
    self.steps = parse_steps(profile_steps)
    self.dir = os.path.join(workdir, "profile")
    self.step = start_step
    self.active = False
    self.enabled = bool(self.steps) and jax.process_index() == 0

  def wrap(self, fn: Callable) -> Callable:
    if not self.enabled:
      return fn

    def traced_step(*args, **kwargs):
      self.step += 1
      if self.step in self.steps and not self.active:
        jax.profiler.start_trace(os.path.join(self.dir, f"step_{self.step}"))
        self.active = True
      with jax.profiler.StepTraceAnnotation("train", step_num=self.step):
        out = fn(*args, **kwargs)
      if self.active and self.step + 1 not in self.steps:
        jax.block_until_ready(out)
        self.close()
      return out

    return traced_step

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


# ------------------------------------------------------------------ where the time went

_SKIP_EVENTS = ("ThunkExecutor", "end: ", "Threadpool", "SlinkyThreadPool")


def _hlo_index(text: str):
  """Compiled HLO text -> ({computation: [instruction lines]}, {instruction: (line, comp)})."""
  comps, instrs, cur = {}, {}, None
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      cur = comps.setdefault(m.group(1), [])
      continue
    if cur is not None and line.startswith("  "):
      cur.append(line.strip())
      m = re.match(r"(?:ROOT )?%?([\w.\-]+) = ", line.strip())
      if m:
        instrs[m.group(1)] = line.strip()
  return comps, instrs


def _opcodes(comps, line: str, depth: int = 0) -> set[str]:
  ops = set(re.findall(r"= \S+? ([a-z][\w\-]*)\(", line))
  for name in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
    if depth < 4:
      for inner in comps.get(name, ()):
        ops |= _opcodes(comps, inner, depth + 1)
  return ops


_KINDS = (  # first match wins
    ("matmul (dot)", {"dot"}),
    ("convolution", {"convolution"}),
    ("softmax (exp)", {"exponential"}),
    ("GELU (tanh/erf)", {"tanh", "erf"}),
    ("LayerNorm (rsqrt)", {"rsqrt"}),
    ("reductions", {"reduce", "reduce-window"}),
)
_MOVES = {"copy", "transpose", "bitcast", "parameter", "reshape", "broadcast", "slice",
          "concatenate", "dynamic-slice", "dynamic-update-slice", "pad", "constant", "tuple",
          "get-tuple-element", "iota"}


_CUSTOM_CALLS = (  # custom_call_target substrings -> kind (GPU libraries)
    ("fmha", "attention (cuDNN fused)"), ("flash", "attention (cuDNN fused)"),
    ("cublas", "matmul (dot)"), ("gemm", "matmul (dot)"), ("matmul", "matmul (dot)"),
    ("conv", "convolution"),
)


def _custom_call_kind(comps, line: str, depth: int = 0) -> str | None:
  targets = re.findall(r'custom_call_target="([^"]+)"', line)
  for name in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
    if depth < 4:
      targets += [t for inner in comps.get(name, ())
                  for t in re.findall(r'custom_call_target="([^"]+)"', inner)]
  for target in targets:
    low = target.lower()
    for key, kind in _CUSTOM_CALLS:
      if key in low:
        return kind
  return None


def classify(name: str, comps=None, instrs=None) -> str:
  """Kind of one profiled op, from its HLO (if given) or else its name.

  ``name`` is an HLO instruction name (XLA:CPU op events, the ``hlo_op`` of GPU
  kernels) or, without HLO, a kernel name (cuBLAS ``*gemm*``, cuDNN ``*fmha*``).
  """
  line = (instrs or {}).get(name)
  if line is None:
    low = name.lower()
    for kind, keys in (("attention (cuDNN fused)", ("fmha", "flash", "sdpa", "cudnn::fusion")),
                       ("convolution", ("conv", "fprop", "dgrad", "wgrad", "nhwc")),
                       ("matmul (dot)", ("dot", "gemm", "matmul", "ynn", "xnn", "xmma", "cutlass",
                                         "nvjet", "cublas")),
                       ("softmax (exp)", ("exp",)), ("reductions", ("reduce",)),
                       ("copies / transposes", ("copy", "transpose", "memcpy", "memset"))):
      if any(k in low for k in keys):
        return kind
    return "other"
  kind = _custom_call_kind(comps, line)
  if kind:
    return kind
  ops = _opcodes(comps, line)
  for kind, keys in _KINDS:
    if ops & keys:
      return kind
  if ops <= _MOVES:
    return "copies / transposes"
  return "elementwise"


def _stat(event, key: str):
  for name, value in event.stats:
    if name == key:
      return value
  return None


def _gpu_kind(event, comps, instrs, kernels) -> str:
  """Kind of one GPU kernel: XLA's own kernels are named after their HLO fusion
  ('.' and '-' as '_'); library kernels (cuBLAS nvjet / xmma, cuDNN sdpa) by their
  names; else by the launching HLO op (``hlo_op``, which is the whole command
  buffer when XLA replays the step as a CUDA graph)."""
  if event.name in kernels:
    return classify(kernels[event.name], comps, instrs)
  kind = classify(event.name)
  op = _stat(event, "hlo_op")
  if kind == "other" and op and str(op) in instrs:
    return classify(str(op), comps, instrs)
  return kind


# Repeated blocks whose index a per-layer table folds together ("encoderblock_*").
_BLOCK_INDEX = re.compile(
    r"\b(encoderblock|decoderblock|encoder_layer|layers?|blocks?|resblocks)_\d+\b")


def _layer(name: str, instrs, kind: str) -> str:
  """The model path of one profiled op: the ``op_name`` of its HLO instruction
  without the ``jit(...)/`` prefix, block indices folded; its kind where the HLO
  has no name for it."""
  m = re.search(r'op_name="([^"]+)"', (instrs or {}).get(name, ""))
  if not m:
    return f"({kind})"
  path = re.sub(r"^(?:[\w]+\([^)]*\)/)+", "", m.group(1))
  return _BLOCK_INDEX.sub(r"\1_*", path)


def op_time_table(trace_dir: str, hlo_text: str | None = None,
                  by: str = "kind") -> list[tuple[str, float, int]]:
  """(kind, seconds, count) rows, largest first, from the newest trace under ``trace_dir``.

  XLA:CPU: the op events of the XLA threads (executor and thread-pool bookkeeping
  left out). GPU: the kernels on the device's streams, each classified by the HLO
  op that launched it (the ``hlo_op`` stat), so cuBLAS / cuDNN custom calls and
  fusions are told apart; the seconds are kernel time, not wall time.
  ``by="layer"`` groups by the model path that emitted each op instead (the HLO's
  ``op_name``, with repeated blocks such as ``encoderblock_3`` folded into
  ``encoderblock_*``); it needs ``hlo_text``. Seconds are summed per op: where
  XLA:CPU runs independent ops at once (e.g. two attention projections), each
  counts its whole duration.
  """
  if by not in ("kind", "layer"):
    raise ValueError(f"op_time_table: by must be 'kind' or 'layer', got {by!r}")
  if by == "layer" and not hlo_text:
    raise ValueError("op_time_table(by='layer') needs the compiled HLO text")
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb trace under {trace_dir}")
  data = ProfileData.from_file(max(files, key=os.path.getmtime))
  comps, instrs = _hlo_index(hlo_text) if hlo_text else ({}, {})
  kernels = {re.sub(r"[.\-]", "_", name): name for name in instrs}
  total, count = collections.Counter(), collections.Counter()
  for plane in data.planes:
    gpu = plane.name.startswith("/device:GPU")
    if not plane.name.startswith("/host:CPU") and not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      if gpu:
        if not line.name.startswith("Stream"):
          continue  # "XLA Ops" / "XLA Modules" lines summarise the same kernels
      elif line.name == "python" or "XLA" not in line.name and not plane.name.startswith("/device"):
        continue
      for ev in line.events:
        if ev.name.startswith(_SKIP_EVENTS):
          continue
        kind = _gpu_kind(ev, comps, instrs, kernels) if gpu else classify(ev.name, comps, instrs)
        if by == "layer":
          op = kernels.get(ev.name) or (str(_stat(ev, "hlo_op") or "") if gpu else ev.name)
          kind = _layer(op, instrs, kind)
        total[kind] += ev.duration_ns / 1e9
        count[kind] += 1
  return [(k, s, count[k]) for k, s in total.most_common()]


def format_op_table(rows: Iterable[tuple[str, float, int]], limit: int | None = None,
                    head: str = "kind") -> str:
  """The rows of ``op_time_table`` as text; ``limit`` keeps the largest, and a last
  row sums the rest."""
  rows = list(rows)
  whole = sum(s for _, s, _ in rows) or 1.0
  if limit is not None and len(rows) > limit:
    rest = rows[limit:]
    rows = rows[:limit] + [(f"({len(rest)} more)", sum(s for _, s, _ in rest),
                            sum(n for _, _, n in rest))]
  width = max([22] + [len(k) + 2 for k, _, _ in rows])
  out = [f"  {head:<{width}}{'share':>7}{'seconds':>10}{'ops':>6}"]
  out += [f"  {k:<{width}}{s / whole:>7.1%}{s:>10.3f}{n:>6}" for k, s, n in rows]
  return "\n".join(out)
