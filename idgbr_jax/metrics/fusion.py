"""Fusion control for XLA on CPU: compute an intermediate once, into a buffer.

XLA fuses an elementwise producer into each of its consumers. When a map built from dozens of
shifted reads (a Sobel band, a windowed distance transform, a blur pass) has several consumers,
XLA on CPU recomputes it inside every one of them; measured on 512x512 maps that costs ~1 ms per
extra consumer, and the blur's vertical pass was recomputed for each of its 7 horizontal taps.
`lax.optimization_barrier` does not stop this on CPU (the barrier is gone before fusion runs);
the operands and results of a conditional are real buffers, so a conditional does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _through_conditional(leaves):
  sized = [x for x in leaves if x.size]
  if not sized:
    return list(leaves)
  # An always-true predicate the compiler does not fold: a float compared with itself (XLA folds
  # x == x only for integers). The float is never NaN: for inexact dtypes it is whether the first
  # element (its real part) is NaN, 0 or 1; otherwise the element itself. The false branch
  # never runs.
  first = sized[0].reshape(-1)[0]
  if jnp.issubdtype(first.dtype, jnp.inexact):
    first = jnp.isnan(jnp.real(first))
  probe = first.astype(jnp.float32)
  always = probe == probe
  return jax.lax.cond(always, lambda xs: list(xs),
                      lambda xs: [jnp.zeros_like(x) for x in xs], list(leaves))


def materialize(tree):
  """Returns `tree` unchanged; on CPU its arrays are computed once, not fused into each consumer.

  On GPU / TPU it is the identity (their fusion heuristics differ, and a GPU conditional would
  cost a host round trip).
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  if not leaves:
    return tree
  out = jax.lax.platform_dependent(leaves, cpu=_through_conditional,
                                   default=lambda xs: list(xs))
  return jax.tree_util.tree_unflatten(treedef, out)
