"""The GRPO learner: a DeepSpeed engine around the policy, a KL reference, and one update per step.

Why: the learner is where the platform meets scale. DeepSpeed (ZeRO stage from config) owns the optimiser, gradient
accumulation and clipping, so the code that runs here on CPU with gloo runs sharded on GPUs. One
:meth:`train_step` makes ``epochs`` passes of ``mini_batches`` optimiser steps; old log-probs are the sampler's own
(``learner/logprob_mismatch`` reports the gap). ``world_size`` ranks share every mini-batch and keep its *global*
normaliser, so N ranks take the step one rank would (docs/design.md, "The GRPO step"). A plain class with an
explicit :meth:`setup`, wrapped into a Ray actor by ``omnigrpo.cluster``.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from omnigrpo.config.runtime import learner_seeds, use_threads
from omnigrpo.config.schema import ModelConfig, RolloutConfig, TrainerConfig
from omnigrpo.rollout.loader import load_policy
from omnigrpo.rollout.sampler import SamplingParams, sequence_logprobs
from omnigrpo.sync.network import LOOPBACK
from omnigrpo.trainers import adapter, grpo, reference
from omnigrpo.trainers.batch import TrainBatch
from omnigrpo.trainers.checkpoint import REFERENCE_DIR, load_state, write_checkpoint, write_failure
from omnigrpo.trainers.distributed import Rank, training_engine
from omnigrpo.trainers.engine import deepspeed_config, disable_dropout, grad_norm
from omnigrpo.trainers.grpo import LossTerms
from omnigrpo.trainers.reference import ReferenceRows
from omnigrpo.trainers.tally import RankUpdate, UpdateTally, mean_kl


@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward pass of an update: ``rows`` ``[B]`` of the batch (this rank's share of a mini-batch),
    the whole mini-batch's loss normaliser ``norm`` (the same on every rank), and whether it is in the first
    epoch (the one the metrics count)."""

    rows: torch.Tensor
    norm: float
    first_epoch: bool


@dataclass(frozen=True)
class MicroLoss:
    """One micro-batch's loss, ready for the engine's backward (scaled by ``world_size``; an exact zero-gradient
    loss where it was not ``finite``), and the per-token figures ``[B, T]`` the tally counts."""

    loss: torch.Tensor
    finite: bool
    terms: LossTerms
    logp: torch.Tensor
    entropy: torch.Tensor
    capped: torch.Tensor
    mask: torch.Tensor


