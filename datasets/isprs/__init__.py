"""ISPRS Potsdam and Vaihingen (TFDS manual-download builders sharing the ISPRS code)."""
from idgbr_datasets.isprs.isprs import CLASS_NAMES
from idgbr_datasets.isprs.isprs import CLASS_ORDERS
from idgbr_datasets.isprs.isprs import COLOURS
from idgbr_datasets.isprs.isprs import POTSDAM_TILES
from idgbr_datasets.isprs.isprs import VAIHINGEN_TILES
from idgbr_datasets.isprs.isprs import IsprsConfig
from idgbr_datasets.isprs.isprs import Potsdam
from idgbr_datasets.isprs.isprs import Vaihingen
from idgbr_datasets.isprs.isprs import class_names
from idgbr_datasets.isprs.isprs import config_name
from idgbr_datasets.isprs.isprs import encode_label
from idgbr_datasets.isprs.isprs import eval_label_values
from idgbr_datasets.isprs.isprs import num_classes

__all__ = [
    "CLASS_NAMES", "CLASS_ORDERS", "COLOURS", "POTSDAM_TILES", "VAIHINGEN_TILES", "IsprsConfig",
    "Potsdam", "Vaihingen", "class_names", "config_name", "encode_label", "eval_label_values",
    "num_classes",
]
