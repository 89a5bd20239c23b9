"""python -m datasets.fgfd --manual_dir=DIR [--data_dir=DIR]: builds the dataset."""
from datasets import _common
from datasets.fgfd import Fgfd

if __name__ == "__main__":
  _common.main(Fgfd)
