"""Per-example VAE posterior moments of the Stage II inputs, computed once before training.

The frozen VAE encoder is the largest frozen cost of a Stage II step: three passes at image
resolution (image, ground-truth colours, coarse colours) for every example of every step. Its
output depends only on the example and its augmentation, and our augmentations are dihedral
elements (`transforms.DIHEDRAL_CODES`: 1, 4 or 8 of them), so each (example, element) is encoded
once here and the step draws the latent from the cached moments. Same distribution and, for the
same rng, the same draws as the uncached step (`Refiner.latent_from_moments`); tested.

Memory per process (every process holds the whole table, as every process may read any example):
records × elements × 3 maps × (H/f · W/f · 2C) float32. The demo (256 × 8 × 3 × 16·16·8) is
50 MB; SD-1.5 at 512 px is 384 KB per (example, element), so 8 elements of a 3,600-image split
need ~11 GB: cache fewer elements (augment=flip or none) or leave the cache off. Random crops
cannot be enumerated and are refused.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from idgbr_jax.data import pipeline, transforms
from idgbr_jax.parallel import multihost, sharding

KEYS = ("image", "label", "coarse")


@dataclasses.dataclass(frozen=True, eq=False)
class LatentCache(grain.transforms.Map):
  """grain Map: adds `<key>_moments` for the element's `id` and `dihedral` code."""
  rows: dict[str, int]               # example id -> row
  slots: dict[int, int]              # dihedral code -> slot
  moments: dict[str, np.ndarray]     # key -> (rows, slots, h, w, 2C) float32

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    out = dict(element)
    code = int(out.pop("dihedral", 0))
    example_id = out["id"]
    if example_id not in self.rows:
      raise KeyError(f"example {example_id!r} is not in the latent cache (built for "
                     f"{len(self.rows)} examples of this process)")
    if code not in self.slots:
      raise KeyError(f"augmentation code {code} is not cached (cached: {sorted(self.slots)})")
    row, slot = self.rows[example_id], self.slots[code]
    for key, table in self.moments.items():
      out[f"{key}_moments"] = table[row, slot]
    return out

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in self.moments.values())


def moment_keys(use_coarse: bool) -> tuple[str, ...]:
  return KEYS if use_coarse else KEYS[:2]


def build(ref, frozen, frozen_sh, config: ml_collections.ConfigDict, num_classes: int, mesh,
          rules, *, coarse_dir: str | None, batch_size: int | None = None) -> LatentCache:
  """Encodes every (training record, augmentation element) with the frozen VAE.

  The training stream is the same on every process (`data.pipeline`), so every process holds
  the whole table: the encoder runs over global batches (each process reads its rows of each)
  and the moments are gathered to every host.
  """
  cfg = config.data
  if cfg.crop_size:
    raise ValueError("config.data.crop_size > 0 cannot use a latent cache (crops are not "
                     "enumerable); set crop_size=0 or config.latent_cache=False")
  if cfg.augment not in transforms.DIHEDRAL_CODES:
    raise ValueError(f"config.data.augment={cfg.augment!r}; allowed: "
                     f"{sorted(transforms.DIHEDRAL_CODES)}")
  codes = transforms.DIHEDRAL_CODES[cfg.augment]
  keys = moment_keys(config.diffusion.use_coarse)
  # The records Stage II trains on: no ignore value (see transforms.NO_IGNORE).
  records = pipeline.train_records(config, num_classes, coarse_dir=coarse_dir,
                                   ignore_index=transforms.NO_IGNORE)
  n = len(records)
  global_batch = batch_size or config.batch_size
  per_process = pipeline.per_process_batch(global_batch)
  first_row = jax.process_index() * per_process
  items = [(row, slot) for row in range(n) for slot in range(len(codes))]
  num_batches = math.ceil(len(items) / global_batch)

  batch_sh = {"image": sharding.batch_sharding(mesh, 4, rules),
              "label": sharding.batch_sharding(mesh, 3, rules),
              "coarse": sharding.batch_sharding(mesh, 3, rules)}
  out_sh = {k: sharding.batch_sharding(mesh, 4, rules) for k in keys}

  @functools.partial(jax.jit, in_shardings=(frozen_sh, batch_sh), out_shardings=out_sh)
  def encode(frozen, batch):
    out = {"image": ref.image_moments(frozen, batch["image"]),
           "label": ref.label_moments(frozen, batch["label"])}
    if "coarse" in keys:
      out["coarse"] = ref.label_moments(frozen, batch["coarse"])
    return out

  normalize = transforms.Normalize(cfg.normalization, keep_id=True)
  example_cache: dict[int, dict[str, Any]] = {}

  def example(row):
    if row not in example_cache:
      example_cache.clear()  # items are row-major: keep one parsed record at a time
      e = normalize.map(records[row])
      if "coarse" not in e:
        if "coarse" in keys:
          raise ValueError(f"example {e['id']}: no coarse map (config.data.coarse_dir unset?)")
        e["coarse"] = np.zeros_like(e["label"])
      example_cache[row] = e
    return example_cache[row]

  # Square examples (rot90 keeps the shape); the size every process encodes at.
  size = example(0)["label"].shape[0] if n else cfg.image_size
  h = ref.latent_size(size)
  channels = 2 * ref.config.autoencoder.latent_channels
  moments = {k: np.zeros((n, len(codes), h, h, channels), np.float32) for k in keys}
  ids = [None] * n
  for b in range(num_batches):
    chunk = items[b * global_batch:(b + 1) * global_batch]
    host = {k: np.zeros((per_process, size, size) + ((int(cfg.get("in_channels", 3)),) if k == "image" else ()),
                        np.float32 if k == "image" else np.int32) for k in KEYS}
    for i, (row, slot) in enumerate(chunk[first_row:first_row + per_process]):
      e = example(row)
      for k in KEYS:
        host[k][i] = transforms.dihedral(e[k], codes[slot])
    out = encode(frozen, pipeline.to_global(host, mesh, rules))
    for k in keys:
      full = multihost.to_host(out[k])  # every process's rows: the whole global batch
      for i, (row, slot) in enumerate(chunk):
        moments[k][row, slot] = full[i]
  for row in range(n):
    ids[row] = records[row]["id"]
  cache = LatentCache(rows={example_id: row for row, example_id in enumerate(ids)},
                      slots={c: i for i, c in enumerate(codes)}, moments=moments)
  logging.info("latent cache: %d examples x %d augmentations x %s, %.1f MB per process",
               n, len(codes), "/".join(keys), cache.nbytes / 2**20)
  return cache
