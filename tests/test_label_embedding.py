"""Label embedding: colour mapping, table-gradient switch, and that the decoder learns."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from idgbr_jax.convert.idgbr import label_embed_params_from_torch
from idgbr_jax.models import label_embedding as le


def _init(cfg, seed=0):
  model = le.LabelEmbedding(cfg)
  labels = jnp.zeros((1, 2, 2), jnp.int32)
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), labels))["params"]
  return model, params


def test_encode_decode_values():
  cfg = le.LabelEmbedConfig(num_classes=4, hidden=8)
  model, params = _init(cfg)
  assert params["embedding"].shape == (4, 3)
  labels = jnp.array([[[0, 1], [2, 3]]], jnp.int32)
  colours = model.apply({"params": params}, labels, method=model.encode)
  expected = 1 / (1 + np.exp(-np.asarray(params["embedding"]))) * 2 - 1
  np.testing.assert_allclose(np.asarray(colours[0]).reshape(4, 3), expected, rtol=1e-6, atol=1e-6)
  # decode is a per-pixel MLP: check against numpy.
  logits = model.apply({"params": params}, colours, method=model.decode)
  hid = np.maximum(np.asarray(colours) @ np.asarray(params["decoder_hidden"]["kernel"][0, 0])
                   + np.asarray(params["decoder_hidden"]["bias"]), 0)
  ref = hid @ np.asarray(params["decoder_out"]["kernel"][0, 0]) + np.asarray(
      params["decoder_out"]["bias"])
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-5)


def test_logical_axes_and_variants():
  model = le.LabelEmbedding(le.get_config("labelembednet8"))
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2, 2), jnp.int32))
  assert boxed["params"]["embedding"].names == ("vocab", None)
  with pytest.raises(ValueError, match="unknown label embedding variant"):
    le.get_config("nope")
  with pytest.raises(ValueError, match="unknown LabelEmbedConfig fields"):
    le.get_config("tiny", colours=3)


def test_table_gradient_switch():
  cfg = le.LabelEmbedConfig(num_classes=6, hidden=16)
  model, params = _init(cfg)
  labels = le.random_label_batch(jax.random.PRNGKey(1), 2, 8, 6)
  assert labels.dtype == jnp.int32 and int(labels.min()) >= 0 and int(labels.max()) <= 5
  grad_fn = jax.grad(lambda p, t: le.label_embed_loss(model, p, labels, jax.random.PRNGKey(2),
                                                      train_table=t)[0], argnums=0)
  g_frozen = grad_fn(params, False)
  g_train = grad_fn(params, True)
  assert np.all(np.asarray(g_frozen["embedding"]) == 0.0)
  assert np.abs(np.asarray(g_train["embedding"])).max() > 0
  # The decoder gradient is the same either way.
  np.testing.assert_array_equal(np.asarray(g_frozen["decoder_out"]["kernel"]),
                                np.asarray(g_train["decoder_out"]["kernel"]))


def test_training_reaches_near_perfect_accuracy():
  cfg = le.LabelEmbedConfig(num_classes=6, hidden=32)
  model, params = _init(cfg, seed=3)
  tx = optax.adam(3e-2)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, rng):
    r_lab, r_noise = jax.random.split(rng)
    labels = le.random_label_batch(r_lab, 4, 16, cfg.num_classes)
    (loss, aux), g = jax.value_and_grad(
        lambda p: le.label_embed_loss(model, p, labels, r_noise, train_table=True),
        has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, aux

  rng = jax.random.PRNGKey(0)
  for i in range(300):
    params, opt, aux = step(params, opt, jax.random.fold_in(rng, i))
  labels = le.random_label_batch(jax.random.PRNGKey(99), 8, 32, cfg.num_classes)
  _, aux = le.label_embed_loss(model, params, labels, jax.random.PRNGKey(7))
  assert float(aux["accuracy"]) > 0.99, aux


def test_params_from_torch_layout():
  rng = np.random.default_rng(0)
  sd = {"embedding_table.weight": rng.normal(size=(2, 3)).astype(np.float32),
        "embedding_conv.0.weight": rng.normal(size=(128, 3, 1, 1)).astype(np.float32),
        "embedding_conv.0.bias": rng.normal(size=(128,)).astype(np.float32),
        "embedding_conv.2.weight": rng.normal(size=(2, 128, 1, 1)).astype(np.float32),
        "embedding_conv.2.bias": rng.normal(size=(2,)).astype(np.float32)}
  cfg = le.get_config("labelembednet2")
  params = label_embed_params_from_torch(sd, cfg)
  model, ref = _init(cfg)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, ref)
  x = rng.normal(size=(1, 2, 2, 3)).astype(np.float32)
  out = model.apply({"params": params}, x, method=model.decode)
  hid = np.maximum(x @ sd["embedding_conv.0.weight"][:, :, 0, 0].T + sd["embedding_conv.0.bias"], 0)
  ref_out = hid @ sd["embedding_conv.2.weight"][:, :, 0, 0].T + sd["embedding_conv.2.bias"]
  np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-5)
  del sd["embedding_conv.2.bias"]
  with pytest.raises(KeyError, match="embedding_conv.2.bias"):
    label_embed_params_from_torch(sd, cfg)
