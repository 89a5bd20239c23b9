"""Pieces every trainer shares: workdir checks, writers and the evaluation cadence."""
from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from idgbr_jax import paths
from idgbr_jax.train import preemption


class WorkdirError(RuntimeError):
  """The workdir cannot be created or written."""


def ensure_workdir(workdir: str) -> str:
  """Creates `workdir` (local or a bucket URL) and checks it is writable before any work starts
  (so none is lost). Returns it absolute / as a URL string."""
  if not workdir:
    raise WorkdirError("--workdir is required")
  path = paths.resolve(workdir)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"workdir {path} is not writable: it is a file")
  probe = path / f".write_check_{os.getpid()}_{jax.process_index()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f"workdir {path} is not writable: {e.strerror or e}") from e
  return str(path)


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
  """Writes a merged clu Collection as `train/*` scalars; a non-finite loss stops the run."""
  scalars = train_metrics.compute()
  if not np.isfinite(scalars["loss"]):
    raise FloatingPointError(f"loss is {scalars['loss']} at step {step}")
  writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})


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


def save_for_preemption(ckpt, step: int, state, config, saved: bool) -> int:
  """After a preemption notice: this step's checkpoint (unless the loop just saved it), waited
  for, so the process can exit. Returns the step."""
  if not saved:
    ckpt.save(step, state, config=config, force=True)
  ckpt.wait_until_finished()
  logging.warning(preemption.resume_message(step, ckpt.directory))
  return step
