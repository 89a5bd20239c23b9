"""FGFD, the Fine-Grained Farmland Dataset (TFDS manual-download builder)."""
from idgbr_datasets.fgfd.fgfd import FOREGROUND
from idgbr_datasets.fgfd.fgfd import PALETTE
from idgbr_datasets.fgfd.fgfd import Fgfd

__all__ = ["FOREGROUND", "PALETTE", "Fgfd"]
