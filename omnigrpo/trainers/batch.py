"""What one GRPO update consumes: prompts, the sampled codes and their log-probs, advantages and validity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnigrpo.rollout.policy import PromptBatch


@dataclass
class TrainBatch:
    """What one GRPO update consumes. ``prompts``: ``[N, P]``; ``codes``/``old_logprobs``: ``[N, T]``;
    ``advantages``/``valid``: ``[N]`` (``valid`` False = excluded from the loss); ``versions``: ``[N]`` weight
    version each sample was drawn with (None: the learner's current one); ``kl_weights``: ``[N]`` weight of each
    sample's KL term (``trainer.kl_uncertain_frac``; None: 1 for all)."""

    prompts: PromptBatch
    codes: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    valid: torch.Tensor
    versions: torch.Tensor | None = None
    kl_weights: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(self.prompts.to(device), self.codes.to(device), self.old_logprobs.to(device),
                          self.advantages.to(device), self.valid.to(device), self.versions,
                          None if self.kl_weights is None else self.kl_weights.to(device))

    def staleness(self, version: int) -> torch.Tensor:
        """Updates made since each sample was drawn ``[N]`` (0 when the batch carries no versions)."""
        if self.versions is None:
            return torch.zeros(len(self.codes), dtype=torch.long)
        return version - self.versions.long()


METRIC_PREFIX = "learner/"
"""Every metric an update reports is named ``learner/<name>``."""


@dataclass(frozen=True)
class Update:
    """What one GRPO update did, merged over the learner ranks: the weight ``version`` it left (the one the
    rollouts sync to and stamp their next samples with), whether it was ``skipped`` (no sample to learn from, or
    a non-finite input: the weights did not move), whether anything was ``nonfinite`` (a skipping input, a
    dropped micro-batch or the gradient norm), the micro-batches left out for a non-finite loss, and the
    ``metrics`` to log, each named ``learner/<name>``."""

    version: int
    metrics: dict[str, float]
    skipped: bool = False
    nonfinite: bool = False
    dropped_micro_batches: int = 0
