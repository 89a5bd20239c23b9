"""Stage I: train a discriminative segmenter (UNet / DeepLabv3+ / SegFormer) on a device mesh.

Reads top to bottom: Workdir & logging / Mesh / Input pipeline / Model & optimizer / Sharded
state / Train step / Checkpoint restore / Train loop. The predict helpers at the bottom are
shared with `idgbr predict` (coarse maps for Stage II) and the demo.
"""

import functools
import os
from typing import Any, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, metrics, periodic_actions

from idgbr_jax import checkpoints
from idgbr_jax.data import pipeline, sources
from idgbr_jax.models import backbones
from idgbr_jax.parallel import sharding
from idgbr_jax.train import common, losses, optim


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  pixel_accuracy: metrics.Average.from_output("pixel_accuracy")
  grad_norm: metrics.Average.from_output("grad_norm")
  param_norm: metrics.LastValue.from_output("param_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  overrides = config.model.overrides.to_dict() if "overrides" in config.model else {}
  return backbones.get_backbone(config.model.backbone, num_classes, config.model.variant,
                                dtype=common.dtype_from_name(config.model.dtype), **overrides)


def input_size(config: ml_collections.ConfigDict) -> int:
  return config.data.crop_size or config.data.image_size


def make_init_fn(model, tx, image_size: int):
  """rng -> train state dict (boxed params, so shardings can be read off `eval_shape`)."""
  def init(rng):
    variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32),
                           train=False)
    state = {"params": variables["params"], "opt_state": tx.init(variables["params"]),
             "step": jnp.zeros((), jnp.int32)}
    if "batch_stats" in variables:
      state["batch_stats"] = variables["batch_stats"]
    return state
  return init


def _variables(state_or_vars: dict[str, Any]) -> dict[str, Any]:
  return {k: state_or_vars[k] for k in ("params", "batch_stats") if k in state_or_vars}


def make_train_step(model, tx, schedule, num_classes: int, config: ml_collections.ConfigDict):
  """(state, batch, rng) -> (state, TrainMetrics). RNG is `fold_in(rng, step)`: nothing to save."""
  ignore_index = config.data.ignore_index

  def train_step(state, batch, rng):
    step = state["step"]
    rng = jax.random.fold_in(rng, step)
    has_bs = "batch_stats" in state

    def loss_fn(params):
      variables = {"params": params, **({"batch_stats": state["batch_stats"]} if has_bs else {})}
      out = model.apply(variables, batch["image"], train=True, rngs={"dropout": rng},
                        mutable=["batch_stats"] if has_bs else False)
      logits, updates = out if has_bs else (out, {})
      loss = losses.segmentation_loss(logits, batch["label"], num_classes, ignore_index,
                                      config.loss.dice_weight)
      return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    param_updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + u, state["params"], param_updates)
    new_state = {**state, "params": params, "opt_state": opt_state, "step": step + 1}
    if has_bs:
      new_state["batch_stats"] = updates["batch_stats"]
    valid = batch["label"] != ignore_index
    acc = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) & valid) / jnp.maximum(
        jnp.sum(valid), 1)
    m = TrainMetrics.single_from_model_output(
        loss=loss, pixel_accuracy=acc, grad_norm=common.l2_norm(grads),
        param_norm=common.l2_norm(params), learning_rate=schedule(step))
    return new_state, m

  return train_step


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


def predict_dataset(predict_fn, variables, ds, batch_size: int, mesh, rules
                    ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
  """Yields (id, predicted map, label) over an eval dataset, in order."""
  for batch, ids, valid in pipeline.eval_batches(ds, batch_size, keys=("image", "label")):
    images = pipeline.to_global(common.host_slice({"image": batch["image"]}), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      preds = common.to_host(predict_fn(variables, images["image"]))
    for i in range(valid):
      yield ids[i], preds[i], batch["label"][i]


def evaluate(predict_fn, variables, ds, config, num_classes: int, mesh, rules) -> dict[str, Any]:
  """The evaluation suite's report (mIoU, mF1, WF, ...) on a whole split."""
  from idgbr_jax import metrics as seg_metrics  # pylint: disable=import-outside-toplevel
  preds, labels = [], []
  for _, pred, label in predict_dataset(predict_fn, variables, ds, config.eval_batch_size, mesh,
                                        rules):
    preds.append(pred)
    labels.append(label)
  return seg_metrics.evaluate_maps(preds, labels, **common.eval_kwargs(config.data, num_classes))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains Stage I; resumes from `<workdir>/checkpoints` if present. Returns the last eval."""
  # ----- Workdir & logging -------------------------------------------------------------------
  workdir = common.ensure_workdir(workdir)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                        if isinstance(v, (int, float, str, bool))})

  # ----- Mesh ----------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh_shape.to_dict())
  rules = tuple(config.sharding_rules)
  logging.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())

  # ----- Input pipeline ------------------------------------------------------------------------
  num_classes = sources.num_classes(config.data)
  train_iter = iter(pipeline.train_dataset(config, num_classes))
  eval_ds = pipeline.eval_dataset(config, config.data.eval_split, num_classes)

  # ----- Model & optimizer ---------------------------------------------------------------------
  model = build_model(config, num_classes)
  tx, schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)

  # ----- Sharded state -------------------------------------------------------------------------
  state, state_shardings = common.create_sharded(
      make_init_fn(model, tx, input_size(config)), init_rng, mesh, rules)
  logging.info("%s/%s: %d parameters", config.model.backbone, config.model.variant,
               common.count_params(state["params"]))

  # ----- Train step ----------------------------------------------------------------------------
  batch_shardings = {"image": sharding.batch_sharding(mesh, 4, rules),
                     "label": sharding.batch_sharding(mesh, 3, rules)}
  train_step = jax.jit(make_train_step(model, tx, schedule, num_classes, config),
                       in_shardings=(state_shardings, batch_shardings, sharding.replicated(mesh)),
                       out_shardings=(state_shardings, sharding.replicated(mesh)),
                       donate_argnums=(0,))
  predict_fn = make_predict_fn(model, _variables(state_shardings), mesh, rules)

  # ----- Checkpoint restore --------------------------------------------------------------------
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  max_to_keep=config.max_checkpoints_to_keep)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(None, state, shardings=state_shardings, data_iterator=train_iter)
    logging.info("resumed from step %d", int(state["step"]))
  start_step = int(state["step"])

  # ----- Train loop ----------------------------------------------------------------------------
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                                    writer=writer)
  train_metrics = None
  last_eval: dict[str, Any] = {}
  # Trace under the mesh and the rules so the models' activation constraints take effect.
  with metric_writers.ensure_flushes(writer), jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for step in range(start_step + 1, config.num_train_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        with report_progress.timed("data"):
          batch = pipeline.to_global(next(train_iter), mesh, rules)
        state, m = train_step(state, batch, train_rng)
      train_metrics = m if train_metrics is None else train_metrics.merge(m)
      report_progress(step)
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        common.write_train_metrics(writer, step, train_metrics)
        train_metrics = None
      if config.eval_every_steps and (step % config.eval_every_steps == 0 or
                                      step == config.num_train_steps):
        with report_progress.timed("eval"):
          last_eval = evaluate(predict_fn, _variables(state), eval_ds, config, num_classes, mesh,
                               rules)
        writer.write_scalars(step, common.report_scalars(last_eval, "eval"))
      if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
        ckpt.save(step, state, data_iterator=train_iter, config=config)
  ckpt.wait_until_finished()
  ckpt.close()
  return {"state": state, "eval": last_eval}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
