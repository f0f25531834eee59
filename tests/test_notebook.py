"""The notebooks in experiments/ run top to bottom on a tiny training run."""
import json
import os
import sys

import pytest

from recipes import ROOT, shared_run, subprocess_env

EVAL_NOTEBOOK = os.path.join(ROOT, "experiments", "eval_checkpoint.ipynb")
TOKENIZER_NOTEBOOK = os.path.join(ROOT, "experiments", "tokenizer_demo.ipynb")


def _kernelspec(jupyter_dir, env):
  """A 'python3' kernelspec that runs this interpreter (the one running pytest)."""
  spec_dir = os.path.join(jupyter_dir, "kernels", "python3")
  os.makedirs(spec_dir)
  with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "Python 3 (vlm_jax tests)", "language": "python", "env": env}, f)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """The runlocal shapes demo trained for 6 steps (``recipes.shared_run``)."""
  pytest.importorskip("nbformat")
  pytest.importorskip("nbclient")
  return shared_run(tmp_path_factory, "notebook")


def _execute(notebook, workdir, tmp_path, monkeypatch):
  """Runs ``notebook`` on ``workdir`` in a fresh kernel; returns (code cell outputs,
  the stdout text, the figure folder)."""
  import nbclient  # pylint: disable=import-outside-toplevel
  import nbformat  # pylint: disable=import-outside-toplevel
  out_dir = str(tmp_path / "figures")
  jupyter = str(tmp_path / "jupyter")
  _kernelspec(jupyter, {
      "VLM_JAX_WORKDIR": workdir, "VLM_JAX_NOTEBOOK_OUT": out_dir,
      **{k: v for k, v in subprocess_env().items()  # one CPU device, like a laptop
         if k in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH", "JAX_COMPILATION_CACHE_DIR",
                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")},
  })
  monkeypatch.setenv("JUPYTER_PATH", jupyter)

  nb = nbformat.read(notebook, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  return outputs, text, out_dir


def _pngs(outputs):
  return [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]


def test_eval_notebook_runs_on_a_checkpoint(workdir, tmp_path, monkeypatch):
  outputs, text, out_dir = _execute(EVAL_NOTEBOOK, workdir, tmp_path, monkeypatch)
  assert f"python {sys.executable}," in text
  assert "step 6," in text and "zero-shot top-1 on these 8 images" in text
  assert text.count("predicted ") == 8
  assert "zeroshot/top1" in text and "retrieval/i2t_r1" in text
  assert len(_pngs(outputs)) == 2
  assert sorted(os.listdir(out_dir)) == ["similarity.png", "zeroshot_predictions.png"]


def test_tokenizer_notebook_patchifies_packs_and_explains(workdir, tmp_path, monkeypatch):
  outputs, text, out_dir = _execute(TOKENIZER_NOTEBOOK, workdir, tmp_path, monkeypatch)
  # A 64 x 64 image in 8-pixel patches: 64 tokens of 8*8*3 values.
  assert "grid (8, 8) -> tokens (64, 192), positions (64, 2)" in text
  assert "segment_ids  int32 (" in text and "fill rate " in text
  assert "step 6, image tower pool 'map'" in text
  assert text.count("rollout (4, 4), similarity (4, 4)") == 3  # runlocal: 32 px / stride 8
  assert len(_pngs(outputs)) == 3
  assert sorted(os.listdir(out_dir)) == ["attention_maps.png", "packing.png", "patchify.png"]
