"""Procedural aerial scenes with pixel labels, seeded and deterministic per example.

A scene is painted layer by layer at twice the output resolution (so thin roads, cars and
roof ridges anti-alias when averaged down), recording for every pixel the *material* that was
painted last: ground, lawns, water, sidewalks and parking lots, roads with markings, clutter,
cars, cast shadows (which darken but do not relabel, as in ISPRS and CHN6-CUG annotations),
buildings with shaded roof facets, then tree crowns that partly hide what lies under them.
Tasks map materials to their class taxonomy, so one painter serves both. Colours, textures,
sun direction, blur and sensor noise are drawn per scene. Only numpy and PIL are needed.

Example `i` of split `s` with seed `k` always draws from `np.random.default_rng([k, s, i])`,
so any example can be regenerated on its own, in any order, in any process.

`channels=4` adds a near-infrared band (RGB + NIR, the order of ISPRS Potsdam's RGBIR): each
material's NIR reflectance (vegetation bright, water dark: `_NIR_REFLECTANCE`) modulated by the
scene's shading, drawn after every RGB draw so the RGB bands are those of the 3-band example.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Materials: what was painted last at a pixel. Tasks map these to their classes.
GRASS, PAVED, ROAD, BUILDING, TREE, CAR, ROAD_CAR, CLUTTER, WATER, SOIL = range(10)
NUM_MATERIALS = 10

TASKS = ("binary_roads", "multiclass6")
SPLIT_IDS = {"train": 0, "test": 1}

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "binary_roads": ("background", "road"),
    "multiclass6": ("impervious_surfaces", "building", "low_vegetation", "tree", "car",
                    "clutter"),
}

# ISPRS Vaihingen/Potsdam colour code for multiclass6; black/white for road masks.
PALETTE: dict[str, np.ndarray] = {
    "binary_roads": np.array([[0, 0, 0], [255, 255, 255]], np.uint8),
    "multiclass6": np.array(
        [[255, 255, 255], [0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]],
        np.uint8),
}

# Cars on a carriageway count as road in road-extraction masks (CHN6-CUG labels the whole
# carriageway); water, bare soil and small objects are "clutter/background" in ISPRS.
_MATERIAL_TO_CLASS: dict[str, np.ndarray] = {
    #                       GRASS PAVED ROAD BLDG TREE CAR RCAR CLUT WATER SOIL
    "binary_roads": np.array([0, 0, 1, 0, 0, 0, 1, 0, 0, 0], np.uint8),
    "multiclass6": np.array([2, 0, 0, 1, 3, 4, 4, 5, 5, 5], np.uint8),
}

_SUPERSAMPLE = 2  # the 2×2 average and label vote in `_finish` assume 2


@dataclasses.dataclass(frozen=True)
class SceneStyle:
  """Scene composition knobs; lengths are fractions of the image side."""
  object_scale: float  # building/tree/car size multiplier: small = coarse ground sampling
  urban_prob: float  # paved ground with lawns, vs. grass and fields
  num_roads: tuple[int, int]  # inclusive range
  road_width: tuple[float, float]
  num_buildings: tuple[int, int]
  num_tree_clusters: tuple[int, int]
  water_prob: float
  cars_per_road: tuple[int, int]
  num_clutter: tuple[int, int]


# multiclass6 mimics ISPRS crops (~10 cm ground sampling: few large objects, visible cars);
# binary_roads mimics CHN6-CUG (~50 cm: many small buildings, narrow roads, tiny cars).
STYLES: dict[str, SceneStyle] = {
    "multiclass6": SceneStyle(
        object_scale=1.25, urban_prob=0.5, num_roads=(1, 2), road_width=(0.08, 0.13),
        num_buildings=(3, 8), num_tree_clusters=(3, 8), water_prob=0.1, cars_per_road=(1, 5),
        num_clutter=(1, 5)),
    "binary_roads": SceneStyle(
        object_scale=0.45, urban_prob=0.4, num_roads=(1, 4), road_width=(0.03, 0.065),
        num_buildings=(4, 22), num_tree_clusters=(3, 12), water_prob=0.2, cars_per_road=(0, 6),
        num_clutter=(0, 4)),
}


def check_task(task: str) -> None:
  """Raises ValueError naming `task` and the allowed tasks when it is unknown."""
  if task not in TASKS:
    raise ValueError(f"Unknown task {task!r}; allowed tasks: {', '.join(TASKS)}.")


def example_rng(seed: int, split: str | int, index: int) -> np.random.Generator:
  """The generator of example `index` of `split`: independent of build order."""
  split_id = SPLIT_IDS[split] if isinstance(split, str) else int(split)
  return np.random.default_rng([int(seed), split_id, int(index)])


CHANNELS = (3, 4)  # RGB, or RGB + NIR


def generate_example(task: str, image_size: int, seed: int, split: str | int,
                     index: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """Returns (`image` uint8 (S,S,channels), `label` uint8 (S,S) class indices) of one example.

  `channels=4` appends a NIR band; the RGB bands and the label are the 3-band example's.
  """
  check_task(task)
  if channels not in CHANNELS:
    raise ValueError(f"channels={channels!r}; allowed: 3 (RGB) or 4 (RGB + NIR)")
  image, material = render_scene(example_rng(seed, split, index), image_size, STYLES[task],
                                 nir=channels == 4)
  return image, materials_to_labels(material, task)


def materials_to_labels(material: np.ndarray, task: str) -> np.ndarray:
  """Maps a material map to `task` class indices."""
  check_task(task)
  return _MATERIAL_TO_CLASS[task][material]


def colorize(label: np.ndarray, task: str) -> np.ndarray:
  """Palette-coloured (…,3) uint8 rendering of a class-index map."""
  return PALETTE[task][np.asarray(label).reshape(np.shape(label)[:2])]


# ----------------------------------------------------------------------------------------------
# Geometry helpers (points are (x, y) = (column, row) in supersampled pixels).


@dataclasses.dataclass
class _Region:
  """A boolean mask over the crop `[ys, xs]` of the canvas."""
  ys: slice
  xs: slice
  mask: np.ndarray
  ids: np.ndarray | None = None  # with `_rasterize(ids=True)`: 1 + index of the top polygon

  def grid(self) -> tuple[np.ndarray, np.ndarray]:
    """Absolute pixel-centre coordinates (X (1,w), Y (h,1)) of the crop, for shading."""
    return (np.arange(self.xs.start, self.xs.stop, dtype=np.float32)[None, :],
            np.arange(self.ys.start, self.ys.stop, dtype=np.float32)[:, None])


def _rasterize(size: int, polygons=(), circles=(), lines=(), ids: bool = False
               ) -> _Region | None:
  """Rasterizes shapes into a crop-sized mask; drawing only the bounding box keeps it cheap.

  Args:
    size: canvas side.
    polygons: sequence of (N,2) vertex arrays.
    circles: sequence of (cx, cy, r).
    lines: sequence of ((N,2) polyline, width).
    ids: also return, per pixel, 1 + the index of the last polygon drawn there, so one call
      rasterizes many objects that are then coloured by table lookup (at most 255 polygons).
  """
  assert not ids or len(polygons) <= 255
  # Bounds in plain floats: numpy reductions over a handful of points cost more than drawing.
  x_lo = y_lo = np.inf
  x_hi = y_hi = -np.inf
  for pts, pad in [(p, 0.0) for p in polygons] + [(p, w / 2) for p, w in lines]:
    (ax, ay), (bx, by) = pts.min(0), pts.max(0)
    x_lo, y_lo = min(x_lo, ax - pad), min(y_lo, ay - pad)
    x_hi, y_hi = max(x_hi, bx + pad), max(y_hi, by + pad)
  for cx, cy, r in circles:
    x_lo, y_lo = min(x_lo, cx - r), min(y_lo, cy - r)
    x_hi, y_hi = max(x_hi, cx + r), max(y_hi, cy + r)
  if not np.isfinite(x_lo):
    return None
  x0, y0 = max(int(np.floor(x_lo)) - 1, 0), max(int(np.floor(y_lo)) - 1, 0)
  x1, y1 = min(int(np.ceil(x_hi)) + 2, size), min(int(np.ceil(y_hi)) + 2, size)
  if x0 >= x1 or y0 >= y1:
    return None
  img = Image.new("L", (x1 - x0, y1 - y0), 0)
  draw = ImageDraw.Draw(img)
  off = np.array([x0, y0], np.float64)
  for k, p in enumerate(polygons):
    draw.polygon((p - off).ravel().tolist(), fill=k + 1 if ids else 1)
  for cx, cy, r in circles:
    draw.ellipse([cx - r - x0, cy - r - y0, cx + r - x0, cy + r - y0], fill=1)
  for p, w in lines:
    draw.line((p - off).ravel().tolist(), fill=1, width=max(1, int(round(w))), joint="curve")
  crop = np.frombuffer(img.tobytes(), np.uint8).reshape(y1 - y0, x1 - x0)
  mask = crop > 0 if ids else crop.view(bool)
  if not mask.any():
    return None
  return _Region(slice(y0, y1), slice(x0, x1), mask, crop if ids else None)


_CORNER_SIGNS = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])


def _rect(center, half_len, half_wid, angle) -> np.ndarray:
  """Corners (4,2) of a rectangle whose long axis `half_len` points along `angle`."""
  cos, sin = np.cos(angle), np.sin(angle)
  axes = np.array([[half_len * cos, half_len * sin], [-half_wid * sin, half_wid * cos]])
  return np.asarray(center, np.float64) + _CORNER_SIGNS @ axes


def _convex_hull(points: np.ndarray) -> np.ndarray:
  """Monotone-chain convex hull (counter-clockwise) of (N,2) points."""
  pts = sorted(map(tuple, np.asarray(points, np.float64)))

  def cross(o, a, b):
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

  lower, upper = [], []
  for p in pts:
    while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
      lower.pop()
    lower.append(p)
  for p in reversed(pts):
    while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
      upper.pop()
    upper.append(p)
  return np.array(lower[:-1] + upper[:-1])


def _bezier(ctrl: np.ndarray, n: int) -> np.ndarray:
  """n points of the cubic Bezier curve with control points ctrl (4,2)."""
  t = np.linspace(0.0, 1.0, n)[:, None]
  return ((1 - t) ** 3 * ctrl[0] + 3 * (1 - t) ** 2 * t * ctrl[1] + 3 * (1 - t) * t ** 2 * ctrl[2]
          + t ** 3 * ctrl[3])


def _tangents(path: np.ndarray) -> np.ndarray:
  """Unit tangents (N,2) of a polyline."""
  d = np.gradient(path, axis=0)
  return d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-9)


def _blob(rng, center, radius, n=40, roughness=0.25) -> np.ndarray:
  """A smooth closed outline: a circle with a few random low harmonics on its radius."""
  theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
  r = np.ones(n)
  for k in range(2, 6):
    r += rng.uniform(0, roughness) / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
  r = radius * np.clip(r, 0.35, None)
  return np.asarray(center)[None, :] + np.stack([r * np.cos(theta), r * np.sin(theta)], 1)


def _fbm(rng, size: int, base_cells: int, octaves: int, persistence: float = 0.55) -> np.ndarray:
  """Multi-octave value noise (size,size) float32 with zero mean and unit std."""
  out = np.zeros((size, size), np.float32)
  amp = 1.0
  for o in range(octaves):
    cells = base_cells * 2 ** o
    if cells > size // 2:
      break
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    out += amp * np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC))
    amp *= persistence
  out -= out.mean()
  return out / (out.std() + 1e-6)


def _sign(rng) -> float:
  """±1 with equal odds (Generator.choice is ~10x slower for this)."""
  return 1.0 if rng.random() < 0.5 else -1.0


def _jitter(rng, rgb, amount=12.0) -> np.ndarray:
  return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, amount, 3), 0, 255).astype(np.float32)


def _grey(rng, level, spread=10.0, tint=3.0) -> np.ndarray:
  """A near-neutral grey: one brightness draw plus a faint per-channel tint."""
  v = level + rng.normal(0, spread) + rng.normal(0, tint, 3)
  return np.clip(v, 0, 255).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The painter.


class _Canvas:
  """Float RGB image, material map and occupancy at the supersampled resolution."""

  def __init__(self, rng: np.random.Generator, size: int, scale: float):
    self.rng = rng
    self.size = size
    self.scale = scale  # object size multiplier (SceneStyle.object_scale)
    # Channel-planar: numpy broadcasts over a trailing axis of 3 an order of magnitude slower.
    self.rgb = np.zeros((3, size, size), np.float32)
    self.material = np.zeros((size, size), np.uint8)
    self.occupied = np.zeros((size, size), bool)  # where buildings may not go
    # Shared texture fields; each material reads a different flip/transpose of them so their
    # patterns do not line up across material borders.
    self._lo = _fbm(rng, size, 3, 4)
    self._hi = _fbm(rng, size, max(4, size // 24), 3)
    self._grain = rng.standard_normal((size, size), dtype=np.float32)
    self.car_len = rng.uniform(0.045, 0.06) * size * scale  # one car model size per scene

  def _field(self, field: np.ndarray, variant: int) -> np.ndarray:
    """One of 8 flips/transposes of a texture field (views: no copy)."""
    if variant & 1:
      field = field.T
    if variant & 2:
      field = field[::-1]
    if variant & 4:
      field = field[:, ::-1]
    return field

  def texture(self, region: _Region | None, rgb, variant: int, lo=0.08, hi=0.05, grain=4.0,
              rgb2=None, mix=1.5) -> np.ndarray | None:
    """Textured colour (3,h,w) over the crop of `region`: luminance noise, two-colour mix.

    Returns None for an empty region (a shape entirely off the canvas); `paint` skips it.
    """
    if region is None:
      return None
    ys, xs = region.ys, region.xs
    lo_f = self._field(self._lo, variant)[ys, xs]
    hi_f = self._field(self._hi, variant + 3)[ys, xs]
    g = self._field(self._grain, variant + 5)[ys, xs]
    base = np.asarray(rgb, np.float32)
    if base.ndim == 1:  # else already (3,h,w): per-object colours looked up by id
      base = base[:, None, None]
    if rgb2 is not None:
      t = 1.0 / (1.0 + np.exp(-mix * self._field(self._lo, variant + 1)[ys, xs]))
      base = base + t[None] * (np.asarray(rgb2, np.float32)[:, None, None] - base)
    lum = 1.0 + lo * lo_f + hi * hi_f
    return base * lum[None] + grain * g[None]

  def paint(self, region: _Region | None, colour, material: int | None = None,
            occupy: bool = False) -> None:
    """Writes `colour` ((3,) or crop-shaped) and `material` where the region's mask is set."""
    if region is None:
      return
    m = region.mask
    colour = np.asarray(colour, np.float32)
    if colour.ndim == 1:
      colour = colour[:, None, None]
    np.copyto(self.rgb[:, region.ys, region.xs], colour, where=m[None])
    if material is not None:  # a scalar or a crop-shaped array
      np.copyto(self.material[region.ys, region.xs], np.asarray(material, np.uint8), where=m)
    if occupy:
      self.occupied[region.ys, region.xs] |= m

  def shade(self, region: _Region | None, factor) -> None:
    """Multiplies the colour by `factor` (scalar or crop-shaped): shadows keep their label."""
    if region is None:
      return
    crop = self.rgb[:, region.ys, region.xs]
    np.multiply(crop, np.float32(factor), out=crop, where=region.mask[None])

  def free_fraction(self, region: _Region | None) -> float:
    """Fraction of the region not yet occupied (0 for an empty region)."""
    if region is None:
      return 0.0
    return 1.0 - self.occupied[region.ys, region.xs][region.mask].mean()


