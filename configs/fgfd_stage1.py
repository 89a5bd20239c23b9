r"""Stage I (discriminative segmenter) on FGFD farmland mapping (binary).

  python -m idgbr_datasets.fgfd --manual_dir=DIR --data_dir=$TFDS_DATA_DIR
  idgbr train --config=configs/fgfd_stage1.py:segformer --workdir=/tmp/fgfd_s1 \
      --config.data.data_dir=$TFDS_DATA_DIR
  idgbr predict --workdir=/tmp/fgfd_s1 --num_folds=4   # coarse maps for Stage II

The arg starts with the backbone (unet | deeplabv3plus | segformer), then optional fields:
`:segformer,variant=b2`, `:unet,tfds_config=irrg_t256_s256`, `:deeplabv3plus,runlocal` (a CPU
smoke-test size: tiny model, examples resized to 64). The training schedule is a starting point:
the paper's Stage I recipe is not released.
"""
from idgbr_configs import real_data

DATASET = "fgfd"


def get_config(arg=None):
  return real_data.stage1(DATASET, arg)
