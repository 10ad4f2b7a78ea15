"""The roles of a run's worker processes, as one enum.

Why: the config sizes each role (``cluster.<role>_workers`` / ``_cpus`` / ``_gpus``), and placement, seeds,
the memory plan and the actors all key on it; one ``StrEnum`` names them once. Its members are the plain
strings they replace, so plans, logs, run tags and JSON read the same.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """A kind of worker process of a run (in the order placement reserves them)."""

    ROLLOUT = "rollout"
    """Samples image tokens from the policy and decodes them (``rollout.*``)."""
    DECODER = "decoder"
    """Turns image tokens into pixels with a diffusion decoder (``decoder.path``)."""
    REWARD = "reward"
    """Scores the pixels with the configured judges (``rewards``)."""
    LEARNER = "learner"
    """A DeepSpeed rank of the GRPO update (hybrid placement: it samples too)."""
