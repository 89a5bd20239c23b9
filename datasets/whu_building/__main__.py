"""python -m idgbr_datasets.whu_building --manual_dir=DIR [--data_dir=DIR]: builds the dataset."""
from idgbr_datasets import _common
from idgbr_datasets.whu_building import WhuBuilding

if __name__ == "__main__":
  _common.main(WhuBuilding)
