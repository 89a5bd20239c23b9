"""Embedded synthetic remote-sensing segmentation dataset (procedural scenes + TFDS builder)."""
from idgbr_datasets.synthetic_rs.scenes import CLASS_NAMES
from idgbr_datasets.synthetic_rs.scenes import PALETTE
from idgbr_datasets.synthetic_rs.scenes import TASKS
from idgbr_datasets.synthetic_rs.scenes import colorize
from idgbr_datasets.synthetic_rs.scenes import generate_example
from idgbr_datasets.synthetic_rs.synthetic_rs import SyntheticRs
from idgbr_datasets.synthetic_rs.synthetic_rs import SyntheticRSConfig
from idgbr_datasets.synthetic_rs.synthetic_rs import build
from idgbr_datasets.synthetic_rs.synthetic_rs import config_name
from idgbr_datasets.synthetic_rs.synthetic_rs import data_source
from idgbr_datasets.synthetic_rs.synthetic_rs import get_builder
from idgbr_datasets.synthetic_rs.synthetic_rs import label_map

__all__ = [
    "CLASS_NAMES", "PALETTE", "TASKS", "SyntheticRSConfig", "SyntheticRs", "build", "colorize",
    "config_name", "data_source", "generate_example", "get_builder", "label_map",
]
