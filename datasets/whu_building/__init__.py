"""WHU Building aerial dataset (TFDS manual-download builder)."""
from datasets.whu_building.whu_building import WhuBuilding

__all__ = ["WhuBuilding"]
