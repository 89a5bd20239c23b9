"""The original IDGBR data package (metadata_i2s_*.jsonl), as a TFDS manual-download builder."""
from idgbr_datasets.idgbr_package.idgbr_package import IdgbrPackage
from idgbr_datasets.idgbr_package.idgbr_package import IdgbrPackageConfig
from idgbr_datasets.idgbr_package.idgbr_package import config_name
from idgbr_datasets.idgbr_package.idgbr_package import read_metadata

__all__ = ["IdgbrPackage", "IdgbrPackageConfig", "config_name", "read_metadata"]
