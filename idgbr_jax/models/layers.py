"""Layers with logical axis names on every parameter, and PyTorch-compatible defaults.

All networks build their parameters through these helpers so that one rules table
(`idgbr_jax.parallel.sharding.DEFAULT_RULES`) can place every weight on the mesh. Layout is
NHWC; kernels are HWIO (a PyTorch OIHW kernel converts with `kernel.transpose(2, 3, 1, 0)`).

Integer padding means symmetric padding as in `torch.nn.Conv2d(padding=p)`; XLA's 'SAME' differs
from PyTorch for strided convs, so the networks that must match PyTorch pass integers.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any
Initializer = Callable[..., Any]

# `attention(implementation=...)`: None is ours (below); "chunked" is ours over blocks of queries
# (`chunked_attention`); the others go to jax.nn.dot_product_attention.
ATTENTION_IMPLEMENTATIONS = (None, "chunked", "xla", "cudnn")
# Queries per block of `chunked_attention`: SD-1.5 at 512 px attends over 64 x 64 = 4096 tokens,
# so its [T, S] logits are held a quarter at a time.
QUERY_CHUNK = 1024


def attention(query, key, value, implementation: str | None = None):
  """Multi-head softmax attention, [..., T, H, D] x [..., S, H, D] -> [..., T, H, D].

  Scale 1/sqrt(D), as diffusers, torch's MultiheadAttention and DINOv2 use.

  `implementation=None` computes it heads-major with the normalisation moved after the second
  product: softmax(QK^T) V = (exp(QK^T - m) V) / rowsum(exp(QK^T - m)). Same function, but XLA
  then never writes the normalised [T, S] probabilities: on CPU this is 3-6x faster forward and
  ~2.7x forward + backward than `jax.nn.dot_product_attention` for the demo's shapes (256
  tokens, 4-8 dims per head), and faster at every shape measured (bench notes in the README).
  "xla" / "cudnn" call `jax.nn.dot_product_attention` with that implementation (cuDNN's fused
  kernel is the one to pick on GPUs for long sequences).

  Logits, the softmax and its sums run in float32 whatever the input dtype (diffusers'
  upcast_softmax); the output has the query's dtype.
  """
  if implementation is not None:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                       f"got {implementation!r}")
    if implementation == "chunked":
      return chunked_attention(query, key, value)
    return jax.nn.dot_product_attention(query, key, value, implementation=implementation)
  dtype = query.dtype
  scale = 1.0 / np.sqrt(query.shape[-1])
  q, k, v = (jnp.swapaxes(x, -3, -2) for x in (query, key, value))  # [..., H, T|S, D]
  logits = jnp.einsum("...htd,...hsd->...hts", q, k, preferred_element_type=jnp.float32) * scale
  # Any per-row shift gives the same softmax: the max keeps exp in range, and needs no gradient.
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  weights = jnp.exp(logits)
  out = jnp.einsum("...hts,...hsd->...htd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out = out / jnp.sum(weights, axis=-1, keepdims=True)
  return jnp.swapaxes(out, -3, -2).astype(dtype)


def chunked_attention(query, key, value, chunk: int | None = None):
  """`attention` computed for blocks of `chunk` (default `QUERY_CHUNK`) queries in a loop, each
  block rematerialised in the backward pass: the [T, S] logits and weights exist one block at a
  time, forward and backward (O(chunk * S) temporaries per head instead of O(T * S)). Softmax
  rows are independent, so it is the same function: each row is computed as `attention` does.
  The query count is padded up to a multiple of `chunk` (the padded rows are dropped).

  A loop (`lax.map`), not unrolled blocks: unrolled, XLA schedules the blocks together and
  holds most of their logits at once (measured on CPU: 18 of the plain form's 25 MB). XLA's
  cost analysis counts a loop body once, so `idgbr plan` notes that its FLOPs under-count."""
  chunk = QUERY_CHUNK if chunk is None else int(chunk)
  t = query.shape[-3]
  if t <= chunk:
    return attention(query, key, value)
  n = -(-t // chunk)
  q = jnp.pad(query, [(0, 0)] * (query.ndim - 3) + [(0, n * chunk - t), (0, 0), (0, 0)])
  q = jnp.moveaxis(q.reshape(q.shape[:-3] + (n, chunk) + q.shape[-2:]), -4, 0)
  block = jax.checkpoint(lambda qb: attention(qb, key, value))
  out = jnp.moveaxis(jax.lax.map(block, q), 0, -4)
  return out.reshape(query.shape[:-3] + (n * chunk,) + query.shape[-2:])[..., :t, :, :]


# PyTorch's default init for Conv/Linear is kaiming_uniform(a=sqrt(5)) == variance_scaling(1/3).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _padding(padding, ndim: int = 2):
  if isinstance(padding, int):
    return tuple((padding, padding) for _ in range(ndim))
  return padding


def Conv(features: int, kernel_size: int | Sequence[int] = 3, strides: int = 1, padding: Any = None,
         *, use_bias: bool = True, in_axis: str | None = "embed", out_axis: str | None = "mlp",
         kernel_init: Initializer = torch_default_init,
         bias_init: Initializer = nn.initializers.zeros_init(), dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32, feature_group_count: int = 1,
         kernel_dilation: int = 1, name: str | None = None) -> nn.Conv:
  """2-D convolution, NHWC. `padding=None` means k//2 (PyTorch 'same' for odd k, stride 1)."""
  ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
  if padding is None:
    padding = tuple(((k - 1) * kernel_dilation // 2,) * 2 for k in ks)
  return nn.Conv(
      features, ks, strides=(strides, strides), padding=_padding(padding),
      use_bias=use_bias, feature_group_count=feature_group_count,
      kernel_dilation=(kernel_dilation, kernel_dilation), dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init,
                                               ("kernel_h", "kernel_w", in_axis, out_axis)),
      bias_init=nn.with_logical_partitioning(bias_init, (out_axis,)), name=name)


def Dense(features: int, *, use_bias: bool = True, in_axis: str | None = "embed",
          out_axis: str | None = "mlp", kernel_init: Initializer = torch_default_init,
          bias_init: Initializer = nn.initializers.zeros_init(), dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
  """Linear layer; kernel is (in, out) = PyTorch weight transposed."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, (in_axis, out_axis)),
      bias_init=nn.with_logical_partitioning(bias_init, (out_axis,)), name=name)


def GroupNorm(num_groups: int = 32, epsilon: float = 1e-5, *, dtype: Dtype = jnp.float32,
              param_dtype: Dtype = jnp.float32, use_scale: bool = True, use_bias: bool = True,
              name: str | None = None) -> nn.GroupNorm:
  """GroupNorm with PyTorch's eps default (1e-5), statistics in float32."""
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
      use_scale=use_scale, use_bias=use_bias, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), name=name)


def LayerNorm(epsilon: float = 1e-5, *, dtype: Dtype = jnp.float32,
              param_dtype: Dtype = jnp.float32, scale_init: Initializer = nn.initializers.ones_init(),
              bias_init: Initializer = nn.initializers.zeros_init(), use_bias: bool = True,
              use_scale: bool = True, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm with PyTorch's eps default (1e-5)."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
      use_scale=use_scale, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(scale_init, ("norm",)),
      bias_init=nn.with_logical_partitioning(bias_init, ("norm",)), name=name)


def BatchNorm(*, momentum: float = 0.9, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
              param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm (PyTorch eps 1e-5, momentum 0.1 == flax momentum 0.9); pass use_running_average."""
  return nn.BatchNorm(
      momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), name=name)


def param_with_axes(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
                    axes: Sequence[str | None], dtype: Dtype = jnp.float32):
  """`module.param` with logical axis names (for raw params such as positional embeddings)."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)
