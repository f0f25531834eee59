"""Host-side (numpy) helpers shared by the evaluators and inference, below both."""

from __future__ import annotations

import numpy as np


def normalize(x, axis: int = -1) -> np.ndarray:
  """float32 ``x / ||x||`` along ``axis`` (a zero vector stays zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)
