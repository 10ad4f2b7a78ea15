"""The hybrid learner: a DeepSpeed learner rank that also samples its share of a step with its own live weights.

Why: with ``cluster.placement: hybrid`` there are no rollout actors and no weight sync: each rank samples, between
updates, from exactly the tensors the optimiser just stepped, and a batch's weight version is the learner's own;
sampling and learning take turns on the same devices. The fast sampler's packed q/k/v and gate/up matrices are
fresh copies (merged under LoRA) refreshed each sampling phase, since DeepSpeed owns the parameters; ZeRO-3 is
refused. The sampler's generator is seeded as rollout actor ``rank``'s would be and goes into the run state
(docs/design.md, "Hybrid placement").
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from omnigrpo.config.roles import Role
from omnigrpo.config.runtime import actor_seed, reseed
from omnigrpo.rollout.engine import pack_copies
from omnigrpo.rollout.graphs import GraphSet
from omnigrpo.rollout.worker import RolloutBatch, draw_batch
from omnigrpo.trainers import adapter
from omnigrpo.trainers.learner import Learner

log = logging.getLogger(__name__)


def merged_read(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """``module.weight`` (``name`` ``"weight"``) with its LoRA delta merged in, or its plain ``weight`` /
    ``bias``; for :func:`pack_copies`."""
    value = getattr(module, name)
    if name == "weight" and isinstance(module, adapter.LoraLayer) and adapter.ADAPTER in module.lora_A:
        return value + module.get_delta_weight(adapter.ADAPTER).to(value.dtype)
    return value


class HybridLearner(Learner):
    """A :class:`Learner` that is also its rank's rollout worker (``generate``, ``rng_state``, ``restore``,
    ``weight_version`` as :class:`~omnigrpo.rollout.worker.RolloutWorker` has them). ``decode``: False when a
    diffusion decoder stage turns codes into pixels (``decoder.path``; the batches then carry no images)."""

    def __init__(self, *args, decode: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.decode = decode

    def setup(self, extensions_dir: str | None = None, threads: int | None = None, resume: bool = False,
              rendezvous: str | None = None) -> int:
        if self.trainer.zero_stage == 3:
            raise ValueError("cluster.placement hybrid samples with trainer.zero_stage 0-2 only")
        version = super().setup(extensions_dir, threads, resume, rendezvous)
        self.sample_seed = actor_seed(self.seed, Role.ROLLOUT, self.rank)
        self.generator = torch.Generator(self.engine.device).manual_seed(self.sample_seed)
        cuda = self.engine.device.type == "cuda"
        self.graph_set = GraphSet() if self.rollout.cuda_graphs and cuda else None
        """The sampler's captured decode loops (over the packed copies below, refreshed in place)."""
        self.graphed = None if self.graph_set is None else self.graph_set.decoder
        self.kept: list[tuple] | None = None
        """The packed copies kept between sampling phases (CUDA graphs read them in place)."""
        return version

    @contextmanager
    def sampling(self):
        """The sampling phase: eval mode, no grad, the fast path's packed copies of the current weights (freed
        on exit, with every module back in its own training mode)."""
        module, packed = self.engine.module, self.lm.packed_layers
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            with torch.no_grad():
                packed.hold(pack_copies(self.lm.body.layers, merged_read, into=self.kept))
                if self.graph_set is not None:
                    self.kept = packed.layers
                yield
        finally:
            packed.invalidate()  # stale at the next optimiser step: freed, or kept for an in-place refresh
            for m, mode in modes:
                m.training = mode

    def generate(self, prompts: list[str], metadata: list[dict], group_size: int,
                 seed: int | None = None) -> RolloutBatch:
        """Draw ``group_size`` images per prompt with this rank's live weights, stamped with its version; with
        ``seed``, from a generator of its own (evaluation), leaving the training stream untouched."""
        device = self.engine.device
        generator = self.generator if seed is None else torch.Generator(device).manual_seed(seed)
        with self.sampling():
            batch = draw_batch(self.policy, self.lm, prompts, metadata, group_size, self.params, generator, device,
                               self.version, self.rollout.sample_batch, self.decode, self.graphed)
        batch.rng_state = self.generator.get_state()
        return batch

    def weight_version(self) -> int:
        return self.version

    def rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def restore(self, rng_state: torch.Tensor | None, version: int) -> None:
        """Continue a checkpointed run's sampling stream (the weights and version came with the checkpoint; None:
        nothing was drawn); a stream saved on another kind of device is reseeded, as a rollout actor does."""
        if version != self.version:
            raise RuntimeError(f"resuming sampling at v{version}, but learner rank {self.rank} holds v{self.version}")
        if rng_state is not None and rng_state.numel() == self.generator.get_state().numel():
            self.generator.set_state(rng_state)
        elif rng_state is not None:
            log.warning("sampler RNG state saved on another device type: reseeding (the resumed run samples a "
                        "different stream than an uninterrupted one would)")
            self.generator.manual_seed(reseed(self.sample_seed, version))
