"""python -m idgbr_datasets.chn6_cug --manual_dir=DIR [--data_dir=DIR]: builds the dataset."""
from idgbr_datasets import _common
from idgbr_datasets.chn6_cug import Chn6Cug

if __name__ == "__main__":
  _common.main(Chn6Cug)
