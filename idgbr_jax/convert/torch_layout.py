"""Layout conversions between PyTorch state dicts and Flax param trees (numpy only)."""
from __future__ import annotations

import numpy as np


def conv_kernel_to_flax(w) -> np.ndarray:
  """PyTorch Conv2d weight (O, I, kh, kw) -> Flax HWIO (kh, kw, I, O)."""
  return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0))


def conv_kernel_to_torch(w) -> np.ndarray:
  """Flax HWIO (kh, kw, I, O) -> PyTorch (O, I, kh, kw)."""
  return np.ascontiguousarray(np.asarray(w).transpose(3, 2, 0, 1))


def linear_kernel_to_flax(w) -> np.ndarray:
  """PyTorch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
  return np.ascontiguousarray(np.asarray(w).T)


linear_kernel_to_torch = linear_kernel_to_flax
