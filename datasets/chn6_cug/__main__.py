"""python -m datasets.chn6_cug --manual_dir=DIR [--data_dir=DIR]: builds the dataset."""
from datasets import _common
from datasets.chn6_cug import Chn6Cug

if __name__ == "__main__":
  _common.main(Chn6Cug)
