"""A reward actor's output is capped: a judge that floods stdout and stderr passes on its budget and a note."""

import json
import subprocess
import sys
from pathlib import Path

from omnigrpo.rewards.throttle import OutputThrottle

PLUGINS = Path(__file__).parents[1] / "plugins"
SCRIPT = """
import json, sys
import numpy as np
from omnigrpo.config.schema import RewardSpec
from omnigrpo.rewards.worker import RewardWorker
worker = RewardWorker([RewardSpec(name="chatty:floods")], output_kb=4)
worker.setup()
results = [worker.score(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"], [{}, {}]).total.tolist() for _ in range(3)]
open(sys.argv[1], "w").write(json.dumps(results))
"""


def test_a_flooding_judge_passes_on_its_budget_and_says_what_it_dropped(tmp_path):
    out = tmp_path / "scores.json"
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True, timeout=120,
                         env={"PYTHONPATH": str(PLUGINS), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(out.read_text()) == [[0.5, 0.5]] * 3  # the judge scored on, its output capped
    printed = run.stdout + run.stderr
    assert 4096 <= printed.count(b"p") + printed.count(b"c") <= 4096 + 200  # 1.2 MB written, 4 KB passed on
    assert printed.count(b"omnigrpo: reward output is over 4096 bytes in 60 s") == 1


def test_a_new_window_passes_output_again_and_counts_what_was_dropped():
    throttle = OutputThrottle(10, window_s=0.05)
    assert throttle.admit(b"0123456789abc")[0] == b"0123456789" and throttle.dropped == 3
    assert throttle.admit(b"more") == [] and throttle.dropped == 7
    import time

    time.sleep(0.06)
    note, passed = throttle.admit(b"next")
    assert note == b"omnigrpo: 7 bytes of reward output were dropped\n" and passed == b"next"
