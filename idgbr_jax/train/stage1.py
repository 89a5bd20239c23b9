"""Stage I: train a discriminative segmenter (UNet / DeepLabv3+ / SegFormer) on a device mesh.

Reads top to bottom: Workdir & logging / Mesh / Input pipeline / Model & optimizer / Sharded
state / Train step / Checkpoint restore / Train loop. The model comes from
`idgbr_jax.assembly.stage1`, evaluation from `idgbr_jax.inference.stage1`; cross-fitted train
coarse maps (fold models trained here) are at the bottom.
"""

import copy
import itertools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from clu import metric_writers, metrics, periodic_actions

from idgbr_jax import checkpoints, paths, visualize
from idgbr_jax.assembly import stage1 as assembly
from idgbr_jax.data import pipeline, sources
from idgbr_jax.inference import stage1 as infer
from idgbr_jax.parallel import sharding
from idgbr_jax.train import common, losses, optim, preemption


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  # Averages over the steps whose update was applied (common.NonFiniteGuard).
  loss: common.applied_average("loss")
  pixel_accuracy: common.applied_average("pixel_accuracy")
  grad_norm: common.applied_average("grad_norm")
  param_norm: metrics.LastValue.from_output("param_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  skipped_steps: common.SkippedSteps


def make_init_fn(model, tx, image_size: int):
  """rng -> train state dict (boxed params, so shardings can be read off `eval_shape`)."""
  init_variables = assembly.variables_init_fn(model, image_size)

  def init(rng):
    variables = init_variables(rng)
    state = {"params": variables["params"], "opt_state": tx.init(variables["params"]),
             "step": jnp.zeros((), jnp.int32)}
    if "batch_stats" in variables:
      state["batch_stats"] = variables["batch_stats"]
    return state
  return init


def _variables(state_or_vars: dict[str, Any]) -> dict[str, Any]:
  return {k: state_or_vars[k] for k in ("params", "batch_stats") if k in state_or_vars}


def make_train_step(model, tx, schedule, num_classes: int, config: ml_collections.ConfigDict):
  """(state, batch, rng) -> (state, TrainMetrics). RNG is `fold_in(rng, step)`: nothing to save.

  A step whose loss or gradient is not finite leaves params, optimizer state and BatchNorm
  statistics as they were (only the step counter moves on) and counts in
  `TrainMetrics.skipped_steps`; the host decides to stop or go on (`common.NonFiniteGuard`).
  """
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
    grad_norm = common.l2_norm(grads)
    ok = common.all_finite(loss, grad_norm)
    param_updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + u, state["params"], param_updates)
    new, old = {"params": params, "opt_state": opt_state}, {
        "params": state["params"], "opt_state": state["opt_state"]}
    if has_bs:
      new["batch_stats"], old["batch_stats"] = updates["batch_stats"], state["batch_stats"]
    new_state = {**state, **common.keep_if_finite(ok, new, old), "step": step + 1}
    valid = batch["label"] != ignore_index
    acc = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) & valid) / jnp.maximum(
        jnp.sum(valid), 1)
    m = TrainMetrics.single_from_model_output(
        loss=loss, pixel_accuracy=acc, grad_norm=grad_norm,
        param_norm=common.l2_norm(new_state["params"]), learning_rate=schedule(step),
        applied=ok)
    return new_state, m

  return train_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains Stage I; resumes from `<workdir>/checkpoints` if present. Returns the last eval.

  Cheap checks come first (config, mesh, workdir, the first training batch), so a bad input
  stops the run before any compilation; a non-finite step never reaches a checkpoint
  (`config.nan_policy`, `common.NonFiniteGuard`).
  """
  common.nan_policy(config)  # a bad value is an error now, not after compiling
  # ----- Mesh ----------------------------------------------------------------------------------
  mesh = common.make_mesh(config)
  rules = tuple(config.sharding_rules)
  logging.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())

  # ----- Workdir & logging -------------------------------------------------------------------
  workdir = common.ensure_workdir(workdir)
  ckpt = checkpoints.Checkpointer(paths.join(workdir, "checkpoints"),
                                  max_to_keep=config.max_checkpoints_to_keep)
  start_step = ckpt.latest_step() or 0

  # ----- Input pipeline ------------------------------------------------------------------------
  num_classes = sources.num_classes(config.data)
  eval_ds = pipeline.eval_dataset(config, config.data.eval_split, num_classes)
  # The data stream's position is the step: a resumed run reads the batches it would have. The
  # first batch is read now, so a data error surfaces before anything is compiled.
  train_iter = pipeline.train_dataset(config, num_classes, start_step=start_step)
  train_iter = common.first_batch_read(train_iter, start_step, config.num_train_steps)
  writer = common.create_writer(config, workdir)
  common.write_hparams(writer, config)

  # ----- Model & optimizer ---------------------------------------------------------------------
  model = assembly.build_model(config, num_classes)
  tx, schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)

  # ----- Sharded state -------------------------------------------------------------------------
  state, state_shardings = sharding.create_sharded(
      make_init_fn(model, tx, assembly.input_size(config)), init_rng, mesh, rules)
  logging.info("%s/%s: %d parameters", config.model.backbone, config.model.variant,
               common.count_params(state["params"]))

  # ----- Train step ----------------------------------------------------------------------------
  batch_shardings = {"image": sharding.batch_sharding(mesh, 4, rules),
                     "label": sharding.batch_sharding(mesh, 3, rules)}
  train_step = jax.jit(make_train_step(model, tx, schedule, num_classes, config),
                       in_shardings=(state_shardings, batch_shardings, sharding.replicated(mesh)),
                       out_shardings=(state_shardings, sharding.replicated(mesh)),
                       donate_argnums=(0,))
  predict_fn = infer.make_predict_fn(model, _variables(state_shardings), mesh, rules)

  # ----- Checkpoint restore --------------------------------------------------------------------
  if start_step:
    state = ckpt.restore(start_step, state, shardings=state_shardings)
    logging.info("resumed from step %d", start_step)
  common.check_resumed_step(state, start_step, ckpt)

  # ----- Train loop ----------------------------------------------------------------------------
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                                    writer=writer)
  guard = common.NonFiniteGuard(config, ckpt.directory)
  last_eval: dict[str, Any] = {}

  def evaluate(step: int, state) -> dict[str, Any]:
    """The evaluation suite's scalars and the panels (pictures) at `step`; after the last step
    also `<workdir>/final_eval.json`."""
    variables = _variables(state)
    report = infer.evaluate(predict_fn, variables, eval_ds, config, num_classes, mesh, rules)
    writer.write_scalars(step, common.report_scalars(report, "eval"))
    common.write_eval_panels(writer, workdir, step, eval_panels(
        predict_fn, variables, eval_ds, config, num_classes, mesh, rules))
    if step == config.num_train_steps:
      common.write_final_eval(workdir, step, report)
    return report

  # Trace under the mesh and the rules so the models' activation constraints take effect.
  with ckpt, metric_writers.ensure_flushes(writer), jax.set_mesh(mesh), \
      nn.logical_axis_rules(rules), preemption.PreemptionGuard() as notice:
    step_end = common.StepEnd(config, writer, ckpt, guard, notice, start_step)
    for step in range(start_step + 1, config.num_train_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        with report_progress.timed("data"):
          arrays, ids = pipeline.split_ids(next(train_iter))
          batch = pipeline.to_global(arrays, mesh, rules)
        state, m = train_step(state, batch, train_rng)
      guard.record(step, ids, m.skipped_steps.count)
      report_progress(step)
      if step_end(step, state, m):
        break
      if common.is_eval_step(step, config):
        with report_progress.timed("eval"):
          last_eval = evaluate(step, state)
    if common.final_eval_missing(workdir, config, start_step):
      last_eval = evaluate(start_step, state)
    ckpt.wait_until_finished()
  return {"state": state, "eval": last_eval, "preempted_at": step_end.preempted_at,
          "checkpoint_dir": ckpt.directory, "skipped_steps": guard.skipped}


def eval_panels(predict_fn, variables, eval_ds, config, num_classes: int, mesh, rules
                ) -> list[tuple[str, Any]]:
  """image | ground truth | prediction of the first `config.num_eval_panels` eval examples (the
  same ones at every evaluation, so TensorBoard shows them change). Every process predicts
  (the batch is global); `common.write_eval_panels` writes on process 0."""
  n = min(common.num_eval_panels(config), len(eval_ds))
  if not n:
    return []
  maps = itertools.islice(infer.predict_dataset(predict_fn, variables, eval_ds,
                                                config.eval_batch_size, mesh, rules), n)
  return [(f"{k:02d}_{example_id}",
           visualize.label_panel(eval_ds[k]["image"], label, pred, num_classes,
                                 scale=visualize.display_scale(label.shape[1])))
          for k, (example_id, pred, label) in enumerate(maps)]


# ----- cross-fitted coarse maps ----------------------------------------------------------------
def fold_config(config: ml_collections.ConfigDict, num_folds: int, fold: int
                ) -> ml_collections.ConfigDict:
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.data.num_folds = num_folds
    cfg.data.fold = fold
    cfg.eval_every_steps = -1
  return cfg


def predict_cross_fitted(workdir: str, out_dir: str, num_folds: int,
                         config: ml_collections.ConfigDict | None = None) -> int:
  """Train-split coarse maps by k-fold cross-fitting (trains missing fold models first)."""
  config = config or checkpoints.load_config(paths.join(workdir, "checkpoints"))
  n_train = len(sources.get_source(config.data, config.data.train_split))
  total = 0
  for fold in range(num_folds):
    cfg = fold_config(config, num_folds, fold)
    fold_dir = paths.join(workdir, "folds", f"fold{fold}")
    train_and_evaluate(cfg, fold_dir)  # resumes / returns at once when already trained
    held_out = pipeline.fold_indices(n_train, num_folds, fold, cfg.seed, held_out=True)
    total += infer.predict_split(fold_dir, cfg.data.train_split, out_dir, indices=held_out,
                                 config=cfg)
  return total
