"""The order training prompts are drawn in: a seeded shuffle per epoch, saved and restored with a run.

Why: a resumed run must draw exactly the prompts an uninterrupted one would; the cursor's state (the
generator and what is left of the epoch) goes into every checkpoint as JSON.
"""

from __future__ import annotations

import json

import numpy as np


class PromptCursor:
    """Training prompts in a fresh seeded shuffle each epoch; ``take(n)`` continues where it stopped."""

    def __init__(self, prompts: list[str], metadata: list[dict], seed: int):
        self.prompts, self.metadata = prompts, metadata
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    def take(self, n: int) -> tuple[list[str], list[dict]]:
        picked = []
        for _ in range(n):
            if not self.order:
                self.order = list(self.rng.permutation(len(self.prompts)))
            picked.append(self.order.pop())
        return [self.prompts[i] for i in picked], [self.metadata[i] for i in picked]

    def state(self) -> str:
        return json.dumps({"rng": self.rng.bit_generator.state, "order": [int(i) for i in self.order]})

    def restore(self, state: str) -> None:
        data = json.loads(state)
        self.rng.bit_generator.state = data["rng"]
        self.order = data["order"]
