"""python -m idgbr_datasets.isprs {potsdam,vaihingen} --manual_dir=DIR [--data_dir=DIR]
[--config=...] [--set tile_size=256 --set stride=128 ...]: builds the dataset."""
import sys

from idgbr_datasets import _common
from idgbr_datasets.isprs import Potsdam, Vaihingen

if __name__ == "__main__":
  builders = {"potsdam": Potsdam, "vaihingen": Vaihingen}
  if len(sys.argv) < 2 or sys.argv[1] not in builders:
    sys.exit(f"usage: python -m idgbr_datasets.isprs {{{','.join(builders)}}} --manual_dir=DIR ...")
  _common.main(builders[sys.argv[1]], sys.argv[2:])
