"""Stage I inference: restore a trained segmenter and write coarse maps as index PNGs.

The PNGs (`<out_dir>/<split>/<id>.png`, uint8 class indices) are the input of Stage II. With
`num_folds=k`, train-split maps are cross-fitted: fold i is predicted by a model trained on the
other k-1 folds, so train coarse maps carry test-like errors instead of memorised labels.
"""
from __future__ import annotations

import copy
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from idgbr_jax import checkpoints
from idgbr_jax.data import pipeline, sources
from idgbr_jax.parallel import sharding
from idgbr_jax.train import optim, stage1


def load(workdir: str, config: ml_collections.ConfigDict | None = None, mesh=None):
  """Restores the latest Stage I checkpoint of `workdir`: (model, variables, config, mesh)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  config = config or checkpoints.load_config(ckpt_dir)
  mesh = mesh or sharding.make_mesh(config.mesh_shape.to_dict())
  rules = tuple(config.sharding_rules)
  num_classes = sources.num_classes(config.data)
  model = stage1.build_model(config, num_classes)
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  init = stage1.make_init_fn(model, tx, stage1.input_size(config))
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.param_shardings(abstract, mesh, rules)
  abstract = nn.meta.unbox(abstract)
  ckpt = checkpoints.Checkpointer(ckpt_dir, create=False)
  state = ckpt.restore(None, abstract, shardings=shardings)
  ckpt.close()
  variables = {k: state[k] for k in ("params", "batch_stats") if k in state}
  return model, variables, config, mesh


def write_png(path: str, index_map: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(index_map, np.uint8), mode="L").save(path)


def predict_split(workdir: str, split: str, out_dir: str, *, indices=None,
                  config: ml_collections.ConfigDict | None = None, mesh=None) -> int:
  """Writes `<out_dir>/<split>/<id>.png` for the split (or its `indices`). Returns the count."""
  model, variables, config, mesh = load(workdir, config, mesh)
  rules = tuple(config.sharding_rules)
  num_classes = sources.num_classes(config.data)
  ds = pipeline.eval_dataset(config, split, num_classes, indices=indices)
  var_shardings = jax.tree.map(lambda x: x.sharding, variables)
  predict_fn = stage1.make_predict_fn(model, var_shardings, mesh, rules)
  n = 0
  for example_id, pred, _ in stage1.predict_dataset(predict_fn, variables, ds,
                                                     config.eval_batch_size, mesh, rules):
    if jax.process_index() == 0:
      write_png(os.path.join(out_dir, split, f"{example_id}.png"), pred)
    n += 1
  logging.info("wrote %d coarse maps of %s to %s", n, split, os.path.join(out_dir, split))
  return n


def fold_config(config: ml_collections.ConfigDict, num_folds: int, fold: int
                ) -> ml_collections.ConfigDict:
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.data.num_folds = num_folds
    cfg.data.fold = fold
    cfg.eval_every_steps = 0
  return cfg


def predict_cross_fitted(workdir: str, out_dir: str, num_folds: int,
                         config: ml_collections.ConfigDict | None = None) -> int:
  """Train-split coarse maps by k-fold cross-fitting (trains missing fold models first)."""
  config = config or checkpoints.load_config(os.path.join(workdir, "checkpoints"))
  n_train = len(sources.get_source(config.data, config.data.train_split))
  total = 0
  for fold in range(num_folds):
    cfg = fold_config(config, num_folds, fold)
    fold_dir = os.path.join(workdir, "folds", f"fold{fold}")
    stage1.train_and_evaluate(cfg, fold_dir)  # resumes / returns at once when already trained
    held_out = pipeline.fold_indices(n_train, num_folds, fold, cfg.seed, held_out=True)
    total += predict_split(fold_dir, cfg.data.train_split, out_dir, indices=held_out, config=cfg)
  return total
