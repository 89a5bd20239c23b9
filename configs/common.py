"""Helpers shared by the experiment configs.

`parse_arg` turns the string after `:` in `--config=configs/x.py:arg` into typed fields, e.g.
`configs/stage1_synthetic.py:backbone=segformer,variant=b0,runlocal` (a bare name is `name=True`).
"""
from __future__ import annotations

import ml_collections

from idgbr_jax.parallel.sharding import DEFAULT_RULES


def _cast(name: str, value: str, default):
  if isinstance(default, bool):
    if value.lower() in ("", "true", "1", "yes"):
      return True
    if value.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"config arg {name!r} expects a bool, got {value!r}")
  if isinstance(default, int):
    return int(value)
  if isinstance(default, float):
    return float(value)
  return value


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'a=1,b=x,flag' against typed defaults; unknown names are errors that name them."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, _, value = item.partition("=")
    name = name.strip()
    if name not in defaults:
      raise ValueError(f"unknown config arg {name!r}; allowed: {sorted(defaults)}")
    out[name] = _cast(name, value.strip() if "=" in item else "", defaults[name])
  return ml_collections.ConfigDict(out)


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """Mesh sizes per axis; one -1 takes the remaining devices."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def sharding_rules():
  """The default logical-axis rules table, as a tuple the config can carry and override."""
  return tuple(DEFAULT_RULES)
