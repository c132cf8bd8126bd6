"""Assemble `runs/demo/REPORT.md` from the datasets table and each package's demo fragment.

Each package's `demo` command writes `<runs/demo>/<package>/REPORT.md` (a Markdown section whose image links
are relative to `runs/demo`); this joins every such fragment, in the order of the package names.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def assemble(demo_dir: Path) -> Path:
    parts = ["# Axon demo report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `make demo`.", ""]
    datasets = demo_dir / "datasets.md"
    if datasets.exists():
        parts += ["## Datasets (prepared offline)", "", datasets.read_text().strip(), ""]
    for fragment in sorted(demo_dir.glob("*/REPORT.md")):
        parts += [fragment.read_text().strip(), ""]
    out = demo_dir / "REPORT.md"
    out.write_text("\n".join(parts))
    return out


if __name__ == "__main__":
    print(assemble(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")))
