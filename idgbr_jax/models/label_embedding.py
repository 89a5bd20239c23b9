"""Label <-> pseudo-RGB embedding (the original's `LabelEmbedNet`) and its training step.

`encode` maps class indices to colours `sigmoid(table[k]) * 2 - 1` in (-1, 1), a 3-channel image
the (frozen) VAE can encode; `decode` is a 1x1-conv MLP 3 -> hidden -> K returning logits.

The original trains it on random label maps with the colours computed under `torch.no_grad()`, so
its colour table never trains (only the decoder does); `train_table=True` is our option to also
learn the colours.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from idgbr_jax.models import layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class LabelEmbedConfig:
  """Label embedding sizes."""
  num_classes: int
  hidden: int = 128  # decoder hidden width (the original's 1x1 conv 3 -> 128)


VARIANTS: dict[str, LabelEmbedConfig] = {
    # The released `weight/labelembednet2` (CHN6-CUG, FGFD, WHU) and `labelembednet8` (Potsdam,
    # Vaihingen; 8 rows even though Potsdam has 6 classes).
    "labelembednet2": LabelEmbedConfig(num_classes=2),
    "labelembednet8": LabelEmbedConfig(num_classes=8),
    "tiny": LabelEmbedConfig(num_classes=6, hidden=16),
}


def get_config(variant: str, **overrides) -> LabelEmbedConfig:
  """Returns the named variant with `overrides` applied; clear errors for unknown names."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown label embedding variant {variant!r}; known: {sorted(VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(LabelEmbedConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"unknown LabelEmbedConfig fields {sorted(unknown)}; known: {sorted(fields)}")
  return dataclasses.replace(VARIANTS[variant], **overrides)


class LabelEmbedding(nn.Module):
  """Class-index <-> pseudo-RGB colour embedding with a 1x1-conv decoder."""
  config: LabelEmbedConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    # N(0, 1) rows like torch nn.Embedding's default init.
    self.embedding = layers.param_with_axes(
        self, "embedding", nn.initializers.normal(1.0), (cfg.num_classes, 3), ("vocab", None),
        self.param_dtype)
    kw = dict(padding=0, dtype=self.dtype, param_dtype=self.param_dtype)
    self.decoder_hidden = layers.Conv(cfg.hidden, 1, in_axis=None, out_axis="mlp", **kw)
    self.decoder_out = layers.Conv(cfg.num_classes, 1, in_axis="mlp", out_axis="classes", **kw)

  def encode(self, labels: jax.Array, stop_table_grad: bool = False) -> jax.Array:
    """(B, H, W) int class indices -> (B, H, W, 3) colours in (-1, 1)."""
    table = self.embedding
    if stop_table_grad:
      table = jax.lax.stop_gradient(table)
    colours = jnp.take(table, labels.astype(jnp.int32), axis=0)
    return (jax.nn.sigmoid(colours) * 2.0 - 1.0).astype(self.dtype)

  def decode(self, rgb: jax.Array) -> jax.Array:
    """(B, H, W, 3) colours -> (B, H, W, K) logits."""
    return self.decoder_out(nn.relu(self.decoder_hidden(rgb.astype(self.dtype))))

  def __call__(self, labels: jax.Array) -> jax.Array:
    """encode then decode (creates every parameter at init)."""
    return self.decode(self.encode(labels))


def random_label_batch(rng: jax.Array, batch: int, size: int | Sequence[int],
                       num_classes: int) -> jax.Array:
  """Uniform random label maps (B, H, W) int32, as the original's label-embedding training."""
  h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
  return jax.random.randint(rng, (batch, h, w), 0, num_classes, dtype=jnp.int32)


def label_embed_loss(model: LabelEmbedding, params, labels: jax.Array, rng: jax.Array,
                     noise_std: float = 0.15, train_table: bool = False):
  """Cross-entropy of decoding noisy colours back to labels; differentiable in `params`.

  Args:
    model: the LabelEmbedding module.
    params: its 'params' collection.
    labels: (B, H, W) int labels.
    rng: key for the Gaussian colour noise.
    noise_std: noise std added to the colours (the original: 0.15).
    train_table: if False (the original), the colour table gets no gradient.

  Returns:
    (loss, aux) with aux = {'accuracy': pixel accuracy of the noisy decode, 'loss': loss}.
  """
  def forward(mdl):
    colours = mdl.encode(labels, stop_table_grad=not train_table)
    noisy = colours + noise_std * jax.random.normal(rng, colours.shape, colours.dtype)
    return mdl.decode(noisy)

  logits = nn.apply(forward, model)({"params": params}).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, {"loss": loss, "accuracy": accuracy}
