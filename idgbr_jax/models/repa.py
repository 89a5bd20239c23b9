"""REPA-style representation alignment: projector, teacher input resize, token alignment, loss.

The original (IDGBR `tools/train.py`, `SuperModel._build_representators`) aligns the guidance net's
last skip residual (1280 ch at 8x8 for SD-1.5) with frozen DINOv2 patch tokens:

  teacher tokens = DINOv2(resize_bicubic(image, 7/8 grid)).x_norm_patchtokens    (B, 32*32, 1536)
  student tokens = upsample_bilinear(Projector(residual_11), teacher grid)        (B, 32*32, 1536)
  loss = mean over tokens of -cos(teacher, student), in float32

This file also holds the PyTorch-exact resampling helpers (`torch_interpolate`) that the
guidance net and DINOv2 use for their positional embeddings: `jax.image.resize` differs from
`torch.nn.functional.interpolate` (Keys a=-0.5 instead of -0.75, different border handling), so
the resize is built here as explicit per-axis matrices that reproduce torch's CPU kernels.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idgbr_jax.models import layers

Dtype = Any

# torch's bicubic kernel constant (upsample_bicubic2d); PIL/`jax.image.resize` use -0.5.
_TORCH_CUBIC_A = -0.75


def _cubic_coefficients(t: np.ndarray) -> np.ndarray:
  """torch `get_cubic_upsample_coefficients` for fractional offsets t (float32), shape (..., 4)."""
  a = np.float32(_TORCH_CUBIC_A)
  one = np.float32(1.0)

  def conv1(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + one

  def conv2(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  x2 = one - t
  return np.stack([conv2(t + one), conv1(t), conv1(x2), conv2(x2 + one)], axis=-1)


def torch_resize_matrix(in_size: int, out_size: int, mode: str, scale_factor: float | None = None,
                        align_corners: bool = False) -> np.ndarray:
  """(out_size, in_size) float32 matrix equal to torch's 1-D resampling along one axis.

  Reproduces `F.interpolate(..., mode='bilinear'|'bicubic', antialias=False)` on CPU:
  source index `scale * (i + 0.5) - 0.5` (clamped at 0 for bilinear only), float32 arithmetic,
  border taps clamped to the edge. `scale` is `1 / scale_factor` when a scale factor was given
  to `F.interpolate` (the DINOv2 offset trick relies on this) and `in / out` otherwise.

  Args:
    in_size: input length along the axis.
    out_size: output length.
    mode: 'bilinear' or 'bicubic'.
    scale_factor: the `scale_factor` passed to `F.interpolate`, if any.
    align_corners: torch's `align_corners`.
  """
  if mode not in ("bilinear", "bicubic"):
    raise ValueError(f"mode must be 'bilinear' or 'bicubic', got {mode!r}")
  f32 = np.float32
  if align_corners:
    scale = f32((in_size - 1) / (out_size - 1)) if out_size > 1 else f32(0.0)
  elif scale_factor is not None and scale_factor > 0:
    scale = f32(1.0 / scale_factor)
  else:
    scale = f32(in_size) / f32(out_size)
  dst = np.arange(out_size, dtype=f32)
  if align_corners:
    real = scale * dst
  else:
    real = scale * (dst + f32(0.5)) - f32(0.5)
    if mode == "bilinear":
      real = np.maximum(real, f32(0.0))
  # guard_index_and_lambda: floor, clamp the index to the top edge, clamp lambda into [0, 1].
  index = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
  lam = np.clip(real - index.astype(f32), f32(0.0), f32(1.0)).astype(f32)
  mat = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  if mode == "bilinear":
    nxt = index + (index < in_size - 1).astype(np.int64)
    np.add.at(mat, (rows, index), f32(1.0) - lam)
    np.add.at(mat, (rows, nxt), lam)
  else:
    coeffs = _cubic_coefficients(lam)
    for j in range(4):
      taps = np.clip(index - 1 + j, 0, in_size - 1)
      np.add.at(mat, (rows, taps), coeffs[:, j])
  return mat


def interpolate_output_size(in_size: int, scale_factor: float) -> int:
  """Output length F.interpolate computes from a scale factor: floor(in * scale) in float64."""
  return int(math.floor(float(in_size) * scale_factor))


def torch_interpolate(x: jax.Array, size: Sequence[int] | None = None, *, mode: str = "bicubic",
                      scale_factor: Sequence[float] | None = None,
                      align_corners: bool = False) -> jax.Array:
  """`torch.nn.functional.interpolate` (antialias=False) for NHWC arrays, in float32.

  Exactly one of `size` and `scale_factor` (per spatial axis, as torch) must be given. The result
  is cast back to `x.dtype` (the callers interpolate positional embeddings and images in float32
  like the original, then cast).
  """
  if (size is None) == (scale_factor is None):
    raise ValueError("give exactly one of size and scale_factor")
  in_h, in_w = x.shape[-3], x.shape[-2]
  if size is not None:
    out_h, out_w = int(size[0]), int(size[1])
    mh = torch_resize_matrix(in_h, out_h, mode, align_corners=align_corners)
    mw = torch_resize_matrix(in_w, out_w, mode, align_corners=align_corners)
  else:
    sh, sw = float(scale_factor[0]), float(scale_factor[1])
    out_h, out_w = interpolate_output_size(in_h, sh), interpolate_output_size(in_w, sw)
    mh = torch_resize_matrix(in_h, out_h, mode, sh, align_corners)
    mw = torch_resize_matrix(in_w, out_w, mode, sw, align_corners)
  if (out_h, out_w) == (in_h, in_w) and np.array_equal(mh, np.eye(in_h)) and np.array_equal(
      mw, np.eye(in_w)):
    return x
  y = x.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,...hwc->...owc", jnp.asarray(mh), y, precision=hp)
  y = jnp.einsum("pw,...owc->...opc", jnp.asarray(mw), y, precision=hp)
  return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Teacher input and student tokens.


def teacher_input_size(hw: Sequence[int], patch_size: int, ratio: float = 7 / 8) -> tuple[int, int]:
  """The original's REPA resize target: int(side * ratio), kept in [patch, side], rounded down to
  a multiple of the patch size (512 -> 448 for patch 14)."""
  out = []
  for side in hw:
    side = int(side)
    if side < patch_size:
      raise ValueError(f"image side {side} is smaller than the teacher patch size {patch_size}")
    dim = min(side, max(patch_size, int(side * ratio)))
    out.append((dim // patch_size) * patch_size)
  return out[0], out[1]


def teacher_input(images: jax.Array, patch_size: int, ratio: float = 7 / 8) -> jax.Array:
  """Resizes NHWC images bicubically (torch semantics, no antialias) to the teacher grid size.

  Matches torchvision `Resize(size, BICUBIC, antialias=None)` on float tensors, which is
  `F.interpolate(mode='bicubic', align_corners=False, antialias=False)` and no clamping.
  """
  target = teacher_input_size(images.shape[-3:-1], patch_size, ratio)
  if tuple(images.shape[-3:-1]) == target:
    return images
  return torch_interpolate(images, target, mode="bicubic")


def align_tokens(student: jax.Array, grid: Sequence[int]) -> jax.Array:
  """(B, h, w, C) projected student map -> (B, gh*gw, C) tokens on the teacher grid.

  Bilinear, align_corners=False (torch semantics); identity when the grids already agree.
  """
  b, h, w, c = student.shape
  gh, gw = int(grid[0]), int(grid[1])
  if (h, w) != (gh, gw):
    student = torch_interpolate(student, (gh, gw), mode="bilinear")
  return student.reshape(b, gh * gw, c)


def _safe_norm(x: jax.Array) -> jax.Array:
  """L2 norm over the last axis whose gradient is 0 (not NaN) at x = 0, like torch's.

  A code-mode CG net starts with an exactly-zero student; `jnp.linalg.norm`'s gradient there is
  0/0 = NaN, which would poison the whole step even though such tokens are masked out.
  """
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def repa_loss(student_proj: jax.Array, teacher: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Mean negative cosine similarity over tokens, in float32 (scalar).

  As the original: the teacher is `F.normalize(eps=1e-6)`-ed; student tokens whose norm is
  <= eps are excluded from the mean (a zero-initialised student has no direction); the loss is 0
  when no token is valid.

  Args:
    student_proj: (B, N, D) projected student tokens.
    teacher: (B, N, D) teacher tokens.
    eps: the norm threshold / clamp.
  """
  if student_proj.shape != teacher.shape:
    raise ValueError(f"student {student_proj.shape} and teacher {teacher.shape} shapes differ")
  s = student_proj.astype(jnp.float32)
  t = teacher.astype(jnp.float32)
  t = t / jnp.maximum(_safe_norm(t), eps)
  s_norm = _safe_norm(s)
  valid = (s_norm[..., 0] > eps).astype(jnp.float32)
  s = s / jnp.maximum(s_norm, eps)
  neg_cos = -jnp.sum(s * t, axis=-1)
  count = jnp.sum(valid)
  return jnp.where(count > 0, jnp.sum(neg_cos * valid) / jnp.maximum(count, 1.0), 0.0)


class Projector(nn.Module):
  """Per-token MLP C -> hidden -> hidden -> out_dim with SiLU (REPA `build_mlp`)."""
  hidden_dim: int = 2048
  out_dim: int = 1536
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # xavier_uniform weights and zero biases, as the original's `_initialize_projectors`.
    init = nn.initializers.xavier_uniform()
    kw = dict(kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.Dense(self.hidden_dim, in_axis="embed", out_axis="mlp", name="fc1", **kw)(x)
    x = nn.silu(x)
    x = layers.Dense(self.hidden_dim, in_axis="mlp", out_axis="embed", name="fc2", **kw)(x)
    x = nn.silu(x)
    return layers.Dense(self.out_dim, in_axis="embed", out_axis="mlp", name="fc3", **kw)(x)
