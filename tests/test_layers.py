"""layers.attention against jax.nn.dot_product_attention (values and gradients), and its chunked form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numerics
from idgbr_jax.models import layers


def _qkv(seed, b=2, t=12, s=7, h=3, d=5, scale=1.0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
               for shape in ((b, t, h, d), (b, s, h, d), (b, s, h, d)))


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: logits in the hundreds (max shift needed)
def test_attention_matches_dot_product_attention_values_and_grads(scale):
  q, k, v = _qkv(0, scale=scale)
  ours = layers.attention(q, k, v)
  ref = jax.nn.dot_product_attention(q, k, v)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * scale)
  assert np.all(np.isfinite(np.asarray(ours)))

  weights = jnp.asarray(np.random.default_rng(1).normal(size=ref.shape), jnp.float32)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * weights)  # noqa: E731
  g_ours = jax.grad(loss(layers.attention), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)


def test_attention_bfloat16_keeps_dtype_and_float32_softmax():
  q, k, v = _qkv(2)
  out = layers.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), layers.attention(q, k, v),
                             atol=3e-2)


def test_attention_named_implementations_and_bad_name():
  q, k, v = _qkv(3)
  np.testing.assert_allclose(layers.attention(q, k, v, implementation="xla"),
                             jax.nn.dot_product_attention(q, k, v), rtol=1e-6)
  with pytest.raises(ValueError, match="attention implementation"):
    layers.attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("t, lead", [(40, ()), (48, ()), (17, (2, 3))])
def test_chunked_attention_is_attention_values_and_grads(t, lead, monkeypatch):
  """Blocks of queries (padded: 40 -> 3 blocks of 16; exact: 48; 17 -> 2 blocks, with two
  leading dims), each rematerialised: the same function (every row computed as `attention`
  does), so values and gradients agree to float32 rounding (tests/numerics.py)."""
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.normal(size=lead + shape), jnp.float32)
             for shape in ((t, 3, 5), (24, 3, 5), (24, 3, 5)))
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * weights)  # noqa: E731
  # The named implementation, as the models call it, with 16-query blocks.
  monkeypatch.setattr(layers, "QUERY_CHUNK", 16)
  chunked = lambda *a: layers.attention(*a, implementation="chunked")  # noqa: E731
  numerics.assert_close_up_to_rounding(chunked(q, k, v), layers.attention(q, k, v),
                                       n_terms=24, err_msg="values")
  # d/dk and d/dv sum over all t queries (across blocks).
  numerics.assert_close_up_to_rounding(
      jax.grad(loss(chunked), argnums=(0, 1, 2))(q, k, v),
      jax.grad(loss(layers.attention), argnums=(0, 1, 2))(q, k, v), n_terms=t * 24,
      err_msg="gradients")
  # It really ran in blocks: a loop in the program.
  assert "scan" in str(jax.make_jaxpr(chunked)(q, k, v))


def test_chunked_attention_holds_one_block_of_logits():
  """What it is for: the [T, S] logits and weights exist a block at a time, forward and
  backward. For T = S = 1024 and 2 heads the plain gradient program holds several
  [2, 1024, 1024] float32 buffers (8 MiB each; 24 MiB measured); in blocks of 128 queries
  (1 MiB of logits) its temporaries stay under half of one of them (3.3 MiB measured)."""
  q, k, v = _qkv(6, b=1, t=1024, s=1024, h=2, d=8)

  def temp_bytes(fn):
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2)))
    return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  logits = 2 * 1024 * 1024 * 4
  plain = temp_bytes(layers.attention)
  chunked = temp_bytes(lambda *a: layers.chunked_attention(*a, chunk=128))
  assert plain >= 2 * logits and chunked < logits / 2, (plain, chunked)
