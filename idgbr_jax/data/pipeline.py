"""grain pipelines over TFDS sources, and the one place host batches become global jax.Arrays.

Training batches do not depend on the number of processes: every process defines the same global
stream (all records, shuffled, augmented, repeated; grain seeds each element by its index) and
reads only its rows of each global batch, `global_batch // process_count` of them. So 2 hosts x 4
chips train on exactly the batches 1 host x 8 chips does, and a run can resume on another process
count. The stream's position is the train step (`start_step`): no iterator state to checkpoint.
`to_global` assembles the global array from every process's piece with
`jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import jax
import ml_collections
import numpy as np

from idgbr_jax.data import sources, transforms
from idgbr_jax.parallel import sharding


def fold_indices(n: int, num_folds: int, fold: int, seed: int, *, held_out: bool) -> np.ndarray:
  """Record indices of the k-fold split: examples are assigned to folds by a seeded permutation."""
  if not 0 <= fold < num_folds:
    raise ValueError(f"config.data.fold={fold} must be in [0, num_folds={num_folds})")
  assignment = np.random.default_rng([seed, num_folds]).permutation(n) % num_folds
  return np.flatnonzero((assignment == fold) == held_out)


def _base_dataset(cfg: ml_collections.ConfigDict, split: str, num_classes: int,
                  coarse_dir: str | None = None, indices: np.ndarray | None = None,
                  ignore_index: int | None = None):
  source = sources.get_source(cfg, split)
  name = getattr(source, "name", f"{cfg.name}[{split}]")
  if indices is not None:
    source = sources.Subset(source, indices)
  ds = grain.MapDataset.source(source)
  ignore_index = cfg.ignore_index if ignore_index is None else ignore_index
  ds = ds.map(transforms.ParseExample(num_classes, ignore_index, cfg.binarize_labels,
                                      num_channels=int(cfg.get("in_channels", 3)), source=name))
  resize = cfg.get("resize", 0)
  if resize:  # the model's input size; labels and stored coarse maps follow (nearest)
    ds = ds.map(transforms.Resize(resize))
  if coarse_dir:  # replaces a stored `coarse`; with `resize`, maps of any size are resized
    ds = ds.map(transforms.AttachCoarse(coarse_dir, num_classes, resize_mismatched=bool(resize)))
  return ds


def train_records(config: ml_collections.ConfigDict, num_classes: int, *,
                  coarse_dir: str | None = None,
                  ignore_index: int | None = None) -> grain.MapDataset:
  """The training records (all of them, on every process), parsed: unshuffled, unaugmented,
  not normalised. Elements are read lazily, so a process only reads what it indexes.

  `ignore_index` overrides `config.data.ignore_index` (-1: no ignore value allowed).
  """
  cfg = config.data
  indices = None
  if cfg.num_folds:
    n = len(sources.get_source(cfg, cfg.train_split))
    indices = fold_indices(n, cfg.num_folds, cfg.fold, config.seed, held_out=False)
  return _base_dataset(cfg, cfg.train_split, num_classes, coarse_dir, indices, ignore_index)


@dataclasses.dataclass(frozen=True)
class ProcessRows(grain.transforms.Map):
  """Index k of this process's stream -> its element of the global stream: global batch
  k // per_process, row process_index * per_process + k % per_process."""
  stream: grain.MapDataset
  global_batch: int
  per_process: int
  process_index: int

  def map(self, k: int):
    step, pos = divmod(int(k), self.per_process)
    return self.stream[step * self.global_batch + self.process_index * self.per_process + pos]


