"""config.compilation_cache_dir: a later process loads compiled programs instead of compiling."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import sys
import jax
import jax.numpy as jnp
sys.path.insert(0, {root!r})
from vlm_jax import train

events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
train.use_compilation_cache(sys.argv[1], min_compile_secs=0)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
value = float(f(jnp.arange(64 * 48, dtype=jnp.float32).reshape(64, 48) / 1000))
hits = events.count("/jax/compilation_cache/cache_hits")
misses = events.count("/jax/compilation_cache/cache_misses")
print(f"RESULT {{value!r}} {{hits}} {{misses}}")
"""


def _run(cache_dir):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", _SCRIPT.format(root=ROOT), cache_dir], env=env,
                       capture_output=True, text=True, timeout=300, check=True).stdout
  line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
  value, hits, misses = line.split()[1:]
  return float(value), int(hits), int(misses)


def test_a_second_process_loads_the_compiled_program_from_the_cache(tmp_path):
  cache = str(tmp_path / "xla_cache")
  value1, hits1, misses1 = _run(cache)
  assert hits1 == 0 and misses1 >= 1
  entries = os.listdir(cache)
  assert entries, "nothing was written to the compilation cache"
  value2, hits2, misses2 = _run(cache)
  assert hits2 >= 1 and misses2 == 0
  assert value2 == value1
  assert sorted(os.listdir(cache)) == sorted(entries)  # nothing new compiled


def test_config_field_is_off_by_default_and_reaches_train(tmp_path, monkeypatch):
  import pytest  # pylint: disable=import-outside-toplevel
  from vlm_jax import config_util, parallel, train  # pylint: disable=import-outside-toplevel
  c = config_util.base_config()
  assert c.compilation_cache_dir == ""
  seen = []
  monkeypatch.setattr(train, "use_compilation_cache", seen.append)

  class Stop(Exception):
    pass

  def stop():
    raise Stop
  monkeypatch.setattr(parallel, "maybe_initialize_distributed", stop)
  c.compilation_cache_dir = str(tmp_path / "cache")
  c.tune_cpu = False
  with pytest.raises(Stop):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert seen == [str(tmp_path / "cache")]
