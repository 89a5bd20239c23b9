"""Tolerances for results that should agree up to floating-point rounding, on any CPU.

Two computations of the same maths that differ in device count, sharding, fusion, remat, batch
composition or CPU model (AVX2 vs AVX-512/AMX kernels, other vector widths, FMA or not) add the
same terms in a different order, so they round differently. What is stable is the size of that
rounding, not its bits:

* A float sum of n terms carries an error of about eps * sqrt(n) * (size of the terms) (random-walk
  estimate; the worst case is (n - 1) * eps * sum|terms|), whatever the order; two orders differ by
  about as much. eps is 2**-23 ~ 1.2e-7 for float32, 2**-52 ~ 2.2e-16 for float64. A network chains
  many such sums, whose errors add up and pass through the layers' gains: the constant C covers
  that, with a margin for other CPU models (see C below).
* The error of an element is proportional to the size of the terms summed into it, not to the
  element: a gradient that is ~0, or a trained model's gradient that is a small difference of large
  terms, carries the same absolute error as the rest. Element by element, the relative error has a
  long tail; over a whole tensor it averages out. So each tensor is compared as a whole, in norm:

      ||a - d|| <= C * eps * sqrt(n) * (||d|| + NEGLIGIBLE * rms(whole tree) * sqrt(size of d))

  with n the length of the longest reduction feeding the result (e.g. batch x pixels for a weight
  gradient). A systematic error (a missing reduction, a wrong shard, a changed learning rate) moves
  the whole tensor and exceeds this by orders of magnitude.
* A tensor whose exact value is zero (the gradient of an attention key bias: softmax ignores a
  shift shared by all keys) holds nothing but the rounding of cancelling terms, as large as itself.
  It is compared against the floor: NEGLIGIBLE (1e-6) of the norm it would have if its elements had
  the whole tree's RMS; an SGD step moves such a parameter by less than a millionth of a typical
  update.

What is NOT stable: Adam-updated weights. Adam divides each gradient by its own RMS, so a gradient
that is rounding noise (|g| ~ 1e-9) becomes a full learning-rate step whose sign is the noise's.
Tests that compare training updates across devices or code paths use plain SGD
(`sgd_keeping_gradients`), whose update is lr * gradient and whose state keeps the gradient. Tests
that compare a run with itself on one machine (same program, same devices, e.g. resume) stay exact:
XLA on one machine is deterministic, so there any difference is a bug.

Calibration: NUMERICS_LOG=<file> makes every comparison append the fraction of its tolerance it
used (1 = at the limit).
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
import optax

# Measured on the 2-core x86 CI machine (NUMERICS_LOG), in units of eps * sqrt(n) * ||d||: at most
# 4.5 for a Stage II step from a trained state, sharded vs one device (0.8 for the first step from
# the init), 3.7 for Stage I's last gradient after 3 chained steps (a transposed-conv bias that
# BatchNorm all but cancels), 1.7 for remat vs plain gradients, 0.1 or less for forward passes;
# float64 metrics differ by 1 ulp. C = 64 leaves a margin of 14x or more for other CPU models and
# still fails on a 7e-4 relative error of a tensor at n = 8192 (a batch of 8 32x32 images).
C = 64.0
NEGLIGIBLE = 1e-6


def eps(dtype=np.float32) -> float:
  return float(np.finfo(dtype).eps)


def rounding_rtol(n_terms: int, *, c: float = C, dtype=np.float32) -> float:
  """c * eps * sqrt(n_terms): the relative size of the rounding of a length-n_terms reduction."""
  return c * eps(dtype) * math.sqrt(max(int(n_terms), 1))


def _f64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def assert_close_up_to_rounding(actual, desired, *, n_terms: int, c: float = C,
                                dtype=np.float32, extra_atol=0.0, err_msg: str = ""):
  """For each pair of leaves of two pytrees (or two arrays / scalars):
  ||a - d|| <= c * eps * sqrt(n_terms) * (||d|| + NEGLIGIBLE * rms(desired tree) * sqrt(d.size))
               + ||extra_atol||
  (`extra_atol`: an element-wise allowance on top, e.g. `ulps`; a scalar or a tree like
  `desired`)."""
  tol = rounding_rtol(n_terms, c=c, dtype=dtype)
  a_leaves, a_tree = jax.tree_util.tree_flatten_with_path(jax.device_get(actual))
  d_leaves, d_tree = jax.tree_util.tree_flatten_with_path(jax.device_get(desired))
  assert a_tree == d_tree, (err_msg, a_tree, d_tree)
  extra = (jax.tree.leaves(extra_atol) if not np.isscalar(extra_atol)
           else [extra_atol] * len(a_leaves))
  assert len(extra) == len(d_leaves), (err_msg, len(extra), len(d_leaves))
  total = sum(float(np.sum(np.square(_f64(d)))) for _, d in d_leaves)
  count = sum(np.size(d) for _, d in d_leaves)
  tree_rms = math.sqrt(total / count) if count else 0.0
  for (path, a), (_, d), x in zip(a_leaves, d_leaves, extra):
    a, d = _f64(a), _f64(d)
    name = f"{err_msg}{jax.tree_util.keystr(path)}"
    assert a.shape == d.shape, (name, a.shape, d.shape)
    if not a.size:
      continue
    assert np.all(np.isfinite(a)) == np.all(np.isfinite(d)), (name, "non-finite values")
    diff = float(np.linalg.norm((a - d).ravel()))
    bound = tol * (float(np.linalg.norm(d.ravel())) + NEGLIGIBLE * tree_rms * math.sqrt(d.size))
    allowance = float(np.linalg.norm(np.broadcast_to(_f64(x), d.shape).ravel()))
    if os.environ.get("NUMERICS_LOG"):  # calibration: the fraction of the tolerance used
      with open(os.environ["NUMERICS_LOG"], "a", encoding="utf-8") as f:
        f.write(f"{max(diff - allowance, 0.0) / max(bound, 1e-300):.4g}\t{name}\n")
    if not diff <= bound + allowance:
      worst = np.unravel_index(np.argmax(np.abs(a - d)), d.shape) if d.ndim else ()
      raise AssertionError(
          f"{name}: not equal up to rounding: ||a - d|| = {diff:.4g} > {bound + allowance:.4g} "
          f"(rtol {tol:.3g} of ||d|| = {np.linalg.norm(d.ravel()):.4g}); largest difference at "
          f"{worst}: actual {a[worst]!r}, desired {d[worst]!r}")


def ulps(x, n: float = 1):
  """n units in the last place of float32 |x| (element-wise): the rounding of adding a small
  update to x, which two runs may round to neighbouring floats (half an ulp each)."""
  return jax.tree.map(lambda v: n * eps(np.float32) * np.abs(_f64(v)), jax.device_get(x))


def updates(params, init):
  """params - init, leaf by leaf, in float64 (exact for float32 inputs): what training added."""
  return jax.tree.map(lambda w, w0: _f64(w) - _f64(w0), jax.device_get(params),
                      jax.device_get(init))


def sgd_keeping_gradients(learning_rate) -> optax.GradientTransformation:
  """Plain SGD, update = -lr * gradient: differences in the gradient pass through unamplified.
  Its state keeps the last gradient (optax.trace with decay 0: g + 0 * previous == g exactly);
  read it with `last_gradient`."""
  return optax.sgd(learning_rate, momentum=0.0)


def last_gradient(opt_state):
  """The gradient of the last step from `sgd_keeping_gradients`' state."""
  trace_state = opt_state[0]
  assert isinstance(trace_state, optax.TraceState), type(trace_state)
  return trace_state.trace
