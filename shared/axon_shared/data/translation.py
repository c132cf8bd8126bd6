"""Shared steps of the English-German parallel corpora: cleaning, de-duplication and English-keyed splits."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .dataset import BuiltDataset
from .sources import SourceFile
from .splits import split_by_hash

_WHITESPACE = re.compile(r"\s+")


def normalize_space(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def unique_pairs(pairs: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """Records {"en", "de"} in first-seen order, without empty sides, identical sides or repeated pairs."""
    seen: set[tuple[str, str]] = set()
    records = []
    for english, german in pairs:
        if not english or not german or english == german or (english, german) in seen:
            continue
        seen.add((english, german))
        records.append({"en": english, "de": german})
    return records


def pairs_dataset(
    records: list[dict[str, str]],
    *,
    salt: str,
    quotas: dict[str, int],
    sources: list[SourceFile],
    license_text: str,
    details: dict[str, Any],
) -> BuiltDataset:
    """Split pairs by the hash of their English side, so repeated English strings never straddle splits."""
    splits = split_by_hash(records, lambda record: record["en"], quotas, salt)
    held_out = ", ".join(f"{split} {size:,}" for split, size in quotas.items())
    method = (
        f"Pairs grouped by English text; groups visited in order of sha1('{salt}' + NUL + English text) and "
        f"assigned to the first of [{held_out}] they still fit in, else train."
    )
    return BuiltDataset(splits, sources, license_text, method, {"fields": ["en", "de"], **details})
