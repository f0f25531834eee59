r"""Training curves as PNG files, from a run's metrics.jsonl.

    python -m vlm_jax.plot runs/shapes                      # -> runs/shapes/plots/*.png
    python -m vlm_jax.plot runs/a runs/b --out /tmp/cmp     # two runs, overlaid
    python -m vlm_jax.plot runs/shapes --keys train/loss,val/top1

A metric's family is its name up to the first "/" ("train/loss" -> "train").
By default each family present gets one PNG, ``FAMILY.png``, with one panel per
metric ("train.png": loss and learning rate first, then the other training
metrics; "zeroshot.png", "retrieval.png", "val.png", "linear_probe.png", ...).
``--keys`` draws just those metrics, one panel each, into ``curves.png``. With
several run directories, each panel has one line per run, labelled by its
directory. Values that are not single numbers (lists) are skipped.

Needs matplotlib (``pip install -e ".[plot]"``); draws off-screen, no display needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Sequence

# Panels of "train.png" that come first, in this order; the rest follow by name.
_TRAIN_FIRST = ("train/loss", "train/lr")


def read_metrics(workdir: str) -> dict[str, tuple[list[int], list[float]]]:
  """Reads ``workdir/metrics.jsonl`` into {metric name: (steps, values)}.

  Keeps numeric values of size 1 (lists such as a confusion matrix are skipped);
  rows without "step" and unreadable lines (a killed run's torn last line) are skipped.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no metrics.jsonl in {workdir}")
  series: dict[str, tuple[list[int], list[float]]] = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if not isinstance(row, dict) or "step" not in row:
        continue
      for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
          continue
        steps, values = series.setdefault(key, ([], []))
        steps.append(int(row["step"]))
        values.append(float(value))
  return series


def family(key: str) -> str:
  """"retrieval/i2t_r1" -> "retrieval"; a name without "/" -> "other"."""
  return key.split("/", 1)[0] if "/" in key else "other"


def default_figures(keys: Sequence[str]) -> dict[str, list[str]]:
  """{PNG name (without .png): metric names, in panel order}: one figure per family."""
  figures: dict[str, list[str]] = {}
  for key in sorted(keys, key=_natural):  # "i2t_r5" before "i2t_r10"
    figures.setdefault(family(key), []).append(key)
  if "train" in figures:
    first = [k for k in _TRAIN_FIRST if k in figures["train"]]
    figures["train"] = first + [k for k in figures["train"] if k not in first]
  return figures


def _natural(key: str) -> list:
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _figure(n_panels: int):
  # A Figure outside pyplot: no display, no global backend switch in a notebook.
  try:
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError('python -m vlm_jax.plot needs matplotlib: pip install -e ".[plot]" '
                      "(or pip install matplotlib)") from e
  cols = min(n_panels, 3)
  rows = math.ceil(n_panels / cols)
  fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[n_panels:]:
    ax.set_visible(False)
  for ax in axes:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
  return fig, axes


def draw(runs: dict[str, dict], keys: Sequence[str], path: str) -> None:
  """Draws one panel per metric of ``keys``, one line per run, into the PNG ``path``.

  ``runs``: {label: ``read_metrics`` output}. A run without a metric has no line in
  its panel.
  """
  fig, axes = _figure(len(keys))
  for ax, key in zip(axes, keys):
    for label, series in runs.items():
      if key in series:
        steps, values = series[key]
        ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(runs) > 1:
      ax.legend(fontsize="small")
  fig.savefig(path, dpi=100)


def plot(workdirs: Sequence[str], out_dir: str | None = None,
         keys: Sequence[str] | None = None) -> list[str]:
  """Writes the PNGs for ``workdirs`` (one run, or several overlaid); returns their paths.

  Args:
    workdirs: run directories, each with a metrics.jsonl.
    out_dir: where the PNGs go (default: ``workdirs[0]/plots``).
    keys: metric names for one ``curves.png`` (None: one PNG per family).
  Raises:
    FileNotFoundError: a directory without metrics.jsonl.
    ValueError: a key of ``keys`` in no run's metrics, or no metric at all.
  """
  labels = [os.path.basename(os.path.abspath(w)) for w in workdirs]
  if len(set(labels)) < len(labels):  # e.g. a/run and b/run
    labels = [os.path.normpath(w) for w in workdirs]
  runs = {}
  for i, (label, workdir) in enumerate(zip(labels, workdirs)):
    runs[label if label not in runs else f"{label} #{i + 1}"] = read_metrics(workdir)
  present = sorted({k for series in runs.values() for k in series})
  if keys:
    missing = [k for k in keys if k not in present]
    if missing:
      raise ValueError(f"--keys {missing} not in the metrics of {list(workdirs)}; "
                       f"they have {present}")
    figures = {"curves": list(keys)}
  else:
    if not present:
      raise ValueError(f"no numeric metric in {list(workdirs)}'s metrics.jsonl")
    figures = default_figures(present)
  out_dir = out_dir or os.path.join(workdirs[0], "plots")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, figure_keys in figures.items():
    path = os.path.join(out_dir, f"{name}.png")
    draw(runs, figure_keys, path)
    paths.append(path)
  return paths


def main(argv: Sequence[str] | None = None) -> list[str]:
  parser = argparse.ArgumentParser(
      prog="python -m vlm_jax.plot", description="PNG training curves from metrics.jsonl.")
  parser.add_argument("workdirs", nargs="+", metavar="DIR",
                      help="run directories (several: their curves overlaid)")
  parser.add_argument("--out", default=None, metavar="OUT_DIR",
                      help="output directory (default: DIR/plots, the first DIR)")
  parser.add_argument("--keys", default=None,
                      help="comma-separated metric names for one curves.png, "
                      "e.g. train/loss,val/top1 (default: one PNG per metric family)")
  args = parser.parse_args(argv)
  keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
  try:
    paths = plot(args.workdirs, args.out, keys)
  except (FileNotFoundError, ValueError, ImportError) as e:
    parser.exit(1, f"error: {e}\n")
  for path in paths:
    print(path)
  return paths


if __name__ == "__main__":
  main()
