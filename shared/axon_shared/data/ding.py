"""``de-en-ding``: example sentences of the Ding German-English dictionary (Debian ``trans-de-en``).

18,756 pairs from trans-de-en 1.9-6: valid 1,000, test 1,000, train 16,756.
"""

from __future__ import annotations

import re

from ..progress import progress_bar
from .dataset import BuiltDataset
from .sources import SourceFetcher, common_license, titled
from .translation import normalize_space, pairs_dataset, unique_pairs

PACKAGE = "trans-de-en"
DICTIONARY_FILE = "usr/share/trans/de-en"
QUOTAS = {"valid": 1_000, "test": 1_000}
MIN_GERMAN_WORDS = 4
_ANNOTATION = re.compile(r"\{[^}]*\}|\[[^\]]*\]|<[^>]*>")  # {f} grammar, [coll.] labels, <abbreviations>


def clean_entry(text: str) -> str:
    """First of the ``;``-separated alternatives, without Ding's annotations."""
    return normalize_space(_ANNOTATION.sub("", text).split(";")[0])


def is_sentence(text: str) -> bool:
    return text[:1].isupper() and text[-1:] in ".!?"


def sentence_pairs(lines: list[str]) -> list[tuple[str, str]]:
    """Dictionary lines ``de | de2 :: en | en2`` -> aligned sub-entries that are whole sentences on both sides."""
    pairs = []
    for line in lines:
        if line.startswith("#") or " :: " not in line:
            continue
        german_side, english_side = line.rstrip("\n").split(" :: ", 1)
        for german_entry, english_entry in zip(german_side.split(" | "), english_side.split(" | "), strict=False):
            german, english = clean_entry(german_entry), clean_entry(english_entry)
            if is_sentence(german) and is_sentence(english) and len(german.split()) >= MIN_GERMAN_WORDS:
                pairs.append((english, german))
    return pairs


def build(fetcher: SourceFetcher, progress: bool) -> BuiltDataset:
    package = fetcher.deb(PACKAGE)
    with (package.root / DICTIONARY_FILE).open(encoding="utf-8") as dictionary:
        lines = list(progress_bar(dictionary, enabled=progress, desc="de-en-ding: reading dictionary", leave=False))
    copyright_title = f"{PACKAGE} {package.source.version}: /usr/share/doc/{PACKAGE}/copyright"
    license_text = titled(copyright_title, package.copyright())
    return pairs_dataset(
        unique_pairs(sentence_pairs(lines)),
        salt="de-en-ding",
        quotas=QUOTAS,
        sources=[package.source],
        license_text=license_text + titled("GPL-2 full text", common_license("GPL-2")),
        details={
            "alignment": f"{DICTIONARY_FILE}: sub-entries aligned by position after splitting on ' | '; first "
            "';' alternative; {...} [...] <...> annotations stripped; kept if both sides start with a capital "
            f"and end in . ! ?, with >= {MIN_GERMAN_WORDS} German words; duplicates removed",
        },
    )
