"""fusion.materialize: the identity on values, a conditional (a buffer) on CPU."""

import jax
import jax.numpy as jnp
import numpy as np

from idgbr_jax.metrics import fusion


def test_materialize_keeps_values_dtypes_and_structure():
  tree = {"a": jnp.arange(6, dtype=jnp.int8).reshape(2, 3), "b": (jnp.array([True, False]),
                                                                 jnp.float32(2.5))}
  out = jax.jit(fusion.materialize)(tree)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
  for x, y in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(out)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Values that would make a naive predicate false (NaN, negative zero) pass unchanged too.
  odd = jnp.array([jnp.nan, -0.0, 1.0])
  np.testing.assert_array_equal(np.asarray(jax.jit(fusion.materialize)(odd)), np.asarray(odd))
  for x in (jnp.array([jnp.nan + 1j, 2 + 3j], jnp.complex64),
            jnp.array([jnp.nan, 1.0], jnp.bfloat16), jnp.array([jnp.nan, 1.0], jnp.float16)):
    got = jax.jit(fusion.materialize)(x)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.complex64)),
                                  np.asarray(x.astype(jnp.complex64)))


def test_materialize_survives_compilation_on_cpu():
  # The point of it: the compiled CPU program keeps a conditional (a fusion boundary). An
  # identity XLA could see through would be folded away and leave none.
  def fn(x):
    y = fusion.materialize(x * 3 + 1)
    return y * 2 + y.sum()

  for dtype in (jnp.int32, jnp.float32, jnp.bfloat16, jnp.bool_):
    text = jax.jit(fn).lower(jnp.ones((8, 8), dtype)).compile().as_text()
    assert "conditional(" in text, dtype
  np.testing.assert_array_equal(np.asarray(jax.jit(fn)(jnp.ones((2, 2), jnp.int32))),
                                np.full((2, 2), 8 + 16))


def test_materialize_of_empty_arrays():
  out = jax.jit(fusion.materialize)((jnp.zeros((0, 3)), jnp.zeros((2, 0), jnp.int32)))
  assert out[0].shape == (0, 3) and out[1].shape == (2, 0)
