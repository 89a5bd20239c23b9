"""One orbax CheckpointManager per run with three items:

* `state`  - the train state pytree (sharded arrays; restored onto any mesh via abstract targets),
* `data`   - the grain iterator position, so a resumed run sees exactly the batches it would have,
* `config` - the run's config as JSON, so `predict`/`refine` can rebuild the model from a workdir.
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing or does not match what the caller expects."""


def _abstract(tree, shardings=None):
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items above."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 2, create: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_iterator=None,
           config: ml_collections.ConfigDict | None = None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int | None, target_state: Any, *, shardings: Any = None,
              data_iterator=None) -> Any:
    """Restores the state into the structure/shardings of `target_state` (arrays or abstract).

    `data_iterator`, if given, is moved to the saved position in place.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(_abstract(target_state, shardings))}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"cannot restore step {step} from {self.directory}: {e}") from e
    return restored["state"]

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def load_config(checkpoint_dir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config saved with a run (from `<workdir>/checkpoints`), as a locked ConfigDict."""
  if not os.path.isdir(checkpoint_dir):
    raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist")
  manager = ocp.CheckpointManager(os.path.abspath(checkpoint_dir),
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
