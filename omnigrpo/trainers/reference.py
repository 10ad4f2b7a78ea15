"""The KL reference: the run's start policy, or the policy as it was at its last refresh.

Why: a reference costs a second copy of the weights only where it must. With ``trainer.kl_coef`` 0 there is
none; with LoRA it is the policy with its adapters switched off (the frozen base weights); a full fine-tune keeps
a frozen copy, which ZeRO-3 partitions over the learner group like the policy. Each kind hands an update its
:class:`ReferenceRows` and can be refreshed to the policy's current weights (GARDO, ``trainer.ref_refresh_*``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch

from omnigrpo.config.schema import TrainerConfig
from omnigrpo.rollout.policy import ImageLM, ImagePolicy, PromptBatch
from omnigrpo.rollout.sampler import SamplingParams, sequence_logprobs
from omnigrpo.trainers import adapter
from omnigrpo.trainers.batch import TrainBatch
from omnigrpo.trainers.distributed import Rank, inference_engine


class ReferenceRows(Protocol):
    """One update's reference log-probs, asked for micro-batch by micro-batch."""

    def score(self, rows: torch.Tensor) -> None:
        """Score the micro-batch ``rows`` ``[B]`` of the batch if not yet done: before the policy's forward, so the
        reference's transient memory never adds to the policy's autograd graph."""

    def of(self, rows: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """The reference log-probs ``[B, T]`` of the scored micro-batch ``rows``, whose policy log-probs are
        ``logp`` ``[B, T]``."""


class Reference(Protocol):
    def table(self, batch: TrainBatch) -> ReferenceRows:
        """The reference log-probs of ``batch``'s rows, for one update's micro-batches to ask for."""

    def refresh(self, engine) -> None:
        """Make the policy's current weights the reference: ``engine`` is the learner's DeepSpeed engine (its
        ``module`` the policy, its ``optimizer`` the policy's). Every rank must call it (ZeRO-3 gathers)."""

    def weights(self) -> AbstractContextManager[dict[str, torch.Tensor]]:
        """The reference's whole weights under the plain model's names while inside (views of the live tensors,
        for a checkpoint). Every rank must enter (ZeRO-3 gathers)."""


class Table:
    """One update's reference log-probs ``[N, T]`` of ``batch``, each row scored once by ``scorer`` (prompts
    ``[B, P]``, codes ``[B, T]`` -> ``[B, T]``) when a micro-batch first asks for it (NaN: not yet)."""

    def __init__(self, batch: TrainBatch, scorer: Callable[[PromptBatch, torch.Tensor], torch.Tensor]):
        self.batch, self.scorer = batch, scorer
        self.values = torch.full(batch.codes.shape, float("nan"), device=batch.codes.device)

    def score(self, rows: torch.Tensor) -> None:
        todo = rows[torch.isnan(self.values[rows, 0]).cpu()]  # ``rows`` lives on the CPU, the values on the device
        if len(todo):
            self.values[todo] = self.scorer(self.batch.prompts.select(todo), self.batch.codes[todo])

    def of(self, rows: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        return self.values[rows]


class Scored:
    """One update's reference log-probs ``values`` ``[N, T]``, every row scored up front."""

    def __init__(self, values: torch.Tensor):
        self.values = values

    def score(self, rows: torch.Tensor) -> None:
        pass

    def of(self, rows: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        return self.values[rows]


class PolicyItself:
    """The policy's own detached log-probs as its reference: k3 and the logged KL are exactly 0."""

    def score(self, rows: torch.Tensor) -> None:
        pass

    def of(self, rows: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        return logp.detach()


class NoReference:
    """``trainer.kl_coef`` 0: no reference forward runs; the policy stands in for itself (:class:`PolicyItself`).
    Nothing to refresh (preflight refuses a refresh without a KL term)."""

    def table(self, batch: TrainBatch) -> ReferenceRows:
        return PolicyItself()

    def refresh(self, engine) -> None:
        raise RuntimeError("trainer.kl_coef is 0: there is no KL reference to refresh")

    def weights(self) -> AbstractContextManager[dict[str, torch.Tensor]]:
        raise RuntimeError("trainer.kl_coef is 0: there is no KL reference to save")


class FrozenCopy:
    """A full fine-tune: a frozen copy ``module`` of the start policy's model (of the policy at the last refresh),
    on the learner's device."""

    def __init__(self, policy: ImagePolicy, module: torch.nn.Module, params: SamplingParams):
        self.module, self.params = module, params
        self.lm = policy.lm(module)

    @torch.no_grad()
    def logprobs(self, prompts: PromptBatch, codes: torch.Tensor) -> torch.Tensor:
        """Reference log-probs ``[B, T]`` of one micro-batch: ``prompts`` ``[B, P]``, ``codes`` ``[B, T]``."""
        return sequence_logprobs(self.lm, prompts, codes, self.params)[0]

    def table(self, batch: TrainBatch) -> ReferenceRows:
        return Table(batch, self.logprobs)

    @torch.no_grad()
    def refresh(self, engine) -> None:
        """The policy's current weights copied into the frozen copy in place (no new allocation)."""
        policy = engine.module.state_dict()
        for key, tensor in self.module.state_dict().items():
            tensor.copy_(policy[key])

    @contextmanager
    def weights(self) -> Iterator[dict[str, torch.Tensor]]:
        yield self.module.state_dict()


class ShardedCopy(FrozenCopy):
    """ZeRO-3: the frozen copy partitioned over the learner group by an optimiser-free DeepSpeed ``engine``
    (ZeRO-Inference). Every rank must run the same number of its forwards, so each update's rows are scored up
    front, an equal share per rank, then all-gathered (``gather``: a collective)."""

    def __init__(self, policy: ImagePolicy, engine, params: SamplingParams,
                 gather: Callable[[int, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]):
        super().__init__(policy, engine.module, params)
        self.engine, self.gather = engine, gather

    def table(self, batch: TrainBatch) -> ReferenceRows:
        return Scored(self.gather(len(batch.codes), lambda rows: self.logprobs(batch.prompts.select(rows),
                                                                               batch.codes[rows])))

    @torch.no_grad()
    def refresh(self, engine) -> None:
        """Parameter by parameter, the policy's gathered whole (read only) is copied into the reference's gathered
        whole, which rank 0 then hands back to every rank's partition: one parameter's memory at a time."""
        import deepspeed

        policy = dict(engine.module.named_parameters())
        for name, param in self.module.named_parameters():
            with (deepspeed.zero.GatheredParameters([policy[name]], modifier_rank=None),
                  deepspeed.zero.GatheredParameters([param], modifier_rank=0)):
                param.data.copy_(policy[name].data)
        buffers = dict(engine.module.named_buffers())  # not partitioned
        for name, buffer in self.module.named_buffers():
            buffer.copy_(buffers[name])

    @contextmanager
    def weights(self) -> Iterator[dict[str, torch.Tensor]]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            yield self.module.state_dict()


class AdaptersOff:
    """LoRA: the learner's own peft ``model`` with its adapters switched off, scored through ``lm`` (its view of
    the adapted model): no second copy of the weights. A refresh folds the adapters into the base weights and
    restarts them at zero (:func:`~omnigrpo.trainers.adapter.merge_and_restart`)."""

    def __init__(self, model: torch.nn.Module, lm: ImageLM, params: SamplingParams):
        self.model, self.lm, self.params = model, lm, params

    @torch.no_grad()
    def logprobs(self, prompts: PromptBatch, codes: torch.Tensor) -> torch.Tensor:
        """Reference log-probs ``[B, T]`` of one micro-batch: ``prompts`` ``[B, P]``, ``codes`` ``[B, T]``."""
        with self.model.disable_adapter():
            return sequence_logprobs(self.lm, prompts, codes, self.params)[0]

    def table(self, batch: TrainBatch) -> ReferenceRows:
        return Table(batch, self.logprobs)

    def refresh(self, engine) -> None:
        adapter.merge_and_restart(self.model, engine.optimizer)

    @contextmanager
    def weights(self) -> Iterator[dict[str, torch.Tensor]]:
        yield adapter.base_state_dict(self.model)


def start_copy(trainer: TrainerConfig, start: Callable[[], ImagePolicy]) -> torch.nn.Module | None:
    """The frozen copy of the start policy's model (``start()``) that a full fine-tune with a KL term keeps,
    taken before the policy is wrapped for training; None for the kinds that hold no copy."""
    if not trainer.kl_coef or trainer.lora_rank:
        return None
    return copy.deepcopy(start().model).eval().requires_grad_(False)


def build(trainer: TrainerConfig, policy: ImagePolicy, params: SamplingParams, engine, frozen: torch.nn.Module | None,
          ds_config: dict, group: Rank) -> Reference:
    """The rank's reference, once its training ``engine`` is built; ``frozen``: :func:`start_copy`'s copy."""
    if not trainer.kl_coef:
        return NoReference()
    if trainer.lora_rank:
        return AdaptersOff(engine.module, policy.lm(adapter.base(engine.module)), params)
    if trainer.zero_stage == 3:
        return ShardedCopy(policy, inference_engine(frozen, ds_config), params,
                           lambda n, score: group.gather_rows(n, trainer.micro_batch_size, score))
    return FrozenCopy(policy, frozen.to(engine.device), params)
