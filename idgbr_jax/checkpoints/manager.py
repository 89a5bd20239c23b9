"""One orbax CheckpointManager per run with two items:

* `state`  - the train state pytree (sharded arrays; restored onto any mesh, and any number of
  processes, via abstract targets),
* `config` - the run's config as JSON, so `predict`/`refine` can rebuild the model from a workdir.

No data-iterator state: the training stream's position is the step (`data.pipeline`), so a
resumed run reads exactly the batches it would have, on any process count. The directory may be
a bucket URL; saves are asynchronous and a save that did not finish is never restored.

Half-written steps. Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>/`, renames it
to `<step>/` when complete (locally) and writes `<step>/commit_success.txt` last. A save killed
midway leaves the temporary folder; a step folder without `commit_success.txt` (a copy or sync
that stopped midway, a save killed on a bucket) is as incomplete, but orbax would take it for a
finished one on a local disk. Both are ignored with a warning and the previous complete step
is used; a trainer (`create=True`) moves such a step folder aside to `<step>.incomplete` (kept,
not deleted), so the step can be saved again.

Disk full. A save that fails for lack of space (or quota, or a read-only file system) raises
`CheckpointError` saying so; the previous checkpoints are untouched (orbax deletes old steps
only after a new one is complete), and the failed step's temporary folder is removed.
"""
from __future__ import annotations

import errno
import json
import re
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from idgbr_jax import paths


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete, does not match what the caller expects, or could not
  be written."""


COMMIT_FILE = "commit_success.txt"   # orbax: written last into every finished step folder
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax: a step folder being written
INCOMPLETE_SUFFIX = ".incomplete"     # ours: a step folder moved aside as incomplete
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_DISK_REASONS = ("No space left on device", "Disk quota exceeded", "Read-only file system")


def scan_steps(directory) -> tuple[list[int], list[str], list[str]]:
  """(complete steps, incomplete step folder names, temporary folder names) in `directory`."""
  root = paths.resolve(directory)
  complete, incomplete, temporary = [], [], []
  if not root.is_dir():
    return complete, incomplete, temporary
  for entry in root.iterdir():
    name = entry.name
    if TMP_MARKER in name:
      temporary.append(name)
    elif re.fullmatch(r"\d+", name) and entry.is_dir():
      (complete if (entry / COMMIT_FILE).exists() else incomplete).append(name)
  return sorted(int(n) for n in complete), sorted(incomplete, key=int), sorted(temporary)


def _disk_error(e: BaseException) -> BaseException | None:
  """The exception in `e`'s chain that says the disk is full / read-only, if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
      return e
    if any(w.lower() in str(e).lower() for w in _DISK_REASONS):
      return e
    e = e.__cause__ or e.__context__
  return None


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


def _warn_incomplete(directory, incomplete: list[str], temporary: list[str],
                     moved: bool) -> None:
  for name in temporary:
    logging.warning("ignoring the half-written checkpoint %s/%s (a save that did not finish)",
                    directory, name)
  for name in incomplete:
    logging.warning("ignoring the incomplete checkpoint %s/%s (no %s: a save or copy that did "
                    "not finish)%s", directory, name, COMMIT_FILE,
                    f"; moved aside to {name}{INCOMPLETE_SUFFIX}" if moved else "")


