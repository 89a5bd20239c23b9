"""Split-level evaluation: per-batch sufficient statistics (jit) -> totals -> report.

One jitted function, `batch_statistics`, computes every per-image statistic of a batch of raw maps
(confusion matrix, WF band scores, boundary IoU / F counts, mBA, unmapped-pixel counts); the split's
numbers are sums of those, so the same function serves the CLI (`evaluate_dirs`), the Python API
(`evaluate_maps`) and the in-training clu metric (`idgbr_jax.metrics.clu`).

Maps of different sizes: they are grouped by shape and each group runs in fixed-size batches
(the last one padded with weight-0 copies), so one compiled program serves each shape.

Precision: `evaluate_maps` runs the computation under a scoped `jax.enable_x64(True)`, so the float
parts of WF / BF / mBA are float64 and integer counts are int64 sums on the host; the numbers agree
with the numpy/scipy/OpenCV original to ~1e-12. Inside training (no x64) the same code runs in
float32 (counts stay exact integers; WF agrees to ~1e-5).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from idgbr_jax import paths
from idgbr_jax.metrics import boundary
from idgbr_jax.metrics import boundary_iou
from idgbr_jax.metrics import fusion
from idgbr_jax.metrics import region
from idgbr_jax.metrics import repair
from idgbr_jax.metrics import wfmeasure

IMAGE_EXTS = (".png", ".tif", ".tiff")
BF_TOLERANCE = 2.0
DILATION_RATIO = 0.02

# Largest joint histogram (bins per image) built in one scatter; beyond it, one per statistic.
_MAX_JOINT_BINS = 1 << 16

# Per-image statistics summed over images (the order of keys fixes the report).
_SUM_KEYS = ("confusion", "wf_score", "wf_present", "biou_inter", "biou_union", "bf_score",
             "bf_counted", "mba", "mba_defined", "unmapped_label", "unmapped_pred")


def batch_statistics(pred_raw: jax.Array, label_raw: jax.Array, num_classes: int,
                     label_values: Optional[Tuple[int, ...]] = None, edge_size: int = 3,
                     bf_tolerance: float = BF_TOLERANCE,
                     dilation_ratio: float = DILATION_RATIO) -> Dict[str, jax.Array]:
  """Per-image sufficient statistics of a batch of raw maps (jit-able; config args static).

  Args:
    pred_raw, label_raw: integer maps [B, H, W] holding file values.
    num_classes, label_values: the value encoding (see `region.encode`).
    edge_size: WF band dilation.
    bf_tolerance: boundary F-score tolerance in pixels.
    dilation_ratio: boundary IoU band width as a fraction of the diagonal.

  Returns:
    dict of arrays with leading axis B: confusion [B,K,K], wf_score / wf_present [B,2],
    biou_inter / biou_union / bf_score / bf_counted [B,K], mba / mba_defined / unmapped_label /
    unmapped_pred [B].
  """
  label_values = None if label_values is None else tuple(int(v) for v in label_values)
  label, label_ok = region.encode(label_raw, num_classes, label_values)
  pred, pred_ok = region.encode(pred_raw, num_classes, label_values)
  valid = label_ok & pred_ok
  if num_classes <= 120:
    # Materialise the encoded maps once, as int8: otherwise XLA fuses the value-lookup chain of
    # `encode` into every consumer below and recomputes it per metric (measured on CPU).
    label, pred = label.astype(jnp.int8), pred.astype(jnp.int8)
    label, pred, valid, label_ok, pred_ok = fusion.materialize(
        (label, pred, valid, label_ok, pred_ok))
  k = num_classes
  height, width = label.shape[-2:]
  stats = {}
  stats["wf_score"], stats["wf_present"] = wfmeasure.band_wf_scores(pred_raw, label_raw,
                                                                    edge_size)
  # The confusion matrix, boundary IoU and mBA are all counts of per-pixel codes: one joint
  # histogram (a scatter, the costliest step on CPU) serves the three while the joint code space
  # stays small. Invalid pixels keep a bin of their own, as mBA counts them.
  biou_code = boundary_iou.boundary_iou_codes(label, pred, valid, k, dilation_ratio)
  biou_code = jnp.where(biou_code < 0, 4 * k * k, biou_code)
  mba_code = boundary_iou.mba_codes(label, pred, k)
  mba_bins = boundary_iou.mba_bins(height, width)
  if (4 * k * k + 1) * mba_bins <= _MAX_JOINT_BINS:
    hist = boundary.histogram(biou_code * mba_bins + mba_code, (4 * k * k + 1) * mba_bins)
    hist = hist.reshape(hist.shape[:-1] + (4 * k * k + 1, mba_bins))
    region_hist, mba_hist = jnp.sum(hist, axis=-1), jnp.sum(hist, axis=-2)
  else:
    region_hist = boundary.histogram(biou_code, 4 * k * k + 1)
    mba_hist = boundary.histogram(mba_code, mba_bins)
  region_counts = region_hist[..., :4 * k * k].reshape(region_hist.shape[:-1] + (k, k, 2, 2))
  stats["confusion"] = jnp.sum(region_counts, axis=(-2, -1))
  stats["biou_inter"], stats["biou_union"] = boundary_iou.boundary_iou_from_counts(
      region_counts)
  stats["mba"], stats["mba_defined"] = boundary_iou.mba_from_counts(mba_hist, height, width)
  stats["bf_score"], stats["bf_counted"] = boundary_iou.boundary_f_stats(
      label, pred, valid, k, bf_tolerance)
  stats["unmapped_label"] = jnp.sum(~label_ok, axis=(-2, -1), dtype=jnp.int32)
  stats["unmapped_pred"] = jnp.sum(~pred_ok, axis=(-2, -1), dtype=jnp.int32)
  return stats


def sum_statistics(stats: Dict[str, jax.Array], image_mask: Optional[jax.Array] = None):
  """Sum per-image statistics over the batch axis; bools become counts. Works in jit and numpy."""
  xp = jnp if any(isinstance(v, jax.Array) for v in stats.values()) else np
  out = {}
  for key in _SUM_KEYS:
    value = stats[key]
    if value.dtype == bool:
      value = value.astype(xp.int32)
    if image_mask is not None:
      shape = (-1,) + (1,) * (value.ndim - 1)
      value = xp.where(xp.reshape(image_mask, shape), value, xp.zeros_like(value))
    out[key] = value.sum(axis=0)
  out["num_images"] = (xp.asarray(image_mask).astype(xp.int32).sum() if image_mask is not None
                       else xp.asarray(stats["confusion"].shape[0]))
  return out


def empty_totals(num_classes: int) -> Dict[str, np.ndarray]:
  """Zero totals (numpy, 64-bit) for host-side accumulation."""
  k = num_classes
  f, i = np.float64, np.int64
  return {"confusion": np.zeros((k, k), i), "wf_score": np.zeros(2, f),
          "wf_present": np.zeros(2, i), "biou_inter": np.zeros(k, i), "biou_union": np.zeros(k, i),
          "bf_score": np.zeros(k, f), "bf_counted": np.zeros(k, i), "mba": np.zeros((), f),
          "mba_defined": np.zeros((), i), "unmapped_label": np.zeros((), i),
          "unmapped_pred": np.zeros((), i), "num_images": np.zeros((), i)}


def report_from_totals(totals, num_classes: int, label_values: Optional[Sequence[int]] = None,
                       edge_size: int = 3, bf_tolerance: float = BF_TOLERANCE) -> dict:
  """Final metrics (plain Python, JSON-serialisable) from summed statistics."""
  t = {k: np.asarray(v) for k, v in totals.items()}
  report = region.metrics_from_confusion(t["confusion"].astype(np.int64))
  report["confusion_matrix"] = t["confusion"].astype(np.int64).tolist()
  wf = wfmeasure.aggregate_wf(t["wf_score"], t["wf_present"])
  report.update(wf)
  report["wf_edge_size"] = int(edge_size)
  inter = t["biou_inter"].astype(np.float64)
  union = t["biou_union"].astype(np.float64)
  per_biou = [float(i / u) if u > 0 else None for i, u in zip(inter, union)]
  defined = [v for v in per_biou if v is not None]
  report["per_class_biou"] = per_biou
  report["biou"] = float(np.mean(defined)) if defined else 0.0
  counted = t["bf_counted"].astype(np.int64)
  per_bf = [float(s / c) if c > 0 else None for s, c in zip(t["bf_score"], counted)]
  defined = [v for v in per_bf if v is not None]
  report["per_class_bf"] = per_bf
  report["bf"] = float(np.mean(defined)) if defined else 0.0
  report["bf_tolerance"] = float(bf_tolerance)
  n_mba = int(t["mba_defined"])
  report["mba"] = float(t["mba"] / n_mba) if n_mba else 0.0
  report["unmapped_label_pixels"] = int(t["unmapped_label"])
  report["unmapped_pred_pixels"] = int(t["unmapped_pred"])
  report["num_images"] = int(t["num_images"])
  report["num_classes"] = int(num_classes)
  report["label_values"] = None if label_values is None else [int(v) for v in label_values]
  return report


@functools.lru_cache(maxsize=None)
def _jitted_statistics(num_classes, label_values, edge_size, bf_tolerance, dilation_ratio,
                       devices=None):
  """The jitted per-batch statistics; over several devices, one shard of the batch per device.

  Each image's statistics depend on that image only, so a `shard_map` over the batch axis runs
  the images of a batch side by side with no communication (and the data-dependent loops and
  conditionals of the WF transform decide per shard, not for the whole batch).
  """
  fn = functools.partial(batch_statistics, num_classes=num_classes, label_values=label_values,
                         edge_size=edge_size, bf_tolerance=bf_tolerance,
                         dilation_ratio=dilation_ratio)
  if devices is None or len(devices) == 1:
    return jax.jit(fn), None
  mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
  spec = jax.sharding.PartitionSpec("batch")
  sharded = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec), out_specs=spec),
                    in_shardings=jax.sharding.NamedSharding(mesh, spec))
  return sharded, mesh


def default_batch_size(devices: Sequence[jax.Device]) -> int:
  """Maps per evaluation call: 1 per CPU device, 8 per accelerator.

  On CPU one 512x512 map per device is fastest: the WF transform's intermediates of a single map
  stay in cache, and at 8 maps per call the working set falls out of it (measured 2x slower per
  map on a 2-core x86 host). Accelerators want larger batches.
  """
  per_device = 1 if devices[0].platform == "cpu" else 8
  return per_device * len(devices)


@functools.lru_cache(maxsize=None)
def _jitted_repair(num_classes, label_values, repair_class):
  """Per-image repair statistics (README analysis) of (refined, label, coarse) raw batches."""

  def fn(pred_raw, label_raw, coarse_raw):
    label, label_ok = region.encode(label_raw, num_classes, label_values)
    pred, pred_ok = region.encode(pred_raw, num_classes, label_values)
    coarse, coarse_ok = region.encode(coarse_raw, num_classes, label_values)
    return repair.repair_stats(label, coarse, pred, label_ok & pred_ok & coarse_ok, repair_class)

  return jax.jit(fn)


def _as_2d(array: np.ndarray, name: str) -> np.ndarray:
  """Single-channel map; a multi-channel map is accepted only if its channels are identical."""
  array = np.asarray(array)
  if array.ndim == 3:
    if not np.all(array == array[..., :1]):
      raise ValueError(f"{name}: multi-channel map with differing channels ({array.shape}); "
                       "give single-channel class-index maps")
    array = array[..., 0]
  if array.ndim != 2:
    raise ValueError(f"{name}: expected a 2-D map, got shape {array.shape}")
  if array.dtype.kind not in "uib":
    raise ValueError(f"{name}: expected an integer map, got dtype {array.dtype}")
  if min(array.shape) < 2:
    raise ValueError(f"{name}: map of shape {array.shape} is too small (need >= 2x2)")
  return array


class _Totals:
  """Host-side sums of per-image statistics, and the report from them."""

  def __init__(self, num_classes, label_values, edge_size, bf_tolerance, repair_class=None,
               repair_k=1.0):
    self.num_classes = num_classes
    # Repair analysis (needs the coarse map of every image): class and k, or None.
    self.repair_class = None if repair_class is None else int(repair_class)
    self.repair_k = float(repair_k)
    if self.repair_class is not None and not 0 <= self.repair_class < num_classes:
      raise ValueError(f"repair_class {repair_class} is not a class index in [0, {num_classes})")
    self.label_values = None if label_values is None else tuple(int(v) for v in label_values)
    self.edge_size = int(edge_size)
    self.bf_tolerance = float(bf_tolerance)
    self.totals = empty_totals(num_classes)
    self.repair_totals = np.zeros((2, 2), np.int64)  # (inter, union) x (RTm, RFm)
    self.repair_images = {"complete": 0, "partial": 0, "error": 0, "undefined": 0}
    self.unmapped_files: Dict[str, Dict[str, int]] = {}

  def add_statistics(self, names: Sequence[str], stats: Dict[str, np.ndarray], repair_iu=None):
    """Per-image statistics of `len(names)` images (rows beyond that are padding, ignored);
    `repair_iu`: their (inter, union) repair statistics when the analysis is on."""
    n = len(names)
    if self.repair_class is not None:
      inter, union = (np.asarray(a)[:n] for a in repair_iu)
      self.repair_totals += np.stack([inter.sum(0), union.sum(0)]).astype(np.int64)
      for iou_imp in repair.repair_scores(inter, union, self.repair_k)["iou_imp"]:
        self.repair_images[repair.repair_category(float(iou_imp))] += 1
    stats = {k: np.asarray(v)[:n] for k, v in stats.items()}
    summed = sum_statistics(stats)
    for key, value in summed.items():
      self.totals[key] = self.totals[key] + np.asarray(value).astype(self.totals[key].dtype)
    for idx, name in enumerate(names):
      bad_label, bad_pred = int(stats["unmapped_label"][idx]), int(stats["unmapped_pred"][idx])
      if bad_label or bad_pred:
        self.unmapped_files[name] = {"label": bad_label, "pred": bad_pred}

  def report(self) -> dict:
    report = report_from_totals(self.totals, self.num_classes, self.label_values,
                                self.edge_size, self.bf_tolerance)
    report["files_with_unmapped_values"] = dict(sorted(self.unmapped_files.items()))
    if self.repair_class is not None:
      scores = repair.repair_scores(self.repair_totals[0], self.repair_totals[1], self.repair_k)
      as_float = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
      report["repair"] = {
          "class": self.repair_class, "k": self.repair_k,
          "iou_rtm": as_float(scores["iou_rtm"]), "iou_rfm": as_float(scores["iou_rfm"]),
          "iou_imp": as_float(scores["iou_imp"]),
          "images": dict(self.repair_images)}
    return report


class _Accumulator(_Totals):
  """Buffers maps per shape, runs full batches through the jitted statistics, sums on host."""

  def __init__(self, num_classes, label_values, edge_size, batch_size, bf_tolerance,
               dilation_ratio, repair_class=None, repair_k=1.0, devices=None):
    super().__init__(num_classes, label_values, edge_size, bf_tolerance, repair_class, repair_k)
    devices = tuple(jax.local_devices() if devices is None else devices)
    if not devices:
      raise ValueError("devices: need at least one device to evaluate on")
    if batch_size is None:
      batch_size = default_batch_size(devices)
    # Whole shards only: the batch is a multiple of the device count (padding fills it).
    self.batch_size = -(-max(1, int(batch_size)) // len(devices)) * len(devices)
    self.fn, self.mesh = _jitted_statistics(num_classes, self.label_values, self.edge_size,
                                            self.bf_tolerance, float(dilation_ratio), devices)
    self.buffers: Dict[tuple, List[tuple]] = {}

  def add(self, name: str, pred: np.ndarray, label: np.ndarray,
          coarse: Optional[np.ndarray] = None):
    pred = _as_2d(pred, f"prediction {name}")
    label = _as_2d(label, f"label {name}")
    if pred.shape != label.shape:
      raise ValueError(f"{name}: prediction shape {pred.shape} != label shape {label.shape}; "
                       "expected a prediction of its label's size")
    if self.repair_class is not None:
      if coarse is None:
        raise ValueError(f"{name}: the repair analysis needs a coarse map for every image")
      coarse = _as_2d(coarse, f"coarse map {name}")
      if coarse.shape != label.shape:
        raise ValueError(f"{name}: coarse map shape {coarse.shape} != label shape {label.shape}")
      coarse = coarse.astype(np.int32)
    buf = self.buffers.setdefault(label.shape, [])
    buf.append((name, pred.astype(np.int32), label.astype(np.int32), coarse))
    if len(buf) == self.batch_size:
      self._flush(label.shape)

  def _flush(self, shape):
    items = self.buffers.pop(shape, [])
    if not items:
      return
    pad = [items[0]] * (self.batch_size - len(items))
    preds = np.stack([item[1] for item in items + pad])
    labels = np.stack([item[2] for item in items + pad])
    # Our own mesh, whatever mesh the caller (a trainer) has set: shard_map requires it.
    mesh_context = (jax.set_mesh(self.mesh) if self.mesh is not None
                    else contextlib.nullcontext())
    with jax.enable_x64(True), mesh_context:
      stats = jax.device_get(self.fn(preds, labels))
    repair_iu = None
    if self.repair_class is not None:
      coarse = np.stack([item[3] for item in items + pad])
      fn = _jitted_repair(self.num_classes, self.label_values, self.repair_class)
      repair_iu = jax.device_get(fn(preds, labels, coarse))
    self.add_statistics([item[0] for item in items], stats, repair_iu)

  def finish(self) -> dict:
    for shape in list(self.buffers):
      self._flush(shape)
    return self.report()


def _check_label_values(num_classes: int, label_values: Optional[Sequence[int]]):
  if label_values is None:
    return
  if len(label_values) != num_classes:
    raise ValueError(f"label_values has {len(label_values)} entries for num_classes={num_classes}")
  if region.is_binary_mode(num_classes, label_values) and 255 in [int(v) for v in label_values]:
    logging.warning("label_values %s in binary mode: like the original evaluator, maps are "
                    "binarised with > 0 first, so raw 255 becomes 1 and is NOT mapped by 255; "
                    "use label_values=[0, 1]", list(label_values))


def evaluate_maps(preds: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int,
                  label_values: Optional[Sequence[int]] = None, edge_size: int = 3,
                  batch_size: Optional[int] = None, *, bf_tolerance: float = BF_TOLERANCE,
                  dilation_ratio: float = DILATION_RATIO, names: Optional[Sequence[str]] = None,
                  strict: bool = False, coarse: Optional[Sequence[np.ndarray]] = None,
                  repair_class: int = 1, repair_k: float = 1.0,
                  devices: Optional[Sequence[jax.Device]] = None) -> dict:
  """Evaluates prediction maps against label maps (raw file values, 2-D integer arrays).

  Args:
    preds, labels: equal-length sequences of maps; each pair must have the same shape. Different
      pairs may differ in shape (grouped by shape).
    num_classes: number of classes.
    label_values: raw value of each class (e.g. [1, 2, 3, 4, 5] for Potsdam), or None.
    edge_size: WF band dilation (3 in every original config).
    batch_size: maps per jitted call (default: `default_batch_size(devices)`); rounded up to a
      multiple of the device count.
    bf_tolerance: boundary F-score tolerance in pixels.
    dilation_ratio: boundary IoU band width relative to the diagonal.
    names: names used in error messages and `files_with_unmapped_values` (default: indices).
    strict: raise if any map holds values outside label_values (default: count and report).
    coarse: the coarse (Stage I) maps the predictions refine, one per label; adds the original
      README's repair analysis of class `repair_class` with weight `repair_k` as `report["repair"]`
      (IoU_RTm, IoU_RFm, IoU_imp over the split, and images per category).
    repair_class, repair_k: see `coarse` and `idgbr_jax.metrics.repair`.
    devices: devices that share each batch (default: all local devices; on CPU the `idgbr`
      command makes one per core, see `xla_flags`).

  Returns:
    JSON-serialisable dict (see `report_from_totals`), with `missing_predictions` = 0.
  """
  if len(preds) != len(labels):
    raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
  if coarse is not None and len(coarse) != len(labels):
    raise ValueError(f"{len(coarse)} coarse maps for {len(labels)} labels")
  _check_label_values(num_classes, label_values)
  names = list(names) if names is not None else [str(i) for i in range(len(labels))]
  acc = _Accumulator(num_classes, label_values, edge_size, batch_size, bf_tolerance,
                     dilation_ratio, None if coarse is None else repair_class, repair_k,
                     devices)
  coarse = coarse if coarse is not None else [None] * len(labels)
  for name, pred, label, rough in zip(names, preds, labels, coarse):
    acc.add(name, pred, label, rough)
  report = acc.finish()
  report["missing_predictions"] = 0
  _check_strict(report, strict, num_classes, label_values)
  return report


def _check_strict(report: dict, strict: bool, num_classes: int = 0,
                  label_values: Optional[Sequence[int]] = None):
  bad = report["files_with_unmapped_values"]
  if not bad:
    return
  listed = ", ".join(f"{k} (label {v['label']}, pred {v['pred']} px)"
                     for k, v in list(bad.items())[:10])
  more = "" if len(bad) <= 10 else f" and {len(bad) - 10} more"
  if strict:
    expected = (f"the values {list(label_values)} of --label_values" if label_values else
                f"class indices 0..{num_classes - 1}")
    raise ValueError(f"{len(bad)} file(s) hold values outside the label encoding: {listed}{more}"
                     f" (--strict: expected only {expected})")
  logging.warning(f"{len(bad)} file(s) hold values outside the label encoding (these pixels "
                  f"are ignored, as in the original): {listed}{more}")


def read_map(path: str) -> np.ndarray:
  """Reads a PNG / TIF map as stored (no palette conversion); errors name the file."""
  try:
    if str(path).lower().endswith((".tif", ".tiff")):
      try:
        import tifffile  # pylint: disable=g-import-not-at-top
        return np.asarray(tifffile.imread(io.BytesIO(paths.read_bytes(path))))
      except ImportError:
        pass
    return np.array(paths.read_image(path))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot read {path}: {e}") from e


def _index_dir(directory: str) -> Dict[str, str]:
  """stem -> file name, preferring .png over .tif / .tiff when both exist."""
  if not paths.isdir(directory):
    raise ValueError(f"not a directory: {directory} (expected a folder of PNG/TIF maps)")
  found: Dict[str, str] = {}
  for name in paths.listdir(directory):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in IMAGE_EXTS:
      continue
    if stem not in found or IMAGE_EXTS.index(ext.lower()) < IMAGE_EXTS.index(
        os.path.splitext(found[stem])[1].lower()):
      found[stem] = name
  return found


def evaluate_dirs(pred_dir: str, label_dir: str, num_classes: int,
                  label_values: Optional[Sequence[int]] = None, edge_size: int = 3,
                  progress: bool = True, *, batch_size: Optional[int] = None,
                  bf_tolerance: float = BF_TOLERANCE, dilation_ratio: float = DILATION_RATIO,
                  strict: bool = False, coarse_dir: Optional[str] = None, repair_class: int = 1,
                  repair_k: float = 1.0) -> dict:
  """Evaluates every label map in label_dir against the prediction with the same stem.

  Labels without a prediction are counted in `missing_predictions` (and listed in
  `missing_files`) and skipped, as in the original; predictions without a label are ignored.
  Unreadable files and shape mismatches raise ValueError naming the file. With `coarse_dir`
  (the maps the predictions refine, same stems) the report adds the repair analysis (see
  `evaluate_maps`); a scored image without a coarse map is an error naming it.
  """
  _check_label_values(num_classes, label_values)
  labels = _index_dir(label_dir)
  preds = _index_dir(pred_dir)
  coarse = _index_dir(coarse_dir) if coarse_dir is not None else None
  acc = _Accumulator(num_classes, label_values, edge_size, batch_size, bf_tolerance,
                     dilation_ratio, None if coarse is None else repair_class, repair_k)
  missing = [stem for stem in labels if stem not in preds]
  stems = [stem for stem in labels if stem in preds]
  if not labels:
    raise ValueError(f"no label maps ({', '.join(IMAGE_EXTS)}) in {label_dir}: expected one "
                     "per image, matched to the predictions by file stem")
  if not stems:
    raise ValueError(f"none of the {len(labels)} label maps in {label_dir} has a prediction in "
                     f"{pred_dir} (matched by file stem, e.g. {next(iter(labels))}.png)")
  if coarse is not None:
    no_coarse = [stem for stem in stems if stem not in coarse]
    if no_coarse:
      raise ValueError(f"{len(no_coarse)} image(s) have no coarse map in {coarse_dir} (first: "
                       f"{', '.join(no_coarse[:5])})")
  iterator: Iterable[str] = stems
  if progress:
    # Every long command reports the same way (ETA; process 0 only; plain lines in a log).
    from idgbr_jax import progress as progress_lib  # pylint: disable=g-import-not-at-top
    iterator = progress_lib.track(stems, "evaluate", unit="map")
  for stem in iterator:
    label = read_map(paths.join(label_dir, labels[stem]))
    pred = read_map(paths.join(pred_dir, preds[stem]))
    rough = None if coarse is None else read_map(paths.join(coarse_dir, coarse[stem]))
    try:
      acc.add(stem, pred, label, rough)
    except ValueError as e:  # name the files, not only the stem
      raise ValueError(f"{e} (prediction {paths.join(pred_dir, preds[stem])}, label "
                       f"{paths.join(label_dir, labels[stem])})") from e
  report = acc.finish()
  report["missing_predictions"] = len(missing)
  report["missing_files"] = missing[:100]
  report["pred_dir"] = str(pred_dir)
  report["label_dir"] = str(label_dir)
  if coarse_dir is not None:
    report["coarse_dir"] = str(coarse_dir)
  if missing:
    logging.warning("%d label map(s) have no prediction in %s (first: %s)", len(missing),
                    pred_dir, ", ".join(missing[:5]))
  _check_strict(report, strict, num_classes, label_values)
  return report


def format_report(report: dict) -> str:
  """Readable table of a report (per-class IoU / F1 / boundary scores, then the summary)."""
  lines = []
  k = len(report.get("per_class_iou", []))
  values = report.get("label_values") or list(range(k))
  header = f"{'class':<8}{'value':>6}{'IoU':>10}{'F1':>10}{'Prec':>10}{'Recall':>10}" \
           f"{'BIoU':>10}{'BF':>10}"
  lines.append(header)
  lines.append("-" * len(header))

  def fmt(v):
    return f"{v:>10.4f}" if v is not None else f"{'-':>10}"

  for c in range(k):
    row = [report["per_class_iou"][c], report["per_class_f1"][c],
           report.get("per_class_precision", [None] * k)[c],
           report.get("per_class_recall", [None] * k)[c],
           report.get("per_class_biou", [None] * k)[c], report.get("per_class_bf", [None] * k)[c]]
    lines.append(f"{c:<8}{values[c] if c < len(values) else '':>6}" + "".join(fmt(v) for v in row))
  lines.append("-" * len(header))
  edge = report.get("wf_edge_size", 3)
  summary = [
      ("mIoU", report.get("miou")), ("mF1", report.get("mf1")), ("OA", report.get("oa")),
      ("Kappa", report.get("kappa")), ("FWIoU", report.get("fw_iou")),
      (f"WF ({edge}px, min)", report.get("wf_min")), (f"WF ({edge}px, mean)", report.get("wf_mean")),
      ("Boundary IoU", report.get("biou")),
      (f"BF ({report.get('bf_tolerance', BF_TOLERANCE):g}px)", report.get("bf")),
      ("mBA", report.get("mba")),
  ]
  for name, value in summary:
    if value is not None:
      lines.append(f"{name:<20}{value:.6f}")
  wf_ids = report.get("wf_class_ids", [])
  if wf_ids:
    parts = ", ".join(f"{'band' if c == 1 else 'non-band'} {s:.6f}"
                      for c, s in zip(wf_ids, report.get("wf_per_class", [])))
    lines.append(f"{'WF per class':<20}{parts}")
  rep = report.get("repair")
  if rep:
    fmt_opt = lambda v: "-" if v is None else f"{v:.6f}"  # noqa: E731
    lines.append(f"{'repair (class ' + str(rep['class']) + ')':<20}IoU_RTm "
                 f"{fmt_opt(rep['iou_rtm'])}, IoU_RFm {fmt_opt(rep['iou_rfm'])}, "
                 f"IoU_imp {fmt_opt(rep['iou_imp'])} (k={rep['k']:g})")
    lines.append(f"{'repair images':<20}" + ", ".join(f"{k} {v}" for k, v in rep["images"].items()))
  lines.append(f"{'images':<20}{report.get('num_images', 0)}")
  lines.append(f"{'missing predictions':<20}{report.get('missing_predictions', 0)}")
  unmapped = report.get("files_with_unmapped_values") or {}
  if unmapped:
    lines.append(f"{'unmapped values':<20}{len(unmapped)} file(s), "
                 f"{report.get('unmapped_label_pixels', 0)} label px, "
                 f"{report.get('unmapped_pred_pixels', 0)} pred px (ignored)")
  return "\n".join(lines)
