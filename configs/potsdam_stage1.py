r"""Stage I (discriminative segmenter) on ISPRS Potsdam (6 classes, IRRG 512x512 patches,
scored on label values 1..5).

  python -m idgbr_datasets.isprs potsdam --manual_dir=DIR --data_dir=$TFDS_DATA_DIR
  idgbr train --config=configs/potsdam_stage1.py:segformer --workdir=/tmp/potsdam_s1 \
      --config.data.data_dir=$TFDS_DATA_DIR
  idgbr predict --workdir=/tmp/potsdam_s1 --num_folds=4   # coarse maps for Stage II

The arg starts with the backbone (unet | deeplabv3plus | segformer), then optional fields:
`:segformer,variant=b2`, `:unet,tfds_config=irrg_t256_s256`, `:deeplabv3plus,runlocal` (a CPU
smoke-test size: tiny model, examples resized to 64), `:segformer,channels=rgbir` (the 4-band
RGBIR build, `--config=rgbir_t512_s512` when building; `config.data.in_channels=4`). The
training schedule is a starting point: the paper's Stage I recipe is not released.
"""
from idgbr_configs import real_data

DATASET = "potsdam"


def get_config(arg=None):
  return real_data.stage1(DATASET, arg)
