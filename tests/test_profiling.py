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


# A GPU trace as XLA writes it (the kernels of one CUDA-graph replay on a stream line,
# each with hlo_op = the command buffer), in XSpace text form, with the HLO beside it.
_GPU_HLO = """HloModule jit_step_fn

%fused_add.33 (p0: bf16[8,4], p1: bf16[8,4]) -> bf16[8,4] {
  %p0 = bf16[8,4]{1,0} parameter(0)
  %p1 = bf16[8,4]{1,0} parameter(1)
  ROOT %add.1 = bf16[8,4]{1,0} add(%p0, %p1)
}

%fused_reduce.7 (p0: f32[8,4]) -> f32[] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %reduce.2 = f32[] reduce(%p0, %c), dimensions={0,1}, to_apply=%sum
}

ENTRY %main (a: bf16[8,4], b: bf16[8,4], c: f32[8,4]) -> bf16[8,4] {
  %a = bf16[8,4]{1,0} parameter(0)
  %b = bf16[8,4]{1,0} parameter(1)
  %c = f32[8,4]{1,0} parameter(2)
  %loop_add_fusion.33 = bf16[8,4]{1,0} fusion(%a, %b), kind=kLoop, calls=%fused_add.33, metadata={op_name="jit(step)/jit(main)/img/Transformer/encoderblock_3/MlpBlock_0/add"}
  %input_reduce_fusion.7 = f32[] fusion(%c), kind=kInput, calls=%fused_reduce.7, metadata={op_name="jit(step)/transpose(jvp(TwoTower))/img/Transformer/encoderblock_11/LayerNorm_0/reduce_sum"}
  ROOT %custom-call.3 = bf16[8,4]{1,0} custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"
}
"""


def _gpu_space(kernels):
  events, meta = [], []
  for i, (name, ps) in enumerate(kernels, start=1):
    meta.append(f'event_metadata {{ key: {i} value {{ id: {i} name: "{name}" }} }}')
    events.append(f"events {{ metadata_id: {i} offset_ps: {i * 10**7} duration_ps: {ps} "
                  "stats { metadata_id: 1 str_value: \"command_buffer_1\" } }")
  return ('planes { id: 1 name: "/device:GPU:0" '
          'lines { id: 1 name: "Stream #14(Compute,Memset)" ' + " ".join(events) + " } "
          + " ".join(meta)
          + ' stat_metadata { key: 1 value { id: 1 name: "hlo_op" } } }')


def test_gpu_kernels_are_classified_by_fusion_and_library_names(tmp_path):
  kernels = [("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_TNT", 5 * 10**6),
             ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", 4 * 10**6),
             ("loop_add_fusion_33", 3 * 10**6),
             ("input_reduce_fusion_7", 2 * 10**6),
             ("sm80_xmma_fprop_implicit_gemm_indexed_bf16bf16", 10**6),
             ("memcpy32_post", 10**5)]
  space = ProfileData.text_proto_to_serialized_xspace(_gpu_space(kernels))
  trace = tmp_path / "plugins" / "profile" / "run"
  trace.mkdir(parents=True)
  (trace / "host.xplane.pb").write_bytes(space)
  rows = {k: (round(s * 1e6), n) for k, s, n in profiling.op_time_table(str(tmp_path), _GPU_HLO)}
  assert rows == {"matmul (dot)": (5, 1), "attention (cuDNN fused)": (4, 1),
                  "elementwise": (3, 1), "reductions": (2, 1), "convolution": (1, 1),
                  "copies / transposes": (0, 1)}, rows
  # By model path: the HLO's op_name without jit(...)/, block indices folded
  # (backward ops keep their transpose(jvp(...)) prefix); library kernels whose
  # launching op has no op_name fall back to their kind.
  rows = {k: n for k, _, n in profiling.op_time_table(str(tmp_path), _GPU_HLO, by="layer")}
  assert rows == {"(matmul (dot))": 1, "(attention (cuDNN fused))": 1,
                  "img/Transformer/encoderblock_*/MlpBlock_0/add": 1,
                  "transpose(jvp(TwoTower))/img/Transformer/encoderblock_*/LayerNorm_0/reduce_sum": 1,
                  "(convolution)": 1, "(copies / transposes)": 1}, rows
  text = profiling.format_op_table(profiling.op_time_table(str(tmp_path), _GPU_HLO, by="layer"),
                                   limit=2)
  assert "(4 more)" in text and "(matmul (dot))" in text, text
  with pytest.raises(ValueError, match="HLO"):
    profiling.op_time_table(str(tmp_path), by="layer")
  # The library call in the HLO is a matmul by its custom_call_target as well.
  comps, instrs = profiling._hlo_index(_GPU_HLO)  # pylint: disable=protected-access
  assert profiling.classify("custom-call.3", comps, instrs) == "matmul (dot)"
