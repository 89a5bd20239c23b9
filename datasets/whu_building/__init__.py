"""WHU Building aerial dataset (TFDS manual-download builder)."""
from idgbr_datasets.whu_building.whu_building import WhuBuilding

__all__ = ["WhuBuilding"]
