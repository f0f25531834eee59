"""The README's Python snippets run as written, as a new user would run them.

Every ```python block of README.md is executed in order, in one fresh interpreter
(one CPU device, like a laptop), in a directory holding ``configs/`` and a short
training run at ``runs/shapes`` (the demo's workdir, trained for a few steps).
"""
import os
import re
import subprocess
import sys
import textwrap

from recipes import ROOT, subprocess_env


def python_blocks(markdown: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_the_readme_has_python_snippets():
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = python_blocks(f.read())
  assert len(blocks) >= 2 and any("vlm_jax.checkpoint.load" in b for b in blocks)


def test_readme_python_snippets_run_as_written(tmp_path):
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = python_blocks(f.read())
  os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
  env = subprocess_env(PYTHONPATH=str(tmp_path))
  train = subprocess.run(
      [sys.executable, "-m", "vlm_jax.train", "--config", "configs/siglip_shapes.py:runlocal",
       "--workdir", "runs/shapes", "--config.total_steps=3", "--config.eval_every=0",
       "--config.checkpoint_every=3", "--config.data.num_threads=0"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  script = "\n\n".join(f"# ---- README block {i}\n{textwrap.dedent(b)}"
                       for i, b in enumerate(blocks))
  (tmp_path / "readme_snippets.py").write_text(script)
  proc = subprocess.run([sys.executable, "readme_snippets.py"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
