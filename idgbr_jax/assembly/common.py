"""Pieces both stages' assembly shares: compute dtypes by name and the init key."""
from __future__ import annotations

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
  if name not in DTYPES:
    raise ValueError(f"dtype {name!r} unknown; allowed: {sorted(DTYPES)}")
  return DTYPES[name]


def init_key(seed: int) -> jax.Array:
  """Key for parameter initialisation. RBG, not threefry: every initializer is a separate RNG
  computation, and threefry's make init programs take several times longer to compile on CPU."""
  return jax.random.key(seed, impl="rbg")
