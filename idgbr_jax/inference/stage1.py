"""Stage I inference: restore a trained segmenter and write coarse maps as index PNGs.

The PNGs (`<out_dir>/<split>/<id>.png`, uint8 class indices) are the input of Stage II.
Scenes of any size (`idgbr predict --images`) run in sliding windows (`inference.windows`):
`make_scores_fn` gives each window's class probabilities, which are blended, not its argmax.
Cross-fitted train-split maps (fold models trained on the other folds) are made by
`train.stage1.predict_cross_fitted`, which trains the fold models and predicts with this module.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from idgbr_jax import paths, progress
from idgbr_jax.assembly import stage1 as assembly
from idgbr_jax.data import pipeline, sources
from idgbr_jax.parallel import multihost, sharding


def make_predict_fn(model, variable_shardings, mesh, rules):
  """Jitted (variables, images) -> class-index maps, sharded over the batch."""
  images_sharding = sharding.batch_sharding(mesh, 4, rules)
  out_sharding = sharding.batch_sharding(mesh, 3, rules)

  @functools.partial(jax.jit, in_shardings=(variable_shardings, images_sharding),
                     out_shardings=out_sharding)
  def predict(variables, images):
    logits = model.apply(variables, images, train=False)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)
  return predict


def make_scores_fn(model, variable_shardings, mesh, rules):
  """Jitted (variables, images) -> (B, H, W, K) float32 class probabilities (softmax).

  Windows blend probabilities rather than logits: they are bounded, so a window that is
  over-confident near its border (where it lacks context) cannot outvote its neighbour, and the
  ramp weights read as shares of the vote. Where one window covers a pixel its argmax is the
  logits' argmax (float32 ties aside), so a scene of one window is the single-tile prediction.
  """
  images_sharding = sharding.batch_sharding(mesh, 4, rules)

  @functools.partial(jax.jit, in_shardings=(variable_shardings, images_sharding),
                     out_shardings=sharding.batch_sharding(mesh, 4, rules))
  def scores(variables, images):
    logits = model.apply(variables, images, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return scores


def scene_predictor(scores_fn, variables, mesh, rules):
  """`windows.run`'s `predict` for Stage I: a host batch of windows -> (B, T, T, K) scores."""
  def predict(arrays, refs):
    del refs  # Stage I is deterministic: nothing depends on which window a row is
    images = pipeline.to_global(multihost.host_slice({"image": arrays["image"]}), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return multihost.to_host(scores_fn(variables, images["image"]))
  return predict


def predict_dataset(predict_fn, variables, ds, batch_size: int, mesh, rules
                    ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
  """Yields (id, predicted map, label) over an eval dataset, in order."""
  for batch, ids, valid in pipeline.eval_batches(ds, batch_size, keys=("image", "label")):
    images = pipeline.to_global(multihost.host_slice({"image": batch["image"]}), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      preds = multihost.to_host(predict_fn(variables, images["image"]))
    for i in range(valid):
      yield ids[i], preds[i], batch["label"][i]


def evaluate(predict_fn, variables, ds, config, num_classes: int, mesh, rules) -> dict[str, Any]:
  """The evaluation suite's report (mIoU, mF1, WF, ...) on a whole split, computed on the mesh:
  the maps stay sharded, only per-image statistics reach the hosts (`metrics.mesh`)."""
  from idgbr_jax.metrics import mesh as mesh_metrics  # pylint: disable=import-outside-toplevel
  evaluator = mesh_metrics.MeshEvaluator(**sources.eval_kwargs(config.data, num_classes))
  for batch, ids, valid in pipeline.eval_batches(ds, config.eval_batch_size,
                                                 keys=("image", "label")):
    arrays = pipeline.to_global(multihost.host_slice(
        {"image": batch["image"], "label": batch["label"].astype(np.int32)}), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      preds = predict_fn(variables, arrays["image"])
    evaluator.add(ids[:valid], preds, arrays["label"])
  return evaluator.finish()


def write_png(path: str, index_map: np.ndarray) -> None:
  paths.write_png(path, np.asarray(index_map, np.uint8))


def predict_split(workdir: str, split: str, out_dir: str, *, indices=None,
                  config: ml_collections.ConfigDict | None = None, mesh=None) -> int:
  """Writes `<out_dir>/<split>/<id>.png` for the split (or its `indices`). Returns the count."""
  model, variables, config, mesh = assembly.load_segmenter(workdir, config, mesh)
  rules = tuple(config.sharding_rules)
  num_classes = sources.num_classes(config.data)
  ds = pipeline.eval_dataset(config, split, num_classes, indices=indices)
  var_shardings = jax.tree.map(lambda x: x.sharding, variables)
  predict_fn = make_predict_fn(model, var_shardings, mesh, rules)
  n = 0
  with progress.Progress(len(ds), f"predict {split}", unit="map") as bar:
    for example_id, pred, _ in predict_dataset(predict_fn, variables, ds,
                                               config.eval_batch_size, mesh, rules):
      if jax.process_index() == 0:
        write_png(paths.join(out_dir, split, f"{example_id}.png"), pred)
      n += 1
      bar.update(1)
  logging.info("wrote %d coarse maps of %s to %s", n, split, paths.join(out_dir, split))
  return n
