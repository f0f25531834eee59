"""vlm_jax: vision encoders of vision-language models in JAX/Flax.

Subpackages: ``models`` (ViT, NaViT, CNNs, text, two-tower, classifier), ``losses``,
``data``, ``parallel``, ``checkpoint``, ``evaluators``, ``interop``, ``inference``,
``tasks``, ``finetune``; programs ``train``, ``evaluate``, ``predict``, ``search``,
``plot``; ``explain`` (heatmaps).

``import vlm_jax`` is cheap: each of these is imported on first use, so
``vlm_jax.checkpoint.load(...)`` works right after ``import vlm_jax``.
"""

import importlib

__version__ = "0.1.0"

# Submodules reachable as attributes of the package, imported lazily (PEP 562).
_SUBMODULES = frozenset({
    "checkpoint", "config_util", "data", "evaluate", "evaluators", "explain", "finetune",
    "inference", "interop", "logs", "losses", "models", "numeric", "optim", "parallel",
    "plot", "predict", "search", "tasks", "train",
})


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | _SUBMODULES)
