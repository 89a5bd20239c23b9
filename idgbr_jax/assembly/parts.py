"""Pretrained parts as params checkpoints: each `meta.json` names its `kind` and holds the
architecture dataclass of that kind. Stage II's `config.init.*`, `idgbr convert` and `idgbr
export` all read it here."""
from __future__ import annotations

import dataclasses
from typing import Any

from idgbr_jax import paths
from idgbr_jax.checkpoints import CheckpointError
from idgbr_jax.checkpoints import params as params_ckpt
from idgbr_jax.models import autoencoder, denoiser, dinov2, guidance, label_embedding

CONFIG_CLASSES = {
    "denoiser": denoiser.DenoiserConfig,
    "autoencoder": autoencoder.AutoencoderConfig,
    "label_embed": label_embedding.LabelEmbedConfig,
    "dinov2": dinov2.DinoV2Config,
    "guidance": guidance.GuidanceConfig,
}
PROJECTOR = "projector"  # a plain dict config {hidden_dim, out_dim}


def kind_of(config) -> str:
  """The checkpoint kind of an architecture dataclass (or a projector's dict)."""
  if isinstance(config, dict):
    return PROJECTOR
  for kind, cls in CONFIG_CLASSES.items():
    if isinstance(config, cls):
      return kind
  raise TypeError(f"no checkpoint kind for {type(config).__name__}")


def config_from_meta(meta: dict[str, Any], where: str = "meta.json"):
  """The architecture recorded in a params checkpoint's meta.json (unknown fields ignored)."""
  kind = meta.get("kind")
  if kind == PROJECTOR:
    return dict(meta["config"])
  if kind not in CONFIG_CLASSES:
    raise CheckpointError(f"{where}: unknown checkpoint kind {kind!r}; known: "
                          f"{sorted(CONFIG_CLASSES) + [PROJECTOR]}")
  cls = CONFIG_CLASSES[kind]
  fields = {f.name for f in dataclasses.fields(cls)}
  cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()
         if k in fields}
  return cls(**cfg)


def part_config(directory: str, kind: str):
  """The architecture of the params checkpoint at `directory`, which must be of `kind`."""
  meta = params_ckpt.load_meta(directory)
  if meta.get("kind") != kind:
    raise CheckpointError(f"{directory} holds a {meta.get('kind')!r} checkpoint, expected "
                          f"{kind!r}")
  return config_from_meta(meta, paths.join(directory, "meta.json"))
