"""CHN6-CUG road extraction (TFDS manual-download builder)."""
from idgbr_datasets.chn6_cug.chn6_cug import Chn6Cug

__all__ = ["Chn6Cug"]
