"""config.profile_steps: a jax.profiler trace of the chosen train steps in WORKDIR/profile.

The training program's hook is exercised by test_train.py's metrics/checkpoints run
(profile_steps there), which compiles a train step anyway."""
import glob
import os

import jax
import jax.numpy as jnp
import pytest
from jax.profiler import ProfileData

from recipes import get_config
from vlm_jax import config_util, profiling


def _step_annotations(path):
  """step_num of every "train" step annotation in an .xplane.pb trace."""
  steps = []
  for plane in ProfileData.from_file(path).planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name == "train":
          steps += [int(v) for k, v in ev.stats if k == "step_num"]
  return sorted(steps)


def test_step_profiler_traces_only_the_chosen_steps(tmp_path):
  # start_step=1 (a resumed run): the calls are steps 2, 3, 4, 5, 6.
  prof = profiling.StepProfiler((3, "5:6"), str(tmp_path), start_step=1)
  step = prof.wrap(jax.jit(lambda x: (x @ x, {"loss": jnp.sum(x)})))
  x = jnp.ones((64, 64))
  for _ in range(5):
    x, _ = step(x * 0.01)
  prof.close()
  traces = sorted(glob.glob(os.path.join(str(tmp_path), "profile", "step_*", "plugins", "profile",
                                         "*", "*.xplane.pb")))
  # Steps 3 and 5 are not consecutive: two traces, each holding its own step.
  assert [_step_annotations(t) for t in traces] == [[3], [5]]
  assert all(glob.glob(os.path.join(os.path.dirname(t), "*.trace.json.gz")) for t in traces)
  rows = {k: s for k, s, _ in profiling.op_time_table(os.path.dirname(traces[-1]))}
  assert rows and all(s >= 0 for s in rows.values()), rows
  assert not profiling.StepProfiler((), str(tmp_path)).enabled  # off by default: no wrapping


@pytest.mark.parametrize("value,steps", [((), set()), ((5,), {5}), ((2, "4:7"), {2, 4, 5, 6}),
                                         ("3", {3}), ([1, 1], {1})])
def test_profile_steps_values(value, steps):
  assert profiling.parse_steps(value) == steps


@pytest.mark.parametrize("value", [(0,), ("7:7",), ("a:b",), (True,), (2.5,), "-1"])
def test_bad_profile_steps_name_the_field(value):
  c = get_config("siglip_shapes", "runlocal")
  c.profile_steps = value if isinstance(value, tuple) else (value,)
  with pytest.raises(ValueError, match="config.profile_steps"):
    config_util.validate(c)
