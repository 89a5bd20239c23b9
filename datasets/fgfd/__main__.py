"""python -m idgbr_datasets.fgfd --manual_dir=DIR [--data_dir=DIR]: builds the dataset."""
from idgbr_datasets import _common
from idgbr_datasets.fgfd import Fgfd

if __name__ == "__main__":
  _common.main(Fgfd)
