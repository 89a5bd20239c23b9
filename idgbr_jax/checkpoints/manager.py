"""One orbax CheckpointManager per run with two items:

* `state`  - the train state pytree (sharded arrays; restored onto any mesh, and any number of
  processes, via abstract targets),
* `config` - the run's config as JSON, so `predict`/`refine` can rebuild the model from a workdir.

No data-iterator state: the training stream's position is the step (`data.pipeline`), so a
resumed run reads exactly the batches it would have, on any process count. The directory may be
a bucket URL; saves are asynchronous and a save that did not finish is never restored.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from idgbr_jax import paths


class CheckpointError(RuntimeError):
  """A checkpoint is missing or does not match what the caller expects."""


def _abstract(tree, shardings=None):
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def partial_restore_args(target: Any) -> ocp.args.PyTreeRestore:
  """Restore args for the leaves of `target` only (abstract arrays with shardings)."""
  return ocp.args.PyTreeRestore(item=target,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)


def check_restored(tree: Any, where: str) -> Any:
  """A partial restore leaves a requested leaf the checkpoint lacks abstract: name them."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  missing = [jax.tree_util.keystr(path) for path, leaf in leaves
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise CheckpointError(f"{where} has no {', '.join(missing[:5])}{more}: the checkpoint does "
                          "not match the model the config builds")
  return tree


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items above."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 2, create: bool = True):
    self.directory = paths.resolve(directory)  # local or a bucket URL (gs://...)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, config: ml_collections.ConfigDict | None = None,
           force: bool = False) -> bool:
    """Starts an asynchronous save (`wait_until_finished` waits for it)."""
    items = {"state": ocp.args.StandardSave(state)}
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int | None, target_state: Any, *, shardings: Any = None) -> Any:
    """Restores the state into the structure/shardings of `target_state` (arrays or abstract)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(_abstract(target_state, shardings))}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"cannot restore step {step} from {self.directory}: {e}") from e
    return restored["state"]

  def restore_partial(self, step: int | None, target: Any, *, shardings: Any = None) -> Any:
    """Restores only the leaves of `target` from the saved train state, e.g. `{"params": ...}`
    without the optimizer state (refinement, export, predict).

    `target` (arrays or abstract) may be any sub-tree of the saved state (params without the
    REPA projector, say); every leaf it names must be in the checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    # Same on-disk format as StandardSave; the PyTree handler can skip the unnamed leaves.
    manager = ocp.CheckpointManager(self.directory,
                                    item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=partial_restore_args(_abstract(target, shardings))))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"cannot restore step {step} from {self.directory}: {e}") from e
    finally:
      manager.close()
    return check_restored(restored["state"], f"step {step} of {self.directory}")

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def load_config(checkpoint_dir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config saved with a run (from `<workdir>/checkpoints`), as a locked ConfigDict."""
  if not paths.isdir(checkpoint_dir):
    raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist")
  manager = ocp.CheckpointManager(paths.resolve(checkpoint_dir),
                                  item_handlers={"config": ocp.JsonCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {checkpoint_dir}")
  cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  manager.close()
  return ml_collections.ConfigDict(_detuple(cfg))


def _detuple(value):
  # JSON turns tuples into lists; the sharding rules table must come back as tuples.
  if isinstance(value, dict):
    return {k: _detuple(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_detuple(v) for v in value)
  return value
