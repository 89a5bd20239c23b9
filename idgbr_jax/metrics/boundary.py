"""Morphology for the boundary metrics: the original's Sobel edge band, and binary filters.

Everything works on batched maps [..., H, W] and is exact integer / boolean arithmetic, so it
matches OpenCV bit for bit (tests compare with cv2.Sobel / cv2.dilate / cv2.morphologyEx).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idgbr_jax.metrics import fusion

# Outside-band marker of the original edge maps; a raw value >= 255 inside the band is
# indistinguishable from "outside" after the `lt255` binarisation.
OUTSIDE_BAND = 255


def _shift(x: jax.Array, dy: int, dx: int, fill) -> jax.Array:
  """y[i, j] = x[i + dy, j + dx], `fill` where that falls outside the map."""
  height, width = x.shape[-2:]
  lead = [(0, 0)] * (x.ndim - 2)
  py, px = abs(dy), abs(dx)
  padded = jnp.pad(x, lead + [(py, py), (px, px)], constant_values=fill)
  return padded[..., py + dy:py + dy + height, px + dx:px + dx + width]


def sobel_nonzero(label: jax.Array) -> jax.Array:
  """`hypot(Sobel_x, Sobel_y) > 0` of a uint8 label map, OpenCV's ksize=3, BORDER_REFLECT_101.

  Args:
    label: integer map [..., H, W] (H, W >= 2). Values are taken modulo 256, as `np.uint8(label)`
      does in the original.

  Returns:
    bool [..., H, W].
  """
  # int16 holds every Sobel response of uint8 input (|g| <= 4 * 255) at half the memory traffic.
  x = jnp.bitwise_and(jnp.asarray(label).astype(jnp.int32), 255).astype(jnp.int16)
  lead = [(0, 0)] * (x.ndim - 2)
  # numpy/jnp 'reflect' excludes the edge sample: gfedcb|abcdefgh|gfedcba = cv2 REFLECT_101.
  p = jnp.pad(x, lead + [(1, 1), (1, 1)], mode="reflect")
  height, width = x.shape[-2:]

  def at(dy, dx):
    return p[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]

  gx = (at(-1, 1) - at(-1, -1)) + 2 * (at(0, 1) - at(0, -1)) + (at(1, 1) - at(1, -1))
  gy = (at(1, -1) - at(-1, -1)) + 2 * (at(1, 0) - at(-1, 0)) + (at(1, 1) - at(-1, 1))
  return (gx != 0) | (gy != 0)


def dilate_square(mask: jax.Array, size: int) -> jax.Array:
  """cv2.dilate(mask, ones((size, size))) with the default anchor and border (border ignored)."""
  if size <= 1:
    return mask
  anchor = size // 2  # cv2's default anchor (-1, -1) is the kernel centre, floor for even sizes.
  offsets = range(-anchor, size - anchor)
  # Separable: a square max-filter is a row max-filter followed by a column max-filter.
  # Each pass reads its input at `size` offsets: materialise the inputs so XLA on CPU does not
  # recompute them per offset (see `fusion`).
  mask = fusion.materialize(mask)
  rows = fusion.materialize(window_reduce(mask, [(0, d) for d in offsets], "max", False))
  return window_reduce(rows, [(d, 0) for d in offsets], "max", False)


def edge_band(raw: jax.Array, edge_size: int = 3) -> jax.Array:
  """The original's binarised edge band of a raw label / prediction map.

  `evaluation/edge_generator.py` + `boundary.py` (`lt255`): Sobel of `uint8(map)`, non-zero
  gradient, dilated with an edge_size x edge_size square, then the map value is kept inside the
  band and 255 written outside, and `value < 255` is the band. So a raw value >= 255 never counts
  as band.

  Args:
    raw: integer map [..., H, W] with the values as stored in the file.
    edge_size: side of the square dilation kernel (the original uses 3).

  Returns:
    bool band [..., H, W].
  """
  raw = jnp.asarray(raw).astype(jnp.int32)
  band = dilate_square(sobel_nonzero(raw), edge_size)
  return band & (raw < OUTSIDE_BAND)


def box_count(mask: jax.Array, radius_y: int, radius_x: int, outside: int) -> jax.Array:
  """Number of True pixels in the (2ry+1)x(2rx+1) window, counting outside pixels as `outside`.

  Uses prefix sums, so the cost does not grow with the window.
  """
  x = jnp.asarray(mask).astype(jnp.int32)
  lead = [(0, 0)] * (x.ndim - 2)
  height, width = x.shape[-2:]
  if radius_y:
    p = jnp.pad(x, lead + [(radius_y + 1, radius_y), (0, 0)], constant_values=outside)
    c = jnp.cumsum(p, axis=-2)
    x = c[..., 2 * radius_y + 1:, :] - c[..., :height, :]
  if radius_x:
    p = jnp.pad(x, lead + [(0, 0), (radius_x + 1, radius_x)],
                constant_values=outside * (2 * radius_y + 1))
    c = jnp.cumsum(p, axis=-1)
    x = c[..., 2 * radius_x + 1:] - c[..., :width]
  return x


def erode_square(mask: jax.Array, radius: int, border_value: bool) -> jax.Array:
  """Binary erosion with a (2r+1)^2 square; `border_value` is what lies outside the map.

  `radius` iterations of a 3x3 erosion equal one erosion with the (2r+1)^2 square.
  """
  if radius <= 0:
    return jnp.asarray(mask, bool)
  count = box_count(mask, radius, radius, int(border_value))
  return count == (2 * radius + 1) ** 2


def ellipse_offsets(radius: int) -> list[tuple[int, int]]:
  """Offsets of cv2.getStructuringElement(MORPH_ELLIPSE, (2r+1, 2r+1)) around its centre.

  OpenCV: row i has columns [c - dx, c + dx] with dx = cvRound(c * sqrt((r^2 - dy^2) / r^2)),
  dy = i - r, r = c = radius; cvRound rounds half to even.
  """
  out = []
  if radius == 0:
    return [(0, 0)]
  for i in range(2 * radius + 1):
    dy = i - radius
    dx = int(np.rint(radius * np.sqrt((radius * radius - dy * dy) / float(radius * radius))))
    lo = max(radius - dx, 0)
    hi = min(radius + dx + 1, 2 * radius + 1)
    out.extend((dy, j - radius) for j in range(lo, hi))
  return out


def ellipse_kernel(radius: int) -> np.ndarray:
  """uint8 (2r+1)^2 elliptic structuring element, equal to OpenCV's."""
  k = np.zeros((2 * radius + 1, 2 * radius + 1), np.uint8)
  for dy, dx in ellipse_offsets(radius):
    k[dy + radius, dx + radius] = 1
  return k


