"""Loads recipes from configs/ the way ``--config configs/NAME.py:ARG`` does."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(name: str, arg: str | None = None):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def override(config, overrides: dict):
  """Sets dotted keys (``{"optimizer.lr": 0.1}``) on ``config``; returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
