"""``axon-data list`` and ``axon-data prepare NAME [NAME ...] | all``."""

from __future__ import annotations

import argparse
import sys
import time

from .api import list_datasets, prepare
from .dataset import DatasetInfo
from .errors import DataSourceError
from .registry import DATASETS
from .storage import SPLITS, data_root

COLUMNS = ("name", "prepared", "train", "valid", "test", "source", "license")
NUMERIC = {2, 3, 4}  # right-aligned count columns


def _row(info: DatasetInfo) -> tuple[str, ...]:
    counts = info.counts if info.prepared and info.counts else info.expected_counts
    marker = "" if info.prepared else "~"
    sizes = tuple(f"{marker}{counts[split]:,}" for split in SPLITS)
    return (info.name, "yes" if info.prepared else "no", *sizes, info.source, info.license)


def format_table(infos: list[DatasetInfo]) -> str:
    """Aligned plain-text table."""
    rows = [COLUMNS, *(_row(info) for info in infos)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    lines = [
        "  ".join(
            cell.rjust(width) if column in NUMERIC else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_markdown(infos: list[DatasetInfo]) -> str:
    """GitHub markdown table (``axon-data list --markdown``)."""
    header = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join("---:" if column in NUMERIC else "---" for column in range(len(COLUMNS))) + "|"
    body = ["| " + " | ".join(cell.replace("|", "\\|") for cell in _row(info)) + " |" for info in infos]
    return "\n".join([header, rule, *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="axon-data", description="Prepare Axon's offline real datasets.")
    parser.add_argument("--root", help=f"cache folder (default: $AXON_DATA or ~/.cache/axon; now {data_root()})")
    commands = parser.add_subparsers(dest="command", required=True)
    list_parser = commands.add_parser("list", help="datasets, whether prepared, split sizes, source, licence")
    list_parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    prepare_parser = commands.add_parser("prepare", help="fetch and convert datasets (idempotent)")
    prepare_parser.add_argument("names", nargs="+", metavar="NAME", help=f"'all' or any of: {', '.join(DATASETS)}")
    prepare_parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    if args.command == "list":
        infos = list_datasets(args.root)
        print(format_markdown(infos) if args.markdown else format_table(infos))
        if not all(info.prepared for info in infos):
            print("\n(~ = expected size: not prepared yet)")
        return 0
    names = list(DATASETS) if "all" in args.names else args.names
    unknown = [name for name in names if name not in DATASETS]
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(DATASETS)}")
    failed = 0
    for name in names:
        if not args.quiet:
            print(f"{name}: preparing (or checking the cache) ...", flush=True)
        start = time.perf_counter()
        try:
            path = prepare(name, args.root, progress=not args.quiet)
        except DataSourceError as error:
            failed += 1
            print(f"{name}: FAILED\n{error}", file=sys.stderr)
            continue
        print(f"{name}: ready in {path} ({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
