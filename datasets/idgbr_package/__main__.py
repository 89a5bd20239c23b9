"""python -m datasets.idgbr_package --manual_dir=examples/Potsdam --config=potsdam: builds it."""
from datasets import _common
from datasets.idgbr_package import IdgbrPackage

if __name__ == "__main__":
  _common.main(IdgbrPackage)
