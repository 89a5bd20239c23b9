"""Pretraining of Stage II's frozen parts when no pretrained weights are at hand:

* the label embedding (class -> colour table + 1x1-conv decoder), as the original's
  `train_label_embed.py` (random label maps, colour noise 0.15, cross-entropy), optionally also
  training the colour table (the original's script cannot: its encode runs under no_grad);
* a small SD-layout autoencoder trained from scratch on the dataset's images and on label
  colour maps (what the frozen SD-1.5 VAE encodes in the original).

Each writes a params checkpoint (`idgbr_jax.checkpoints.params`) that Stage II configs point at.
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from idgbr_jax.checkpoints import params as params_ckpt
from idgbr_jax.data import pipeline, sources, transforms
from idgbr_jax.models import autoencoder, label_embedding
from idgbr_jax.parallel import sharding
from idgbr_jax.train import common, optim


def _state_init(init_params, tx):
  def init(rng):
    params = init_params(rng)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  return init


def _apply_grads(tx, state, grads):
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
  return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}


def train_label_embedding(config: ml_collections.ConfigDict, out_dir: str) -> dict[str, Any]:
  """config: num_classes, hidden, steps, batch_size, size, learning_rate, noise_std,
  train_table, seed. Returns {'params', 'accuracy'} and writes `out_dir`."""
  out_dir = common.ensure_workdir(out_dir)
  le_cfg = label_embedding.LabelEmbedConfig(num_classes=config.num_classes, hidden=config.hidden)
  model = label_embedding.LabelEmbedding(le_cfg)
  tx, _ = optim.make_optimizer(config.optim, config.steps)
  rng = jax.random.key(config.seed)
  state = jax.jit(lambda r: nn.meta.unbox(_state_init(
      lambda r: model.init(r, jnp.zeros((1, 2, 2), jnp.int32))["params"], tx)(r)))(rng)

  @jax.jit
  def step_fn(state, rng):
    rng = jax.random.fold_in(rng, state["step"])
    r_lab, r_noise = jax.random.split(rng)
    labels = label_embedding.random_label_batch(r_lab, config.batch_size, config.size,
                                                config.num_classes)
    grad_fn = jax.grad(lambda p: label_embedding.label_embed_loss(
        model, p, labels, r_noise, config.noise_std, config.train_table), has_aux=True)
    grads, aux = grad_fn(state["params"])
    return _apply_grads(tx, state, grads), aux

  aux = {}
  for _ in range(config.steps):
    state, aux = step_fn(state, rng)
  accuracy = float(aux["accuracy"])
  logging.info("label embedding: %d steps, noisy-decode accuracy %.4f", config.steps, accuracy)
  params_ckpt.save_params(out_dir, state["params"], {
      "kind": "label_embed", "config": dataclasses.asdict(le_cfg),
      "train_table": bool(config.train_table), "noisy_decode_accuracy": accuracy})
  return {"params": state["params"], "accuracy": accuracy}


def train_autoencoder(config: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict,
                      label_embed_dir: str, out_dir: str) -> dict[str, Any]:
  """Trains an AutoencoderKL on the train split's images and their label colour maps.

  config: variant, overrides (dict), steps, kl_weight, label_ce_weight (0: the plain L1 + KL
  objective; >0 adds cross-entropy of the reconstructed label colours through the frozen label
  decoder), optim, seed. `data_config` is a full
  Stage I/II config (its `data`, `batch_size`, `mesh_shape` and `sharding_rules` are used), so
  images get exactly the normalisation Stage II feeds the VAE.

  Images of another band count than the label colours' 3 (`data.in_channels`, e.g. 4 for
  RGBIR) train the autoencoder's image stem (`image_channels`, see models/autoencoder.py): the
  images and the colour maps then go through in two passes, and the loss is the mean of the two
  objectives (with 3 bands it is one pass over [images; colours], as before).
  """
  out_dir = common.ensure_workdir(out_dir)
  mesh = sharding.mesh_from_config(data_config)
  rules = tuple(data_config.sharding_rules)
  num_classes = sources.num_classes(data_config.data)
  ae_cfg = autoencoder.get_config(config.variant, **dict(config.get("overrides", {})))
  channels = int(data_config.data.get("in_channels", 3))
  if channels != ae_cfg.in_channels and not ae_cfg.has_image_stem:
    ae_cfg = dataclasses.replace(ae_cfg, image_channels=channels)
  if channels not in ae_cfg.accepted_bands:
    raise ValueError(f"config.data.in_channels={channels}, but the autoencoder overrides give "
                     f"image_channels={ae_cfg.image_channels}")
  model = autoencoder.AutoencoderKL(ae_cfg)
  le_meta = params_ckpt.load_meta(label_embed_dir)
  le_model = label_embedding.LabelEmbedding(label_embedding.LabelEmbedConfig(**le_meta["config"]))
  le_params = params_ckpt.load_params(label_embed_dir)
  tx, _ = optim.make_optimizer(config.optim, config.steps)
  size = data_config.data.image_size
  state, state_sh = sharding.create_sharded(_state_init(
      lambda r: model.init(r, jnp.zeros((1, size, size, 3)), None, False)["params"], tx),
      jax.random.key(config.seed), mesh, rules)
  batch_sh = {"image": sharding.batch_sharding(mesh, 4, rules),
              "label": sharding.batch_sharding(mesh, 3, rules)}

  @functools.partial(jax.jit, in_shardings=(state_sh, batch_sh, sharding.replicated(mesh), None),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  def step_fn(state, batch, rng, le_params):
    rng = jax.random.fold_in(rng, state["step"])
    colours = le_model.apply({"params": le_params}, batch["label"], method=le_model.encode)
    colours = colours.astype(batch["image"].dtype)
    b = batch["image"].shape[0]

    def reconstruct(p):
      """(loss, aux, reconstructed label colours)."""
      if not ae_cfg.has_image_stem:
        x = jnp.concatenate([batch["image"], colours])  # [images; label colours]: one pass
        loss, aux = autoencoder.autoencoder_loss(model, p, x, rng, config.kl_weight)
        return loss, aux, aux.pop("reconstruction")[b:]
      r_img, r_col = jax.random.split(rng)
      loss_i, aux_i = autoencoder.autoencoder_loss(model, p, batch["image"], r_img,
                                                   config.kl_weight)
      loss_c, aux_c = autoencoder.autoencoder_loss(model, p, colours, r_col, config.kl_weight)
      aux = {k: 0.5 * (aux_i[k] + aux_c[k]) for k in ("loss", "l1", "mse", "kl")}
      return 0.5 * (loss_i + loss_c), aux, aux_c["reconstruction"]

    def loss_fn(p):
      loss, aux, colour_recon = reconstruct(p)
      if config.get("label_ce_weight", 0.0):
        # What Stage II needs from the autoencoder is that decoded label colours decode back to
        # the right classes: score the colour reconstructions through the frozen decoder.
        logits = le_model.apply({"params": le_params}, colour_recon, method=le_model.decode)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        loss = loss + config.label_ce_weight * ce
        aux = {**aux, "label_ce": ce,
               "label_accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
      return loss, aux

    grads, aux = jax.grad(loss_fn, has_aux=True)(state["params"])
    return _apply_grads(tx, state, grads), aux

  # Labels go through the label embedding: no ignore value (see transforms.NO_IGNORE).
  it = iter(pipeline.train_dataset(data_config, num_classes,
                                   ignore_index=transforms.NO_IGNORE))
  rng = jax.random.key(config.seed + 1)
  aux = {}
  for step in range(1, config.steps + 1):
    batch = pipeline.to_global({k: v for k, v in next(it).items() if k in batch_sh}, mesh, rules)
    state, aux = step_fn(state, batch, rng, le_params)
    if step % max(1, config.steps // 5) == 0:
      logging.info("autoencoder step %d: l1 %.4f", step, float(aux["l1"]))
  l1 = float(aux["l1"])
  label_accuracy = float(aux.get("label_accuracy", float("nan")))
  params_ckpt.save_params(out_dir, state["params"], {
      "kind": "autoencoder", "config": dataclasses.asdict(ae_cfg), "final_l1": l1,
      "label_round_trip_accuracy": label_accuracy})
  return {"params": state["params"], "l1": l1, "label_accuracy": label_accuracy}
