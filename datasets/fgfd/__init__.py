"""FGFD, the Fine-Grained Farmland Dataset (TFDS manual-download builder)."""
from datasets.fgfd.fgfd import FOREGROUND
from datasets.fgfd.fgfd import PALETTE
from datasets.fgfd.fgfd import Fgfd

__all__ = ["FOREGROUND", "PALETTE", "Fgfd"]