@dataclasses.dataclass
class _Road:
  """A carriageway: centre line, per-vertex width, sidewalks."""
  path: np.ndarray  # (N,2) centre line
  width: np.ndarray  # (N,) carriageway width
  sidewalk: float  # sidewalk width on each side (0: none)

  def __post_init__(self):
    self.tangent = _tangents(self.path)
    self.normal = self.tangent @ np.array([[0.0, 1.0], [-1.0, 0.0]])  # tangent turned +90°


def render_scene(rng: np.random.Generator, image_size: int, style: SceneStyle,
                 nir: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Paints one scene; returns (image uint8 (S,S,3), or (S,S,4) with `nir`, material uint8
  (S,S))."""
  size = image_size * _SUPERSAMPLE
  cv = _Canvas(rng, size, style.object_scale)
  ang = rng.uniform(0, 2 * np.pi)
  sun = np.array([np.cos(ang), np.sin(ang)])  # direction shadows are cast in
  shadow_len = rng.uniform(0.5, 1.3)  # shadow length per unit of object height
  shadow_dark = rng.uniform(0.42, 0.6)
  urban = rng.random() < style.urban_prob

  _paint_ground(cv, urban)
  if rng.random() < style.water_prob:
    _paint_water(cv)
  roads = _paint_roads(cv, style, urban)
  stalls = _paint_parking_lots(cv, roads, urban)
  _paint_clutter(cv, style, sun, shadow_len, shadow_dark)
  _paint_cars(cv, roads, stalls, style, sun, shadow_dark)
  _paint_buildings(cv, roads, style, sun, shadow_len, shadow_dark)
  _paint_trees(cv, roads, style, sun, shadow_len, shadow_dark)
  image, material = _finish(cv, image_size)
  if nir:
    image = np.concatenate([image, _near_infrared(cv, image, material)[..., None]], axis=-1)
  return image, material


def _paint_ground(cv: _Canvas, urban: bool) -> None:
  rng, s = cv.rng, cv.size
  full = _Region(slice(0, s), slice(0, s), np.ones((s, s), bool))
  grass = _jitter(rng, (78, 104, 52), 10)
  dry = _jitter(rng, (132, 128, 86), 12)
  if urban:
    concrete = _grey(rng, 150, 14) + np.array([2, 0, -4], np.float32)
    cv.paint(full, cv.texture(full, concrete, 0, lo=0.035, hi=0.05, grain=5.0), PAVED)
    for _ in range(rng.integers(1, 5)):  # lawns and gardens
      c = rng.uniform(0, s, 2)
      if rng.random() < 0.5:
        poly = _blob(rng, c, rng.uniform(0.1, 0.3) * s)
      else:
        poly = _rect(c, rng.uniform(0.08, 0.3) * s, rng.uniform(0.06, 0.2) * s,
                     rng.uniform(0, np.pi))
      reg = _rasterize(s, polygons=[poly])
      cv.paint(reg, cv.texture(reg, grass, 1, lo=0.1, hi=0.07, rgb2=dry), GRASS)
  else:
    cv.paint(full, cv.texture(full, grass, 1, lo=0.08, hi=0.07, rgb2=dry, mix=1.0), GRASS)
    for _ in range(rng.integers(0, 4)):  # fields with ploughing or mowing stripes
      c = rng.uniform(0, s, 2)
      a = rng.uniform(0, np.pi)
      reg = _rasterize(s, polygons=[_rect(c, rng.uniform(0.15, 0.45) * s,
                                          rng.uniform(0.1, 0.3) * s, a)])
      if reg is None:
        continue
      crop_rgb = _jitter(rng, [(96, 122, 60), (150, 140, 90), (110, 96, 70)][rng.integers(3)], 10)
      col = cv.texture(reg, crop_rgb, 2, lo=0.08, hi=0.06)
      x, y = reg.grid()
      period = rng.uniform(3.0, 7.0) * _SUPERSAMPLE
      stripes = np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / period)
      cv.paint(reg, col * (1 + 0.07 * stripes)[None], GRASS)
    for _ in range(rng.integers(0, 3)):  # bare soil
      reg = _rasterize(s, polygons=[_blob(rng, rng.uniform(0, s, 2), rng.uniform(0.04, 0.12) * s)])
      cv.paint(reg, cv.texture(reg, _jitter(rng, (135, 112, 85), 10), 3, lo=0.1, hi=0.08), SOIL)


def _paint_water(cv: _Canvas) -> None:
  rng, s = cv.rng, cv.size
  deep = _jitter(rng, (38, 62, 72), 8)
  shallow = _jitter(rng, (62, 88, 86), 8)
  if rng.random() < 0.5:  # lake
    reg = _rasterize(s, polygons=[_blob(rng, rng.uniform(0, s, 2), rng.uniform(0.12, 0.3) * s,
                                        n=48, roughness=0.3)])
  else:  # river: a wide smooth curve across the image
    path = _bezier(_crossing_curve(rng, s, bend=0.2), 48)
    width = rng.uniform(0.08, 0.18) * s * (1 + 0.2 * np.sin(np.linspace(0, rng.uniform(2, 6), 48)))
    reg = _variable_line(path, width, s)  # PIL's wide lines leave specks at the joints
  if reg is not None:
    col = cv.texture(reg, deep, 4, lo=0.05, hi=0.02, grain=1.5, rgb2=shallow, mix=1.0)
    cv.paint(reg, col, WATER, occupy=True)


def _crossing_curve(rng, s, bend: float, start=None) -> np.ndarray:
  """Bezier control points of a curve between two image sides, extending past the border."""
  sides = rng.choice(4, 2, replace=False)

  def on_side(side):
    t = rng.uniform(0.1, 0.9) * s
    return np.array([[t, -0.1 * s], [1.1 * s, t], [t, 1.1 * s], [-0.1 * s, t]][side])

  p0 = on_side(sides[0]) if start is None else np.asarray(start, np.float64)
  p3 = on_side(sides[1])
  if np.linalg.norm(p3 - p0) < 0.4 * s:
    p3 = np.array([s, s], np.float64) - p0  # mirror through the centre: long enough to cross
  v = p3 - p0
  n = np.array([-v[1], v[0]])
  p1 = p0 + v / 3 + n * rng.normal(0, bend)
  p2 = p0 + 2 * v / 3 + n * rng.normal(0, bend)
  return np.stack([p0, p1, p2, p3])


def _variable_line(path: np.ndarray, width: np.ndarray, size: int) -> _Region | None:
  """Polyline whose width varies per vertex: its outline polygon plus round ends."""
  normal = _tangents(path) @ np.array([[0.0, 1.0], [-1.0, 0.0]])
  half = (width / 2)[:, None]
  outline = np.concatenate([path + normal * half, (path - normal * half)[::-1]])
  ends = [(path[0][0], path[0][1], width[0] / 2), (path[-1][0], path[-1][1], width[-1] / 2)]
  return _rasterize(size, polygons=[outline], circles=ends)


def _dashes(path: np.ndarray, on: float, off: float, phase: float) -> list[np.ndarray]:
  """Splits a polyline into dash polylines of arc length `on` separated by `off`."""
  seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
  arc = np.concatenate([[0.0], np.cumsum(seg)]) + phase
  keep = (arc % (on + off)) < on
  dashes, cur = [], []
  for p, k in zip(path, keep):
    if k:
      cur.append(p)
    elif cur:
      if len(cur) > 1:
        dashes.append(np.array(cur))
      cur = []
  if len(cur) > 1:
    dashes.append(np.array(cur))
  return dashes


def _paint_roads(cv: _Canvas, style: SceneStyle, urban: bool) -> list[_Road]:
  rng, s = cv.rng, cv.size
  roads = []
  for _ in range(rng.integers(style.num_roads[0], style.num_roads[1] + 1)):
    start = None
    if roads and rng.random() < 0.5:  # T-junction on an earlier road
      prev = roads[rng.integers(len(roads))].path
      start = prev[rng.integers(len(prev) // 4, 3 * len(prev) // 4)]
    bend = 0.03 if rng.random() < 0.5 else 0.18  # straight streets and winding lanes
    path = _bezier(_crossing_curve(rng, s, bend, start), 64)
    w0 = rng.uniform(*style.road_width) * s
    t = np.linspace(0, 1, len(path))
    width = w0 * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * t + rng.uniform(0, 6)))
    sidewalk = rng.uniform(0.15, 0.35) * w0 if rng.random() < (0.8 if urban else 0.2) else 0.0
    roads.append(_Road(path, width, sidewalk))

  sidewalk_rgb = _grey(rng, 172, 10) + np.array([2, 0, -3], np.float32)
  for r in roads:  # all sidewalks before any carriageway, so junctions stay open
    if r.sidewalk > 0:
      reg = _variable_line(r.path, r.width + 2 * r.sidewalk, s)
      cv.paint(reg, cv.texture(reg, sidewalk_rgb, 5, lo=0.05, hi=0.05, grain=5.0), PAVED,
               occupy=True)
  for r in roads:
    asphalt = _grey(rng, rng.uniform(72, 118), 0, 2) + np.array([0, 0, 3], np.float32)
    reg = _variable_line(r.path, r.width, s)
    cv.paint(reg, cv.texture(reg, asphalt, 6, lo=0.06, hi=0.06, grain=5.0), ROAD, occupy=True)
    # Occupy a margin beyond the carriageway so buildings keep off the kerb.
    margin = _variable_line(r.path, r.width + 2 * r.sidewalk + 0.03 * s, s)
    if margin is not None:
      cv.occupied[margin.ys, margin.xs] |= margin.mask
  for r in roads:
    normal = r.normal
    w_mean = float(r.width.mean())
    if rng.random() < 0.7:  # tyre wear: darker tracks along both lanes
      tracks = [(r.path + normal * (off * r.width)[:, None], 0.06 * w_mean)
                for off in (-0.3, -0.15, 0.15, 0.3)]
      cv.shade(_rasterize(s, lines=tracks), 0.93)
    line_w = max(1.0, 0.07 * w_mean)
    paint_rgb = _jitter(rng, (225, 222, 210) if rng.random() < 0.8 else (215, 185, 70), 8)
    if w_mean > 5 and rng.random() < 0.75:  # dashed centre line
      dash = rng.uniform(0.3, 0.6) * w_mean
      dashes = _dashes(r.path, dash, dash * rng.uniform(0.8, 1.5), rng.uniform(0, dash))
      cv.paint(_rasterize(s, lines=[(d, line_w) for d in dashes]), paint_rgb)
    if w_mean > 5 and rng.random() < 0.4:  # solid edge lines
      edges = [(r.path + normal * (side * 0.4 * r.width)[:, None], line_w) for side in (-1, 1)]
      cv.paint(_rasterize(s, lines=edges), paint_rgb)
  return roads


def _paint_parking_lots(cv: _Canvas, roads: list[_Road], urban: bool) -> list[tuple]:
  """Paved lots beside roads with marked stalls; returns the stalls as (centre, angle)."""
  rng, s = cv.rng, cv.size
  stalls = []
  for _ in range(rng.integers(0, 3 if urban else 2)):
    r = roads[rng.integers(len(roads))]
    i = int(rng.integers(8, len(r.path) - 8))
    tangent = r.tangent[i]
    normal = r.normal[i] * _sign(rng)
    angle = np.arctan2(tangent[1], tangent[0])
    half_len = rng.uniform(1.5, 3.5) * cv.car_len
    half_dep = rng.uniform(1.1, 1.3) * cv.car_len  # two rows of cars parked nose to nose
    gap = r.width[i] / 2 + r.sidewalk + 0.02 * s
    centre = r.path[i] + normal * (gap + half_dep)
    lot = _rasterize(s, polygons=[_rect(centre, half_len, half_dep, angle)])
    if lot is None or cv.free_fraction(lot) < 0.97:
      continue
    drive = _rasterize(s, polygons=[_rect(r.path[i] + normal * gap / 2, gap / 2 + 2,
                                          0.5 * cv.car_len, np.arctan2(normal[1], normal[0]))])
    if drive is not None:  # driveway up to, but not over, the carriageway
      drive.mask = drive.mask & (cv.material[drive.ys, drive.xs] != ROAD)
      cv.paint(drive, cv.texture(drive, _grey(rng, 110, 8), 6), PAVED, occupy=True)
    surface = _grey(rng, 105 if rng.random() < 0.6 else 158, 10)
    cv.paint(lot, cv.texture(lot, surface, 7, lo=0.05, hi=0.05), PAVED, occupy=True)
    e1 = np.array([np.cos(angle), np.sin(angle)])
    stall_w = cv.car_len * rng.uniform(0.5, 0.6)
    n_stalls = int(2 * half_len / stall_w)
    line_rgb = _jitter(rng, (215, 215, 210), 6)
    marks = []
    for k in range(n_stalls + 1):
      x = -half_len + k * stall_w
      for row in (-1, 1):
        a = centre + e1 * x + normal * row * half_dep
        b = centre + e1 * x + normal * row * 0.1 * half_dep
        marks.append((np.stack([a, b]), max(1.0, 0.05 * cv.car_len)))
        if k < n_stalls:
          stalls.append((centre + e1 * (x + stall_w / 2) + normal * row * 0.55 * half_dep,
                         np.arctan2(normal[1], normal[0])))
    cv.paint(_rasterize(s, lines=marks), line_rgb)
  return stalls


def _shadow_polygon(poly: np.ndarray, sun: np.ndarray, length: float) -> np.ndarray:
  """Cast shadow of a vertical prism over `poly`: hull of its base and its shifted top."""
  return _convex_hull(np.concatenate([poly, poly + sun * length]))


_CAR_COLOURS = np.array([(225, 225, 228), (30, 30, 34), (165, 168, 172), (150, 35, 35),
                         (40, 60, 130), (90, 92, 96), (200, 190, 170)], np.float32)


def _paint_cars(cv: _Canvas, roads: list[_Road], stalls: list[tuple], style: SceneStyle,
                sun, shadow_dark) -> None:
  """Cars in lanes (aligned with traffic) and in parking stalls, all drawn in three calls."""
  rng, s = cv.rng, cv.size
  cars = []  # (centre, angle, material)

  def free(c):
    inside = -0.02 * s < c[0] < 1.02 * s and -0.02 * s < c[1] < 1.02 * s
    return inside and all(np.linalg.norm(c - o[0]) > 1.3 * cv.car_len for o in cars)

  for r in roads:
    for _ in range(rng.integers(style.cars_per_road[0], style.cars_per_road[1] + 1)):
      i = int(rng.integers(len(r.path)))
      side = _sign(rng)  # drive on the right: lane and heading go together
      c = r.path[i] + r.normal[i] * side * 0.25 * r.width[i]
      if free(c):
        angle = np.arctan2(r.tangent[i, 1], r.tangent[i, 0]) + (np.pi if side < 0 else 0.0)
        cars.append((c, angle + rng.normal(0, 0.03), ROAD_CAR))
  for c, angle in stalls:
    if rng.random() < 0.6 and free(c):
      cars.append((c, angle + (np.pi if rng.random() < 0.5 else 0.0) + rng.normal(0, 0.04), CAR))
  cars = cars[:255]
  if not cars:
    return
  half_l, half_w = cv.car_len / 2, cv.car_len * 0.22
  bodies, glass = [], []
  for c, angle, _ in cars:
    e1 = np.array([np.cos(angle), np.sin(angle)])
    bodies.append(_rect(c, half_l, half_w, angle))
    glass += [_rect(c + e1 * half_l * 0.4, half_l * 0.14, half_w * 0.85, angle),  # windscreen
              _rect(c - e1 * half_l * 0.62, half_l * 0.09, half_w * 0.8, angle)]  # rear window
  cv.shade(_rasterize(s, polygons=[_shadow_polygon(b, sun, 0.3 * cv.car_len) for b in bodies]),
           shadow_dark + 0.1)
  reg = _rasterize(s, polygons=bodies, ids=True)
  if reg is None:
    return
  colours = np.clip(_CAR_COLOURS[rng.integers(len(_CAR_COLOURS), size=len(cars))]
                    + rng.normal(0, 8, (len(cars), 3)), 0, 255).astype(np.float32)
  colours = np.concatenate([np.zeros((1, 3), np.float32), colours])  # id 0: no car
  materials = np.array([0] + [m for _, _, m in cars], np.uint8)
  base = colours[reg.ids].transpose(2, 0, 1)
  cv.paint(reg, cv.texture(reg, base, 2, lo=0.0, hi=0.03, grain=2.0), materials[reg.ids])
  win = _rasterize(s, polygons=glass)
  if win is not None:  # dark glass, keeping a little of the body colour
    cv.shade(win, 0.3)


def _paint_clutter(cv: _Canvas, style: SceneStyle, sun, shadow_len, shadow_dark) -> None:
  """Small odd objects (containers, tanks, sheds, heaps): the ISPRS clutter class."""
  rng, s, sc = cv.rng, cv.size, cv.scale
  palette = [(60, 90, 150), (165, 60, 50), (205, 120, 40), (215, 215, 210), (55, 55, 58),
             (120, 100, 80), (90, 130, 110)]
  for _ in range(rng.integers(style.num_clutter[0], style.num_clutter[1] + 1)):
    c = rng.uniform(0.03, 0.97, 2) * s
    if cv.material[int(c[1]), int(c[0])] in (ROAD, WATER):
      continue
    size = rng.uniform(0.012, 0.035) * s * sc
    if rng.random() < 0.6:
      poly = _rect(c, size * rng.uniform(1.0, 2.5), size, rng.uniform(0, np.pi))
    else:
      poly = _blob(rng, c, size, n=16, roughness=0.2)
    cv.shade(_rasterize(s, polygons=[_shadow_polygon(poly, sun, shadow_len * size)]),
             shadow_dark + 0.1)
    reg = _rasterize(s, polygons=[poly])
    col = _jitter(rng, palette[rng.integers(len(palette))], 12)
    cv.paint(reg, cv.texture(reg, col, 3, lo=0.04, hi=0.05, grain=3.0), CLUTTER, occupy=True)


def _roof_facets(part, kind: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """(polygon, outward horizontal normal) of each roof facet of a rectangular part."""
  c, hl, hw, angle = part
  e1 = np.array([np.cos(angle), np.sin(angle)])
  e2 = np.array([-e1[1], e1[0]])
  c = np.asarray(c)
  a, b = c + hl * e1, c - hl * e1  # ends of the long axis
  if kind == "gable":
    return [(np.stack([a + hw * e2, b + hw * e2, b, a]), e2),
            (np.stack([a - hw * e2, b - hw * e2, b, a]), -e2)]
  r1, r0 = c + (hl - hw) * e1, c - (hl - hw) * e1  # hip ridge
  return [(np.stack([a + hw * e2, b + hw * e2, r0, r1]), e2),
          (np.stack([a - hw * e2, b - hw * e2, r0, r1]), -e2),
          (np.stack([a + hw * e2, a - hw * e2, r1]), e1),
          (np.stack([b + hw * e2, b - hw * e2, r0]), -e1)]


def _footprint_is_free(cv: _Canvas, parts, gap: float) -> bool:
  """Samples occupancy on a grid over each gap-enlarged part: far cheaper than rasterizing.

  The grid pitch (≤ 0.02 of the side) is finer than the narrowest occupied band (a road
  plus its margin), so a footprint cannot straddle a road between samples.
  """
  s = cv.size
  for c, hl, hw, angle in parts:
    e1 = np.array([np.cos(angle), np.sin(angle)])
    e2 = np.array([-e1[1], e1[0]])
    u = np.linspace(-1, 1, max(3, int(np.ceil(2 * (hl + gap) / (0.02 * s))) + 1))
    v = np.linspace(-1, 1, max(3, int(np.ceil(2 * (hw + gap) / (0.02 * s))) + 1))
    pts = (np.asarray(c) + (u[:, None, None] * (hl + gap)) * e1
           + (v[None, :, None] * (hw + gap)) * e2).reshape(-1, 2)
    xi = np.clip(pts[:, 0].astype(int), 0, s - 1)
    yi = np.clip(pts[:, 1].astype(int), 0, s - 1)
    if cv.occupied[yi, xi].any():
      return False
  return True


_ROOF_COLOURS = [(165, 82, 62), (128, 70, 58), (92, 92, 102), (172, 170, 166), (205, 203, 196),
                 (64, 64, 70), (120, 132, 120), (150, 120, 95)]


def _paint_buildings(cv: _Canvas, roads: list[_Road], style: SceneStyle, sun, shadow_len,
                     shadow_dark) -> None:
  """Rectangular and L-shaped buildings, mostly facing a street, with cast shadows."""
  rng, s, sc = cv.rng, cv.size, cv.scale
  target = rng.integers(style.num_buildings[0], style.num_buildings[1] + 1)
  buildings = []  # (parts, height)
  for _ in range(target * 4):
    if len(buildings) >= target:
      break
    hl = rng.uniform(0.06, 0.15) * s * sc
    hw = hl * rng.uniform(0.45, 0.9)
    if roads and rng.random() < 0.75:  # face a street, as most buildings do
      r = roads[rng.integers(len(roads))]
      i = int(rng.integers(len(r.path)))
      angle = np.arctan2(r.tangent[i, 1], r.tangent[i, 0])
      setback = r.width[i] / 2 + r.sidewalk + rng.uniform(0.02, 0.08) * s + hw
      c = r.path[i] + r.normal[i] * _sign(rng) * setback
    else:
      c = rng.uniform(0, s, 2)
      angle = rng.uniform(0, np.pi)
    if not (-0.05 * s < c[0] < 1.05 * s and -0.05 * s < c[1] < 1.05 * s):
      continue
    if cv.occupied[int(np.clip(c[1], 0, s - 1)), int(np.clip(c[0], 0, s - 1))]:
      continue  # cheap early rejection: the centre alone is already taken
    parts = [(c, hl, hw, angle)]
    if rng.random() < 0.35:  # L-shape: a perpendicular wing at one end
      e1 = np.array([np.cos(angle), np.sin(angle)])
      e2 = np.array([-e1[1], e1[0]])
      bw = hw * rng.uniform(0.5, 0.8)
      wl = hw * rng.uniform(0.5, 1.2)
      wc = c + e1 * _sign(rng) * (hl - bw) + e2 * _sign(rng) * (hw + wl) / 2
      half = (hw + wl) / 2
      parts.append((wc, half, bw, angle + np.pi / 2) if half >= bw else (wc, bw, half, angle))
    if not _footprint_is_free(cv, parts, 0.015 * s):
      continue
    foot = _rasterize(s, polygons=[_rect(*p) for p in parts])
    if foot is None:
      continue
    cv.occupied[foot.ys, foot.xs] |= foot.mask
    buildings.append((parts, rng.uniform(0.05, 0.12) * s * sc))
  if not buildings:
    return
  # One pass for all shadows: where two overlap the ground is not darkened twice.
  cv.shade(_rasterize(s, polygons=[_shadow_polygon(_rect(*p), sun, shadow_len * h)
                                   for parts, h in buildings for p in parts]), shadow_dark)
  light = -sun  # the lit side faces away from the shadows
  for parts, _ in buildings:
    rgb = _jitter(rng, _ROOF_COLOURS[rng.integers(len(_ROOF_COLOURS))], 12)
    big = parts[0][1] > 0.11 * s * sc
    u = rng.random()  # big buildings mostly have flat roofs, houses pitched ones
    kind = ("flat" if u < 0.7 else "gable") if big else (
        "flat" if u < 0.25 else "gable" if u < 0.7 else "hip")
    if kind == "hip" and len(parts) > 1:
      kind = "gable"
    tiled = kind != "flat" and rng.random() < 0.7
    for p in parts:
      _paint_roof(cv, p, kind, tiled, rgb, light, sun)


def _paint_roof(cv: _Canvas, part, kind: str, tiled: bool, rgb, light, sun) -> None:
  """One rectangular roof part: facets shaded by their slope's facing, in one raster call."""
  rng, s = cv.rng, cv.size
  c, hl, hw, angle = part
  if kind == "flat":
    inset = min(0.12 * hw, 0.012 * s)
    polys = [_rect(*part), _rect(c, hl - inset, hw - inset, angle)]  # parapet, then roof deck
    factors = np.array([1.0, 1.12, 1.0], np.float32)
  else:
    facets = _roof_facets(part, kind)
    polys = [poly for poly, _ in facets]
    normals = np.concatenate([np.zeros((1, 2)), np.stack([n for _, n in facets])])
    factors = (1.0 + 0.3 * normals @ light).astype(np.float32)
  reg = _rasterize(s, polygons=polys, ids=True)
  if reg is None:
    return
  x, y = reg.grid()
  f = factors[reg.ids]
  if kind == "flat":  # a gentle brightness gradient toward the sun
    f = f * (1 + 0.05 * ((x - c[0]) * light[0] + (y - c[1]) * light[1]) / hl)
  elif tiled:  # tile rows run parallel to the ridge
    nx, ny = normals[reg.ids, 0], normals[reg.ids, 1]
    f = f * (1 + 0.06 * np.sin(2 * np.pi * (x * nx + y * ny) / max(2.0, 0.012 * s)))
  col = cv.texture(reg, rgb, 4, lo=0.04, hi=0.05, grain=3.0)
  cv.paint(reg, col * f[None], BUILDING, occupy=True)
  if kind == "gable":
    e1 = np.array([np.cos(angle), np.sin(angle)])
    ridge = np.stack([c + hl * e1, c - hl * e1])
    cv.paint(_rasterize(s, lines=[(ridge, max(1.0, 0.006 * s))]), rgb * 1.15)
  elif kind == "flat":  # rooftop units (air conditioning, skylights) with small shadows
    e1 = np.array([np.cos(angle), np.sin(angle)])
    e2 = np.array([-e1[1], e1[0]])
    units = []
    for _ in range(rng.integers(0, 4)):
      us = rng.uniform(0.1, 0.2) * hw
      uc = c + rng.uniform(-0.6, 0.6) * hl * e1 + rng.uniform(-0.5, 0.5) * hw * e2
      units.append((_rect(uc, us, us * rng.uniform(0.6, 1.0), angle), us))
    if units:
      cv.shade(_rasterize(s, polygons=[_shadow_polygon(u, sun, us) for u, us in units]), 0.7)
      cv.paint(_rasterize(s, polygons=[u for u, _ in units]), _grey(rng, 190, 10))


_TREE_COLOURS = np.array([(52, 80, 42), (62, 90, 48), (44, 66, 40), (72, 92, 52)], np.float32)


def _paint_trees(cv: _Canvas, roads: list[_Road], style: SceneStyle, sun, shadow_len,
                 shadow_dark) -> None:
  """Street-tree rows and clumps; all shadows, then all crowns, each in one raster call."""
  rng, s, sc = cv.rng, cv.size, cv.scale
  crowns = []  # (centre, radius)
  for _ in range(rng.integers(style.num_tree_clusters[0], style.num_tree_clusters[1] + 1)):
    r0 = rng.uniform(0.025, 0.05) * s * sc
    if roads and rng.random() < 0.4:  # a row of street trees along the kerb
      r = roads[rng.integers(len(roads))]
      side = _sign(rng)
      seg = np.linalg.norm(np.diff(r.path, axis=0), axis=1).mean()
      step = max(1, int(rng.uniform(2.2, 3.2) * r0 / seg))
      i0 = int(rng.integers(len(r.path)))
      for i in range(i0, min(len(r.path), i0 + step * int(rng.integers(2, 8))), step):
        off = r.width[i] / 2 + r.sidewalk + r0 * rng.uniform(0.2, 0.9)
        crowns.append((r.path[i] + r.normal[i] * side * off, r0 * rng.uniform(0.85, 1.15)))
    else:  # a clump of trees
      c = rng.uniform(0, s, 2)
      k = int(rng.integers(1, 10))
      for p in c + rng.normal(0, r0 * 0.9 * np.sqrt(k), (k, 2)):
        crowns.append((p, r0 * rng.uniform(0.7, 1.3)))
  # Trees do not grow on roofs, on carriageways or in water.
  keep = []
  for c, r in crowns:
    x, y = int(np.clip(c[0], 0, s - 1)), int(np.clip(c[1], 0, s - 1))
    if cv.material[y, x] not in (BUILDING, ROAD, ROAD_CAR, WATER):
      keep.append((c, r, _blob(rng, c, r, n=18, roughness=0.18)))
  keep = keep[:255]
  if not keep:
    return
  cv.shade(_rasterize(s, polygons=[o + sun * r * shadow_len * 1.2 for _, r, o in keep]),
           shadow_dark)
  reg = _rasterize(s, polygons=[o for _, _, o in keep], ids=True)
  if reg is None:
    return
  # Per-crown tables, looked up by the id of the crown on top at each pixel (row 0: none).
  centres = np.concatenate([np.zeros((1, 2)), np.stack([c for c, _, _ in keep])])
  radii = np.array([1.0] + [r for _, r, _ in keep])
  colours = np.clip(_TREE_COLOURS[rng.integers(len(_TREE_COLOURS), size=len(keep) + 1)]
                    + rng.normal(0, 6, (len(keep) + 1, 3)), 0, 255).astype(np.float32)
  x, y = reg.grid()
  dx = (x - centres[reg.ids, 0]) / radii[reg.ids]
  dy = (y - centres[reg.ids, 1]) / radii[reg.ids]
  lit = np.clip(dx * -sun[0] + dy * -sun[1], -1, 1)  # the sun-facing side of a crown is bright
  rim = np.minimum(dx * dx + dy * dy, 1.0)  # and its edge darker
  col = cv.texture(reg, colours[reg.ids].transpose(2, 0, 1), 5, lo=0.05, hi=0.14, grain=6.0)
  cv.paint(reg, col * ((1 + 0.3 * lit) * (1 - 0.2 * rim)).astype(np.float32)[None], TREE)


def _mode_downsample_2x2(material: np.ndarray) -> np.ndarray:
  """Most frequent value in each 2×2 block (a 2-2 tie keeps the top-left sample's value)."""
  a, b = material[0::2, 0::2], material[0::2, 1::2]
  c, d = material[1::2, 0::2], material[1::2, 1::2]
  # A matched `a` has ≥2 votes, so no other value can have more.
  a_wins = (a == b) | (a == c) | (a == d)
  other = np.where((b == c) | (b == d), b, np.where(c == d, c, a))
  return np.where(a_wins, a, other)


def _finish(cv: _Canvas, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Averages down, applies per-scene radiometry, sensor blur and noise."""
  rng, rgb = cv.rng, cv.rgb
  img = (rgb[:, 0::2, 0::2] + rgb[:, 0::2, 1::2] + rgb[:, 1::2, 0::2] + rgb[:, 1::2, 1::2])
  img = (0.25 * img).transpose(1, 2, 0)
  material = _mode_downsample_2x2(cv.material)
  gain = rng.normal(1.0, 0.025, 3) * rng.uniform(0.88, 1.12)
  img = img * gain + rng.uniform(0, 16)  # haze lifts the shadows
  img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
  img = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7))), np.float32)
  img = img + rng.normal(0, rng.uniform(1.0, 3.0), img.shape)
  return np.clip(np.round(img), 0, 255).astype(np.uint8), material.astype(np.uint8)


# Near-infrared reflectance per material, 0..255: vegetation reflects strongly beyond the red
# edge, water absorbs, built surfaces sit between. Plausible values in the spirit of spectral
# libraries, not measurements; what matters is that NIR carries what RGB shows poorly.
#                              GRASS PAVED ROAD BLDG TREE CAR RCAR CLUT WATER SOIL
_NIR_REFLECTANCE = np.array([200, 75, 55, 100, 215, 60, 60, 110, 12, 120], np.float32)


def _near_infrared(cv: _Canvas, image: np.ndarray, material: np.ndarray) -> np.ndarray:
  """NIR band (S,S) uint8 of a finished scene.

  Reflectance of the supersampled materials, averaged down like the RGB, times the scene's
  illumination: a pixel's RGB brightness relative to its material's mean brightness in this
  scene carries the cast shadows, roof facets and texture. Noise comes from the example's
  generator after all RGB draws, so asking for NIR leaves the RGB bands unchanged.
  """
  refl = _NIR_REFLECTANCE[cv.material]
  refl = 0.25 * (refl[0::2, 0::2] + refl[0::2, 1::2] + refl[1::2, 0::2] + refl[1::2, 1::2])
  lum = image.astype(np.float32).mean(axis=-1)
  counts = np.bincount(material.ravel(), minlength=NUM_MATERIALS)
  sums = np.bincount(material.ravel(), weights=lum.ravel(), minlength=NUM_MATERIALS)
  typical = (sums / np.maximum(counts, 1)).astype(np.float32)
  light = np.clip(lum / np.maximum(typical[material], 1.0), 0.2, 2.0) ** 0.8
  nir = refl * light + cv.rng.normal(0, 2.0, lum.shape)
  return np.clip(np.round(nir), 0, 255).astype(np.uint8)
