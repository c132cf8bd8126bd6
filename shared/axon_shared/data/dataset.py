"""The two records of the pipeline: a dataset's registry entry and the output of its builder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from .sources import SourceFetcher, SourceFile

Kind = Literal["text", "images"]
TextSplit = list[dict[str, Any]]
ImageSplit = dict[str, np.ndarray]  # {"images": uint8 (N, H, W), "labels": int64 (N,)}


@dataclass(frozen=True)
class BuiltDataset:
    """What a builder hands to the writer: split contents plus everything meta.json and LICENSE.txt need."""

    splits: dict[str, TextSplit] | dict[str, ImageSplit]
    sources: list[SourceFile]
    license_text: str
    split_method: str
    details: dict[str, Any] = field(default_factory=dict)  # extra meta.json fields (class names, licence notes...)


Builder = Callable[["SourceFetcher", bool], BuiltDataset]


@dataclass(frozen=True)
class DatasetInfo:
    """One offline dataset: what it is, where it comes from, and what ``prepare`` should produce.

    ``expected_counts`` are the split sizes measured with the pinned sources; ``counts`` and ``prepared`` are
    filled in by ``list_datasets`` from the cache.
    """

    name: str
    description: str
    kind: Kind
    source: str
    license: str
    expected_counts: dict[str, int]
    builder: Builder = field(repr=False, compare=False)
    prepared: bool = False
    counts: dict[str, int] | None = None
