"""A Stage I segmenter from a config: the backbone, its init and its params-only restore."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from idgbr_jax import checkpoints, paths
from idgbr_jax.assembly import common
from idgbr_jax.data import sources
from idgbr_jax.models import backbones
from idgbr_jax.parallel import sharding

VARIABLE_COLLECTIONS = ("params", "batch_stats")


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  """The backbone, reading `config.data.in_channels` image bands (3 when the key is absent)."""
  overrides = config.model.overrides.to_dict() if "overrides" in config.model else {}
  channels = int(config.data.get("in_channels", 3))
  if overrides.get("in_channels", channels) != channels:
    raise ValueError(f"config.model.overrides.in_channels={overrides['in_channels']} differs "
                     f"from config.data.in_channels={channels}; set only the data key")
  overrides["in_channels"] = channels
  return backbones.get_backbone(config.model.backbone, num_classes, config.model.variant,
                                dtype=common.dtype_from_name(config.model.dtype), **overrides)


def input_size(config: ml_collections.ConfigDict) -> int:
  return config.data.crop_size or config.data.image_size


def variables_init_fn(model, image_size: int) -> Callable[[jax.Array], dict[str, Any]]:
  """rng -> {'params', ['batch_stats']} (boxed, so shardings can be read off `eval_shape`)."""
  bands = model.config.in_channels

  def init(rng):
    return dict(model.init(rng, jnp.zeros((1, image_size, image_size, bands), jnp.float32),
                           train=False))
  return init


class LoadedSegmenter(NamedTuple):
  model: Any
  variables: dict[str, Any]   # {'params', ['batch_stats']}, sharded on `mesh`
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh


def load_segmenter(workdir: str, config: ml_collections.ConfigDict | None = None,
                   mesh=None) -> LoadedSegmenter:
  """The latest Stage I checkpoint of `workdir`, params and batch statistics only (no
  optimizer state is read or allocated)."""
  ckpt_dir = paths.join(workdir, "checkpoints")
  config = config or checkpoints.load_config(ckpt_dir)
  mesh = mesh or sharding.mesh_from_config(config)
  rules = tuple(config.sharding_rules)
  model = build_model(config, sources.num_classes(config.data))
  abstract, shardings = sharding.abstract_sharded(
      variables_init_fn(model, input_size(config)), jax.random.key(0), mesh, rules)
  ckpt = checkpoints.Checkpointer(ckpt_dir, create=False)
  try:
    variables = ckpt.restore_partial(None, abstract, shardings=shardings)
  finally:
    ckpt.close()
  return LoadedSegmenter(model, variables, config, mesh)
