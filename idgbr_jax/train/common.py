"""Pieces every trainer shares: workdir checks, writers, the evaluation cadence, and the guard
that keeps a non-finite loss or gradient out of every checkpoint."""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metrics

from idgbr_jax import paths
from idgbr_jax.checkpoints import CheckpointError
from idgbr_jax.parallel import sharding
from idgbr_jax.train import preemption


class WorkdirError(RuntimeError):
  """The workdir cannot be created or written."""


def ensure_workdir(workdir: str) -> str:
  """Creates `workdir` (local or a bucket URL) and checks it is writable before any work starts
  (so none is lost). Returns it absolute / as a URL string."""
  if not workdir:
    raise WorkdirError("--workdir is required")
  try:
    path = paths.ensure_writable_dir(workdir, "workdir")
  except OSError as e:
    raise WorkdirError(f"{e.strerror} (for checkpoints and logs)") from e
  return str(path)


def make_mesh(config: ml_collections.ConfigDict):
  """`config.mesh_shape` (and `dcn_mesh_shape`) as a mesh; a shape that does not fit the
  devices is an error saying what would."""
  try:
    return sharding.mesh_from_config(config)
  except ValueError as e:
    raise ValueError(f"config.mesh_shape: {e}; expected sizes (data, fsdp, tensor; one may be "
                     f"-1) whose product divides the {jax.device_count()} devices") from e


def first_batch_read(dataset, start_step: int, num_train_steps: int):
  """An iterator over `dataset` whose first batch is already read when steps remain: a data
  error (an unreadable record, a label outside the classes, a missing coarse map, an empty
  split) surfaces here, before any compilation, and nothing is written."""
  it = iter(dataset)
  if start_step >= num_train_steps:
    return it
  first = next(it)
  return itertools.chain([first], it)


def check_resumed_step(state, start_step: int, ckpt) -> None:
  """The restored state's step is the checkpoint's (the data stream was positioned on it)."""
  step = int(state["step"])
  if step != start_step:
    raise CheckpointError(f"checkpoint step {start_step} in {ckpt.directory} holds a train "
                          f"state at step {step}: the directory was edited by hand?")


def create_writer(config: ml_collections.ConfigDict, workdir: str):
  """clu's writer: TensorBoard events on process 0 (`config.summary_dir`, default the workdir;
  TensorBoard's writer goes through TensorFlow's file systems, local or gs://), logging only on
  the other processes."""
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  return metric_writers.create_default_writer(config.get("summary_dir") or workdir,
                                              just_logging=jax.process_index() > 0)


def l2_norm(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree))))


def write_train_metrics(writer, step: int, train_metrics) -> None:
  """Writes a merged clu Collection as `train/*` scalars. Non-finite steps are the
  `NonFiniteGuard`'s business (checked before this is called, and before every save)."""
  scalars = train_metrics.compute()
  writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})


# ----- non-finite steps ------------------------------------------------------------------------
# config.nan_policy: "stop" (default) ends the run at the first non-finite step, keeping the
# last checkpoint (written before it); "skip" leaves such a step's update out (params,
# optimizer state and BatchNorm statistics stay as they were; the step counter and the data
# stream move on) and stops after more than config.nan_max_skips of them. Either way no
# checkpoint ever holds a non-finite update: the guard is checked before every save.
NAN_POLICIES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
  """A train step produced a non-finite loss or gradient (names the step and the batch ids)."""


def nan_policy(config: ml_collections.ConfigDict) -> tuple[str, int]:
  """(policy, max skipped steps) from `config.nan_policy` / `config.nan_max_skips`."""
  policy = config.get("nan_policy", "stop")
  if policy not in NAN_POLICIES:
    raise ValueError(f"config.nan_policy={policy!r}; allowed: {', '.join(NAN_POLICIES)}")
  max_skips = int(config.get("nan_max_skips", 0) if policy == "skip" else 0)
  if max_skips < 0:
    raise ValueError(f"config.nan_max_skips={max_skips} must be >= 0")
  return policy, max_skips


