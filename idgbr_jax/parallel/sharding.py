"""Mesh construction and the one table that maps logical axis names to mesh axes.

Every parameter in idgbr_jax carries logical axis names (see `idgbr_jax.models.layers`).
`DEFAULT_RULES` is the single place that decides where those names go on the mesh; configs may
override it (`config.sharding_rules`). Mesh axes are always `('data', 'fsdp', 'tensor')`:

* data   - pure data parallelism (params replicated).
* fsdp   - data parallelism with params/optimizer state sharded along their `embed` axis.
* tensor - model parallelism along `mlp` / `heads`.

A dimension whose size does not divide the mesh axes it maps to is replicated instead (tiny test
models have 3-channel convs); `param_shardings` does that per leaf so one rules table serves
every model size.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("height", None),
    ("width", None),
    ("length", None),
    ("channels", None),
    # parameters
    ("embed", "fsdp"),        # input-feature axis of kernels: sharded for FSDP
    ("mlp", "tensor"),        # output-feature / hidden axis: tensor parallel
    ("heads", "tensor"),
    ("kv", None),
    ("kernel_h", None),
    ("kernel_w", None),
    ("norm", None),           # norm scales and shifts
    ("vocab", None),          # embedding tables (label embedding rows)
    ("classes", None),
    ("tokens", None),         # positional embeddings
)


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices=None) -> Mesh:
  """Builds a ('data', 'fsdp', 'tensor') mesh. One size may be -1 (fills the rest).

  Args:
    shape: {'data': -1, 'fsdp': 1, 'tensor': 1} or a 3-sequence in MESH_AXES order.
    devices: devices to use; default all of `jax.devices()`.
  """
  if isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"mesh_shape has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"mesh_shape needs {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh_shape may have at most one -1, got {sizes}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n % known:
      raise ValueError(f"mesh_shape {sizes} does not divide {n} devices")
    sizes[sizes.index(-1)] = n // known
  needed = math.prod(sizes)
  if needed > n:
    raise ValueError(f"mesh_shape {dict(zip(MESH_AXES, sizes))} needs {needed} devices, "
                     f"but {n} are available")
  # An explicit smaller mesh uses the first devices (e.g. a 1-device reference run).
  return Mesh(np.asarray(devices[:needed]).reshape(sizes), MESH_AXES)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Replicates any dimension whose size is not divisible by its mesh axes."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if size > 1 and dim % size == 0 else None)
  return P(*out)


def logical_to_sharding(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                        rules=DEFAULT_RULES) -> NamedSharding:
  """NamedSharding for one array with the given logical axis names."""
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules=tuple(rules))
  return NamedSharding(mesh, _fit_spec(spec, shape, mesh))


def param_shardings(boxed_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """Shardings for a tree of (abstract) params that may hold `nn.LogicallyPartitioned` boxes.

  Leaves without logical names (e.g. optimizer counters) are replicated. Works on the output
  of `jax.eval_shape(model.init, ...)` and of `jax.eval_shape(tx.init, params)`.
  """
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return logical_to_sharding(leaf.names, leaf.value.shape, mesh, rules)
    return NamedSharding(mesh, P())
  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of a batch array: leading axis over the data-parallel axes, rest replicated."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules=tuple(rules))
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
