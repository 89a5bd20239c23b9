"""Segmentation losses: cross-entropy with an ignore index, optional soft Dice."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = 255) -> jax.Array:
  """Mean pixel cross-entropy over non-ignored pixels. logits (B,H,W,K), labels (B,H,W)."""
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def dice_loss(logits: jax.Array, labels: jax.Array, num_classes: int, ignore_index: int = 255,
              eps: float = 1.0) -> jax.Array:
  """1 - mean soft Dice over classes (batch-pooled), ignoring `ignore_index` pixels."""
  valid = (labels != ignore_index)[..., None]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * valid
  onehot = jax.nn.one_hot(jnp.where(labels == ignore_index, 0, labels), num_classes) * valid
  inter = jnp.sum(probs * onehot, axis=(0, 1, 2))
  denom = jnp.sum(probs, axis=(0, 1, 2)) + jnp.sum(onehot, axis=(0, 1, 2))
  return 1.0 - jnp.mean((2 * inter + eps) / (denom + eps))


def segmentation_loss(logits, labels, num_classes: int, ignore_index: int = 255,
                      dice_weight: float = 0.0) -> jax.Array:
  loss = cross_entropy(logits, labels, ignore_index)
  if dice_weight:
    loss = loss + dice_weight * dice_loss(logits, labels, num_classes, ignore_index)
  return loss
