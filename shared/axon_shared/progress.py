"""Progress bars (tqdm), shown on the main process only.

`RunProgress` is the training loop's bar. It tells the truth about what bounds a run: the step count, or the time
budget (`max_minutes`) when that ends the run first. Its fill is the larger of the two fractions, and it prints
the time left by whichever comes first, instead of an ETA for a step count the run will never reach.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, disable=not enabled, **kwargs)


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _StatusBar(tqdm):
    """A tqdm bar whose format can show a free status text (`{status}`) without tqdm's ', ' postfix prefix."""

    status = ""

    @property
    def format_dict(self):
        return {**super().format_dict, "status": self.status}


class RunProgress:
    """A training run's bar: `step 120/380 | 3:21 left (time budget) | loss 3.21 ...`."""

    RESOLUTION = 1000  # the bar's fill in thousandths

    def __init__(self, *, desc: str, steps: int, start_step: int, elapsed: float, budget: float | None, enabled: bool):
        self.steps, self.start_step, self.budget = steps, start_step, budget
        self.started, self.elapsed_before = time.monotonic(), elapsed
        self.metrics: dict[str, float] = {}
        self.bar = _StatusBar(
            total=self.RESOLUTION,
            disable=not enabled,
            desc=desc,
            dynamic_ncols=True,
            mininterval=0.5,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {status}",
        )
        self.update(start_step)

    def update(self, step: int, metrics: dict[str, float] | None = None) -> None:
        if metrics:  # the training loss first, then the throughput
            shown = sorted(
                (k for k in metrics if k.startswith("train/") or k.endswith("_per_s")),
                key=lambda k: (k != "train/loss", not k.endswith("_per_s")),
            )
            self.metrics = {key.removeprefix("train/"): metrics[key] for key in shown}
        now = time.monotonic() - self.started
        done = step / self.steps
        left, bound = self._left(step, now)
        if self.budget is not None:
            done = max(done, (self.elapsed_before + now) / self.budget)
        shown = [f"step {step:,}/{self.steps:,}", f"{format_seconds(left)} left ({bound})" if left is not None else "estimating"]
        shown += [f"{key} {value:.4g}" for key, value in list(self.metrics.items())[:3]]
        self.bar.status = " | ".join(shown)
        self.fill = min(self.RESOLUTION, int(done * self.RESOLUTION))
        self.bar.update(self.fill - self.bar.n)

    def _left(self, step: int, now: float) -> tuple[float | None, str]:
        """Seconds left and what bounds them: the time budget, or the steps at the pace measured so far."""
        by_steps = (self.steps - step) * now / (step - self.start_step) if step > self.start_step and now > 0 else None
        by_time = self.budget - self.elapsed_before - now if self.budget is not None else None
        if by_time is not None and (by_steps is None or by_time < by_steps):
            return by_time, "time budget"
        return by_steps, "steps"

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
