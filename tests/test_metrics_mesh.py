"""Evaluation on a device mesh (`metrics.mesh.MeshEvaluator`) gives `evaluate_maps`' report."""
import jax
import numpy as np
import pytest

from idgbr_jax import metrics
from idgbr_jax.metrics import mesh as mesh_metrics
from idgbr_jax.parallel import sharding


def _maps(rng, n, k, size=24):
  label = rng.integers(0, k, (n, size, size))
  label[:, : size // 2] = rng.integers(0, k)  # some large regions, so boundaries are sparse
  pred = np.where(rng.random(label.shape) < 0.15, rng.integers(0, k, label.shape), label)
  coarse = np.where(rng.random(label.shape) < 0.3, rng.integers(0, k, label.shape), label)
  return pred.astype(np.int32), label.astype(np.int32), coarse.astype(np.int32)


@pytest.mark.parametrize("num_classes,label_values", [(2, None), (3, (1, 2, 3))])
def test_mesh_report_equals_evaluate_maps(num_classes, label_values):
  rng = np.random.default_rng(0)
  k_raw = num_classes if label_values is None else 4  # raw 0 is outside (1, 2, 3): unmapped
  pred, label, coarse = _maps(rng, 13, k_raw)
  names = [f"img{i}" for i in range(13)]
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
  batch = sharding.batch_sharding(mesh, 3)
  evaluator = mesh_metrics.MeshEvaluator(num_classes, label_values, repair_class=1)
  for start in range(0, 13, 8):  # batches of 8, the last one padded with zeros
    stop = min(start + 8, 13)
    fill = np.zeros((8 - (stop - start),) + pred.shape[1:], np.int32)
    pad = lambda x: np.concatenate([x[start:stop], fill])  # noqa: E731
    put = lambda x: jax.device_put(pad(x), batch)  # noqa: E731
    evaluator.add(names[start:stop], put(pred), put(label), put(coarse))
  got = evaluator.finish()
  want = metrics.evaluate_maps(list(pred), list(label), num_classes, label_values, names=names,
                               coarse=list(coarse), repair_class=1)
  assert got.keys() == want.keys()
  for key, value in want.items():
    if isinstance(value, float):
      assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    else:
      assert got[key] == value, key
  assert got["num_images"] == 13 and got["repair"]["images"] == want["repair"]["images"]
  if label_values is not None:
    assert got["files_with_unmapped_values"]  # raw 0 is outside the encoding


def test_mesh_evaluator_refuses_unsharded_maps():
  evaluator = mesh_metrics.MeshEvaluator(2)
  x = np.zeros((8, 4, 4), np.int32)
  with pytest.raises(ValueError, match="NamedSharding"):
    evaluator.add(["a"], jax.numpy.asarray(x), jax.numpy.asarray(x))
