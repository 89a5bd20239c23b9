"""Sliding windows over a scene of any size, and the blending of per-window scores (pure NumPy).

A scene of H x W pixels is cut into square windows of the model's tile size T, `overlap` pixels
apart (stride T - overlap), row-major. On each axis the last window is aligned to the scene's
edge, so no pixel is dropped and every window lies inside the scene; a scene side shorter than T
is first padded (reflect) to T and the result cropped back.

Blending: every window's per-class scores (H', W', K) are weighted by a separable ramp and summed;
the blend is the weighted mean. On each axis a window's weight is 1 except across its overlap
with a neighbour, where it falls as a raised cosine (cos^2) while the neighbour's rises (sin^2)
over the same pixels, so in 1-D the two weights sum to 1 and the product in 2-D too; sampled at
pixel centres, the ramp is > 0 everywhere, so even a window's edge pixels count. A scene edge
(no neighbour) keeps weight 1, which makes a scene of one window come back bit for bit.

`Blender` keeps only the rows that windows still to come can touch (a band of T rows of the
padded width, plus their weights): rows are handed out as soon as the last window over them is
added. Memory: T x W_padded x (K + 1) float32 per scene, whatever its height.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Iterator

import numpy as np


def starts(length: int, tile: int, stride: int) -> list[int]:
  """Window offsets along one axis of `length` (>= tile: callers pad shorter sides first)."""
  if tile <= 0 or not 0 < stride <= tile:
    raise ValueError(f"window size {tile} and stride {stride}: need 0 < stride <= size")
  if length <= tile:
    return [0]
  n = math.ceil((length - tile) / stride) + 1
  return [min(i * stride, length - tile) for i in range(n)]


def default_overlap(tile: int) -> int:
  """A quarter of the tile: enough context at every window's border for the ramp to hide it."""
  return tile // 4


def check_overlap(overlap: int, tile: int) -> int:
  if not 0 <= overlap < tile:
    raise ValueError(f"--overlap={overlap}: must be in [0, {tile}), below the model's window "
                     f"size {tile} (config.data.image_size)")
  return overlap


def ramp(offsets: list[int], index: int, tile: int) -> np.ndarray:
  """(tile,) float64 weights of window `index` along an axis with windows at `offsets`."""
  w = np.ones(tile, np.float64)
  if index > 0:  # overlap with the previous window: rising over its first `lo` pixels
    lo = offsets[index - 1] + tile - offsets[index]
    if lo > 0:
      rise = np.sin(0.5 * np.pi * (np.arange(lo) + 0.5) / lo) ** 2
      w[:lo] = np.minimum(w[:lo], rise)
  if index < len(offsets) - 1:  # overlap with the next window: falling over its last `hi`
    hi = offsets[index] + tile - offsets[index + 1]
    if hi > 0:
      fall = np.cos(0.5 * np.pi * (np.arange(hi) + 0.5) / hi) ** 2
      w[tile - hi:] = np.minimum(w[tile - hi:], fall)
  return w


@dataclasses.dataclass(frozen=True)
class Window:
  index: int   # row-major position in the scene
  row: int     # window row (index into Tiling.ys)
  y: int       # top-left corner in the padded scene
  x: int


