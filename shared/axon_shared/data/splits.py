"""Deterministic train/valid/test splits driven by SHA-1 hashes of record keys (never by a random generator)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
SplitKey = str | bytes | int | tuple


def stable_hash(key: SplitKey, salt: str) -> str:
    """SHA-1 hex digest of ``salt`` + ``key``; the same on every machine and Python version."""
    if isinstance(key, bytes):
        payload = key
    elif isinstance(key, tuple):
        payload = "\x1f".join(map(str, key)).encode("utf-8")
    else:
        payload = str(key).encode("utf-8")
    return hashlib.sha1(salt.encode("utf-8") + b"\x00" + payload).hexdigest()


def split_by_hash(items: Sequence[Item], key_of: Callable[[Item], SplitKey], quotas: dict[str, int], salt: str) -> dict[str, list[Item]]:
    """Split ``items`` into ``train`` plus the held-out splits of ``quotas`` (e.g. {"valid": 1000, "test": 2000}).

    Items sharing a key form one group that never straddles two splits. Groups are visited in order of
    ``stable_hash(key, salt)``; each goes to the first held-out split it still fits into, otherwise to train.
    Held-out splits therefore get exactly their quota whenever enough small groups exist. Items keep their
    input order inside each split.
    """
    groups: dict[Hashable, int] = {}
    for item in items:
        key = key_of(item)
        groups[key] = groups.get(key, 0) + 1
    filled = dict.fromkeys(quotas, 0)
    split_of_key: dict[Hashable, str] = {}
    for key in sorted(groups, key=lambda k: stable_hash(k, salt)):
        size = groups[key]
        split_of_key[key] = "train"
        for split, quota in quotas.items():
            if filled[split] + size <= quota:
                split_of_key[key] = split
                filled[split] += size
                break
    result: dict[str, list[Item]] = {"train": [], **{split: [] for split in quotas}}
    for item in items:
        result[split_of_key[key_of(item)]].append(item)
    return result


def stratified_split(
    items: Sequence[Item],
    stratum_of: Callable[[Item], Hashable],
    key_of: Callable[[Item], SplitKey],
    quotas_of: Callable[[Hashable, int], dict[str, int]],
    salt: str,
) -> dict[str, list[Item]]:
    """``split_by_hash`` inside each stratum (class, source...); ``quotas_of(stratum, size)`` gives its quotas."""
    strata: dict[Hashable, list[Item]] = {}
    for item in items:
        strata.setdefault(stratum_of(item), []).append(item)
    merged: dict[str, list[Item]] = {}
    for stratum, members in strata.items():
        parts = split_by_hash(members, key_of, quotas_of(stratum, len(members)), f"{salt}/{stratum}")
        for split, part in parts.items():
            merged.setdefault(split, []).extend(part)
    return merged
