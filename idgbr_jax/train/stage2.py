"""Stage II: train the IDGBR refiner (denoiser + CG net [+ REPA projector]) on a device mesh.

Trainable and frozen params are separate trees, both passed to the jitted step as arguments;
only the trainable tree reaches the optimizer. The model, its init and its schedule come from
`idgbr_jax.assembly.stage2`; the step calls the refiner's own loss API (`Refiner.losses`).
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from clu import metric_writers, metrics, periodic_actions

from idgbr_jax import checkpoints, diffusion, paths, visualize
from idgbr_jax.assembly import stage2 as assembly
from idgbr_jax.data import pipeline, sources, transforms
from idgbr_jax.inference import refine
from idgbr_jax.models import denoiser, refiner
from idgbr_jax.parallel import sharding
from idgbr_jax.train import common, latent_cache, optim, preemption


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  # Averages over the steps whose update was applied (common.NonFiniteGuard).
  loss: common.applied_average("loss")
  mse: common.applied_average("mse")
  repa: common.applied_average("repa")
  grad_norm: common.applied_average("grad_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  skipped_steps: common.SkippedSteps


# ----- params ------------------------------------------------------------------------------------
def init_state(ref: refiner.Refiner, tx, config: ml_collections.ConfigDict, mesh, rules):
  """Sharded train state {params, opt_state, step} and its shardings; `config.init.unet` (a
  params checkpoint, e.g. converted SD-1.5) or `config.init.refiner` (an imported original
  run) replaces the random init."""
  init_params = assembly.trainable_init_fn(ref, config)

  def init(rng):
    params = init_params(rng)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  state, state_sh = sharding.create_sharded(init, assembly.trainable_key(config), mesh, rules)
  # config.init.unet replaces the denoiser; config.init.refiner (an imported original run)
  # replaces unet + guidance (+ projector). Optimizer moments start at zero either way.
  state["params"] = assembly.load_initial_trainable(config, state["params"], state_sh["params"])
  return state, state_sh


def init_frozen(ref: refiner.Refiner, config: ml_collections.ConfigDict, state, state_sh, mesh,
                rules, *, with_teacher: bool = True):
  """The frozen tree for training (with the teacher unless `with_teacher=False`, e.g. a run
  resumed after the warm-up); `unet_ori` is a copy of the encoder half of the freshly
  initialised `state` (call this before restoring a checkpoint)."""
  # A copy, not an alias: the trainable UNet buffers are donated to the train step.
  unet_ori = (jax.tree.map(jnp.copy, denoiser.encoder_params(state["params"]["unet"])),
              denoiser.encoder_params(state_sh["params"]["unet"]))
  return assembly.init_frozen(ref, config, mesh, rules, unet_ori=unet_ori,
                              with_teacher=with_teacher)


def teacher_steps(ref: refiner.Refiner, config: ml_collections.ConfigDict) -> int:
  """How many steps (from the start) the train step needs the DINOv2 teacher: REPA's warm-up,
  `repa.active_steps`, when the refiner has a teacher and REPA is on; else 0."""
  if ref.teacher is None or not config.repa.enabled:
    return 0
  return max(int(config.repa.active_steps), 0)


def step_needs_teacher(ref: refiner.Refiner, config: ml_collections.ConfigDict,
                       step: int) -> bool:
  """Whether the trainer runs loop step `step` (1-based: the state has taken step - 1) with the
  program that holds the teacher: REPA's warm-up steps 1..active_steps; after them only under
  `repa.drop_teacher=False` (default true; ours: the original deletes DINOv2 after
  `acc_steps`). A teacher REPA never uses (active_steps 0) is never loaded."""
  warmup = teacher_steps(ref, config)
  if warmup == 0:
    return False
  return step <= warmup or not bool(config.repa.get("drop_teacher", True))


def drop_teacher(frozen, f_sh):
  """(frozen, shardings) without the teacher; its device buffers are freed now."""
  frozen, f_sh = dict(frozen), dict(f_sh)
  teacher = frozen.pop("teacher", None)
  f_sh.pop("teacher", None)
  if teacher is not None:
    jax.tree.map(lambda x: x.delete(), teacher)
  return frozen, f_sh


# ----- train step --------------------------------------------------------------------------------
def make_step_parts(ref: refiner.Refiner, tx, lr_schedule, schedule, config, *,
                    with_teacher: bool = True):
  """The train step's three parts, (prepare, grads, apply):

  * `prepare(frozen, batch, rng, step) -> prepared`: everything before the gradient, from
    frozen weights only: the conditions (VAE and frozen-encoder passes), the label latent, the
    timesteps, the noised latent, the condition-dropout mask and, during the REPA warm-up, the
    teacher's tokens;
  * `grads(params, frozen, batch, prepared, step) -> (grads, losses)`: the loss and its
    gradient with respect to the trainable params;
  * `apply(state, grads, losses) -> (state, TrainMetrics)`: clipping, AdamW, the non-finite
    guard and the step counter.

  `make_train_step` composes them into one program; `config.split_step` makes the trainer jit
  them as three (`jit_train_step`), so that no single compile holds the whole step.
  """
  d = config.diffusion
  use_repa = with_teacher and teacher_steps(ref, config) > 0

  def prepare(frozen, batch, rng, step):
    rng = jax.random.fold_in(rng, step)
    r_cond, r_gt, r_t, r_noise, r_drop = jax.random.split(rng, 5)
    image, label, coarse = batch["image"], batch["label"], batch["coarse"]
    b = image.shape[0]
    # Cached VAE posterior moments (train/latent_cache.py), when the batch has them, replace
    # the three frozen VAE encoder passes; the latents are drawn from them the same way.
    cond = ref.encode_conditions(frozen, image, coarse, r_cond, use_coarse=d.use_coarse,
                                 image_moments=batch.get("image_moments"),
                                 coarse_moments=batch.get("coarse_moments"))
    if "label_moments" in batch:
      z0 = ref.latent_from_moments(batch["label_moments"], r_gt)
    else:
      z0 = ref.encode_labels(frozen, label, r_gt)
    z0 = jax.lax.stop_gradient(z0)
    t = diffusion.sample_timesteps(r_t, b, schedule, d.timestep_strategy,
                                   d.get("train_max_timestep", 0))
    noise = jax.random.normal(r_noise, z0.shape, jnp.float32)
    out = {"cond": cond, "z_t": diffusion.add_noise(schedule, z0, noise, t), "t": t,
           "noise": noise,
           "keep": (jax.random.uniform(r_drop, (b,)) >= d.cond_dropout).astype(jnp.float32)}
    if use_repa:
      # The teacher only during the warm-up; its tokens take no gradient.
      tokens = lambda: jax.lax.stop_gradient(ref.teacher_tokens(frozen, image))  # noqa: E731
      shape = jax.eval_shape(tokens)
      out["teacher"] = jax.lax.cond(step < config.repa.active_steps, tokens,
                                    lambda: jnp.zeros(shape.shape, shape.dtype))
    return out

  def grads(params, frozen, batch, prepared, step):
    p = prepared

    def loss_fn(trainable):
      # Dropped examples (cond_dropout) train the zero-residual (unconditional) branch.
      mse, align = ref.losses(trainable, frozen, p["z_t"], p["t"], p["noise"], p["cond"],
                              keep=p["keep"] if d.cond_dropout else None, image=batch["image"],
                              align=step < config.repa.active_steps if use_repa else None,
                              teacher=p.get("teacher"))
      return mse + config.repa.weight * align, (mse, align)

    (loss, (mse, align)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return g, {"loss": loss, "mse": mse, "repa": align}

  def apply(state, grads, losses):
    step = state["step"]
    grad_norm = common.l2_norm(grads)
    ok = common.all_finite(losses["loss"], grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
    kept = common.keep_if_finite(ok, {"params": params, "opt_state": opt_state},
                                 {"params": state["params"], "opt_state": state["opt_state"]})
    m = TrainMetrics.single_from_model_output(loss=losses["loss"], mse=losses["mse"],
                                              repa=losses["repa"], grad_norm=grad_norm,
                                              learning_rate=lr_schedule(step), applied=ok)
    return {**kept, "step": step + 1}, m

  return prepare, grads, apply


def make_train_step(ref: refiner.Refiner, tx, lr_schedule, schedule, config, *,
                    with_teacher: bool = True):
  """(state, frozen, batch, rng) -> (state, TrainMetrics): `make_step_parts` in one function.

  Two programs. With the teacher (the warm-up), the REPA term sits behind
  `lax.cond(step < repa.active_steps)`, so the program is right at any step. `with_teacher=
  False` is the step after the warm-up: no REPA branch and no teacher among the frozen
  arguments (its `repa` metric is 0, as the first program's after the warm-up). The trainer
  switches to it after `repa.active_steps` and frees the teacher (`step_needs_teacher`), as the
  original deletes DINOv2 after `acc_steps`: 1.1 B parameters (DINOv2-g) off every chip for
  the rest of the run.

  A step whose loss or gradient is not finite leaves params and optimizer state as they were
  (the step counter moves on) and counts in `TrainMetrics.skipped_steps`; the host decides to
  stop or go on (`common.NonFiniteGuard`).
  """
  prepare, grads, apply = make_step_parts(ref, tx, lr_schedule, schedule, config,
                                          with_teacher=with_teacher)

  def train_step(state, frozen, batch, rng):
    prepared = prepare(frozen, batch, rng, state["step"])
    g, losses = grads(state["params"], frozen, batch, prepared, state["step"])
    return apply(state, g, losses)

  return train_step


class SplitTrainStep:
  """The train step as three jitted programs (`make_step_parts`), called in turn:
  `config.split_step`. The same function as `make_train_step`'s, compiled in three pieces: a
  compile holds one piece (the sd15 step whole needs more host memory to compile than a
  24 GiB machine has), and the chip holds the gradient between the last two (as the whole
  step does before its update). `programs(...)` gives each jitted program with abstract
  arguments, for `idgbr plan`."""

  def __init__(self, parts, mesh, rules, state_sh, frozen_sh, batch_sh):
    self.prepare, self.grads, self.apply = parts
    self.mesh = mesh
    self.rules = rules
    self.state_sh, self.frozen_sh, self.batch_sh = state_sh, frozen_sh, batch_sh
    self.repl = sharding.replicated(mesh)
    self._prepare = None  # jitted at the first call, once the prepared tree's shape is known
    self._grads = jax.jit(self.grads, out_shardings=(state_sh["params"], self.repl),
                          keep_unused=True)
    self._apply = jax.jit(self.apply, in_shardings=(state_sh, state_sh["params"], self.repl),
                          out_shardings=(state_sh, self.repl), donate_argnums=(0,))

  def _jit_prepare(self, frozen, batch, rng, step):
    """(the jitted prepare program, its abstract output): every prepared array has the batch
    first and is sharded as the batch."""
    prepared = jax.eval_shape(self.prepare, frozen, batch, rng, step)
    prepared_sh = jax.tree.map(
        lambda x: sharding.batch_sharding(self.mesh, x.ndim, self.rules), prepared)
    if self._prepare is None:
      self._prepare = jax.jit(self.prepare, in_shardings=(self.frozen_sh, self.batch_sh,
                                                          self.repl, self.repl),
                              out_shardings=prepared_sh, keep_unused=True)
    return self._prepare, jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), prepared, prepared_sh)

  def __call__(self, state, frozen, batch, rng):
    prepare = self._prepare or self._jit_prepare(frozen, batch, rng, state["step"])[0]
    prepared = prepare(frozen, batch, rng, state["step"])
    g, losses = self._grads(state["params"], frozen, batch, prepared, state["step"])
    del prepared  # off the chip before the update
    return self._apply(state, g, losses)

  def programs(self, state, frozen, batch, rng):
    """[(name, jitted, abstract args, trees the chip holds meanwhile besides the args)] of the
    three programs, from abstract (ShapeDtypeStruct) arguments with shardings; call under the
    mesh and the rules."""
    prepare, prepared = self._jit_prepare(frozen, batch, rng, state["step"])
    grads = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                         state["params"])
    losses = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=self.repl)
              for k in ("loss", "mse", "repa")}
    return [
        ("prepare", prepare, (frozen, batch, rng, state["step"]), (state,)),
        ("grads", self._grads, (state["params"], frozen, batch, prepared, state["step"]),
         (state["opt_state"],)),
        ("apply", self._apply, (state, grads, losses), (frozen, batch)),
    ]


def jit_train_step(ref: refiner.Refiner, tx, lr_schedule, schedule, config, mesh, rules,
                   state_sh, frozen_sh, batch_sh, *, with_teacher: bool,
                   keep_unused: bool = False):
  """The trainer's step, `(state, frozen, batch, rng) -> (state, TrainMetrics)`, jitted with
  its shardings, the state donated: one program, or three with `config.split_step`
  (`SplitTrainStep`). Compiled at its first call. `keep_unused` (`idgbr plan`) keeps the
  frozen weights the one program never reads (the VAE decoder) among its arguments, as the
  chip holds them all the same; the split programs always keep them."""
  if config.get("split_step", False):
    return SplitTrainStep(make_step_parts(ref, tx, lr_schedule, schedule, config,
                                          with_teacher=with_teacher),
                          mesh, rules, state_sh, frozen_sh, batch_sh)
  repl = sharding.replicated(mesh)
  return jax.jit(make_train_step(ref, tx, lr_schedule, schedule, config,
                                 with_teacher=with_teacher),
                 in_shardings=(state_sh, frozen_sh, batch_sh, repl),
                 out_shardings=(state_sh, repl), donate_argnums=(0,), keep_unused=keep_unused)


def batch_shardings(mesh, rules, cached_keys=()):
  """Shardings of a train batch; `cached_keys` adds `<key>_moments` (the latent cache's)."""
  out = {"image": sharding.batch_sharding(mesh, 4, rules),
         "label": sharding.batch_sharding(mesh, 3, rules),
         "coarse": sharding.batch_sharding(mesh, 3, rules)}
  out.update({f"{k}_moments": sharding.batch_sharding(mesh, 4, rules) for k in cached_keys})
  return out


def train_input(config, num_classes: int, coarse_dir: str | None, cache=None,
                start_step: int = 0):
  """Stage II's training batches: `pipeline.train_dataset` with no ignore value (a 255 in a
  training label is a data error naming the example; evaluation keeps config.data.ignore_index,
  so eroded labels still score)."""
  return pipeline.train_dataset(config, num_classes, coarse_dir=coarse_dir, cache=cache,
                                ignore_index=transforms.NO_IGNORE, start_step=start_step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains Stage II; resumes from `<workdir>/checkpoints`. Returns state and the last eval.

  Cheap checks come first (config, mesh, coarse maps, the parts' checkpoints, the workdir, the
  first training batch), so a bad input stops the run before any compilation; a non-finite
  step never reaches a checkpoint (`config.nan_policy`, `common.NonFiniteGuard`).
  """
  common.nan_policy(config)  # a bad value is an error now, not after compiling
  # ----- Mesh ----------------------------------------------------------------------------------
  mesh = common.make_mesh(config)
  rules = tuple(config.sharding_rules)
  logging.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())

  # ----- Input, model config & workdir -------------------------------------------------------
  num_classes = sources.num_classes(config.data)
  coarse_dir = assembly.coarse_dir_for(config, config.data.train_split)
  ref = assembly.build_refiner(config, num_classes)  # reads the parts' meta.json: no params yet
  workdir = common.ensure_workdir(workdir)
  ckpt = checkpoints.Checkpointer(paths.join(workdir, "checkpoints"),
                                  max_to_keep=config.max_checkpoints_to_keep)
  start_step = ckpt.latest_step() or 0
  # The data stream's position is the step: a resumed run reads the batches it would have. The
  # first batch is read now (without the latent cache, which needs the frozen VAE), so a data
  # error surfaces before anything is compiled.
  train_iter = common.first_batch_read(
      train_input(config, num_classes, coarse_dir, None, start_step), start_step,
      config.num_train_steps)
  writer = common.create_writer(config, workdir)
  common.write_hparams(writer, config)

  # ----- Params & optimizer --------------------------------------------------------------------
  tx, lr_schedule = optim.make_optimizer(config.optim, config.num_train_steps)
  state, state_sh = init_state(ref, tx, config, mesh, rules)
  # A run resumed after REPA's warm-up never loads the teacher (step_needs_teacher).
  frozen, f_sh = init_frozen(ref, config, state, state_sh, mesh, rules,
                             with_teacher=step_needs_teacher(ref, config, start_step + 1))
  logging.info("stage II trainable %d, frozen %d parameters",
               common.count_params(state["params"]), common.count_params(frozen))

  # ----- Latent cache (needs the frozen VAE) ---------------------------------------------------
  cache, cached_keys = None, ()
  if config.get("latent_cache", False):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      cache = latent_cache.build(ref, frozen, f_sh, config, num_classes, mesh, rules,
                                 coarse_dir=coarse_dir)
    cached_keys = tuple(cache.moments)
    train_iter = iter(train_input(config, num_classes, coarse_dir, cache, start_step))

  # ----- Train steps ---------------------------------------------------------------------------
  schedule = assembly.make_schedule(config)

  def step_for(frozen_sh):
    # Compiled at its first call: the step without the teacher only if the run gets there.
    return jit_train_step(ref, tx, lr_schedule, schedule, config, mesh, rules, state_sh,
                          frozen_sh, batch_shardings(mesh, rules, cached_keys),
                          with_teacher="teacher" in frozen_sh)
  train_step = step_for(f_sh)

  # ----- Checkpoint restore --------------------------------------------------------------------
  if start_step:
    state = ckpt.restore(start_step, state, shardings=state_sh)
    logging.info("resumed from step %d", start_step)
  common.check_resumed_step(state, start_step, ckpt)

  # ----- Train loop ----------------------------------------------------------------------------
  rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                                    writer=writer)
  guard = common.NonFiniteGuard(config, ckpt.directory)
  last_eval: dict[str, Any] = {}
  # The refine function (evaluation and panels), built at the first evaluation and reused: one
  # trace and compile per run, not per evaluation.
  refine_fns = {}

  def evaluate(step: int, params) -> dict[str, Any]:
    """Refined and coarse reports' scalars and the panels (pictures) at `step`; after the last
    step also `<workdir>/final_eval.json`."""
    # Refinement never reads the teacher: the same tree before and after it is dropped.
    frozen_r = {k: v for k, v in frozen.items() if k != "teacher"}
    if "fn" not in refine_fns:
      refine_fns["fn"] = refine.make_refine_fn(ref, config, mesh,
                                               jax.tree.map(lambda x: x.sharding, params),
                                               jax.tree.map(lambda x: x.sharding, frozen_r))
    report = refine.evaluate(ref, params, frozen_r, config, mesh, refine_fn=refine_fns["fn"])
    writer.write_scalars(step, common.report_scalars(report, "eval"))
    if common.num_eval_panels(config):
      common.write_eval_panels(writer, workdir, step,
                               eval_panels(refine_fns["fn"], params, frozen_r, config, mesh))
    if step == config.num_train_steps:
      common.write_final_eval(workdir, step, report)
    return report

  # Trace under the mesh and the rules so the models' activation constraints take effect.
  with ckpt, metric_writers.ensure_flushes(writer), jax.set_mesh(mesh), \
      nn.logical_axis_rules(rules), preemption.PreemptionGuard() as notice:
    step_end = common.StepEnd(config, writer, ckpt, guard, notice, start_step)
    for step in range(start_step + 1, config.num_train_steps + 1):
      if "teacher" in frozen and not step_needs_teacher(ref, config, step):
        frozen, f_sh = drop_teacher(frozen, f_sh)  # the warm-up is over
        train_step = step_for(f_sh)
        logging.info("step %d: REPA warm-up over, teacher dropped", step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        with report_progress.timed("data"):
          arrays, ids = pipeline.split_ids(next(train_iter))
          batch = pipeline.to_global(arrays, mesh, rules)
        state, m = train_step(state, frozen, batch, rng)
      guard.record(step, ids, m.skipped_steps.count)
      report_progress(step)
      if step_end(step, state, m):
        break
      if common.is_eval_step(step, config):
        with report_progress.timed("eval"):
          last_eval = evaluate(step, state["params"])
    if common.final_eval_missing(workdir, config, start_step):
      last_eval = evaluate(start_step, state["params"])
    ckpt.wait_until_finished()
  return {"state": state, "frozen": frozen, "refiner": ref, "eval": last_eval, "mesh": mesh,
          "preempted_at": step_end.preempted_at, "checkpoint_dir": ckpt.directory,
          "skipped_steps": guard.skipped}


def eval_panels(refine_fn, trainable, frozen, config, mesh) -> list[tuple[str, Any]]:
  """image | ground truth | coarse | refined | repaired/damaged of the first
  `config.num_eval_panels` eval examples (the same ones at every evaluation, with the
  evaluation's per-batch noise). Every process refines (the batch is global);
  `common.write_eval_panels` writes on process 0."""
  n = common.num_eval_panels(config)
  if n:
    n = min(n, len(refine.eval_split_dataset(config)))
  if not n:
    return []
  ds = refine.eval_split_dataset(config, max_examples=n)
  num_classes = sources.num_classes(config.data)
  return [(f"{k:02d}_{example_id}",
           visualize.panel(ds[k]["image"], label, coarse, refined, num_classes,
                           ignore_label=config.data.ignore_index,
                           scale=visualize.display_scale(label.shape[1])))
          for k, (example_id, refined, coarse, label) in enumerate(
              refine.refine_dataset(refine_fn, trainable, frozen, ds, config, mesh))]
