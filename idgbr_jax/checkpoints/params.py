"""Params-only checkpoints for pretrained / frozen parts (autoencoder, label embedding, UNet init,
teacher): `<dir>/params` (orbax) plus `<dir>/meta.json` holding the architecture config, so a
Stage II config only needs the path."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from idgbr_jax.checkpoints.manager import CheckpointError


def save_params(directory: str, params: Any, meta: dict[str, Any]) -> str:
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "params"), params, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(directory, "meta.json"), "w") as f:
      json.dump(meta, f, indent=2)
  return directory


def load_meta(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, "meta.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{path} not found: {directory} is not a params checkpoint "
                          "(expected params/ and meta.json)")
  with open(path) as f:
    return json.load(f)


def load_params(directory: str, target: Any = None, shardings: Any = None) -> Any:
  """Restores `<dir>/params`; with `target` (arrays or ShapeDtypeStructs) and `shardings` the
  result is placed accordingly and its structure/shapes are checked."""
  path = os.path.join(os.path.abspath(directory), "params")
  if not os.path.isdir(path):
    raise CheckpointError(f"params checkpoint {path} not found")
  if target is not None:
    if shardings is not None:
      target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            target, shardings)
    else:
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
  try:
    return ocp.StandardCheckpointer().restore(path, target)
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"params in {path} do not match the model: {e}") from e
