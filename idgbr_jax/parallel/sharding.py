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
from typing import Any, Callable, Mapping, Sequence

import jax
from flax import linen as nn
from jax.experimental import mesh_utils
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


def _axis_sizes(shape: Mapping[str, int] | Sequence[int], what: str) -> list[int]:
  if isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"{what} has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}")
    return [int(shape.get(a, 1)) for a in MESH_AXES]
  sizes = [int(s) for s in shape]
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"{what} needs {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
  return sizes


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices=None,
              dcn_shape: Mapping[str, int] | Sequence[int] | None = None) -> Mesh:
  """Builds a ('data', 'fsdp', 'tensor') mesh. One size may be -1 (fills the rest).

  The device order comes from `mesh_utils` (what `jax.make_mesh` uses): on TPU, neighbouring
  mesh positions are neighbouring chips on the interconnect.

  Args:
    shape: per-slice sizes, {'data': -1, 'fsdp': 1, 'tensor': 1} or a 3-sequence in MESH_AXES
      order (one slice: the whole mesh).
    devices: devices to use; default all of `jax.devices()`.
    dcn_shape: multi-slice: how many slices each axis spans over the data-centre network, e.g.
      {'data': 2} for two v5e-256 slices doing data parallelism between them. Granules are TPU
      slices, or processes on platforms without slices (CPU, GPU hosts).
  """
  sizes = _axis_sizes(shape, "mesh_shape")
  dcn = _axis_sizes(dcn_shape or {}, "dcn_mesh_shape")
  if any(d < 1 for d in dcn):
    raise ValueError(f"dcn_mesh_shape sizes must be >= 1, got {dict(zip(MESH_AXES, dcn))}")
  devices = list(jax.devices() if devices is None else devices)
  slices = math.prod(dcn)
  if len(devices) % slices:
    raise ValueError(f"dcn_mesh_shape {dict(zip(MESH_AXES, dcn))} ({slices} slices) does not "
                     f"divide {len(devices)} devices")
  n = len(devices) // slices  # devices per slice
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
                     f"but {n} are available" + (" per slice" if slices > 1 else ""))
  if slices > 1:
    if needed != n:
      raise ValueError(f"mesh_shape {dict(zip(MESH_AXES, sizes))} must use all {n} devices of "
                       "each slice with a dcn_mesh_shape")
    # Granules are TPU slices; where devices report no slices (CPU and GPU hosts say 0), the
    # processes are the granules.
    by_process = len({getattr(d, "slice_index", 0) for d in devices}) != slices
    array = mesh_utils.create_hybrid_device_mesh(sizes, dcn, devices,
                                                 process_is_granule=by_process,
                                                 allow_split_physical_axes=True)
  else:
    # An explicit smaller mesh uses the first devices (e.g. a 1-device reference run).
    array = mesh_utils.create_device_mesh(sizes, devices[:needed], allow_split_physical_axes=True)
  return Mesh(array, MESH_AXES)


def mesh_from_config(config) -> Mesh:
  """The mesh a train/predict/refine config asks for (`mesh_shape`, optional `dcn_mesh_shape`)."""
  dcn = config.get("dcn_mesh_shape")
  return make_mesh(config.mesh_shape.to_dict(), dcn_shape=dcn.to_dict() if dcn else None)


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


def create_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                   rules=DEFAULT_RULES) -> tuple[Any, Any]:
  """Allocates `init_fn(rng)` directly sharded: shapes first, then shardings, then one jit.

  `init_fn` may return logically-partitioned (boxed) params; the returned tree is unboxed and
  comes with its NamedSharding tree.
  """
  abstract = jax.eval_shape(init_fn, rng)
  shardings = param_shardings(abstract, mesh, rules)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return state, shardings


def abstract_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                     rules=DEFAULT_RULES) -> tuple[Any, Any]:
  """What `create_sharded` would allocate, as ShapeDtypeStructs with their shardings (nothing
  is computed: the target of a restore)."""
  abstract = jax.eval_shape(init_fn, rng)
  shardings = param_shardings(abstract, mesh, rules)
  unboxed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         nn.meta.unbox(abstract), shardings)
  return unboxed, shardings
