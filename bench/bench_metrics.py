"""Evaluation throughput on 512x512 maps: JAX (jit, batched) vs the numpy/scipy/OpenCV reference.

  python bench/bench_metrics.py [--num_images=32] [--num_classes=5] [--maps=blocks|roads]
                                [--repeats=3]

Like `idgbr evaluate`, it runs with one XLA CPU device per core this process may use (run it
under `taskset -c 0` for a one-core comparison). Rows, all on the same maps:
  * confusion + WF band: the original evaluator's definition (region confusion matrix and the
    "WF (edge band)" metric), the reference against one jitted call per map on one device, and
    against a `shard_map` over all devices (one map each);
  * all metrics: what `evaluate_maps` reports (adds boundary IoU, boundary F and mBA), against
    a reference that adds the per-class OpenCV definitions of those (boundary-iou-api,
    openseg-style BF with cv2 morphology, CascadePSP's mBA).
Prints a markdown table (images/s). Numbers depend on the machine; say which when quoting them.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from idgbr_jax import xla_flags  # noqa: E402  (does not import jax)

# The `idgbr evaluate` command's XLA settings (one CPU device per core), before JAX starts.
xla_flags.apply_defaults(extra=xla_flags.cpu_device_flags())

import cv2
import jax
import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from test_metrics_boundary import _ref_mask_to_boundary, _ref_mba  # noqa: E402
from test_metrics_reference import (perturb, random_blocky, ref_encode, ref_region,  # noqa: E402
                                    ref_wf)

from idgbr_jax.metrics import boundary  # noqa: E402
from idgbr_jax.metrics import evaluate  # noqa: E402
from idgbr_jax.metrics import region  # noqa: E402
from idgbr_jax.metrics import wfmeasure  # noqa: E402


def _roads(rng, size):
  """A road-extraction-like binary pair: a few straight roads on background; the prediction
  wobbles their edges, drops a stretch and adds a spurious road far from the others."""
  yy, xx = np.mgrid[:size, :size]

  def road(width):
    angle = rng.uniform(0, np.pi)
    offset = rng.uniform(-size / 3, size / 3)
    dist = (xx - size / 2) * np.sin(angle) - (yy - size / 2) * np.cos(angle) - offset
    return np.abs(dist) < width / 2

  label = np.zeros((size, size), bool)
  for _ in range(int(rng.integers(2, 4))):
    label |= road(rng.uniform(4, 12))
  pred = label.copy()
  wobble = rng.random((size // 8, size // 8)) < 0.3
  edge = (np.diff(label, axis=0, prepend=False) | np.diff(label, axis=1, prepend=False))
  pred ^= np.kron(wobble, np.ones((8, 8), bool)) & ndimage.binary_dilation(edge, iterations=2)
  y0, x0 = rng.integers(0, size - 64, 2)
  pred[y0:y0 + 64, x0:x0 + 64] = False
  pred |= road(rng.uniform(4, 10)) & (rng.random() < 0.8)
  return pred.astype(np.uint8), label.astype(np.uint8)


def _data(n, num_classes, size, maps="blocks", seed=0):
  rng = np.random.default_rng(seed)
  if maps == "roads":
    pairs = [_roads(rng, size) for _ in range(n)]
    return [p for p, _ in pairs], [l for _, l in pairs], [0, 1]
  values = [0, 1] if num_classes == 2 else list(range(1, num_classes + 1))
  labels = [random_blocky(rng, (size, size), values, 32) for _ in range(n)]
  preds = [perturb(rng, l, values, 0.1, 8) for l in labels]
  return preds, labels, values


def _ref_bf(g, p, tolerance=evaluate.BF_TOLERANCE):
  """Boundary F of one class (openseg-style) with OpenCV morphology: 1-px inner boundaries (the
  image border is not a boundary), matches within the tolerance disk."""
  r = int(tolerance)
  disk = np.zeros((2 * r + 1,) * 2, np.uint8)
  for dy, dx in boundary.disk_offsets(tolerance):
    disk[dy + r, dx + r] = 1
  ones = np.ones((3, 3), np.uint8)
  g8, p8 = g.astype(np.uint8), p.astype(np.uint8)
  gb = g8 & (1 - cv2.erode(g8, ones, borderType=cv2.BORDER_CONSTANT, borderValue=1))
  pb = p8 & (1 - cv2.erode(p8, ones, borderType=cv2.BORDER_CONSTANT, borderValue=1))
  g_near = cv2.dilate(gb, disk, borderType=cv2.BORDER_CONSTANT, borderValue=0)
  p_near = cv2.dilate(pb, disk, borderType=cv2.BORDER_CONSTANT, borderValue=0)
  n_g, n_p = float(gb.sum()), float(pb.sum())
  if n_g == 0 and n_p == 0:
    return 1.0
  precision = float((pb & g_near).sum()) / n_p if n_p else 0.0
  recall = float((gb & p_near).sum()) / n_g if n_g else 0.0
  return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def ref_boundary_metrics(preds, labels, num_classes, values):
  """Boundary IoU, BF and mBA as `evaluate_maps` reports them, class by class with OpenCV."""
  k = num_classes
  inter, union = np.zeros(k), np.zeros(k)
  bf_sum, bf_count = np.zeros(k), np.zeros(k)
  mbas = []
  for p, l in zip(preds, labels):
    le, lm = ref_encode(l, k, values)
    pe, pm = ref_encode(p, k, values)
    valid = lm & pm
    for c in range(k):
      gb = _ref_mask_to_boundary(le == c).astype(bool) & valid
      pb = _ref_mask_to_boundary(pe == c).astype(bool) & valid
      inter[c] += (gb & pb).sum()
      union[c] += (gb | pb).sum()
      if (le == c).any() or (pe == c).any():
        bf_sum[c] += _ref_bf(le == c, pe == c)
        bf_count[c] += 1
    mbas.append(_ref_mba(le, np.where(le < 0, -1, pe)))
  biou = [i / u for i, u in zip(inter, union) if u > 0]
  bf = [s / n for s, n in zip(bf_sum, bf_count) if n > 0]
  return {"biou": float(np.mean(biou)), "bf": float(np.mean(bf)), "mba": float(np.mean(mbas))}


def _time(fn, repeats):
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_images", type=int, default=32)
  parser.add_argument("--num_classes", type=int, default=5)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--maps", choices=("blocks", "roads"), default="blocks",
                      help="blocks: random K-class blocks (32 px) with blob errors; roads: "
                           "binary road maps whose errors lie far from the true roads (the WF "
                           "distance transform's slow path)")
  args = parser.parse_args()
  if args.maps == "roads":
    args.num_classes = 2
  preds, labels, values = _data(args.num_images, args.num_classes, args.size, args.maps)
  n, k = args.num_images, args.num_classes
  values_t = tuple(values)
  devices = jax.local_devices()
  n_dev = len(devices)

  # Same definition as the reference: confusion + WF band scores of a batch of maps.
  def core(p, l):
    cls_l, ok_l = region.encode(l, k, values_t)
    cls_p, ok_p = region.encode(p, k, values_t)
    confm = region.confusion_matrix(cls_l, cls_p, ok_l & ok_p, k)
    scores, present = wfmeasure.band_wf_scores(p, l, 3)
    return confm, scores, present

  mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
  spec = jax.sharding.PartitionSpec("batch")
  runs = {}
  for name, fn, bs in (
      ("one", jax.jit(core), 1),
      ("all", jax.jit(jax.shard_map(core, mesh=mesh, in_specs=(spec, spec), out_specs=spec)),
       n_dev)):
    usable = n - n % bs
    batches = [(np.stack(preds[i:i + bs]).astype(np.int32),
                np.stack(labels[i:i + bs]).astype(np.int32)) for i in range(0, usable, bs)]

    def run(fn=fn, batches=batches):
      with jax.enable_x64(True):
        jax.block_until_ready([fn(p, l) for p, l in batches])

    runs[name] = (run, usable)

  def run_full():
    evaluate.evaluate_maps(preds, labels, k, values)

  def run_ref_core():
    ref_region(preds, labels, k, values)
    ref_wf(preds, labels)

  def run_ref_boundary():
    ref_boundary_metrics(preds, labels, k, values)

  for run, _ in runs.values():
    run()  # compile
  run_full()
  load_before = os.getloadavg()
  # Best of `repeats` for every side, interleaved, so load from other jobs hits all sides alike.
  t = {name: float("inf") for name in ("ref_core", "ref_boundary", "one", "all", "full")}
  for _ in range(args.repeats):
    t["ref_core"] = min(t["ref_core"], _time(run_ref_core, 1))
    t["ref_boundary"] = min(t["ref_boundary"], _time(run_ref_boundary, 1))
    for name, (run, _) in runs.items():
      t[name] = min(t[name], _time(run, 1))
    t["full"] = min(t["full"], _time(run_full, 1))
  load_after = os.getloadavg()
  # Sanity: the same numbers on both sides.
  report = evaluate.evaluate_maps(preds[:4], labels[:4], k, values)
  ref = ref_wf(preds[:4], labels[:4]) | ref_boundary_metrics(preds[:4], labels[:4], k, values)
  for key in ("wf_min", "wf_mean", "biou", "bf", "mba"):
    assert abs(report[key] - ref[key]) < 1e-9, (key, report[key], ref[key])

  rate = {name: runs[name][1] / t[name] for name in runs}
  ref_core = n / t["ref_core"]
  ref_all = n / (t["ref_core"] + t["ref_boundary"])
  device = devices[0]
  print(f"\n{n} {args.maps} maps {args.size}x{args.size}, {k} classes, "
        f"JAX backend: {device.platform} ({device.device_kind}) x {n_dev}, x64 scoped, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"cores usable: {xla_flags.usable_cores()}, load average (1 min) before / after: "
        f"{load_before[0]:.2f} / {load_after[0]:.2f}\n")
  print("| implementation | what | images/s | speed-up |")
  print("|---|---|---:|---:|")
  print(f"| numpy/scipy/OpenCV reference | confusion + WF band | {ref_core:.1f} | 1.0x |")
  print(f"| JAX jit, 1 device, 1 map per call | confusion + WF band | {rate['one']:.1f} | "
        f"{rate['one'] / ref_core:.1f}x |")
  print(f"| JAX jit + shard_map, {n_dev} device(s), 1 map each | confusion + WF band | "
        f"{rate['all']:.1f} | {rate['all'] / ref_core:.1f}x |")
  print(f"| numpy/scipy/OpenCV reference | all metrics (+ BIoU, BF, mBA) | {ref_all:.1f} | "
        f"1.0x |")
  print(f"| JAX `evaluate_maps` (as `idgbr evaluate`) | all metrics, host batching | "
        f"{n / t['full']:.1f} | {(t['ref_core'] + t['ref_boundary']) / t['full']:.1f}x |")


if __name__ == "__main__":
  main()