def all_finite(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
  """One boolean scalar inside a jitted step: the loss and the gradient's global L2 norm are
  finite (a NaN or inf anywhere in the gradient, or a norm that overflows, makes it false).
  The norm is the one the step logs anyway; a per-leaf check would cost compile time."""
  return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


def keep_if_finite(ok: jax.Array, new, old):
  """`new` where `ok`, else `old`, leaf by leaf (no host sync: a select inside the step, which
  XLA fuses into the update)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


@flax.struct.dataclass
class SkippedSteps(metrics.Metric):
  """Counts the steps whose update was left out as non-finite (`train/skipped_steps`)."""
  count: jnp.ndarray

  @classmethod
  def empty(cls) -> "SkippedSteps":
    return cls(count=jnp.array(0, jnp.int32))

  @classmethod
  def from_model_output(cls, applied: jnp.ndarray, **_) -> "SkippedSteps":
    return cls(count=1 - jnp.asarray(applied).astype(jnp.int32))

  def merge(self, other: "SkippedSteps") -> "SkippedSteps":
    return type(self)(count=self.count + other.count)

  def compute(self) -> jnp.ndarray:
    return self.count


def applied_average(name: str):
  """clu Average of model output `name` over the steps whose update was applied (a skipped,
  non-finite step is left out of the loss curves and counted in `skipped_steps`)."""
  return metrics.Average.from_fun(
      lambda **out: {"values": jnp.reshape(out[name], (1,)),
                     "mask": jnp.reshape(out["applied"], (1,))})


class NonFiniteGuard:
  """Host side of `config.nan_policy`. The train loop hands over each step's device-side
  `skipped` count and the batch's ids (`record`, no host sync); `check` reads the flags of
  all steps since the last check in one transfer. Call it before every checkpoint save (and at
  log steps): under "stop", or past `nan_max_skips` skipped steps, it raises NonFiniteError
  naming the step and the batch ids, so that step never reaches a checkpoint."""

  def __init__(self, config: ml_collections.ConfigDict, checkpoint_dir: str = ""):
    self.policy, self.max_skips = nan_policy(config)
    self.checkpoint_dir = str(checkpoint_dir)
    self.skipped: list[int] = []
    self._pending: list[tuple[int, Sequence[str], jax.Array]] = []

  def record(self, step: int, ids: Sequence[str], skipped: jax.Array) -> None:
    self._pending.append((step, ids, skipped))

  def check(self, last_saved: int | None = None) -> None:
    if not self._pending:
      return
    flags = jax.device_get([s for _, _, s in self._pending])
    pending, self._pending = self._pending, []
    for (step, ids, _), flag in zip(pending, flags):
      if not int(flag):
        continue
      self.skipped.append(step)
      where = _batch_ids(ids)
      if self.policy == "stop" or len(self.skipped) > self.max_skips:
        kept = (f"the last checkpoint (step {last_saved}) in {self.checkpoint_dir} is intact "
                "and holds no non-finite value" if last_saved else
                "no checkpoint was written by this run")
        why = ("config.nan_policy='stop'" if self.policy == "stop" else
               f"{len(self.skipped)} non-finite steps ({', '.join(map(str, self.skipped[-10:]))})"
               f" > config.nan_max_skips={self.max_skips}")
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step} ({why}); batch {where}; {kept}. "
            "Check those examples, lower the learning rate, or set config.nan_policy='skip' "
            "(with config.nan_max_skips=N) to leave such steps out")
      logging.warning("step %d: non-finite loss or gradient; update skipped (%d of at most %d, "
                      "config.nan_policy='skip'); batch %s", step, len(self.skipped),
                      self.max_skips, where)


def _batch_ids(ids: Sequence[str]) -> str:
  ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
  more = f" (+{len(ids) - 16} more)" if len(ids) > 16 else ""
  where = "" if jax.process_count() == 1 else f" (process {jax.process_index()}'s rows)"
  return f"ids {ids[:16]}{more}{where}"


def report_scalars(report: dict, prefix: str) -> dict[str, float]:
  """The numeric entries of an evaluation report (nested dicts flattened with '/')."""
  out = {}
  for k, v in report.items():
    if isinstance(v, dict):
      out.update(report_scalars(v, f"{prefix}/{k}"))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[f"{prefix}/{k}"] = float(v)
  return out


def is_eval_step(step: int, config: ml_collections.ConfigDict) -> bool:
  """`config.eval_every_steps`: N > 0 evaluates every N steps and after the last step; 0 only
  after the last step; -1 never (e.g. when the caller evaluates itself, as the demo does)."""
  every = int(config.eval_every_steps)
  if every < 0:
    return False
  return step == config.num_train_steps or (every > 0 and step % every == 0)


def write_hparams(writer, config: ml_collections.ConfigDict) -> None:
  """The config's scalar leaves as TensorBoard hparams (dotted keys)."""
  writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                        if isinstance(v, (int, float, str, bool))})


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


