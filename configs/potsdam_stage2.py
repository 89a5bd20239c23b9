r"""Stage II (the IDGBR refiner) on ISPRS Potsdam (6 classes, IRRG 512x512 patches,
scored on label values 1..5).

  idgbr train --config=configs/potsdam_stage2.py:ablation=full --workdir=/tmp/potsdam_s2 \
      --config.data.data_dir=$TFDS_DATA_DIR --config.data.coarse_dir=/tmp/potsdam_s1/coarse \
      --config.init.autoencoder=AE_DIR --config.init.label_embed=LE_DIR \
      --config.init.unet=SD15_UNET_DIR --config.init.teacher=DINOV2_G_DIR \
      --config.init.context=EMPTY_PROMPT.npy

Coarse maps from any segmenter attach by id: `<coarse_dir>/<split>/<id>.png`. Model sizes are
the original's (SD-1.5 denoiser, CG width 512 / 8 heads, DINOv2-g teacher, 77-token context,
512x512). Ablations as the original's configs: full | no_rough | no_align | cubic | no_cubic.
`:runlocal` is a CPU smoke-test size (tiny networks, examples resized to 32). `:channels=rgbir`
trains on the 4-band RGBIR build: the SD VAE gets a 4-band image stem (README, "Multispectral
(RGBIR) input"), the DINOv2 teacher reads the RGB bands.
"""
from idgbr_configs import real_data

DATASET = "potsdam"


def get_config(arg=None):
  return real_data.stage2(DATASET, arg)
