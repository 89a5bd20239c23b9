"""python -m idgbr_datasets.idgbr_package --manual_dir=examples/Potsdam --config=potsdam: builds
it."""
from idgbr_datasets import _common
from idgbr_datasets.idgbr_package import IdgbrPackage

if __name__ == "__main__":
  _common.main(IdgbrPackage)
