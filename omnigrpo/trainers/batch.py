"""What one GRPO update consumes: prompts, the sampled codes and their log-probs, advantages and validity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnigrpo.rollout.policy import PromptBatch


@dataclass
class TrainBatch:
    """What one GRPO update consumes. ``prompts``: ``[N, P]``; ``codes``/``old_logprobs``: ``[N, T]``;
    ``advantages``/``valid``: ``[N]`` (``valid`` False = excluded from the loss); ``versions``: ``[N]`` weight
    version each sample was drawn with (None: the learner's current one)."""

    prompts: PromptBatch
    codes: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    valid: torch.Tensor
    versions: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(self.prompts.to(device), self.codes.to(device), self.old_logprobs.to(device),
                          self.advantages.to(device), self.valid.to(device), self.versions)

    def staleness(self, version: int) -> torch.Tensor:
        """Updates made since each sample was drawn ``[N]`` (0 when the batch carries no versions)."""
        if self.versions is None:
            return torch.zeros(len(self.codes), dtype=torch.long)
        return version - self.versions.long()