class Tiling:
  """The windows of one H x W scene for tile T and `overlap` (0 <= overlap < T)."""

  def __init__(self, height: int, width: int, tile: int, overlap: int):
    if height <= 0 or width <= 0:
      raise ValueError(f"scene of {width}x{height} (WxH) pixels: nothing to tile")
    if not 0 <= overlap < tile:
      raise ValueError(f"overlap {overlap} must be in [0, {tile}) (the window size {tile})")
    self.height, self.width, self.tile, self.overlap = height, width, tile, overlap
    self.padded_height, self.padded_width = max(height, tile), max(width, tile)
    self.ys = starts(self.padded_height, tile, tile - overlap)
    self.xs = starts(self.padded_width, tile, tile - overlap)
    self._wy = [ramp(self.ys, i, tile) for i in range(len(self.ys))]
    self._wx = [ramp(self.xs, j, tile) for j in range(len(self.xs))]

  def __len__(self) -> int:
    return len(self.ys) * len(self.xs)

  def windows(self) -> list[Window]:
    return [Window(i * len(self.xs) + j, i, y, x)
            for i, y in enumerate(self.ys) for j, x in enumerate(self.xs)]

  def weight(self, window: Window) -> np.ndarray:
    """(T, T) float32 blending weight of `window` (> 0 everywhere)."""
    j = window.index % len(self.xs)
    return np.outer(self._wy[window.row], self._wx[j]).astype(np.float32)

  def crop(self, scene: np.ndarray, window: Window) -> np.ndarray:
    """The (T, T, ...) window of a scene array of shape (H, W, ...), padding short sides."""
    return pad_to_tile(scene, self.tile)[window.y:window.y + self.tile,
                                         window.x:window.x + self.tile]

  def source_box(self, window: Window) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the part of the unpadded scene the window reads (then `pad_to_tile`)."""
    return (window.y, min(window.y + self.tile, self.height),
            window.x, min(window.x + self.tile, self.width))


def pad_to_tile(array: np.ndarray, tile: int) -> np.ndarray:
  """Pads the first two axes up to `tile` (reflect, bottom/right); longer sides are kept."""
  ph, pw = max(tile - array.shape[0], 0), max(tile - array.shape[1], 0)
  if not ph and not pw:
    return array
  pad = [(0, ph), (0, pw)] + [(0, 0)] * (array.ndim - 2)
  return np.pad(array, pad, mode="reflect")


class Blender:
  """Accumulates weighted per-window scores of one scene and hands out finished rows.

  `add(window, scores)` takes windows in row-major order (any batching); it returns the
  (y0, y1, blended) row bands that no later window touches: `blended` is (y1 - y0, W, K)
  float32, the weighted mean of the windows over those rows, cropped to the scene. After the
  last window every row has been returned.
  """

  def __init__(self, tiling: Tiling, channels: int):
    self.tiling, self.channels = tiling, channels
    t, wp = tiling.tile, tiling.padded_width
    self._acc = np.zeros((t, wp, channels), np.float32)
    self._wsum = np.zeros((t, wp), np.float32)
    self._top = 0          # padded-scene row of the band's first row
    self._row = 0          # window row being accumulated
    self._next = 0         # index of the next window expected
    self._done = 0         # rows of the scene already handed out

  def _advance(self, new_top: int) -> list[tuple[int, int, np.ndarray]]:
    """Hands out rows [top, new_top) and shifts the band down to start at `new_top`."""
    k = new_top - self._top
    out = self._emit(self._top, new_top)
    t = self.tiling.tile
    self._acc[:t - k], self._wsum[:t - k] = self._acc[k:], self._wsum[k:]
    self._acc[t - k:], self._wsum[t - k:] = 0.0, 0.0
    self._top = new_top
    return out

  def _emit(self, y0: int, y1: int) -> list[tuple[int, int, np.ndarray]]:
    y1 = min(y1, self.tiling.height)  # rows past the scene are reflect padding
    if y1 <= y0:
      return []
    a, b = y0 - self._top, y1 - self._top
    w = self._wsum[a:b, :self.tiling.width]
    blended = self._acc[a:b, :self.tiling.width] / w[..., None]
    self._done = y1
    return [(y0, y1, blended)]

  def add(self, window: Window, scores: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    if window.index != self._next:
      raise ValueError(f"window {window.index} added out of order (expected {self._next})")
    t = self.tiling.tile
    if scores.shape != (t, t, self.channels):
      raise ValueError(f"window scores of shape {scores.shape}; expected {(t, t, self.channels)}")
    out = []
    if window.row != self._row:  # the previous window row is complete above this one's top
      out += self._advance(window.y)
      self._row = window.row
    w = self.tiling.weight(window)
    a = window.y - self._top
    self._acc[a:a + t, window.x:window.x + t] += w[..., None] * scores
    self._wsum[a:a + t, window.x:window.x + t] += w
    self._next += 1
    if self._next == len(self.tiling):
      out += self._emit(self._top, self._top + t)
    return out


def blend(tiling: Tiling, scores: Iterator[np.ndarray] | list[np.ndarray], channels: int
          ) -> np.ndarray:
  """(H, W, K): the whole blended scene from per-window scores in row-major order (tests and
  small scenes; large ones stream `Blender`'s row bands)."""
  out = np.zeros((tiling.height, tiling.width, channels), np.float32)
  blender = Blender(tiling, channels)
  for window, s in zip(tiling.windows(), scores):
    for y0, y1, rows in blender.add(window, np.asarray(s, np.float32)):
      out[y0:y1] = rows
  return out


# ----- running a model over scenes -------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class Scene:
  """One scene to predict: its tiling, how to read a window's model inputs, and where the
  blended rows go."""
  tiling: Tiling
  read: Callable[[Window], dict[str, np.ndarray]]      # window -> {name: (T, T, ...) array}
  write: Callable[[int, int, np.ndarray], None]        # (y0, y1, blended (y1-y0, W, K) scores)
  finish: Callable[[], None] = lambda: None            # after its last rows
  key: int = 0                                         # the scene's seed (Stage II noise)


def run(scenes: Iterable[Scene],
        predict: Callable[[dict[str, np.ndarray], list[tuple[Scene, Window]]], np.ndarray],
        batch_size: int, channels: int, progress=None) -> int:
  """Runs `predict` over the windows of every scene in fixed-size batches (windows of several
  scenes share a batch; the last batch is zero-padded), blends each scene's window scores and
  streams its finished rows to `scene.write`. `predict(arrays, refs)` gets the stacked inputs
  and the (scene, window) of each valid row and returns (batch_size, T, T, K) scores.
  `scenes` may be a generator: a scene is read only when its windows come up. Returns the
  number of windows run."""
  blenders: dict[int, Blender] = {}
  inputs: list[dict[str, np.ndarray]] = []
  refs: list[tuple[Scene, Window]] = []
  count = 0

  def flush():
    arrays = {}
    for k in inputs[0]:
      a = np.stack([x[k] for x in inputs])
      if len(inputs) < batch_size:
        a = np.concatenate([a, np.zeros((batch_size - len(inputs),) + a.shape[1:], a.dtype)])
      arrays[k] = a
    scores = np.asarray(predict(arrays, list(refs)))
    for (scene, window), s in zip(refs, scores):
      blender = blenders.setdefault(id(scene), Blender(scene.tiling, channels))
      for y0, y1, rows in blender.add(window, s):
        scene.write(y0, y1, rows)
      if window.index == len(scene.tiling) - 1:
        del blenders[id(scene)]
        scene.finish()
    if progress is not None:
      progress.update(len(refs))
    inputs.clear()
    refs.clear()

  for scene in scenes:
    for window in scene.tiling.windows():
      inputs.append(scene.read(window))
      refs.append((scene, window))
      count += 1
      if len(inputs) == batch_size:
        flush()
  if inputs:
    flush()
  return count
