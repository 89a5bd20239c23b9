"""The evaluation report of maps that live on a device mesh (multi-host included).

Predictions and labels arrive as batch-sharded global arrays (what a trainer's predict / refine
step returns). Each device computes the per-image statistics of its own images
(`evaluate.batch_statistics` under `shard_map`), and only those small statistics (a confusion
matrix and a few counts per image) travel to the hosts, where they are summed exactly as
`evaluate_maps` sums them: no host ever gathers the maps. The report equals `evaluate_maps` on
the same maps (same per-image numbers, float64 under a scoped x64 as there).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from idgbr_jax.metrics import evaluate, region, repair
from idgbr_jax.parallel import multihost


@functools.lru_cache(maxsize=None)
def _statistics_fn(mesh, batch_axes, num_classes, label_values, edge_size, bf_tolerance,
                   dilation_ratio, repair_class):
  spec = P(batch_axes)

  def per_shard(pred, label, *coarse):
    stats = evaluate.batch_statistics(pred, label, num_classes=num_classes,
                                      label_values=label_values, edge_size=edge_size,
                                      bf_tolerance=bf_tolerance, dilation_ratio=dilation_ratio)
    if coarse:
      enc = lambda x: region.encode(x, num_classes, label_values)  # noqa: E731
      (lab, lab_ok), (prd, prd_ok), (crs, crs_ok) = enc(label), enc(pred), enc(coarse[0])
      stats["repair"] = repair.repair_stats(lab, crs, prd, lab_ok & prd_ok & crs_ok,
                                            repair_class)
    return stats

  n_in = 3 if repair_class is not None else 2
  return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * n_in, out_specs=spec))


class MeshEvaluator(evaluate._Totals):  # pylint: disable=protected-access
  """`add` batches of sharded maps, `finish` for the report (the keys of `evaluate_maps`)."""

  def __init__(self, num_classes: int, label_values: Optional[Sequence[int]] = None,
               edge_size: int = 3, *, bf_tolerance: float = evaluate.BF_TOLERANCE,
               dilation_ratio: float = evaluate.DILATION_RATIO,
               repair_class: Optional[int] = None, repair_k: float = 1.0):
    evaluate._check_label_values(num_classes, label_values)  # pylint: disable=protected-access
    super().__init__(num_classes, label_values, edge_size, bf_tolerance, repair_class, repair_k)
    self.dilation_ratio = float(dilation_ratio)

  def add(self, names: Sequence[str], pred: jax.Array, label: jax.Array,
          coarse: Optional[jax.Array] = None) -> None:
    """Raw maps [B, H, W] (integers) sharded along the batch; the first `len(names)` images
    count, the rest is padding."""
    if pred.shape != label.shape:
      raise ValueError(f"prediction batch {pred.shape} != label batch {label.shape}")
    if (self.repair_class is not None) != (coarse is not None):
      raise ValueError("coarse maps are needed exactly when the repair analysis is on")
    sh = pred.sharding
    if not isinstance(sh, jax.sharding.NamedSharding):
      raise ValueError(f"maps must be sharded over a mesh (NamedSharding), got {sh}")
    batch_axes = sh.spec[0] if len(sh.spec) else None
    fn = _statistics_fn(sh.mesh, batch_axes, self.num_classes, self.label_values,
                        self.edge_size, self.bf_tolerance, self.dilation_ratio,
                        self.repair_class)
    args = (pred, label) + ((coarse,) if coarse is not None else ())
    with jax.enable_x64(True):
      stats = fn(*[a.astype(np.int32) for a in args])
    repair_iu = stats.pop("repair", None)
    if repair_iu is not None:
      repair_iu = tuple(multihost.to_host(x) for x in repair_iu)
    stats = {k: multihost.to_host(v) for k, v in stats.items()}
    self.add_statistics(list(names), stats, repair_iu)

  def finish(self) -> dict:
    report = self.report()
    report["missing_predictions"] = 0
    return report
