"""The hybrid learner: a DeepSpeed learner rank that also samples its share of a step with its own live weights.

Why: with ``cluster.placement: hybrid`` there are no rollout actors and no weight sync. Each learner rank
holds the policy once and, between updates, samples from exactly the tensors the optimiser just stepped;
nothing travels between processes, and a batch's weight version is the learner's own. The price is that
sampling and learning take turns on the same devices (as ``colocated`` does, without the second copy of the
weights).

How sampling reads the live weights:

- ZeRO-0/1/2: every rank holds the whole module's parameters; the fast sampler
  (:mod:`omnigrpo.rollout.engine`) wants q/k/v and gate/up packed into one matrix each, and :func:`engine.fuse`
  would re-point the module's parameters (which DeepSpeed owns), so :meth:`HybridLearner.sampling` packs
  *fresh copies* (:func:`engine.pack_copies`) at the start of every sampling phase and frees them at its
  end: about 2/3 of the body's weights once more, for the sampling phase only. With CUDA graphs
  (``rollout.cuda_graphs`` on a GPU) the copies persist and each phase refreshes them in place (``copy_``), so the
  graphs captured over them stay valid; the memory plan counts them either way. Every other module (norms,
  o/down projections, embeddings, head) is read live, in place.
- LoRA: the packed copies are the merged ``W + B A * alpha / r``; every other adapted module runs its
  unmerged peft forward, so the sampler draws from the policy the learner scores, and the frozen base (the
  KL reference) is never written (no merge/unmerge round trip to drift it).
- ZeRO-3: refused in config validation. The fast sampler calls submodules one by one under ZeRO-3's
  per-module fetch/release hooks; sampling from gathered weights would need those hooks taken off and
  re-registered around every sampling phase (DeepSpeed internals that change between releases).

Without CUDA graphs the KV cache lives only inside a sampling call (with them, the graphs' cache persists);
the module is in eval mode under ``no_grad`` while sampling and returns to its own training mode after. The
sampler's generator is seeded as rollout actor
``rank`` would be (so a one-rank hybrid run samples the stream a one-actor colocated run does) and goes
into the run state (``rollout_rng``) like a rollout actor's.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

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
    ``weight_version`` as :class:`~omnigrpo.rollout.worker.RolloutWorker` has them)."""

    def setup(self, extensions_dir: str | None = None, threads: int | None = None, resume: bool = False,
              rendezvous: str | None = None) -> int:
        if self.cfg.trainer.zero_stage == 3:
            raise ValueError("cluster.placement hybrid samples with trainer.zero_stage 0-2 only")
        version = super().setup(extensions_dir, threads, resume, rendezvous)
        self.sample_seed = actor_seed(self.cfg.run.seed, "rollout", self.rank)
        self.generator = torch.Generator(self.engine.device).manual_seed(self.sample_seed)
        cuda = self.engine.device.type == "cuda"
        self.graph_set = GraphSet() if self.cfg.rollout.cuda_graphs and cuda else None
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
                               self.version, self.cfg.rollout.sample_batch, not self.cfg.decoder.path, self.graphed)
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