def _no_checkpoint_message(directory, incomplete: list[str], temporary: list[str]) -> str:
  skipped = incomplete + temporary
  return (f"no complete checkpoint in {directory}" +
          (f" (ignored as half-written: {', '.join(skipped)})" if skipped else ""))


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items above. A context manager: leaving
  it waits for a pending save and closes the manager."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 2, create: bool = True):
    self.directory = paths.resolve(directory)  # local or a bucket URL (gs://...)
    self._complete, self._incomplete, temporary = scan_steps(self.directory)
    moved = create and bool(self._incomplete)
    if moved and jax.process_index() == 0:
      self._set_aside(self._incomplete)
    if create and jax.process_count() > 1:  # every process then sees the same steps
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("idgbr_checkpointer_scan")
    _warn_incomplete(self.directory, self._incomplete, temporary, moved)
    self._temporary = temporary
    self._pending_step: int | None = None
    # Async (orbax's default, stated here because the trainers rely on it): a save copies the
    # arrays to host memory and writes them in a background thread while training goes on;
    # `save` finishes the previous write first, and `wait_until_finished` ends the run.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def _set_aside(self, names: list[str]) -> None:
    """Renames incomplete step folders to `<step>.incomplete[.k]` (kept, never deleted)."""
    for name in names:
      target = self.directory / f"{name}{INCOMPLETE_SUFFIX}"
      k = 1
      while target.exists():
        target = self.directory / f"{name}{INCOMPLETE_SUFFIX}.{k}"
        k += 1
      (self.directory / name).rename(target)

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc is None:
      self.close()
      return
    try:  # the error that ended the run is the one to report; closing waits for pending saves
      self.close()
    except Exception as e:  # noqa: BLE001
      logging.warning("closing the checkpoint manager after an error: %s", e)

  def latest_step(self) -> int | None:
    """The newest complete step (half-written ones are ignored, see the module doc)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    bad = {int(n) for n in self._incomplete}
    return sorted(s for s in self._manager.all_steps() if s not in bad)

  def save(self, step: int, state: Any, *, config: ml_collections.ConfigDict | None = None,
           force: bool = False) -> bool:
    """Starts an asynchronous save (`wait_until_finished` waits for it). A full disk raises
    CheckpointError (here, for the previous save, or in `wait_until_finished`)."""
    items = {"state": ocp.args.StandardSave(state)}
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    # orbax first finishes (or reports the failure of) a save still in flight.
    with self._save_errors(step if self._pending_step is None else self._pending_step):
      started = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if started:
      self._pending_step = step
    return started

  def _save_errors(self, step: int | None = None):
    return _SaveErrors(self, self._pending_step if step is None else step)

  def _remove_temporary(self, step: int | None, settle_s: float = 10.0) -> None:
    """Deletes the temporary folders of `step` left by a failed save (they hold no finished
    checkpoint; removing them frees the space they took).

    A failed save's error surfaces as soon as one of orbax's writer threads fails, while others
    may still be writing (and creating files) in the folder: first wait for them, then remove
    until two scans in a row find nothing (at most `settle_s`)."""
    if jax.process_index() != 0:
      return
    try:
      self._manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except  # the same failure, reported by the caller
      pass

    def left() -> list[str]:
      return [n for n in scan_steps(self.directory)[2]
              if n not in self._temporary and (step is None or n.startswith(f"{step}."))]
    deadline, clean_scans = time.monotonic() + settle_s, 0
    while clean_scans < 2 and time.monotonic() < deadline:
      names = left()
      clean_scans = 0 if names else clean_scans + 1
      for name in names:
        try:
          paths.rmtree(self.directory / name)
        except OSError:
          pass
      time.sleep(0.1)

  def restore(self, step: int | None, target_state: Any, *, shardings: Any = None) -> Any:
    """Restores the state into the structure/shardings of `target_state` (arrays or abstract)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(_no_checkpoint_message(self.directory, self._incomplete,
                                                   self._temporary))
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
      raise CheckpointError(_no_checkpoint_message(self.directory, self._incomplete,
                                                   self._temporary))
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
    with self._save_errors():
      self._manager.wait_until_finished()
    self._pending_step = None

  def close(self):
    with self._save_errors():
      self._manager.close()


class _SaveErrors:
  """Turns a failed save for lack of space into CheckpointError naming the step and the last
  complete one (which is intact), after removing the failed step's temporary folder."""

  def __init__(self, ckpt: Checkpointer, step: int | None):
    self._ckpt, self._step = ckpt, step

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb) -> bool:
    if exc is None or isinstance(exc, CheckpointError):
      return False
    cause = _disk_error(exc)
    if cause is None:
      return False
    ckpt = self._ckpt
    ckpt._remove_temporary(None)  # pylint: disable=protected-access
    complete = scan_steps(ckpt.directory)[0]
    text = str(cause)
    reason = next((r for r in _DISK_REASONS if r.lower() in text.lower()), text)
    what = f"step {self._step}" if self._step is not None else "a checkpoint"
    kept = (f"the last complete checkpoint, step {complete[-1]}, is intact; free space, then "
            f"run the same command again to resume from step {complete[-1]}" if complete else
            "no complete checkpoint was written; free space, then run the same command again")
    raise CheckpointError(f"cannot save {what} to {ckpt.directory}: {reason} (what was "
                          f"written of it was removed; {kept})") from exc


def load_config(checkpoint_dir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config saved with a run (from `<workdir>/checkpoints`), as a locked ConfigDict."""
  if not paths.isdir(checkpoint_dir):
    raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist")
  complete, incomplete, temporary = scan_steps(checkpoint_dir)
  _warn_incomplete(paths.resolve(checkpoint_dir), incomplete, temporary, moved=False)
  step = (complete[-1] if complete else None) if step is None else step
  if step is None:
    raise CheckpointError(_no_checkpoint_message(checkpoint_dir, incomplete, temporary))
  manager = ocp.CheckpointManager(paths.resolve(checkpoint_dir),
                                  item_handlers={"config": ocp.JsonCheckpointHandler()})
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