class StepEnd:
  """What both trainers do after each step, in order: the step's metrics merged and, every
  `log_every_steps` and at the last step, written; a checkpoint every `checkpoint_every_steps`
  and at the last step; after a preemption notice, this step's checkpoint. A non-finite step
  (`NonFiniteGuard.check`) reaches neither the logs nor a checkpoint.

  `__call__` returns True when the loop must stop (preempted; `preempted_at` is then set)."""

  def __init__(self, config: ml_collections.ConfigDict, writer, ckpt, guard: NonFiniteGuard,
               notice, start_step: int):
    self.config, self.writer, self.ckpt, self.guard, self.notice = (config, writer, ckpt, guard,
                                                                    notice)
    self.metrics = None
    self.last_saved = start_step or None
    self.preempted_at = None

  def __call__(self, step: int, state, step_metrics) -> bool:
    config = self.config
    self.metrics = step_metrics if self.metrics is None else self.metrics.merge(step_metrics)
    last = step == config.num_train_steps
    if step % config.log_every_steps == 0 or last:
      self.guard.check(self.last_saved)
      write_train_metrics(self.writer, step, self.metrics)
      self.metrics = None
    saved = step % config.checkpoint_every_steps == 0 or last
    if saved:
      self.guard.check(self.last_saved)
      self.ckpt.save(step, state, config=config)
      self.last_saved = step
    if self.notice.reached(step):
      self.guard.check(self.last_saved)
      self.preempted_at = save_for_preemption(self.ckpt, step, state, config, saved)
      return True
    return False


def save_for_preemption(ckpt, step: int, state, config, saved: bool) -> int:
  """After a preemption notice: this step's checkpoint (unless the loop just saved it), waited
  for, so the process can exit. Returns the step."""
  if not saved:
    ckpt.save(step, state, config=config, force=True)
  ckpt.wait_until_finished()
  logging.warning(preemption.resume_message(step, ckpt.directory))
  return step


# ----- what an evaluation leaves for a person and for a sweep ------------------------------------
# The last step's evaluation report, `{"step": N, **report}`, as JSON in the workdir: what
# `idgbr sweep` tabulates (its presence marks a finished run; idgbr_jax.sweep.FINAL_EVAL).
FINAL_EVAL_FILE = "final_eval.json"


def _plain(value):
  """A report with NumPy / JAX scalars and arrays as JSON numbers and lists."""
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return np.asarray(value).tolist()
  return value


def write_final_eval(workdir: str, step: int, report: dict) -> None:
  """`<workdir>/final_eval.json` (process 0 only)."""
  if jax.process_index() == 0:
    paths.write_json(paths.join(workdir, FINAL_EVAL_FILE), {"step": step, **_plain(report)})


def num_eval_panels(config: ml_collections.ConfigDict) -> int:
  """`config.num_eval_panels`: pictures per evaluation (0: none). A config saved before the key
  existed (a checkpoint's) has none."""
  n = int(config.get("num_eval_panels", 0))
  if n < 0:
    raise ValueError(f"config.num_eval_panels={n} must be >= 0 (0 writes no pictures)")
  return n


def write_eval_panels(writer, workdir: str, step: int,
                      panels: Sequence[tuple[str, np.ndarray]]) -> None:
  """Panels (name, uint8 (H, W, 3)) of an evaluation as `<workdir>/panels/step_<step>/<name>.png`
  and as one TensorBoard image summary `eval/panels` (a batch, so TensorBoard shows them side by
  side at each step). Process 0 only: the others computed the same maps."""
  if not panels or jax.process_index() != 0:
    return
  folder = paths.join(workdir, "panels", f"step_{step}")
  for name, image in panels:
    paths.write_png(paths.join(folder, f"{_file_name(name)}.png"), image)
  writer.write_images(step, {"eval/panels": np.stack([image for _, image in panels])})


def _file_name(name: str) -> str:
  # Example ids are the datasets' (file stems, tile names): keep them readable, never a path.
  return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(name))


def final_eval_missing(workdir: str, config: ml_collections.ConfigDict, start_step: int) -> bool:
  """A run resumed at its last step without its final evaluation (stopped between the last
  save and that evaluation, or trained before the report was written): the trainer runs it
  now, as big_vision re-runs final evals after a late preemption."""
  return (int(config.eval_every_steps) >= 0 and start_step >= config.num_train_steps
          and not paths.exists(paths.join(workdir, FINAL_EVAL_FILE)))
