"""vlm_jax.cpu_runtime (CPU host settings) and layers.matmul_dot_general."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import cpu_runtime
from vlm_jax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the gradient of a small MLP, whose 66 MB temporary (activations and their
# gradients) is allocated on every call; prints the minor page faults of calls 4 and 5.
_FAULTS = r"""
import json, resource, sys
from vlm_jax import cpu_runtime
started = cpu_runtime.backends_started()
applied = cpu_runtime.tune() if sys.argv[1] == "tune" else []
import jax, jax.numpy as jnp
f = jax.jit(jax.grad(lambda w1, w2, x: jnp.mean(jnp.tanh(x @ w1) @ w2), (0, 1)))
args = (jnp.full((128, 2048), 0.01), jnp.full((2048, 128), 0.01), jnp.ones((4096, 128)))
compiled = f.lower(*args).compile()
for _ in range(3):  # the heap settles
  jax.block_until_ready(compiled(*args))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
  jax.block_until_ready(compiled(*args))
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps(dict(started=started, applied=applied, again=cpu_runtime.tune(), faults=faults,
                      temp=compiled.memory_analysis().temp_size_in_bytes,
                      dispatch=bool(jax.config.read("jax_cpu_enable_async_dispatch")))))
"""


def _faults(mode):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=120).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                    reason="glibc x86-64 host")
def test_tune_stops_the_per_call_page_faults_of_xla_cpu_temporaries():
  plain, tuned = _faults("plain"), _faults("tune")
  pages = 2 * tuned["temp"] / 4096  # two calls
  assert tuned["temp"] >= 64 << 20
  # glibc maps a fresh temporary for each call, and pages it in again ...
  assert not plain["started"] and plain["dispatch"] and plain["faults"] > pages
  # ... unless programs run on the calling thread and the heap keeps freed memory.
  assert tuned["applied"] == tuned["again"] == [
      "jax_cpu_enable_async_dispatch=False", "mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=SIZE_MAX)"]
  assert not tuned["dispatch"]
  assert tuned["faults"] < 0.2 * pages, (tuned, plain)  # ~4%: the worker threads' scratch


def test_tune_is_a_no_op_once_backends_run_or_on_accelerator_hosts(monkeypatch):
  jax.devices()
  monkeypatch.setattr(cpu_runtime, "_applied", [])
  assert cpu_runtime.backends_started()
  assert cpu_runtime.tune() == []
  assert cpu_runtime.accelerator_possible("cuda,cpu") and cpu_runtime.accelerator_possible("tpu")
  assert not cpu_runtime.accelerator_possible("cpu") and not cpu_runtime.accelerator_possible(" cpu ,")
  # this process simulates 8 CPU devices (conftest): tune() would leave it alone anyway
  assert cpu_runtime.cpu_device_count() == jax.device_count() == 8


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims,flat", [
    ((2, 5, 6), (6, 3, 4), (((2,), (0,)), ((), ())), True),        # q/k/v projection
    ((2, 5, 3, 4), (3, 4, 6), (((2, 3), (0, 1)), ((), ())), True),  # attention out
    ((6, 5), (6, 3), (((0,), (0,)), ((), ())), False),             # not trailing x leading
    ((2, 5, 6), (2, 6, 3), (((2,), (1,)), ((0,), (0,))), False),   # batch axes
])
def test_matmul_dot_general_is_lax_dot_general_as_one_2d_matmul(lhs_shape, rhs_shape, dims, flat):
  kl, kr = jax.random.split(jax.random.PRNGKey(0))
  lhs, rhs = jax.random.normal(kl, lhs_shape), jax.random.normal(kr, rhs_shape)
  ref = lambda x, y: jax.lax.dot_general(x, y, dims)  # noqa: E731
  ours = lambda x, y: layers.matmul_dot_general(x, y, dims)  # noqa: E731
  np.testing.assert_allclose(ours(lhs, rhs), ref(lhs, rhs), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, y: jnp.sum(jnp.sin(f(x, y)))  # noqa: E731
  for g, g_ref in zip(jax.grad(loss(ours), (0, 1))(lhs, rhs), jax.grad(loss(ref), (0, 1))(lhs, rhs)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
  eqns = [e for e in jax.make_jaxpr(ours)(lhs, rhs).eqns if e.primitive.name == "dot_general"]
  assert len(eqns) == 1
  matmul = (eqns[0].params["dimension_numbers"] == (((1,), (0,)), ((), ()))
            and all(v.aval.ndim == 2 for v in eqns[0].invars))
  assert matmul == flat
