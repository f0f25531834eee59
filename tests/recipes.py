"""Loads recipes from configs/ the way ``--config configs/NAME.py:ARG`` does; the
environment for programs that tests start as a user would (``subprocess_env``); one
small trained run shared by the modules that only need a checkpoint (``shared_run``)."""
import atexit
import importlib.util
import os
import shutil
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's CPU backend optimisations off: compiling, not running, is what tests wait for.
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# Programs started by tests (training runs, the notebook, README snippets) share a
# persistent compilation cache, one per test process: a killed run and its resume
# compile the same step once. Entries are keyed by the program and the XLA flags.
_XLA_CACHE = None


def _xla_cache() -> str:
  global _XLA_CACHE
  if _XLA_CACHE is None:
    _XLA_CACHE = tempfile.mkdtemp(prefix="vlm_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  return _XLA_CACHE


def subprocess_env(devices: int = 1, **extra) -> dict:
  """os.environ for a child process: ``devices`` CPU devices (1: like a laptop), the
  repository on PYTHONPATH, fast compiles and the shared compilation cache."""
  env = dict(os.environ)
  flags = FAST_XLA_FLAGS
  if devices > 1:
    flags += f" --xla_force_host_platform_device_count={devices}"
  env.update({
      "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
      "JAX_COMPILATION_CACHE_DIR": _xla_cache(),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  })
  env.update(extra)
  return env


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


def spy_safetensors_reads(monkeypatch) -> list[str]:
  """Records every tensor key read through ``safetensors.safe_open`` (get_tensor /
  get_slice) from now on, for tests that a loader never reads some tensors."""
  import safetensors  # pylint: disable=import-outside-toplevel
  read: list[str] = []
  real_open = safetensors.safe_open

  class Spy:
    def __init__(self, *a, **k):
      self.f = real_open(*a, **k)

    def __enter__(self):
      self.inner = self.f.__enter__()
      return self

    def __exit__(self, *exc):
      return self.f.__exit__(*exc)

    def keys(self):
      return self.inner.keys()

    def get_slice(self, k):
      read.append(k)
      return self.inner.get_slice(k)

    def get_tensor(self, k):
      read.append(k)
      return self.inner.get_tensor(k)

  monkeypatch.setattr(safetensors, "safe_open", Spy)
  return read


def shared_run(tmp_path_factory, name: str) -> str:
  """A copy, for the caller to write into, of one small training run shared by test
  modules: configs/siglip_shapes.py:runlocal trained in-process for 6 steps (lr 3e-3),
  evaluated (zero-shot + retrieval) and checkpointed at steps 3 and 6.

  The first module to ask trains it, under a file lock in the session's base temp
  directory (shared by the pytest-xdist workers of one session); the others wait
  for it and copy it.
  """
  import fcntl  # pylint: disable=import-outside-toplevel
  from vlm_jax import train  # pylint: disable=import-outside-toplevel
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  src = os.path.join(base, "shared_siglip_shapes_run")
  done = src + ".done"
  with open(src + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(done):
      shutil.rmtree(src, ignore_errors=True)
      c = get_config("siglip_shapes", "runlocal")
      c.data.num_threads = 0
      c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 6, 3, 3, 0
      c.optimizer.lr = 3e-3
      train.train_and_evaluate(c, src)
      open(done, "w").close()
  dest = os.path.join(tmp_path_factory.mktemp(name), "run")
  shutil.copytree(src, dest)
  return dest
