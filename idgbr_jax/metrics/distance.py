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

`nearest_seed_bit` is the same transform for a caller that needs less: one bit of the nearest seed
near the seeds (carried inside the keys, so no gather) and the distance only at some pixels. A
windowed transform settles every pixel within a few pixels of a seed; needed pixels beyond it get
their distance from a capped int16 transform, or from the keyed full transform past its cap, whose
row pass stops when those pixels are settled instead of at the farthest pixel of the map. The
weighted F of binary maps needs exactly that (see `wfmeasure`).

All shapes are static; the loop bound is data dependent (a `lax.while_loop`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from idgbr_jax.metrics import fusion

# Offsets examined per while-loop iteration: amortises loop overhead, costs at most
# _UNROLL - 1 extra (harmless) offsets.
_UNROLL = 8


def _key_layout(height: int, width: int, payload_bits: int):
  """Integer dtype and 'no seed' sentinel for keys `d2 * scale + (col << bits | payload)`."""
  scale = width << payload_bits
  max_key = (height * height + width * width + 1) * scale
  # The row pass adds offset^2 * scale to the sentinel; offsets stay below width + _UNROLL.
  max_add = (width + _UNROLL) ** 2 * scale
  if max_key + max_add < 2**31 - 1:
    return jnp.int32, 2**31 - 1 - max_add
  if not jax.config.jax_enable_x64:
    raise ValueError(
        f"distance transform of a {height}x{width} map needs 64-bit integers; "
        "run under `jax.enable_x64(True)`.")
  return jnp.int64, 2**63 - 1 - max_add


def _prefix_scan(op, x: jax.Array, axis: int, reverse: bool = False) -> jax.Array:
  """Inclusive prefix max / min along `axis`, as a log-depth parallel scan."""
  return jax.lax.associative_scan(op, x, reverse=reverse, axis=axis)


def _column_pass(seeds: jax.Array, payload: jax.Array | None = None):
  """Nearest seed along axis -2 for each pixel.

  Returns (code, vertical distance, has-seed), where code is the nearest seed's row, shifted
  left by one with the seed's `payload` bit in bit 0 when a payload is given (the bit rides
  along the cumulative max / min: rows are distinct, so the bit never decides).
  """
  height = seeds.shape[-2]
  bits = 0 if payload is None else 1
  # int16 codes when they fit: the scans are memory-bound (about 3x faster on CPU).
  dtype = jnp.int16 if (height << bits) < 2**15 - 2 else jnp.int32
  rows = jax.lax.broadcasted_iota(dtype, seeds.shape, seeds.ndim - 2)
  code = rows if payload is None else rows * 2 + payload.astype(dtype)
  above = _prefix_scan(jnp.maximum, jnp.where(seeds, code, -1), seeds.ndim - 2)
  below = _prefix_scan(jnp.minimum, jnp.where(seeds, code, height << bits), seeds.ndim - 2,
                       reverse=True)
  # Arithmetic shifts keep the 'none' markers: -1 >> 1 == -1, (H << 1) >> 1 == H.
  above_row, below_row = above >> bits, below >> bits
  dist_above = jnp.where(above_row >= 0, rows - above_row, height + 1)
  dist_below = jnp.where(below_row < height, below_row - rows, height + 1)
  # `<=`: an equidistant seed above (smaller row) wins, as in scipy's 1-D pass.
  take_above = dist_above <= dist_below
  nearest = jnp.where(take_above, above, below)
  vertical = jnp.minimum(dist_above, dist_below)
  has_seed = vertical <= height
  return nearest, vertical, has_seed


def _row_pass(base, width, scale, inf, any_seed, open_mask, min_offset):
  """min over columns c of base[c] + (x - c)^2 * scale, for every pixel x of every row.

  Runs offsets 1.._UNROLL (and on through `min_offset`), then as many more as the largest key
  still open among the `open_mask` pixels can need: an offset k can only improve (or tie at a
  smaller column) a pixel whose best squared distance is at least k^2, and bests only go down.
  """
  key_dtype = base.dtype
  lead = base.shape[:-2]
  # Pad columns with the sentinel so shifted reads need no bounds checks.
  pad = width + _UNROLL
  padded = jnp.pad(base, [(0, 0)] * len(lead) + [(0, 0), (pad, pad)], constant_values=inf)
  mask = any_seed if open_mask is None else open_mask & any_seed

  def offsets(i, best):
    k = 1 + i * _UNROLL
    for u in range(_UNROLL):
      offset = k + u
      add = (offset.astype(key_dtype) * offset) * scale
      left = jax.lax.dynamic_slice_in_dim(padded, pad - offset, width, axis=-1)
      right = jax.lax.dynamic_slice_in_dim(padded, pad + offset, width, axis=-1)
      # The sentinel stays below the dtype's maximum after adding offset^2 * scale.
      best = jnp.minimum(best, jnp.minimum(left, right) + add)
    return best

  # The trip counts are computed outside the loops: a reduction in a while-loop condition costs
  # XLA on CPU more than the loop body itself. Both counts are data dependent on purpose: XLA
  # inlines a loop of one static trip, and its slices at constant offsets then run ~3x slower.
  first = max(1, -(-min_offset // _UNROLL))
  first_trips = jnp.where(jnp.any(any_seed), first, 0)
  best = jax.lax.fori_loop(0, first_trips, offsets, base)
  # Largest best key among the pixels that must be exact (maps without a seed never close).
  open_max = jnp.max(jnp.where(mask, best, -1))
  # Offsets k with k^2 <= open_max // scale; computed in floating point, then corrected by one
  # in each direction so rounding cannot cut it short.
  # (Clipped first: -1 when nothing is open, and at most W^2 + H^2 anyway.)
  open_d2 = jnp.clip(open_max // scale, 0, width * width + base.shape[-2] ** 2)
  k_max = jnp.floor(jnp.sqrt(open_d2.astype(jnp.float32))).astype(jnp.int32) + 1
  k_max = jnp.minimum(k_max, width)
  done = first * _UNROLL  # offsets 1..done are in
  more = jnp.maximum(k_max - done + _UNROLL - 1, 0) // _UNROLL
  return jax.lax.fori_loop(first_trips, first_trips + more, offsets, best)


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
  key_dtype, inf = _key_layout(height, width, 0)
  nearest_row, vertical, has_seed = _column_pass(seeds)
  cols = jax.lax.broadcasted_iota(key_dtype, seeds.shape, seeds.ndim - 1)
  vertical = vertical.astype(key_dtype)
  base = jnp.where(has_seed, vertical * vertical * width + cols, inf)
  any_seed = jnp.any(seeds, axis=(-2, -1), keepdims=True)
  best = _row_pass(base, width, width, inf, any_seed, None, 0)
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


def _window_keys(seeds, bit, radius, scale, key_dtype, inf):
  """Row-pass keys of `nearest_seed_bit` from seeds at most `radius` away in each axis.

  Both passes read shifted copies (2 * radius + 1 rows, then 2 * radius columns) instead of
  scanning whole columns and rows. A pixel whose true squared distance D is below
  (radius + 1)^2 has every nearest seed inside that window (each is at most sqrt(D) away in
  each axis), so its key, tie-breaking included, is the full transform's; and a key below that
  bound can only come from such a pixel.
  """
  height, width = seeds.shape[-2:]
  lead = [(0, 0)] * (seeds.ndim - 2)
  # Vertical pass: rank each row offset dy as 2|dy| - (dy < 0), so a smaller rank is nearer and,
  # at equal distance, the upper seed (scipy's choice); the seed's bit rides in bit 0.
  sentinel = 4 * radius + 4
  # One int16 code per pixel (bit for a seed, a large value otherwise), so each offset is a
  # shifted add and a min: integer arithmetic that vectorises, unlike selects on booleans.
  # The code is padded in both axes up front and everything after works in padded columns:
  # padding the int32 keys instead makes XLA fuse the whole vertical pass into the pad, ~4x slower.
  code = jnp.where(seeds, bit.astype(jnp.int16), jnp.int16(8 * radius + 8))
  code_p = jnp.pad(code, lead + [(radius, radius), (radius, radius)],
                   constant_values=8 * radius + 8)
  vkey = jnp.full(seeds.shape[:-1] + (width + 2 * radius,), sentinel, jnp.int16)
  for dy in range(-radius, radius + 1):
    rank = 2 * abs(dy) - (dy < 0)
    vkey = jnp.minimum(vkey, code_p[..., radius + dy:radius + dy + height, :] + 2 * rank)
  vertical = ((vkey >> 1) + 1 >> 1).astype(key_dtype)
  cols = jax.lax.broadcasted_iota(key_dtype, vkey.shape, vkey.ndim - 1) - radius
  base_p = jnp.where(vkey < sentinel,
                     vertical * vertical * scale + cols * 2 + (vkey & 1).astype(key_dtype), inf)
  # Row pass over column offsets 0..radius (padded columns hold the sentinel).
  best = base_p[..., radius:radius + width]
  for k in range(1, radius + 1):
    left = base_p[..., radius - k:radius - k + width]
    right = base_p[..., radius + k:radius + k + width]
    best = jnp.minimum(best, jnp.minimum(left, right) + k * k * scale)
  return best


def nearest_seed_bit(seeds: jax.Array, bit: jax.Array, distance_needed: jax.Array,
                     exact_sq: int, window: int = 8, any_seed: jax.Array | None = None):
  """`bit` at each pixel's nearest seed (scipy's choice), and squared distances where needed.

  Equal to `d2, r, c = feature_transform(seeds); bit[r, c]` where the caller needs it, for less
  work. A windowed transform (a few dozen shifted reads, no whole-column scans; the bit travels
  inside its keys, no gather) settles every pixel less than `window + 1` pixels from a seed, bit
  and distance. Needed pixels it leaves open get their distance only (`lax.cond`): from
  `_capped_distance_sq` (int16) when all of them lie within `_CAP` pixels, else from the keyed
  full transform, which stops once they are settled rather than at the map's farthest pixel.

  Args:
    seeds: bool [..., H, W].
    bit: bool [..., H, W], the value to carry from the nearest seed.
    distance_needed: bool [..., H, W], pixels whose d2 must be exact.
    exact_sq: the bit and d2 are exact at every pixel whose squared distance is at most this (the
      window is raised to cover it). With `window` > 0 that is where the bit is exact; with
      `window` 0 the bit is exact at the needed pixels too.
    window: radius of the windowed fast path (static; raised to sqrt(exact_sq)), or 0 to run
      the full transform directly (when the needed pixels are known to lie far from the seeds).
    any_seed: optional bool [..., 1, 1], whether each map holds a seed, when the caller knows
      (saves a reduction over the map).

  Returns:
    (d2 int32, bit bool) [..., H, W]. Exact where stated above; elsewhere d2 is a finite value
    at least the true one and the bit is unspecified. For a map without any seed, d2 is -1 and
    the bit False.
  """
  seeds = jnp.asarray(seeds, bool)
  bit = jnp.asarray(bit, bool)
  distance_needed = jnp.asarray(distance_needed, bool)
  height, width = seeds.shape[-2:]
  key_dtype, inf = _key_layout(height, width, 1)
  scale = width * 2
  # Offsets past the map add nothing (and would overflow the keys' headroom): clamp to it.
  min_offset = min(int(np.sqrt(exact_sq)), width)
  if window:
    window = min(max(int(window), int(np.ceil(np.sqrt(exact_sq)))), width)
  if any_seed is None:
    any_seed = jnp.any(seeds, axis=(-2, -1), keepdims=True)
  any_seed = jnp.broadcast_to(jnp.asarray(any_seed, bool), seeds.shape[:-2] + (1, 1))

  def full_keys(_):
    nearest, vertical, has_seed = _column_pass(seeds, bit)
    cols = jax.lax.broadcasted_iota(key_dtype, seeds.shape, seeds.ndim - 1)
    vertical = vertical.astype(key_dtype)
    tag = cols * 2 + (nearest & 1).astype(key_dtype)
    base = jnp.where(has_seed, vertical * vertical * scale + tag, inf)
    return _row_pass(base, width, scale, inf, any_seed, distance_needed, min_offset)

  if not window:
    best = full_keys(None)
    d2 = jnp.minimum(best // scale, 2**30).astype(jnp.int32)
    none = ~any_seed
    return jnp.where(none, -1, d2), (best & 1).astype(bool) & ~none

  # Behind a `lax.cond` (skipping batches without any seed) the keys are materialised once:
  # otherwise XLA on CPU fuses the whole windowed transform into each of its consumers below and
  # recomputes it there (~1 ms per 512x512 map per consumer; `optimization_barrier` does not
  # stop it).
  best = jax.lax.cond(
      jnp.any(any_seed), lambda _: _window_keys(seeds, bit, window, scale, key_dtype, inf),
      lambda _: jnp.full_like(seeds, inf, dtype=key_dtype), None)
  settled = best < (window + 1) ** 2 * scale
  d2 = jnp.minimum(best // scale, 2**30).astype(jnp.int32)
  open_pixels = distance_needed & ~settled & any_seed

  def far_distances(_):
    # Only distances are missing now (the bit is settled within exact_sq by the window): the
    # capped int16 transform gives them unless a needed pixel lies `_CAP` or more away.
    near_d2 = _capped_distance_sq(seeds, open_pixels, has_open).astype(jnp.int32)
    beyond = jnp.any(open_pixels & (near_d2 >= _CAP * _CAP))
    return jax.lax.cond(
        beyond, lambda _: jnp.minimum(full_keys(None) // scale, 2**30).astype(jnp.int32),
        lambda _: near_d2, None)

  has_open = jnp.any(open_pixels)
  far_d2 = jax.lax.cond(has_open, far_distances, lambda _: d2, None)
  # Unsettled pixels nobody needs keep the window's bound (at least the true distance).
  d2 = jnp.where(open_pixels, far_d2, d2)
  none = ~any_seed
  return jnp.where(none, -1, d2), (best & 1).astype(bool) & ~none


# Distances below this many pixels take the int16 transform (`_capped_distance_sq`); its row pass
# adds squared offsets below _CAP^2 to squared distances up to _CAP^2, within int16.
_CAP = 120
assert 2 * _CAP * _CAP < 2**15, "int16 headroom of _capped_distance_sq"


def _capped_distance_sq(seeds: jax.Array, needed: jax.Array, any_needed: jax.Array) -> jax.Array:
  """Squared distance to the nearest seed at `needed` pixels, exact below `_CAP`^2, in int16.

  No tie-breaking and no payload, so both passes work on int16 distances (half the traffic of
  the keyed transform, and no whole-width padding):
  1. Vertical distance, capped at _CAP, by min-plus doubling: after steps 1, 2, 4, ... every
     offset below the next power of two is covered (the penalty is linear, so offsets add up).
     The arrays shrink by each step instead of being re-padded.
  2. Row pass over offsets up to the largest distance still open among `needed` (< _CAP).
  Everything is computed on maps padded once, up front (seeds never lie in the padding):
  padding a computed array makes XLA on CPU fuse its whole producer into the pad.

  Returns int16 [..., H, W]: exact where `needed` and the distance is below _CAP; at least
  _CAP^2 where `needed` and the distance is not; unspecified elsewhere.
  """
  height, width = seeds.shape[-2:]
  lead = [(0, 0)] * (seeds.ndim - 2)
  steps = []
  while sum(steps) < _CAP - 1:
    steps.append(1 << len(steps))
  margin = sum(steps)  # rows consumed by the doubling steps
  pad = _CAP + _UNROLL  # > the largest offset the row pass reads, _UNROLL * (1 + (_CAP-1) // 8) - 1
  assert pad > _UNROLL * (1 + (_CAP - 1) // _UNROLL) - 1
  init = jnp.pad(jnp.where(seeds, jnp.int16(0), jnp.int16(_CAP)),
                 lead + [(margin, margin), (pad, pad)], constant_values=_CAP)
  up = init[..., :height + margin, :]  # rows -margin .. H-1
  down = init[..., margin:, :]  # rows 0 .. H-1+margin
  for s in steps:
    # Each step materialised (see `fusion`): fused, step k re-reads 2^k copies of the input.
    up, down = fusion.materialize((jnp.minimum(up[..., s:, :], up[..., :-s, :] + s),
                                   jnp.minimum(down[..., :-s, :], down[..., s:, :] + s)))
  vertical = jnp.minimum(jnp.minimum(up, down), _CAP)
  f = vertical * vertical  # [..., H, W + 2 pad], _CAP^2 in the padding

  def offsets(i, best):
    k = i * _UNROLL
    for u in range(_UNROLL):
      offset = k + u
      left = jax.lax.dynamic_slice_in_dim(f, pad - offset, width, axis=-1)
      right = jax.lax.dynamic_slice_in_dim(f, pad + offset, width, axis=-1)
      best = jnp.minimum(best, jnp.minimum(left, right) + (offset * offset).astype(jnp.int16))
    return best

  # Offset 0 runs inside the loop too: the loop is then the only consumer of `f`, which XLA
  # materialises once instead of fusing the doubling steps into a second reader.
  best = jnp.full_like(seeds, _CAP * _CAP, dtype=jnp.int16)  # (full_like: varying under shard_map)
  # Trip counts outside the loops, and data dependent (see `_row_pass`).
  first = jnp.where(any_needed, 1, 0)
  best = jax.lax.fori_loop(0, first, offsets, best)  # offsets 0 .. _UNROLL - 1
  open_max = jnp.max(jnp.where(needed, best, 0)).astype(jnp.int32)
  k_max = jnp.floor(jnp.sqrt(open_max.astype(jnp.float32))).astype(jnp.int32) + 1
  k_max = jnp.minimum(k_max, _CAP - 1)
  more = k_max // _UNROLL  # offsets up to _UNROLL * (1 + more) - 1 >= k_max
  return jax.lax.fori_loop(first, first + more, offsets, best)


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
