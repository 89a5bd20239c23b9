"""The Stage I / Stage II config bodies shared by the real datasets' experiment files.

Each `configs/<dataset>_stage{1,2}.py` is one experiment (its own `get_config(arg)` and usage
docstring) and delegates here, so the five datasets cannot drift apart.
"""
import ml_collections

from idgbr_configs import common, stage1_synthetic, stage2_synthetic
from idgbr_jax.data import sources
from idgbr_jax.models import backbones

BACKBONES = ("unet", "deeplabv3plus", "segformer")
# Band sets of the ISPRS builders (`idgbr_datasets.isprs`, builder field `channels`).
ISPRS_CHANNELS = {"potsdam": ("irrg", "rgb", "rgbir"), "vaihingen": ("irrg",)}


def _apply_channels(config: ml_collections.ConfigDict, dataset: str, channels: str) -> None:
  """`channels=rgbir` (Potsdam): the 4-band build (`rgbir_t512_s512`, the tfds_config's tile
  fields kept) and `config.data.in_channels=4`; R, G, B are bands 0..2 of RGBIR."""
  if not channels:
    return
  allowed = ISPRS_CHANNELS.get(dataset, ())
  if channels not in allowed:
    raise ValueError(f"channels={channels!r} for dataset {dataset!r}; allowed: "
                     f"{list(allowed) or 'none (a 3-band dataset)'}")
  _, _, tiles = config.data.tfds_config.partition("_")
  config.data.tfds_config = f"{channels}_{tiles}"
  config.data.in_channels = 4 if channels == "rgbir" else 3


def _with_backbone_key(arg):
  """'segformer,variant=b2' -> 'backbone=segformer,variant=b2'."""
  items = [item for item in (arg or "").split(",") if item]
  if items and "=" not in items[0] and items[0] in BACKBONES:
    items[0] = f"backbone={items[0]}"
  return ",".join(items)


def stage1(dataset: str, arg=None) -> ml_collections.ConfigDict:
  """Stage I on `dataset`; arg = backbone[,variant=..][,tfds_config=..][,channels=..]
  [,runlocal] (channels: an ISPRS band set, `rgbir` for 4-band Potsdam)."""
  arg = common.parse_arg(_with_backbone_key(arg), backbone="segformer", variant="",
                         tfds_config="", channels="", runlocal=False)
  if arg.backbone not in BACKBONES:
    raise ValueError(f"backbone {arg.backbone!r}; allowed: {BACKBONES}")
  variant = arg.variant or backbones.DEFAULT_VARIANTS[arg.backbone]
  config = stage1_synthetic.get_config(
      f"backbone={arg.backbone},variant={variant},runlocal={arg.runlocal}")
  config.data = sources.data_config(dataset)
  if arg.tfds_config:
    config.data.tfds_config = arg.tfds_config
  _apply_channels(config, dataset, arg.channels)
  if arg.runlocal:  # stage1_synthetic's runlocal schedule and tiny model, at 64 px
    config.data.resize = 64
    config.data.image_size = 64
    return config
  # A starting point: the paper's Stage I recipe is not released.
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 20000
  config.optim.warmup_steps = 500
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 2000
  return config


def sd15_refiner(config: ml_collections.ConfigDict, runlocal: bool) -> ml_collections.ConfigDict:
  """The original's Stage II sizes (SD-1.5 denoiser, CG width 512 / 8 heads, DINOv2-g teacher,
  77-token context); `runlocal` keeps the tiny networks and resizes examples to 32."""
  if runlocal:
    config.data.resize = 32
    config.data.image_size = 32
  else:
    config.model.denoiser = "sd15"
    config.model.guidance_width = 512
    config.model.guidance_heads = 8
    config.model.teacher = "vitg14"
    config.model.context_length = 77
    # FSDP over every device (`idgbr plan`, README "Planning a run on TPU/GPU"): replicated,
    # the 976 M trainable params and AdamW's two moments take 11.7 GB on every chip, most of
    # a v5e's 16 GB before any activation; sharded 8 ways they take 1.5 GB per chip.
    config.mesh_shape = common.mesh_config(data=1, fsdp=-1)
    # The step as three programs (train/stage2.py SplitTrainStep; the same numbers): the whole
    # SD-1.5 step needs more than 24 GiB of host memory to compile for a TPU, each part less
    # (README "Planning").
    config.split_step = True
  return config


def stage2(dataset: str, arg=None) -> ml_collections.ConfigDict:
  """Stage II on `dataset`; arg = [ablation=..][,tfds_config=..][,channels=..][,runlocal]."""
  arg = common.parse_arg(arg, ablation="full", tfds_config="", channels="", runlocal=False)
  config = stage2_synthetic.get_config(f"ablation={arg.ablation},runlocal={arg.runlocal}")
  config.data = sources.data_config(dataset)
  if arg.tfds_config:
    config.data.tfds_config = arg.tfds_config
  _apply_channels(config, dataset, arg.channels)
  return sd15_refiner(config, arg.runlocal)