def window_reduce(x: jax.Array, offsets: Sequence[tuple[int, int]], op: str, fill) -> jax.Array:
  """max / min of x over a structuring element given by offsets; `fill` outside the map."""
  reduce = jnp.maximum if op == "max" else jnp.minimum
  height, width = x.shape[-2:]
  py = max(abs(dy) for dy, _ in offsets)
  px = max(abs(dx) for _, dx in offsets)
  # One padded copy read at every offset, rather than a padded copy per offset; materialised,
  # so XLA on CPU does not recompute x's producer for each offset (see `fusion`).
  padded = fusion.materialize(
      jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(py, py), (px, px)], constant_values=fill))
  out = None
  for dy, dx in offsets:
    s = padded[..., py + dy:py + dy + height, px + dx:px + dx + width]
    out = s if out is None else reduce(out, s)
  return out


def _window_extreme_1d(x: jax.Array, size: int, axis: int, reduce) -> jax.Array:
  """reduce(x[j - r], ..., x[j + r]) along `axis` (size = 2r + 1), by doubling windows.

  The map is edge-padded, so values whose window leaves the map are not meaningful; callers
  mask them. Cost: about log2(size) elementwise steps, whatever the window.
  """
  radius = size // 2
  n = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (radius, radius)
  m = jnp.pad(x, pad, mode="edge")
  span = 1  # m[p] = reduce over the `span` samples starting at p.
  m = fusion.materialize(m)
  while 2 * span <= size:
    length = m.shape[axis]
    # Each step materialised: fused, step k would re-read 2^k copies of the input.
    m = fusion.materialize(reduce(jax.lax.slice_in_dim(m, 0, length - span, axis=axis),
                                  jax.lax.slice_in_dim(m, span, length, axis=axis)))
    span *= 2
  return reduce(jax.lax.slice_in_dim(m, 0, n, axis=axis),
                jax.lax.slice_in_dim(m, size - span, size - span + n, axis=axis))