class Learner:
    """DeepSpeed GRPO learner (rank ``rank`` of ``world_size``) over the ``model`` policy at ``model_path``.

    ``rollout``: how the batches it learns from were sampled (their size, the sampling distribution); ``seed``:
    ``run.seed``; ``sync_timeout_s``: ``cluster.sync_timeout_s``, how long ranks wait for each other to meet."""

    def __init__(self, trainer: TrainerConfig, model: ModelConfig, rollout: RolloutConfig, model_path: str, *,
                 seed: int, sync_timeout_s: float = 120.0, rank: int = 0, world_size: int = 1,
                 reference_path: str | None = None, address: str = LOOPBACK):
        self.trainer, self.rollout = trainer, rollout
        self.family, self.grid, self.dtype = model.family, tuple(model.image_grid) or None, model.dtype
        self.seed, self.sync_timeout_s = seed, sync_timeout_s
        self.model_path = model_path
        self.reference_path = reference_path or model_path  # the run's start policy (until a refresh)
        self.rank = rank
        self.world_size = world_size
        self.group = Rank(rank, world_size, address)
        self.version = 0
        self.ref_refreshes = 0
        """Refreshes of the KL reference to the policy so far (``trainer.ref_refresh_*``)."""
        self.in_update = False
        self.params = SamplingParams.of(rollout)

    def setup(self, extensions_dir: str | None = None, threads: int | None = None, resume: bool = False,
              rendezvous: str | None = None) -> int:
        """Load policy and reference, join the process group, build the DeepSpeed engine; with ``resume``,
        continue the checkpoint at ``model_path`` (optimiser state, shuffle stream, weight version).

        The group meets at ``rendezvous``: a file store's plain path on one machine (in the run's owner-only
        folder; no listening socket), across hosts the ``tcp://`` store rank 0 serves (:meth:`serve`); one rank
        needs none."""
        device = self.group.prepare(extensions_dir)
        hf_logging.disable_progress_bar()
        use_threads(threads)
        init_seed, shuffle_seed = learner_seeds(self.seed, self.rank)
        torch.manual_seed(init_seed)
        model, frozen = self._load_models(resume)
        model.to(device)
        self.group.join(device, rendezvous, self.sync_timeout_s)
        ds_config = deepspeed_config(self.trainer, self.rollout.batch_size, self.dtype, self.world_size)
        self.engine, self.optimizer = training_engine(model, self.trainer, ds_config)
        self.reference = reference.build(self.trainer, self.policy, self.params, self.engine, frozen, ds_config,
                                         self.group)
        # scores through the engine's (ZeRO-managed) module, inside the LoRA wrapper if any
        self.lm = self.policy.lm(adapter.base(self.engine.module))
        self.shuffle = torch.Generator().manual_seed(shuffle_seed)  # same shuffle on every rank
        if resume:
            self._resume()
        return self.version

    def _load_models(self, resume: bool) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """The policy made trainable (dropout off, checkpointing, LoRA), which DeepSpeed wraps, and the frozen
        copy of the start policy the KL reference keeps, if its kind keeps one (:mod:`omnigrpo.trainers.reference`)."""
        family, grid, dtype = self.family, self.grid, self.dtype
        tr = self.trainer
        refreshed = Path(self.model_path) / REFERENCE_DIR
        # a checkpoint written after the reference was refreshed carries it; before that it is the start policy
        start = str(refreshed) if resume and refreshed.is_dir() else self.reference_path
        # LoRA resume: the checkpoint's weights are merged; start from the plain base (the reference) and let
        # DeepSpeed restore base and adapters (loading the merged ones would apply the adapters twice)
        self.policy = load_policy(family, start if resume and tr.lora_rank else self.model_path, grid, dtype)
        frozen = reference.start_copy(tr, lambda: self.policy if start == self.model_path else
                                      load_policy(family, start, grid, dtype))
        # every dropout off (Emu3 ships attention_dropout 0.1): the learner's log-probs must be the
        # distribution the rollout sampled from. Eval mode, except for gradient checkpointing, which needs
        # train mode (slower per step on the CPU: BENCHMARKS.md section 2)
        model = disable_dropout(self.policy.model.train(tr.gradient_checkpointing))
        if tr.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tr.lora_rank:
            model = adapter.wrap(model, self.policy.lm().body, tr.lora_rank, tr.lora_alpha, tr.lora_targets)
        return model, frozen

    def _resume(self) -> None:
        """Optimiser state (every rank's shard), shuffle stream and weight version of the checkpoint."""
        self.engine.load_checkpoint(str(Path(self.model_path) / "optimizer"), tag="state", load_module_strict=True,
                                    load_optimizer_states=True)
        state = load_state(Path(self.model_path) / "learner_state.pt")
        self.shuffle.set_state(state["shuffle"] if "shuffle" in state else state["generator"])  # older checkpoints
        self.version = int(state["version"])
        self.ref_refreshes = int(state.get("ref_refreshes", 0))

    def train_step(self, batch: TrainBatch) -> RankUpdate:
        """One GRPO update on this rank's share of ``batch``; returns this rank's part for
        :func:`~omnigrpo.trainers.tally.merge_ranks`."""
        staleness = self._staleness(batch)
        # no sample to learn from (a step would still move weights), or non-finite inputs: alike on every rank
        empty = not batch.valid.any()
        if empty or grpo.nonfinite_inputs(batch.advantages, batch.old_logprobs, batch.valid):
            return RankUpdate(self.version, staleness, skipped=True, nonfinite=not empty,
                              ref_refreshes=self._logged_refreshes())
        batch = batch.to(self.engine.device)
        self.in_update = True
        mask = batch.valid[:, None].expand_as(batch.codes).float()
        ref = self.reference.table(batch)  # a sharded reference scores every row here, on every rank
        old = self._old_logprobs(batch)
        tally, grad_norms, dropped = UpdateTally(), [], 0
        for micro in self._micro_batches(mask):
            drawn = batch.old_logprobs[micro.rows] if not grad_norms else None  # before the first optimiser step
            part = self._micro_loss(batch, micro, mask, ref, old)
            dropped += not part.finite
            norm = self._backward_and_step(part.loss)
            if norm is not None:
                grad_norms.append(norm)
            if micro.first_epoch and part.finite:
                tally.add(part.terms, part.logp, part.entropy, part.capped, part.mask,
                          float(part.loss.detach()) * micro.norm / self.world_size, drawn)
        self.version += 1
        if self._refresh_due(tally.sums):
            self.reference.refresh(self.engine)
            self.ref_refreshes += 1
        self.in_update = False
        return RankUpdate(self.version, staleness, nonfinite=not all(map(math.isfinite, grad_norms)),
                          sums=tally.sums, dropped=dropped, loss_norm=grpo.normaliser(mask, self.trainer.loss_agg),
                          grad_norm=sum(grad_norms) / max(len(grad_norms), 1), lr=self.optimizer.param_groups[0]["lr"],
                          ref_refreshes=self._logged_refreshes())

    def _refresh_due(self, sums: dict[str, float]) -> bool:
        """Whether the update just made (this rank's tally ``sums``) refreshes the KL reference: the N-th update
        (``trainer.ref_refresh_every``) or a merged ``learner/kl`` above ``trainer.ref_refresh_kl``. Every rank
        decides alike: from the version, or from every rank's sums (a collective)."""
        tr = self.trainer
        if tr.ref_refresh_every and self.version % tr.ref_refresh_every == 0:
            return True
        return bool(tr.ref_refresh_kl) and self._merged_kl(sums) > tr.ref_refresh_kl

    def _merged_kl(self, sums: dict[str, float]) -> float:
        """``learner/kl`` of the update as :func:`~omnigrpo.trainers.tally.merge_ranks` logs it, from every rank's
        KL and token sums (all-gathered in float64: exactly each rank's figures)."""
        mine = torch.tensor([sums["kl"], sums["tokens"]], dtype=torch.float64, device=self.engine.device)
        parts = [mine]
        if self.world_size > 1:
            parts = [torch.empty_like(mine) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, mine)
        kls, tokens = zip(*torch.stack(parts).tolist(), strict=True)
        return mean_kl(list(kls), list(tokens))

    def _logged_refreshes(self) -> int | None:
        """``learner/ref_refreshes`` (None where the refresh is off: not logged)."""
        tr = self.trainer
        return self.ref_refreshes if tr.ref_refresh_every or tr.ref_refresh_kl else None

    def _staleness(self, batch: TrainBatch) -> float:
        """The mean updates since ``batch``'s samples were drawn; refuses any outside ``0..trainer.max_staleness``."""
        stale, limit = batch.staleness(self.version), self.trainer.max_staleness
        if int(stale.max()) > limit or int(stale.min()) < 0:
            raise RuntimeError(f"learner v{self.version}: samples drawn {stale.min()}..{stale.max()} updates ago, "
                               f"outside 0..trainer.max_staleness = {limit}")
        return float(stale.float().mean())

    def _micro_batches(self, mask: torch.Tensor) -> Iterator[MicroBatch]:
        """This rank's micro-batches of an update, in order: ``epochs`` shuffled passes over the batch (the same
        shuffle on every rank), each split into ``mini_batches`` optimiser steps; ``mask`` ``[N, T]``."""
        tr = self.trainer
        for epoch in range(tr.epochs):
            for mini in torch.randperm(len(mask), generator=self.shuffle).chunk(tr.mini_batches):
                norm = grpo.normaliser(mask[mini], tr.loss_agg)  # of the whole mini-batch, on every rank
                for rows in mini.chunk(self.world_size)[self.rank].split(tr.micro_batch_size):
                    yield MicroBatch(rows, norm, epoch == 0)

    def _micro_loss(self, batch: TrainBatch, micro: MicroBatch, mask: torch.Tensor, ref: ReferenceRows,
                    old: torch.Tensor | None) -> MicroLoss:
        """The GRPO loss of one micro-batch against the reference's log-probs ``ref`` and the ratio's ``old`` ones
        ``[N, T]`` (None: this very forward's, see :meth:`_old_logprobs`)."""
        tr, rows = self.trainer, micro.rows
        ref.score(rows)
        logp, entropy = sequence_logprobs(self.lm, batch.prompts.select(rows), batch.codes[rows], self.params)
        proximal = logp.detach() if old is None else old[rows]
        kl_weights = None if batch.kl_weights is None else batch.kl_weights[rows]
        terms = grpo.grpo_token_loss(logp, proximal, ref.of(rows, logp), batch.advantages[rows], tr.clip_eps_low,
                                     tr.clip_eps_high, tr.kl_coef, kl_weights)
        per_token, capped = self._tis_weighted(terms.loss, proximal, batch.old_logprobs[rows])
        # DeepSpeed averages gradients over ranks; scaling by world_size makes that a sum
        loss = grpo.aggregate(per_token, mask[rows], tr.loss_agg, micro.norm) * self.world_size
        finite = bool(torch.isfinite(loss))
        if not finite:  # its gradient would poison the weights; the step still runs on every rank
            loss = grpo.zero_gradient_loss(logp)
        return MicroLoss(loss, finite, terms, logp, entropy, capped, mask[rows])

    def _backward_and_step(self, loss: torch.Tensor) -> float | None:
        """Back-propagate one micro-batch's ``loss``; at a mini-batch's end the engine takes the optimiser step.
        Returns that step's global gradient norm (None between steps)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss, scale_wrt_gas=False)
        zero_records_norm = self.trainer.zero_stage > 0
        norm = grad_norm(self.engine.module) if boundary and not zero_records_norm else None  # before it steps
        self.engine.step()
        if boundary and zero_records_norm:
            norm = float(self.engine.get_global_grad_norm())
        return norm

    @torch.no_grad()
    def _old_logprobs(self, batch: TrainBatch) -> torch.Tensor | None:
        """The ratio's old log-probs ``[N, T]``: the sampler's, or the learner's before its first optimiser step.
        With one optimiser step per update (``epochs = mini_batches = 1``) every micro-batch's forward runs on
        those very weights, so its own detached log-probs are the recomputation, exactly and for free (None);
        otherwise one no-grad forward here, each rank an equal share."""
        tr = self.trainer
        if not tr.recompute_old:
            return batch.old_logprobs
        if tr.epochs == 1 and tr.mini_batches == 1:
            return None
        return self.group.gather_rows(len(batch.codes), tr.micro_batch_size, lambda rows: sequence_logprobs(
            self.lm, batch.prompts.select(rows), batch.codes[rows], self.params)[0])

    def _tis_weighted(self, loss: torch.Tensor, proximal: torch.Tensor,
                      sampler: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-token ``loss`` ``[B, T]`` weighed by the TIS weights from the sampler's log-probs to the
        ``proximal`` ones (``trainer.tis_cap``; unchanged when off), and where the cap bit."""
        cap = self.trainer.resolved_tis_cap
        if not cap:
            return loss, torch.zeros_like(loss, dtype=torch.bool)
        weights, capped = grpo.tis_weights(proximal, sampler, cap)
        return loss * weights, capped

    @contextmanager
    def _full_weights(self):
        """The policy's full state dict (views of the live weights) while inside; under ZeRO-3 every rank
        must enter, as the parameters are gathered for the duration."""
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None,
                                               enabled=self.trainer.zero_stage == 3):
            yield adapter.merged_state_dict(module)  # LoRA: merged into the plain model's names

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full policy weights on CPU, for the rollout workers: rank 0's (every rank holds them whole,
        except under ZeRO-3, where every rank must call this to gather them; the others return ``{}``)."""
        with self._full_weights() as weights:
            return {k: v.detach().to("cpu", copy=True) for k, v in weights.items()} if self.rank == 0 else {}

    def weight_bytes(self) -> int:
        """Bytes of the full policy's parameters, as a sync sends them (LoRA: the plain model's, adapters merged;
        ZeRO-3: the whole parameters, not this rank's partition)."""
        named = adapter.base(self.engine.module).named_parameters()
        return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for name, p in named if ".lora_" not in name)

    def serve(self, group: str, size: int, timeout_s: float) -> str:
        """Rank 0 across hosts: serve the TCP store where ``group`` (``learners`` or ``weights``) meets, on this
        node's address; returns its ``tcp://`` spec for the other members."""
        return self.group.serve(group, size, timeout_s)

    def join_weight_group(self, store: str, size: int, timeout_s: float, backend: str = "gloo") -> None:
        """Rank 0 joins the weight-broadcast group (gloo or nccl) as its sender (rank 0 of ``size``)."""
        if self.rank == 0:
            self.sync_group = self.group.weight_group(store, size, timeout_s, backend)

    def broadcast_weights(self, bucket_bytes: int) -> int:
        """Send the current weights to the broadcast group (every rank must call: ZeRO-3 gathers first);
        returns the bytes rank 0 sent (0 elsewhere)."""
        with self._full_weights() as weights:  # sent from the live tensors: no copy of the whole model
            return self.sync_group.send(weights, self.version, bucket_bytes) if self.rank == 0 else 0

    def checksum(self) -> float:
        """Sum of the full weights (LoRA: merged; under ZeRO-3 every rank must call, as they are gathered), to
        compare ranks and rollouts after a sync."""
        with torch.no_grad(), self._full_weights() as weights:  # tied weights (Janus's head and embeddings) count
            buffers = {b.data_ptr() for b in self.engine.module.buffers()}  # once, as in parameters()
            unique = {t.data_ptr(): t for t in weights.values() if t.data_ptr() not in buffers}
            return float(sum(t.double().sum() for t in unique.values()))

    def _save_reference(self, directory: Path) -> None:
        """Write the refreshed KL reference as a ``model.path``-ready policy ``directory`` (LoRA: the base weights
        the adapters were merged into). Every rank must call it (ZeRO-3 gathers); rank 0 writes."""
        with self.reference.weights() as weights:
            if self.rank == 0:
                self.policy.save_pretrained(directory, state_dict=weights)

    def save_checkpoint(self, root: str | Path, step: int | None = None, name: str = "step",
                        run_state: dict | None = None) -> str:
        """Atomically write ``root/{name}-NNNNNN``: the policy (a ``model.path``-ready directory), the
        DeepSpeed optimiser state (every rank's shard), the learners' shuffle stream and version, and
        ``run_state`` (the driver's part, see ``omnigrpo.app.driver``). Every rank must call it;
        rank 0 publishes. ``step`` defaults to the updates made."""
        import torch.distributed as dist

        step = self.version if step is None else step
        weights = self.state_dict()
        staging = staging_dir(root, step, name)
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # a leftover of a crashed save
        try:
            if self.rank == 0:
                staging.mkdir(parents=True)
            if self.world_size > 1:
                dist.barrier()
            self.engine.save_checkpoint(str(staging / "optimizer"), tag="state")  # collective: every rank's shard
            if self.ref_refreshes:
                self._save_reference(staging / REFERENCE_DIR)
            if self.world_size > 1:
                dist.barrier()
        except Exception as err:  # a full disk: no half-written folder stays behind, and the error names it
            shutil.rmtree(staging, ignore_errors=True)
            raise write_failure(err, staging) from err
        target = Path(root) / f"{name}-{step:06d}"
        if self.rank != 0:
            return str(target)

        def save(tmp: Path) -> None:
            self.policy.save_pretrained(tmp, state_dict=weights)
            if adapter.is_adapted(self.engine.module):
                self.engine.module.save_pretrained(tmp / "adapter")
            refreshes = {"ref_refreshes": self.ref_refreshes} if self.ref_refreshes else {}
            torch.save({"shuffle": self.shuffle.get_state(), "version": self.version, **refreshes},
                       tmp / "learner_state.pt")
            if run_state is not None:
                torch.save(run_state, tmp / "run_state.pt")

        # a crash inside train_step leaves weights part-way through an update: say so in the checkpoint
        info = {"version": self.version, "partial_update": self.in_update, "learners": self.world_size}
        try:
            return str(write_checkpoint(root, step, save, self.trainer.keep_last, info, name=name, staging=staging))
        except Exception as err:  # write_checkpoint has removed what it staged
            raise write_failure(err, target) from err


def staging_dir(root: str | Path, step: int, name: str) -> Path:
    """Where every rank writes a checkpoint before rank 0 publishes it (the same path on all ranks)."""
    return Path(root) / f".{name}-{step:06d}.staging"
