"""What ``omnigrpo train`` shows while it runs: a live progress bar on a terminal, plain lines elsewhere.

Why: a user watching a run wants step / total, reward, KL, seconds per step and the time left at a
glance, not a wall of log lines; a job log (CI, ``omnigrpo logs``) wants one readable line per step
that survives without a terminal. tqdm draws the bar (and its rate and ETA); log records emitted while
it is live are printed above it instead of breaking it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("omnigrpo")


def summary_line(metrics: dict[str, float]) -> str:
    """The few numbers a user scans each step.

    >>> summary_line({"reward/total/mean": 0.5, "learner/kl": 0.001, "reward/failed": 0.0, "timing/step_s": 1.25})
    'reward 0.500 kl 0.0010 failed 0 1.2s/step'
    >>> summary_line({"reward/total/mean": float("nan"), "learner/skipped_update": 1.0, "reward/failed": 8.0,
    ...               "timing/step_s": 1.25})
    'reward nan update skipped failed 8 1.2s/step'
    """
    learned = "update skipped" if metrics.get("learner/skipped_update") else f"kl {metrics['learner/kl']:.4f}"
    return (f"reward {metrics['reward/total/mean']:.3f} {learned} failed {metrics['reward/failed']:.0f} "
            f"{metrics['timing/step_s']:.1f}s/step")


def eta(seconds: float) -> str:
    """``h:mm:ss`` of a duration.

    >>> eta(3725.2)
    '1:02:05'
    """
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Steps ``first .. total`` of a run: a tqdm bar when ``stream`` is a terminal, else a log line per step
    with the same numbers and an ETA from the mean step time so far."""

    def __init__(self, total: int, first: int = 1, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.total, self.first, self.done = total, first, first - 1
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, initial=self.done, desc="GRPO", unit="step", file=self.stream,
                        dynamic_ncols=True, disable=not self.live)
        self._redirect = logging_redirect_tqdm() if self.live else contextlib.nullcontext()
        self._redirect.__enter__()

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """Report a finished step."""
        self.done = step
        if self.live:
            self.bar.set_postfix_str(summary_line(metrics), refresh=False)
            self.bar.update(1)
            return
        per_step = (time.perf_counter() - self.started) / max(step - self.first + 1, 1)
        log.info("step %d/%d %s ETA %s", step, self.total, summary_line(metrics), eta(per_step * (self.total - step)))

    def close(self) -> None:
        self.bar.close()
        self._redirect.__exit__(None, None, None)
