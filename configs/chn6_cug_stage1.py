r"""Stage I (discriminative segmenter) on CHN6-CUG road extraction (binary, 512x512 tiles).

  python -m idgbr_datasets.chn6_cug --manual_dir=DIR --data_dir=$TFDS_DATA_DIR
  idgbr train --config=configs/chn6_cug_stage1.py:segformer --workdir=/tmp/chn6_cug_s1 \
      --config.data.data_dir=$TFDS_DATA_DIR
  idgbr predict --workdir=/tmp/chn6_cug_s1 --num_folds=4   # coarse maps for Stage II

The arg starts with the backbone (unet | deeplabv3plus | segformer), then optional fields:
`:segformer,variant=b2`, `:unet,tfds_config=irrg_t256_s256`, `:deeplabv3plus,runlocal` (a CPU
smoke-test size: tiny model, examples resized to 64). The training schedule is a starting point:
the paper's Stage I recipe is not released.
"""
from idgbr_configs import real_data

DATASET = "chn6_cug"


def get_config(arg=None):
  return real_data.stage1(DATASET, arg)
