"""Pieces every trainer shares: workdir checks, writers, sharded state creation, dtypes."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idgbr_jax.parallel import sharding


class WorkdirError(RuntimeError):
  """The workdir cannot be created or written."""


def ensure_workdir(workdir: str) -> str:
  """Creates `workdir` and checks it is writable before any work starts (so none is lost)."""
  if not workdir:
    raise WorkdirError("--workdir is required")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_check_"):
      pass
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror or e}") from e
  return workdir


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
  if name not in DTYPES:
    raise ValueError(f"dtype {name!r} unknown; allowed: {sorted(DTYPES)}")
  return DTYPES[name]


def init_key(seed: int) -> jax.Array:
  """Key for parameter initialisation. RBG, not threefry: every initializer is a separate RNG
  computation, and threefry's make init programs take several times longer to compile on CPU."""
  return jax.random.key(seed, impl="rbg")


def create_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: jax.sharding.Mesh,
                   rules) -> tuple[Any, Any]:
  """Allocates `init_fn(rng)` directly sharded: shapes first, then shardings, then one jit.

  `init_fn` may return logically-partitioned (boxed) params; the returned tree is unboxed and
  comes with its NamedSharding tree.
  """
  abstract = jax.eval_shape(init_fn, rng)
  shardings = sharding.param_shardings(abstract, mesh, rules)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return state, shardings


def l2_norm(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree))))


def host_slice(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's share of a batch that every process built in full (evaluation)."""
  pc, pi = jax.process_count(), jax.process_index()
  if pc == 1:
    return batch
  return {k: np.array_split(v, pc)[pi] for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host) global array, fully on this host."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


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


def eval_kwargs(data_config, num_classes: int) -> dict[str, Any]:
  """`evaluate_maps` arguments for a dataset: the classes the original scores (Potsdam and
  Vaihingen: index values 1..5, clutter excluded) when the data config names them."""
  values = data_config.get("eval_label_values")
  if not values:
    return {"num_classes": num_classes}
  return {"num_classes": int(data_config.get("eval_num_classes") or len(values)),
          "label_values": tuple(int(v) for v in values)}
