"""Exact Euclidean feature / distance transform in JAX, with scipy's tie-breaking.

Margolin's weighted F copies the error of the *nearest* ground-truth pixel onto every other pixel,
and the original evaluator takes that pixel from
`scipy.ndimage.distance_transform_edt(..., return_indices=True)`. When several seeds are equally
near, the chosen one changes the score, so this transform reproduces scipy's choice exactly.

scipy (Maurer et al. 2003, `ni_morphology.c`) runs a 1-D pass along axis 0 and then a lower-envelope
pass along axis 1. Both passes keep the *earlier* site on equal distance (`delta1 <= delta2` stops
the scan), and sites dropped from the envelope are strictly farther everywhere. The result is: among
all seeds at the minimal squared distance, the one with the smallest column, then the smallest row.
This module computes exactly that, in integers:

1. Column pass: nearest seed above / below each pixel by cumulative max / min of row indices
   (ties go to the upper seed, the smaller row). The cumulative max / min is a parallel prefix
   scan (`lax.associative_scan`): `lax.cummax` lowers to an O(H^2) reduce-window on CPU (~10x
   slower on 512x512 maps).
2. Row pass: min over columns c of `(x - c)^2 + g(c)^2`. The squared distance and the column are
   packed into one integer key `d2 * W + c`, so a plain `min` picks the smallest
   distance and, among equal distances, the smallest column. The min runs over growing offsets k
   and stops as soon as `k^2` exceeds the largest best squared distance still open, so the work is
   O(H * W * max distance) of fully parallel integer min-plus updates: no sequential scan, which
   suits GPU / TPU (and vmap / jit).

All shapes are static; the loop bound is data dependent (a `lax.while_loop`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Offsets examined per while-loop iteration: amortises loop overhead, costs at most
# _UNROLL - 1 extra (harmless) offsets.
_UNROLL = 8


def _key_dtype(height: int, width: int):
  """Integer dtype wide enough for the packed key (d2 * W + c) plus the 'no seed' sentinel."""
  max_key = (height * height + width * width + 1) * width * 2
  if max_key < 2**30:
    return jnp.int32, 2**30
  if not jax.config.jax_enable_x64:
    raise ValueError(
        f"distance transform of a {height}x{width} map needs 64-bit integers; "
        "run under `jax.enable_x64(True)`.")
  return jnp.int64, 2**62


def _prefix_scan(op, x: jax.Array, axis: int, reverse: bool = False) -> jax.Array:
  """Inclusive prefix max / min along `axis`, as a log-depth parallel scan."""
  return jax.lax.associative_scan(op, x, reverse=reverse, axis=axis)


def _column_pass(seeds: jax.Array):
  """Nearest seed along axis -2 for each pixel: (row index, squared distance, has-seed)."""
  height = seeds.shape[-2]
  # int16 row indices when they fit: the scans are memory-bound (about 3x faster on CPU).
  dtype = jnp.int16 if height < 2**15 - 2 else jnp.int32
  rows = jax.lax.broadcasted_iota(dtype, seeds.shape, seeds.ndim - 2)
  above = _prefix_scan(jnp.maximum, jnp.where(seeds, rows, -1), seeds.ndim - 2)
  below = _prefix_scan(jnp.minimum, jnp.where(seeds, rows, height), seeds.ndim - 2, reverse=True)
  dist_above = jnp.where(above >= 0, rows - above, height + 1)
  dist_below = jnp.where(below < height, below - rows, height + 1)
  # `<=`: an equidistant seed above (smaller row) wins, as in scipy's 1-D pass.
  take_above = dist_above <= dist_below
  nearest_row = jnp.where(take_above, above, below)
  vertical = jnp.minimum(dist_above, dist_below)
  has_seed = vertical <= height
  return nearest_row, vertical, has_seed


def feature_transform(seeds: jax.Array):
  """Nearest seed of every pixel, with scipy's tie-breaking.

  Args:
    seeds: bool array [..., H, W]; True marks seed pixels (scipy's *zeros*).

  Returns:
    (d2, rows, cols): int arrays [..., H, W]: squared Euclidean distance to the nearest seed and
    its coordinates. For a map without any seed, d2 is -1 and rows / cols are -1 (scipy's feature
    array would be -1 as well).
  """
  seeds = jnp.asarray(seeds, bool)
  height, width = seeds.shape[-2:]
  key_dtype, inf = _key_dtype(height, width)
  nearest_row, vertical, has_seed = _column_pass(seeds)
  cols = jax.lax.broadcasted_iota(key_dtype, seeds.shape, seeds.ndim - 1)
  vertical = vertical.astype(key_dtype)
  base = jnp.where(has_seed, vertical * vertical * width + cols, inf)

  lead = seeds.shape[:-2]
  # Pad columns with the sentinel so shifted reads need no bounds checks.
  pad = width + _UNROLL
  padded = jnp.pad(base, [(0, 0)] * len(lead) + [(0, 0), (pad, pad)], constant_values=inf)
  any_seed = jnp.any(seeds, axis=(-2, -1), keepdims=True)

  def open_max(best):
    # Largest best key among maps that have a seed (others never close).
    return jnp.max(jnp.where(any_seed, best, -1))

  def cond(state):
    k, best = state
    # k^2 <= largest open key // W, compared as k^2 * W <= key: no per-pixel division.
    return (k < width) & (k.astype(key_dtype) * k * width <= open_max(best))

  def body(state):
    k, best = state
    for u in range(_UNROLL):
      offset = k + u
      add = (offset.astype(key_dtype) * offset) * width
      left = jax.lax.dynamic_slice_in_dim(padded, pad - offset, width, axis=-1)
      right = jax.lax.dynamic_slice_in_dim(padded, pad + offset, width, axis=-1)
      # The sentinel stays above every real key after adding offset^2 * W.
      best = jnp.minimum(best, jnp.minimum(left, right) + add)
    return k + _UNROLL, best

  _, best = jax.lax.while_loop(cond, body, (jnp.asarray(1, jnp.int32), base))
  best_col = (best % width).astype(jnp.int32)
  d2 = (best // width).astype(jnp.int32)
  # best_col is in [0, W) (maps without seeds are masked below): no bounds handling needed.
  best_row = jnp.take_along_axis(nearest_row, best_col, axis=-1,
                                 mode="promise_in_bounds").astype(jnp.int32)
  none = ~any_seed
  d2 = jnp.where(none, -1, d2)
  best_row = jnp.where(none, -1, best_row)
  best_col = jnp.where(none, -1, best_col)
  return d2, best_row, best_col


def distance_transform_edt(image: jax.Array, return_indices: bool = False):
  """scipy.ndimage.distance_transform_edt for 2-D maps (batched over leading axes).

  Distance of every non-zero pixel to the nearest zero pixel; zeros get 0 and themselves as index.

  Args:
    image: array [..., H, W]; zeros are the seeds.
    return_indices: also return the [..., 2, H, W] index array, like scipy's `indices`.

  Returns:
    Float distances (float64 under x64, else float32), and the indices if requested.
  """
  seeds = jnp.asarray(image) == 0
  d2, rows, cols = feature_transform(seeds)
  dist = jnp.sqrt(d2.astype(jnp.result_type(float)))
  if not return_indices:
    return dist
  return dist, jnp.stack([rows, cols], axis=-3)


def squared_distance_upper_bound(height: int, width: int) -> int:
  """Largest squared distance a map of this size can produce (for static buffers)."""
  return int(np.int64(height) ** 2 + np.int64(width) ** 2)
