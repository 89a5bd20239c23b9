"""ISPRS Potsdam and Vaihingen (TFDS manual-download builders sharing the ISPRS code)."""
from datasets.isprs.isprs import CLASS_NAMES
from datasets.isprs.isprs import CLASS_ORDERS
from datasets.isprs.isprs import COLOURS
from datasets.isprs.isprs import POTSDAM_TILES
from datasets.isprs.isprs import VAIHINGEN_TILES
from datasets.isprs.isprs import IsprsConfig
from datasets.isprs.isprs import Potsdam
from datasets.isprs.isprs import Vaihingen
from datasets.isprs.isprs import class_names
from datasets.isprs.isprs import config_name
from datasets.isprs.isprs import encode_label
from datasets.isprs.isprs import eval_label_values
from datasets.isprs.isprs import num_classes

__all__ = [
    "CLASS_NAMES", "CLASS_ORDERS", "COLOURS", "POTSDAM_TILES", "VAIHINGEN_TILES", "IsprsConfig",
    "Potsdam", "Vaihingen", "class_names", "config_name", "encode_label", "eval_label_values",
    "num_classes",
]
