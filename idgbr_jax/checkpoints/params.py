"""Params-only checkpoints for pretrained / frozen parts (autoencoder, label embedding, UNet init,
teacher): `<dir>/params` (orbax) plus `<dir>/meta.json` holding the architecture config, so a
Stage II config only needs the path."""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from idgbr_jax import paths

from idgbr_jax.checkpoints.manager import CheckpointError, check_restored, partial_restore_args


def save_params(directory: str, params: Any, meta: dict[str, Any]) -> str:
  """Writes `<directory>/params` and `meta.json` (local or a bucket URL); returns the path."""
  directory = paths.makedirs(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / "params", params, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    paths.write_json(directory / "meta.json", meta)
  return str(directory)


def load_meta(directory: str) -> dict[str, Any]:
  path = paths.resolve(directory) / "meta.json"
  if not path.exists():
    raise CheckpointError(f"{path} not found: {directory} is not a params checkpoint "
                          "(expected params/ and meta.json)")
  return paths.read_json(path)


def load_params(directory: str, target: Any = None, shardings: Any = None, *,
                partial: bool = False) -> Any:
  """Restores `<dir>/params`; with `target` (arrays or ShapeDtypeStructs) and `shardings` the
  result is placed accordingly and its structure/shapes are checked. `partial=True` reads only
  the leaves `target` names (e.g. the encoder half of a UNet)."""
  path = paths.resolve(directory) / "params"
  if not path.is_dir():
    raise CheckpointError(f"params checkpoint {path} not found")
  if target is not None:
    if shardings is not None:
      target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            target, shardings)
    else:
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
  try:
    if partial:
      if target is None:
        raise ValueError("partial=True needs a target")
      with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        return check_restored(checkpointer.restore(path, args=partial_restore_args(target)), path)
    return ocp.StandardCheckpointer().restore(path, target)
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"params in {path} do not match the model: {e}") from e
