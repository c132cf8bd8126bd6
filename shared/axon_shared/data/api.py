"""Public functions: list, prepare and load the offline datasets."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .dataset import BuiltDataset, DatasetInfo, ImageSplit, TextSplit
from .errors import DataSourceError
from .registry import DATASETS
from .sources import SourceFetcher
from .storage import (
    FORMAT_VERSION,
    LICENSE_FILE,
    META_FILE,
    SPLITS,
    damage,
    file_lock,
    is_complete,
    read_jsonl,
    read_meta,
    read_npz,
    resolve_root,
    split_path,
    write_json,
    write_jsonl,
    write_npz,
    write_text,
)

PathLike = str | os.PathLike[str]


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataSourceError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def list_datasets(root: PathLike | None = None) -> list[DatasetInfo]:
    """Every registered dataset, with ``prepared`` and the actual ``counts`` read from the cache."""
    base = resolve_root(root)
    listed = []
    for info in DATASETS.values():
        directory = base / info.name
        prepared = is_complete(directory, info.kind) and damage(directory, info.kind) is None  # counts verified, not just read
        counts = read_meta(directory)["counts"] if prepared else None
        listed.append(dataclasses.replace(info, prepared=prepared, counts=counts))
    return listed


def prepare(name: str, root: PathLike | None = None, progress: bool = True) -> Path:
    """Fetch, convert and cache one dataset; return its folder. Returns at once if it is already complete.

    Safe to call from several processes at once (a lock file serialises the build); an interrupted build
    leaves no meta.json and is redone from scratch.
    """
    info = dataset_info(name)
    base = resolve_root(root)
    directory = base / name
    if is_complete(directory, info.kind) and damage(directory, info.kind) is None:
        return directory
    with file_lock(base / "_locks" / f"{name}.lock"):
        if is_complete(directory, info.kind) and (problem := damage(directory, info.kind)) is not None:
            print(f"{name}: {problem}; rebuilding it", flush=True)
            (directory / META_FILE).unlink()
        if not is_complete(directory, info.kind):
            (directory / META_FILE).unlink(missing_ok=True)
            for leftover in directory.glob(".*.tmp"):  # temp files of a build that was killed
                leftover.unlink()
            built = info.builder(SourceFetcher(base / "_sources", name), progress)
            _write(directory, info, built)
    return directory


def load_split(name: str, split: str, root: PathLike | None = None) -> TextSplit | ImageSplit:
    """One split: a list of dict records (text) or {"images": uint8 (N,H,W), "labels": int64 (N,)} (images).

    Prepares the dataset first if needed.
    """
    if split not in SPLITS:
        raise DataSourceError(f"split must be one of {SPLITS}, got {split!r}")
    info = dataset_info(name)
    path = split_path(prepare(name, root), split, info.kind)  # prepare() rebuilds a dataset whose counts are off
    return read_jsonl(path) if info.kind == "text" else read_npz(path)


def load_meta(name: str, root: PathLike | None = None) -> dict[str, Any]:
    """The dataset's meta.json (prepares it first if needed)."""
    meta = read_meta(prepare(name, root))
    assert meta is not None  # prepare() guarantees a complete dataset
    return meta


def _write(directory: Path, info: DatasetInfo, built: BuiltDataset) -> None:
    """Split files, then LICENSE.txt, then meta.json last as the completion marker."""
    for split in SPLITS:
        content = built.splits[split]
        if info.kind == "text":
            write_jsonl(split_path(directory, split, "text"), content)
        else:
            write_npz(split_path(directory, split, "images"), content)
    write_text(directory / LICENSE_FILE, built.license_text)
    counts = {split: _count(built.splits[split]) for split in SPLITS}
    write_json(
        directory / META_FILE,
        {
            "name": info.name,
            "format_version": FORMAT_VERSION,
            "kind": info.kind,
            "description": info.description,
            "files": {split: split_path(directory, split, info.kind).name for split in SPLITS},
            "counts": counts,
            "total": sum(counts.values()),
            "splits": built.split_method,
            "license": info.license,
            "license_file": LICENSE_FILE,
            "source": [source.to_meta() for source in built.sources],
            **built.details,
        },
    )


def _count(split: TextSplit | ImageSplit) -> int:
    return len(split["labels"]) if isinstance(split, dict) else len(split)
