"""Embedded synthetic remote-sensing segmentation dataset (procedural scenes + TFDS builder)."""
from datasets.synthetic_rs.scenes import CLASS_NAMES
from datasets.synthetic_rs.scenes import PALETTE
from datasets.synthetic_rs.scenes import TASKS
from datasets.synthetic_rs.scenes import colorize
from datasets.synthetic_rs.scenes import generate_example
from datasets.synthetic_rs.synthetic_rs import SyntheticRs
from datasets.synthetic_rs.synthetic_rs import SyntheticRSConfig
from datasets.synthetic_rs.synthetic_rs import build
from datasets.synthetic_rs.synthetic_rs import config_name
from datasets.synthetic_rs.synthetic_rs import data_source
from datasets.synthetic_rs.synthetic_rs import get_builder
from datasets.synthetic_rs.synthetic_rs import label_map

__all__ = [
    "CLASS_NAMES", "PALETTE", "TASKS", "SyntheticRSConfig", "SyntheticRs", "build", "colorize",
    "config_name", "data_source", "generate_example", "get_builder", "label_map",
]
