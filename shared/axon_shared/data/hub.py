"""Hugging Face Hub datasets for users with internet (needs the optional ``datasets`` package).

Nothing in Axon's tests or demos depends on these: each has an offline counterpart prepared by ``prepare``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import DataSourceError


@dataclass(frozen=True)
class HubDataset:
    path: str
    config: str | None
    offline_alternative: str


HUB_DATASETS = {
    "wmt14-de-en": HubDataset("wmt/wmt14", "de-en", "de-en-libreoffice (or de-en-ding, de-en-bible)"),
    "tinystories": HubDataset("roneneldan/TinyStories", None, "en-text"),
    "cifar10": HubDataset("uoft-cs/cifar10", None, "fashion-mnist"),
    "mnist": HubDataset("ylecun/mnist", None, "mnist-5k (or fashion-mnist)"),
}


def load_hub(name: str, split: str | None = None, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` for one of HUB_DATASETS; raises DataSourceError (naming the offline
    alternative) when ``datasets`` is missing or the Hub cannot be reached."""
    if name not in HUB_DATASETS:
        raise KeyError(f"unknown hub dataset {name!r}; known: {', '.join(HUB_DATASETS)}")
    entry = HUB_DATASETS[name]
    advice = f"offline alternative: axon_shared.data.load_split({entry.offline_alternative.split()[0]!r}, ...)"
    try:
        import datasets
    except ImportError as error:
        raise DataSourceError(
            f"Hub dataset '{name}' needs the optional 'datasets' package (pip install datasets) and internet access; {advice}."
        ) from error
    try:
        return datasets.load_dataset(entry.path, entry.config, split=split, **kwargs)
    except Exception as error:  # network, offline-mode and hub errors come in many types
        raise DataSourceError(
            f"Hub dataset '{name}' ({entry.path}) could not be loaded: it needs internet access to the "
            f"Hugging Face Hub (or a filled HF cache). {type(error).__name__}: {error}\n"
            f"Offline alternative: {entry.offline_alternative}, e.g. "
            f"axon_shared.data.load_split({entry.offline_alternative.split()[0]!r}, 'train')."
        ) from error
