"""Jane Austen's six novels from the Debian package ``r-cran-janeaustenr`` (R lazy-load database)."""

from __future__ import annotations

import gzip
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

from .errors import DataSourceError
from .sources import DebianPackage, SourceFetcher

PACKAGE = "r-cran-janeaustenr"
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
TITLES = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}


def _unserialize(payload: bytes) -> Any:
    """An R serialized object (XDR format) as Python/numpy values, via the ``rdata`` package."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that a bare serialization stream has no file header
        return rdata.conversion.convert(rdata.parser.parse_data(payload))


def read_lazyload_database(data_dir: Path) -> dict[str, Any]:
    """Objects of ``Rdata.rdb``: the ``.rdx`` index (one gzip stream) maps names to (offset, length); each record
    is a 4-byte big-endian uncompressed length followed by a zlib stream of a serialized R object."""
    index = _unserialize(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    if index["compressed"][0] is not True and index["compressed"][0] != 1:
        raise DataSourceError(f"{data_dir / 'Rdata.rdx'}: unsupported compression {index['compressed']!r}")
    database = (data_dir / "Rdata.rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = database[offset : offset + length]
        (expected_size,) = struct.unpack(">I", record[:4])
        payload = zlib.decompress(record[4:])
        if len(payload) != expected_size:
            raise DataSourceError(f"{data_dir / 'Rdata.rdb'}: record {name!r} is corrupt")
        objects[str(name)] = _unserialize(payload)
    return objects


def novels(fetcher: SourceFetcher) -> tuple[list[dict[str, str]], DebianPackage]:
    """One document per novel: {"source": "austen", "title", "text"} with the package's line breaks."""
    package = fetcher.deb(PACKAGE)
    objects = read_lazyload_database(package.root / DATA_DIR)
    documents = [
        {"source": "austen", "title": TITLES[name], "text": "\n".join(str(line) for line in objects[name]).strip()} for name in TITLES
    ]
    return documents, package
