r"""Stage I (discriminative segmenter) on ISPRS Vaihingen (6 classes, IRRG 512x512 patches,
scored on label values 1..5).

  python -m datasets.isprs vaihingen --manual_dir=DIR --data_dir=$TFDS_DATA_DIR
  idgbr train --config=configs/vaihingen_stage1.py:segformer --workdir=/tmp/vaihingen_s1 \
      --config.data.data_dir=$TFDS_DATA_DIR
  idgbr predict --workdir=/tmp/vaihingen_s1 --num_folds=4   # coarse maps for Stage II

The arg starts with the backbone (unet | deeplabv3plus | segformer), then optional fields:
`:segformer,variant=b2`, `:unet,tfds_config=irrg_t256_s256`, `:deeplabv3plus,runlocal` (a CPU
smoke-test size: tiny model, examples resized to 64). The training schedule is a starting point:
the paper's Stage I recipe is not released.
"""
from configs import common, stage1_synthetic
from idgbr_jax.data import sources
from idgbr_jax.models import backbones

DATASET = "vaihingen"
BACKBONES = ("unet", "deeplabv3plus", "segformer")


def _with_backbone_key(arg):
  """'segformer,variant=b2' -> 'backbone=segformer,variant=b2'."""
  items = [item for item in (arg or "").split(",") if item]
  if items and "=" not in items[0] and items[0] in BACKBONES:
    items[0] = f"backbone={items[0]}"
  return ",".join(items)


def get_config(arg=None):
  arg = common.parse_arg(_with_backbone_key(arg), backbone="segformer", variant="",
                         tfds_config="", runlocal=False)
  if arg.backbone not in BACKBONES:
    raise ValueError(f"backbone {arg.backbone!r}; allowed: {BACKBONES}")
  variant = arg.variant or backbones.DEFAULT_VARIANTS[arg.backbone]
  config = stage1_synthetic.get_config(
      f"backbone={arg.backbone},variant={variant},runlocal={arg.runlocal}")
  config.data = sources.data_config(DATASET)
  if arg.tfds_config:
    config.data.tfds_config = arg.tfds_config
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 20000
  config.optim.warmup_steps = 500
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 2000

  if arg.runlocal:
    config.data.resize = 64
    config.data.image_size = 64
    config.model.variant = "tiny"
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = 20
    config.optim.warmup_steps = 5
    config.log_every_steps = 5
    config.eval_every_steps = 20
    config.checkpoint_every_steps = 10
  return config
