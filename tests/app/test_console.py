"""The run's console: a live bar on a terminal, one log line per step (with an ETA) elsewhere."""

from __future__ import annotations

import io
import logging

from omnigrpo.app.console import Progress

METRICS = {"reward/total/mean": 0.25, "learner/kl": 0.002, "reward/failed": 1.0, "timing/step_s": 0.5}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_with_step_total_reward_kl_and_eta():
    out = Terminal()
    progress = Progress(total=4, first=2, stream=out)
    progress.step(2, METRICS)
    progress.step(3, METRICS)
    progress.close()
    text = out.getvalue()
    assert "GRPO" in text and "3/4" in text and "reward 0.250 kl 0.0020 failed 1" in text
    assert "<" in text  # tqdm's elapsed<remaining


def test_elsewhere_each_step_is_one_plain_line(caplog):
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="omnigrpo"):
        progress = Progress(total=3, stream=out)
        for step in (1, 2, 3):
            progress.step(step, METRICS)
        progress.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "omnigrpo"]
    assert len(lines) == 3 and lines[0].startswith("step 1/3 reward 0.250 kl 0.0020 failed 1 0.5s/step ETA ")
    assert lines[-1].endswith("ETA 0:00:00") and out.getvalue() == ""  # no bar, no carriage returns
