"""The GRPO learner: a DeepSpeed engine around the policy, a frozen reference, and one update per step.

Why: the learner is where the platform meets scale. DeepSpeed (ZeRO stage from config) owns the optimiser, gradient
accumulation and clipping, so the code that runs here on CPU with gloo runs sharded on GPUs. One
:meth:`train_step` makes ``epochs`` passes of ``mini_batches`` optimiser steps; old log-probs are the sampler's own
(``grpo/logprob_mismatch`` reports the gap). ``world_size`` ranks share every mini-batch and keep its *global*
normaliser, so N ranks take the step one rank would (docs/design.md, "The GRPO step"). A plain class with an
explicit :meth:`setup`, wrapped into a Ray actor by ``omnigrpo.cluster``.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from omnigrpo.config.runtime import learner_seeds, use_threads
from omnigrpo.config.schema import Config
from omnigrpo.rollout.loader import load_policy
from omnigrpo.rollout.sampler import SamplingParams, sequence_logprobs
from omnigrpo.sync.broadcast import WeightBroadcast
from omnigrpo.sync.network import LOOPBACK, interface_of, is_loopback, open_store, serve_store
from omnigrpo.trainers import adapter, grpo
from omnigrpo.trainers.batch import TrainBatch
from omnigrpo.trainers.checkpoint import load_state, write_checkpoint, write_failure
from omnigrpo.trainers.engine import (
    deepspeed_config,
    disable_dropout,
    grad_norm,
    load_weights_only,
    skip_shared_memory_allreduce,
)
from omnigrpo.trainers.tally import UpdateTally


class Learner:
    """DeepSpeed GRPO learner (rank ``rank`` of ``world_size``) over the policy at ``model_path``."""

    def __init__(self, cfg: Config, model_path: str, rank: int = 0, world_size: int = 1,
                 reference_path: str | None = None, address: str = LOOPBACK):
        self.cfg = cfg
        self.model_path = model_path
        self.reference_path = reference_path or model_path  # KL is always against the run's start policy
        self.rank = rank
        self.world_size = world_size
        self.address = address
        """The address this rank's sockets bind: loopback on one machine, its node's own across hosts."""
        self.served: dict[str, object] = {}  # TCP stores this rank serves: the learner group's, the broadcast's
        self.version = 0
        self.in_update = False
        self.params = SamplingParams.of(cfg.rollout)

    def setup(self, extensions_dir: str | None = None, threads: int | None = None, resume: bool = False,
              rendezvous: str | None = None) -> int:
        """Load policy and reference, join the process group, build the DeepSpeed engine; with ``resume``,
        continue the checkpoint at ``model_path`` (optimiser state, shuffle stream, weight version).

        The group meets at ``rendezvous``: a file store's plain path on one machine (in the run's owner-only
        folder; no listening socket), across hosts the ``tcp://`` store rank 0 serves (:meth:`serve`); one rank
        needs none."""
        gpu = torch.cuda.is_available()  # a GPU Ray assigned this actor (cluster.learner_gpus): NCCL
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if gpu else "cpu")
        interface = "lo" if is_loopback(self.address) else interface_of(self.address)
        # gloo and NCCL bind here: loopback, or the interface of the node's address. Set, not defaulted: a value
        # inherited from elsewhere (a driver that ran a local learner) would bind the wrong interface
        os.environ.update(GLOO_SOCKET_IFNAME=interface, NCCL_SOCKET_IFNAME=interface)
        if extensions_dir:
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir)
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        import deepspeed  # after DS_ACCELERATOR is set: it picks the accelerator at import

        hf_logging.disable_progress_bar()
        use_threads(threads)
        init_seed, shuffle_seed = learner_seeds(self.cfg.run.seed, self.rank)
        torch.manual_seed(init_seed)
        model = self._load_models(resume)
        trainable = [p for p in model.parameters() if p.requires_grad]
        tr = self.cfg.trainer
        optimizer = torch.optim.AdamW(trainable, lr=tr.lr, weight_decay=tr.weight_decay)
        ds_config = deepspeed_config(self.cfg, self.world_size)
        if gpu:
            torch.cuda.set_device(0)  # Ray's CUDA_VISIBLE_DEVICES leaves this actor its own GPU as device 0
            model.to("cuda")
            if self.reference is not None and tr.zero_stage != 3:  # ZeRO-3 places the reference's partitions
                self.reference.to("cuda")
        backend = "nccl" if gpu else "gloo"
        if not gpu:
            skip_shared_memory_allreduce(deepspeed.ops)
        if not torch.distributed.is_initialized():  # a process that already holds a group (tests) keeps it
            torch.distributed.init_process_group(backend, store=self._store(rendezvous), rank=self.rank,
                                                 world_size=self.world_size)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # joins the group above
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        load_weights_only(self.engine)
        self.sharded_reference = False
        if self.reference is not None and tr.zero_stage == 3:
            self._shard_reference(ds_config)
        # scores through the engine's (ZeRO-managed) module, inside the LoRA wrapper if any
        self.lm = self.policy.lm(adapter.base(self.engine.module))
        self.shuffle = torch.Generator().manual_seed(shuffle_seed)  # same shuffle on every rank
        if resume:
            self._resume()
        return self.version

    def _store(self, rendezvous: str | None):
        """The store the learner group meets at: in memory for one rank, else the file or TCP store named."""
        if rendezvous is None:
            return torch.distributed.HashStore()
        served = self.served.get("learners")  # rank 0 across hosts serves the TCP store itself
        return served.store if served else open_store(rendezvous, self.world_size, self.cfg.cluster.sync_timeout_s)

    def _load_models(self, resume: bool) -> torch.nn.Module:
        """The policy (made trainable: dropout off, checkpointing, LoRA) and the KL reference; returns the module
        DeepSpeed wraps.

        The reference costs a second copy of the weights only where it must: none with ``kl_coef == 0``; with
        LoRA the base model with its adapters disabled (the base weights are frozen, so they *are* the start
        policy); a full fine-tune keeps a frozen copy (``_shard_reference`` partitions it under ZeRO-3)."""
        family, grid, dtype = self.cfg.model.family, tuple(self.cfg.model.image_grid) or None, self.cfg.model.dtype
        tr = self.cfg.trainer
        # LoRA resume: the checkpoint's weights are merged; start from the plain base and let DeepSpeed
        # restore base and adapters (loading the merged ones would apply the adapters twice)
        self.policy = load_policy(family, self.reference_path if resume and tr.lora_rank else self.model_path, grid,
                                  dtype)
        self.reference: torch.nn.Module | None = None
        if tr.kl_coef > 0 and not tr.lora_rank:
            reference = self.policy if self.reference_path == self.model_path else load_policy(
                family, self.reference_path, grid, dtype)
            self.reference = copy.deepcopy(reference.model).eval().requires_grad_(False)
        # every dropout off (Emu3 ships attention_dropout 0.1): the learner's log-probs must be the
        # distribution the rollout sampled from. Eval mode, except for gradient checkpointing, which needs
        # train mode (slower per step on the CPU: BENCHMARKS.md section 2)
        model = disable_dropout(self.policy.model.train(tr.gradient_checkpointing))
        if tr.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tr.lora_rank:  # the reference is this model with its adapters disabled
            model = adapter.wrap(model, self.policy.lm().body, tr.lora_rank, tr.lora_alpha, tr.lora_targets)
        return model

    def _shard_reference(self, ds_config: dict) -> None:
        """Under ZeRO-3 the frozen reference is partitioned over the learner group like the policy: a DeepSpeed
        engine without an optimiser (ZeRO-Inference), so each rank holds 1/world_size of its weights and every
        rank gathers a layer's weights for the duration of its forward."""
        import deepspeed

        config = {k: v for k, v in ds_config.items() if k not in ("gradient_clipping", "zero_allow_untested_optimizer")}
        self.reference_engine, *_ = deepspeed.initialize(model=self.reference, config=config)
        self.reference = self.reference_engine.module
        self.sharded_reference = True

    def _resume(self) -> None:
        """Optimiser state (every rank's shard), shuffle stream and weight version of the checkpoint."""
        self.engine.load_checkpoint(str(Path(self.model_path) / "optimizer"), tag="state", load_module_strict=True,
                                    load_optimizer_states=True)
        state = load_state(Path(self.model_path) / "learner_state.pt")
        self.shuffle.set_state(state["shuffle"] if "shuffle" in state else state["generator"])  # older checkpoints
        self.version = int(state["version"])

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One GRPO update on this rank's share of ``batch``; returns partial sums for
        :func:`~omnigrpo.trainers.tally.merge_metrics`."""
        tr = self.cfg.trainer
        n, t = batch.codes.shape
        stale = batch.staleness(self.version)
        if int(stale.max()) > tr.max_staleness or int(stale.min()) < 0:
            raise RuntimeError(f"learner v{self.version}: samples drawn {stale.min()}..{stale.max()} updates ago, "
                               f"outside 0..trainer.max_staleness = {tr.max_staleness}")
        # no sample to learn from (a step would still move weights), or non-finite inputs: alike on every rank
        empty = not batch.valid.any()
        if empty or grpo.nonfinite_inputs(batch.advantages, batch.old_logprobs, batch.valid):
            return {"grpo/skipped_update": 1.0, "grpo/nonfinite": float(not empty),
                    "version": float(self.version), "async/staleness": float(stale.float().mean())}
        batch = batch.to(self.engine.device)
        self.in_update = True
        mask = batch.valid[:, None].expand(n, t).float()
        ref = torch.full((n, t), float("nan"), device=batch.codes.device)
        tally = UpdateTally()
        grad_norms, dropped = [], 0
        if self.sharded_reference:  # a collective: every rank scores an equal share, then all share it
            ref.copy_(self._scored_by_rank(n, lambda rows: self._reference_logprobs(batch, rows)))
        old = self._old_logprobs(batch)
        for epoch in range(tr.epochs):
            order = torch.randperm(n, generator=self.shuffle)
            for mini in order.chunk(tr.mini_batches):
                norm = grpo.normaliser(mask[mini], tr.loss_agg)  # of the whole mini-batch, on every rank
                for micro in mini.chunk(self.world_size)[self.rank].split(tr.micro_batch_size):
                    on_policy = not grad_norms  # no optimiser step yet: the weights the batch was drawn with
                    self._fill_reference(batch, ref, micro)
                    logp, ent = sequence_logprobs(self.lm, batch.prompts.select(micro), batch.codes[micro],
                                                  self.params)
                    # no reference (kl_coef 0): ref = logp, so k3 and the logged kl are exactly 0
                    ref_rows = ref[micro] if self.has_reference else logp.detach()
                    # None: one optimiser step per update, so the proximal policy is this very forward's
                    proximal = logp.detach() if old is None else old[micro]
                    terms = grpo.grpo_token_loss(logp, proximal, ref_rows, batch.advantages[micro],
                                                 tr.clip_eps_low, tr.clip_eps_high, tr.kl_coef)
                    m = mask[micro]
                    per_token, capped = self._tis_weighted(terms.loss, proximal, batch.old_logprobs[micro])
                    # DeepSpeed averages gradients over ranks; scaling by world_size makes that a sum
                    loss = grpo.aggregate(per_token, m, tr.loss_agg, norm) * self.world_size
                    finite = bool(torch.isfinite(loss))
                    if not finite:  # its gradient would poison the weights; the step still runs on every rank
                        dropped += 1
                        loss = grpo.zero_gradient_loss(logp)
                    boundary = self.engine.is_gradient_accumulation_boundary()
                    self.engine.backward(loss, scale_wrt_gas=False)
                    if boundary and tr.zero_stage == 0:  # ZeRO 0 does not record the norm itself
                        grad_norms.append(grad_norm(self.engine.module))
                    self.engine.step()
                    if boundary and tr.zero_stage > 0:
                        grad_norms.append(float(self.engine.get_global_grad_norm()))
                    if epoch == 0 and finite:
                        drawn = batch.old_logprobs[micro] if on_policy else None
                        tally.add(terms, logp, ent, capped, m, float(loss.detach()) * norm / self.world_size, drawn)
        self.version += 1
        self.in_update = False
        return {**tally.partial(), "loss_norm": grpo.normaliser(mask, tr.loss_agg),
                "grpo/skipped_update": 0.0, "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
                "grpo/nonfinite": float(not all(map(math.isfinite, grad_norms))), "sum/dropped": float(dropped),
                "lr": self.optimizer.param_groups[0]["lr"], "version": float(self.version),
                "async/staleness": float(stale.float().mean())}

    @torch.no_grad()
    def _old_logprobs(self, batch: TrainBatch) -> torch.Tensor | None:
        """The ratio's old log-probs ``[N, T]``: the sampler's, or the learner's before its first optimiser step.
        With one optimiser step per update (``epochs = mini_batches = 1``) every micro-batch's forward runs on
        those very weights, so its own detached log-probs are the recomputation, exactly and for free (None);
        otherwise one no-grad forward here, each rank an equal share."""
        tr = self.cfg.trainer
        if not tr.recompute_old:
            return batch.old_logprobs
        if tr.epochs == 1 and tr.mini_batches == 1:
            return None
        return self._scored_by_rank(len(batch.codes), lambda rows: sequence_logprobs(
            self.lm, batch.prompts.select(rows), batch.codes[rows], self.params)[0])

    def _tis_weighted(self, loss: torch.Tensor, proximal: torch.Tensor,
                      sampler: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-token ``loss`` ``[B, T]`` weighed by the TIS weights from the sampler's log-probs to the
        ``proximal`` ones (``trainer.tis_cap``; unchanged when off), and where the cap bit."""
        cap = self.cfg.trainer.resolved_tis_cap
        if not cap:
            return loss, torch.zeros_like(loss, dtype=torch.bool)
        weights, capped = grpo.tis_weights(proximal, sampler, cap)
        return loss * weights, capped

    @property
    def has_reference(self) -> bool:
        """A KL reference exists: a frozen copy (full fine-tuning) or the adapter-free base (LoRA)."""
        return self.cfg.trainer.kl_coef > 0

    @torch.no_grad()
    def _reference_logprobs(self, batch: TrainBatch, rows: torch.Tensor) -> torch.Tensor:
        """Reference log-probs ``[len(rows), T]``: the frozen copy's, or (LoRA) the policy's with adapters off."""
        prompts, codes = batch.prompts.select(rows), batch.codes[rows]
        if self.reference is not None:
            return sequence_logprobs(self.policy.lm(self.reference), prompts, codes, self.params)[0]
        with self.engine.module.disable_adapter():  # LoRA: the frozen base is the start policy
            return sequence_logprobs(self.lm, prompts, codes, self.params)[0]

    def _fill_reference(self, batch: TrainBatch, ref: torch.Tensor, rows: torch.Tensor) -> None:
        """Reference log-probs ``ref[rows]`` ``[len(rows), T]``, computed once per row (NaN = not yet)."""
        if not self.has_reference or self.sharded_reference:
            return
        todo = rows[torch.isnan(ref[rows, 0]).cpu()]  # ``rows`` lives on the CPU, ``ref`` on the device
        if len(todo):
            ref[todo] = self._reference_logprobs(batch, todo)

    def _scored_by_rank(self, n: int, score) -> torch.Tensor:
        """``score(rows)`` ``[len(rows), T]`` for all ``n`` rows of a batch ``[N, T]``: rank r scores rows
        ``chunk(world_size)[r]`` in micro-batches (the same number of forwards on every rank, as ZeRO-3's gathered
        layers require), then the shares are all-gathered."""
        rows = torch.arange(n).chunk(self.world_size)[self.rank]
        mine = torch.cat([score(r) for r in rows.split(self.cfg.trainer.micro_batch_size)])
        if self.world_size == 1:
            return mine
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, mine)
        return torch.cat(parts)

    @contextmanager
    def _full_weights(self):
        """The policy's full state dict (views of the live weights) while inside; under ZeRO-3 every rank
        must enter, as the parameters are gathered for the duration."""
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None,
                                               enabled=self.cfg.trainer.zero_stage == 3):
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
        self.served[group], spec = serve_store(self.address, size, timeout_s)
        return spec

    def join_weight_group(self, store: str, size: int, timeout_s: float, backend: str = "gloo") -> None:
        """Rank 0 joins the weight-broadcast group (gloo or nccl) as its sender (rank 0 of ``size``)."""
        if self.rank == 0:
            served = self.served.get("weights")
            self.sync_group = WeightBroadcast(store, 0, size, timeout_s, self.address, served and served.store,
                                              backend)

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
            torch.save({"shuffle": self.shuffle.get_state(), "version": self.version}, tmp / "learner_state.pt")
            if run_state is not None:
                torch.save(run_state, tmp / "run_state.pt")

        # a crash inside train_step leaves weights part-way through an update: say so in the checkpoint
        info = {"version": self.version, "partial_update": self.in_update, "learners": self.world_size}
        try:
            return str(write_checkpoint(root, step, save, self.cfg.trainer.keep_last, info, name=name, staging=staging))
        except Exception as err:  # write_checkpoint has removed what it staged
            raise write_failure(err, target) from err


def staging_dir(root: str | Path, step: int, name: str) -> Path:
    """Where every rank writes a checkpoint before rank 0 publishes it (the same path on all ranks)."""
    return Path(root) / f".{name}-{step:06d}.staging"
