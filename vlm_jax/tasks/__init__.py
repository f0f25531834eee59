"""Training objectives: one module per task, one loop (``vlm_jax.train``) for all.

    task = vlm_jax.tasks.get(config)       # by config.task: "contrastive" | "classification"
                                           # | "captioning"

A task module owns its batch format, loss, metrics, evaluators and data:

    NAME                      the config.task value
    EVALUATORS                the config.evals sections this task can run
    prepare_config(config)    checks / fills fields derived from the data (in place),
                              e.g. classification's model.num_classes
    train_dataset(config, *, process_index, process_count)
                              a grain IterDataset; ``iter()`` gives an iterator of local
                              numpy batches with get_state() / set_state()
    batch_shardings(config, mesh)
                              the NamedShardings of a global batch (same tree)
    make_grad_fn(config, model, mesh, param_shardings=None)
                              -> grad_fn(params, model_state, batch, rng)
                                 -> (loss, grads, model_state, metrics {"train/...": scalar})
                              pure; ``model_state`` holds non-parameter collections
                              (BatchNorm's batch_stats), {} when there are none
    build_evaluators(config, model, *, mesh=None, workdir=None)
                              -> evaluators.Evaluators (``run(variables, step=None)``)

Shared helpers (micro-batching, train-mode apply) live in ``tasks.common``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = ("contrastive", "classification", "captioning")


def get(config_or_name) -> ModuleType:
  """The task module for ``config.task`` (default "contrastive") or a task name."""
  name = config_or_name
  if not isinstance(name, str):
    name = config_or_name.get("task", "contrastive") or "contrastive"
  if name not in TASKS:
    raise ValueError(f"config.task={name!r} is not one of {TASKS}")
  return importlib.import_module(f"{__name__}.{name}")