def uniform_square(x: jax.Array, radius: int) -> jax.Array:
  """True where the (2r+1)^2 window around a pixel lies inside the map and holds one value.

  For every value c, `(x == c) & uniform_square(x, r)` is the binary erosion of `x == c` by the
  (2r+1)^2 square with the outside counted as background, so one pass serves all classes.
  """
  size = 2 * radius + 1
  hi = x
  lo = x
  for axis in (x.ndim - 2, x.ndim - 1):
    hi = _window_extreme_1d(hi, size, axis, jnp.maximum)
    lo = _window_extreme_1d(lo, size, axis, jnp.minimum)
  height, width = x.shape[-2:]
  rows = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
  inside = ((rows >= radius) & (rows < height - radius) & (cols >= radius)
            & (cols < width - radius))
  return (hi == lo) & inside


def differs_from_neighbour(x: jax.Array) -> jax.Array:
  """True where some in-map 8-neighbour holds another value than the pixel.

  For every value c, `(x == c) & differs_from_neighbour(x)` is `x == c` minus its 3x3 erosion
  with the outside counted as foreground (the 1-px inner boundary, image border excluded).
  """
  height, width = x.shape[-2:]
  # Edge padding repeats in-map samples of the same window, so it never adds a difference.
  p = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
  out = None
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      if dy == 0 and dx == 0:
        continue
      d = p[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width] != x
      out = d if out is None else out | d
  return out


def histogram(codes: jax.Array, length: int) -> jax.Array:
  """Per-map counts of each code in [0, length), int32 [..., length]; other codes are skipped.

  Args:
    codes: integer array [..., H, W]; one code per pixel, negative = not counted.
    length: number of bins.

  One scatter-add over all pixels of the batch gives many per-class counts in a single pass
  (on CPU, XLA runs several sibling reductions over one map far slower than one scatter).
  """
  lead = codes.shape[:-2]
  num_maps = int(np.prod(lead)) if lead else 1
  # Computed in map layout first: fused into the scatter's [N, 1] index operand, the code's whole
  # producer runs one pixel at a time (no vector lanes along a unit minor axis), several times
  # slower on CPU (see `fusion`).
  codes = fusion.materialize(jnp.asarray(codes).astype(jnp.int32))
  codes = codes.reshape((num_maps, -1))
  # Each map gets one extra bin for the codes that are not counted, so every index is in
  # bounds and the scatter needs no bounds checks.
  stride = length + 1
  base = jnp.arange(num_maps, dtype=jnp.int32)[:, None] * stride
  index = base + jnp.where((codes >= 0) & (codes < length), codes, length)
  counts = jnp.zeros((num_maps * stride,), jnp.int32).at[index.reshape(-1)].add(
      1, mode="promise_in_bounds")
  return counts.reshape((num_maps, stride))[:, :length].reshape(lead + (length,))


def disk_offsets(radius: float) -> list[tuple[int, int]]:
  """Integer offsets with dy^2 + dx^2 <= radius^2 (Euclidean disk)."""
  r = int(np.floor(radius))
  return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
          if dy * dy + dx * dx <= radius * radius]