def train_dataset(config: ml_collections.ConfigDict, num_classes: int, *,
                  coarse_dir: str | None = None, cache=None,
                  ignore_index: int | None = None, start_step: int = 0) -> grain.IterDataset:
  """Infinite, shuffled, augmented per-process batches for training (deterministic in seed).

  Each batch holds `id`, the examples' ids (strings, host side only: `split_ids` takes them
  out before `to_global`). An empty training split is a DataError.

  The first batch is the one of train step `start_step + 1` (a resumed run continues the
  stream); the same for any process count (see the module doc).
  `cache` (a `train.latent_cache.LatentCache` or any grain Map that reads `id` and `dihedral`)
  attaches precomputed per-example, per-augmentation values after the augmentation.
  `ignore_index` overrides `config.data.ignore_index` (see `train_records`).
  """
  cfg = config.data
  ds = train_records(config, num_classes, coarse_dir=coarse_dir, ignore_index=ignore_index)
  if len(ds) == 0:
    fold = f" (fold {cfg.fold} of {cfg.num_folds})" if cfg.num_folds else ""
    raise sources.DataError(f"the training split {cfg.train_split!r} of dataset {cfg.name!r} "
                            f"is empty{fold}: expected at least one example "
                            f"(data_dir {cfg.get('data_dir') or sources.default_data_dir()})")
  ds = ds.shuffle(seed=config.seed)
  if cfg.crop_size:
    if cache is not None:
      raise ValueError("config.data.crop_size > 0 cannot use a latent cache (crops are not "
                       "enumerable); set crop_size=0 or turn the cache off")
    ds = ds.random_map(transforms.RandomCrop(cfg.crop_size), seed=config.seed + 1)
  if cfg.augment in ("flip", "fliprot"):
    ds = ds.random_map(transforms.RandomFlipRot(rotate=cfg.augment == "fliprot",
                                                emit_code=cache is not None),
                       seed=config.seed + 2)
  elif cfg.augment != "none":
    raise ValueError(f"config.data.augment={cfg.augment!r}; allowed: none, flip, fliprot")
  if cache is not None:
    ds = ds.map(cache)
  # The ids stay with the host batch (`split_ids`): a data or non-finite-loss error names them.
  ds = ds.map(transforms.Normalize(cfg.normalization, keep_id=True))
  ds = ds.repeat()  # reseeds shuffle and augmentation every epoch
  per_process = per_process_batch(config.batch_size)
  rows = ProcessRows(ds, config.batch_size, per_process, jax.process_index())
  ds = grain.MapDataset.range(start_step * per_process, len(ds) // config.batch_size * per_process)
  ds = ds.map(rows).batch(per_process, drop_remainder=True)
  read = grain.ReadOptions(num_threads=max(1, cfg.num_workers), prefetch_buffer_size=2)
  if cfg.num_workers > 0:
    return ds.to_iter_dataset(read).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return ds.to_iter_dataset(read)


def eval_dataset(config: ml_collections.ConfigDict, split: str, num_classes: int, *,
                 coarse_dir: str | None = None, indices: np.ndarray | None = None,
                 normalize: bool = True) -> grain.MapDataset:
  """Unbatched, unaugmented examples of `split` in order, with their `id` (all processes)."""
  ds = _base_dataset(config.data, split, num_classes, coarse_dir, indices)
  if normalize:
    ds = ds.map(transforms.Normalize(config.data.normalization, keep_id=True))
  return ds


def per_process_batch(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ValueError(f"batch size {global_batch} not divisible by {jax.process_count()} processes")
  return global_batch // jax.process_count()


def eval_batches(ds: grain.MapDataset, batch_size: int, keys=("image", "label", "coarse")
                 ) -> Iterator[tuple[dict[str, np.ndarray], list[str], int]]:
  """Fixed-size host batches of `ds` (the last one zero-padded) with ids and the valid count."""
  n = len(ds)
  for start in range(0, n, batch_size):
    items = [ds[i] for i in range(start, min(start + batch_size, n))]
    valid = len(items)
    batch = {}
    for k in keys:
      if k in items[0]:
        arr = np.stack([it[k] for it in items])
        if valid < batch_size:
          pad = np.zeros((batch_size - valid,) + arr.shape[1:], arr.dtype)
          arr = np.concatenate([arr, pad])
        batch[k] = arr
    yield batch, [it["id"] for it in items], valid


def split_ids(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """(the arrays of a host batch, its example ids): ids never go to the devices."""
  arrays = {k: v for k, v in batch.items() if k != "id"}
  ids = batch.get("id")
  ids = [] if ids is None else [i.decode() if isinstance(i, bytes) else str(i)
                                for i in np.asarray(ids).reshape(-1)]
  return arrays, ids


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, rules=sharding.DEFAULT_RULES
              ) -> dict[str, jax.Array]:
  """Host-local batch pieces -> global arrays sharded along 'batch' over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim, rules), v)
          for k, v in batch.items()}
