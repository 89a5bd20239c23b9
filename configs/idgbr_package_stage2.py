r"""Stage II on the original IDGBR data package (its SegFormer coarse maps are stored in it).

  python -m idgbr_datasets.idgbr_package --manual_dir=examples/Potsdam --config=potsdam \
      --data_dir=$TFDS_DATA_DIR
  idgbr train --config=configs/idgbr_package_stage2.py:dataset=potsdam --workdir=/tmp/pkg_s2 \
      --config.data.data_dir=$TFDS_DATA_DIR --config.init.autoencoder=AE_DIR ...

`dataset=chn6_cug` (2 classes, scored on 0/1) or `dataset=potsdam` (6 classes, scored on label
values 1..5). The records carry `coarse`, so no coarse_dir is needed (a coarse_dir, if given,
replaces the stored maps). As the original's loader, every example is resized to 512
(`data.resize`). Ablations: full | no_rough | no_align | cubic | no_cubic. `:runlocal` is a CPU
smoke-test size (tiny networks, examples resized to 32).
"""
from idgbr_configs import common, real_data, stage2_synthetic
from idgbr_jax.data import sources

PACKAGE_DATASETS = {"chn6_cug": (2, (0, 1)), "potsdam": (6, (1, 2, 3, 4, 5))}


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="chn6_cug", ablation="full", runlocal=False)
  if arg.dataset not in PACKAGE_DATASETS:
    raise ValueError(f"dataset {arg.dataset!r}; allowed: {sorted(PACKAGE_DATASETS)}")
  num_classes, label_values = PACKAGE_DATASETS[arg.dataset]
  config = stage2_synthetic.get_config(f"ablation={arg.ablation},runlocal={arg.runlocal}")
  config.data = sources.data_config(
      "idgbr_package", tfds_config=arg.dataset, num_classes=num_classes, resize=512,
      eval_num_classes=len(label_values), eval_label_values=label_values)
  return real_data.sd15_refiner(config, arg.runlocal)
