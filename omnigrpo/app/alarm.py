"""The collapse alarm: a run that loses its variety, or pleases its training judge while a watchdog disagrees.

Why: reward hacking shows in the curves long before anyone looks at a sample grid. After every step (``alarm.*``)
two signatures are checked: **collapse**, the recent mean ``diversity/group`` below ``diversity_share`` of its mean
over the run's first ``window`` steps; **watchdog**, a watchdog reward's least-squares slope negative while the
training total's is positive. Each kind is raised once per run (a metric, a run tag, and with ``alarm.stop`` a
resumable stop); its history is in the run state, so a resumed run judges by the same baseline (docs/design.md,
"Watchdogs").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from omnigrpo.config.schema import AlarmConfig, RewardSpec


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index (per step).

    >>> slope([1.0, 2.0, 3.0]), slope([3.0, 1.0])
    (1.0, -2.0)
    """
    y = np.asarray(values, dtype=float)
    x = np.arange(len(y)) - (len(y) - 1) / 2
    return float((x * (y - y.mean())).sum() / (x * x).sum())


@dataclass
class CollapseAlarm:
    """Watches the step metrics of one run (``alarm.*``, the watchdogs among its ``rewards``); :meth:`observe`
    returns the alarms raised at this step."""

    alarm: AlarmConfig
    rewards: list[RewardSpec]
    history: dict[str, list[float]] = field(default_factory=dict)
    raised: list[str] = field(default_factory=list)

    @property
    def watched(self) -> list[str]:
        return [f"reward/{r.key}/mean" for r in self.rewards if r.watch]

    def observe(self, metrics: dict[str, float]) -> dict[str, str]:
        """Record this step's figures; ``{kind: message}`` for each alarm raised now (once per run and kind)."""
        for key in ["diversity/group", "reward/total/mean", *self.watched]:
            value = metrics.get(key, float("nan"))
            self.history.setdefault(key, []).append(float(value))
        found = {**self._collapse(), **self._watchdogs()}
        new = {k: v for k, v in found.items() if k not in self.raised}
        self.raised += list(new)
        return new

    def _collapse(self) -> dict[str, str]:
        a, n = self.alarm, self.alarm.window
        group = self.history["diversity/group"]
        if not a.diversity_share or len(group) < 2 * n:
            return {}
        start, recent = np.nanmean(group[:n]), np.nanmean(group[-n:])
        if recent < a.diversity_share * start:
            return {"collapse": f"diversity/group {recent:.4f} over the last {n} steps < {a.diversity_share:g} x "
                                f"{start:.4f} over the first {n}"}
        return {}

    def _watchdogs(self) -> dict[str, str]:
        a, n = self.alarm, self.alarm.window
        total = self.history["reward/total/mean"][-n:]
        if not a.watch_slopes or len(total) < n or not np.isfinite(total).all() or slope(total) <= 0:
            return {}
        out = {}
        for key in self.watched:
            recent = self.history[key][-n:]
            if np.isfinite(recent).all() and slope(recent) < 0:
                name = key.split("/")[1]
                out[f"watchdog_{name}"] = (f"{key} slope {slope(recent):+.4g}/step while reward/total/mean "
                                           f"{slope(total):+.4g}/step over the last {n} steps")
        return out

    def state(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}, "raised": list(self.raised)}

    def restore(self, state: dict | None) -> None:
        if state:
            self.history = {k: list(v) for k, v in state["history"].items()}
            self.raised = list(state["raised"])
