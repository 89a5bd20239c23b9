"""Moving arrays between hosts and a global mesh: each process's share of a batch, and global
arrays brought back to a host."""
from __future__ import annotations

import jax
import numpy as np


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
