"""python -m datasets.whu_building --manual_dir=DIR [--data_dir=DIR]: builds the dataset."""
from datasets import _common
from datasets.whu_building import WhuBuilding

if __name__ == "__main__":
  _common.main(WhuBuilding)
