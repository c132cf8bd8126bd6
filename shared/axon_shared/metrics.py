"""A JSONL metrics log (one JSON object a line: step, wall time, metrics) and plots of its curves."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Append-only JSONL log. On resume from `resume_step`, rows logged after that step are dropped first,
    so the log of a resumed run reads like the log of an uninterrupted one."""

    def __init__(self, path: str | Path, *, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self._start = time.time()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(self.path) if resume_step is not None else []
        kept = [row for row in rows if row.get("step", 0) <= resume_step] if resume_step is not None else []
        if kept:
            self._start -= max(row.get("time", 0.0) for row in kept)
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def log(self, step: int, **metrics: Any) -> dict[str, Any]:
        row = {"step": int(step), "time": round(time.time() - self._start, 3), **{k: _plain(v) for k, v in metrics.items()}}
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        return row


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics log. A last line cut short by a crash mid-write is dropped (the run resumes from its
    checkpoint and logs that step again); an unreadable line elsewhere is a damaged file and raises ValueError."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # a torn final line
            raise ValueError(f"{path}, line {number}: not a JSON object ({line[:60]!r}); the metrics log is damaged") from None
    return rows


def plot_metrics(
    path: str | Path,
    out_png: str | Path,
    keys: Sequence[str] | None = None,
    *,
    x: str = "step",
    title: str | None = None,
    log_y: Sequence[str] = (),
) -> Path:
    """One subplot per metric key against `x` ("step" or "time"); returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    if keys is None:
        keys = sorted({k for row in rows for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))})
    if not keys:
        raise ValueError(f"{path}: no numeric metrics to plot")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = [(row[x], row[key]) for row in rows if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
        if points:
            xs, ys = zip(*points)
            axis.plot(xs, ys, marker="." if len(points) < 30 else None)
        axis.set_title(key)
        axis.set_xlabel("seconds" if x == "time" else x)
        if key in log_y:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        return value.item()
    return value
