"""The GRPO learner: a DeepSpeed engine around the policy, a frozen reference, and one update per step.

Why: the learner is where the platform meets scale. DeepSpeed (ZeRO stage from config) owns the
optimiser, gradient accumulation over micro-batches and clipping, so the same code that runs here on
CPU with gloo (``DS_ACCELERATOR=cpu``) runs sharded on GPUs. It is a plain class with a cheap
``__init__`` and an explicit :meth:`setup`, wrapped into a Ray actor by ``omnigrpo.cluster``.

One :meth:`train_step`: reference log-probs (no grad), then ``epochs`` passes over the batch, each split
into ``mini_batches`` optimiser steps of ``micro_batch_size`` forward/backward passes. Old log-probs
are the sampler's own, which equal the learner's recomputation on the same weights (tested to 1e-5),
so the first pass is exactly on-policy; ``grpo/logprob_mismatch`` reports the gap every step.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from omnigrpo.platform.config import Config
from omnigrpo.rollout.policy import ShapesPolicy
from omnigrpo.rollout.sampler import PromptBatch, SamplingParams, sequence_logprobs
from omnigrpo.trainers import grpo
from omnigrpo.trainers.checkpoint import write_checkpoint


@dataclass
class TrainBatch:
    """What one GRPO update consumes. ``prompts``: ``[N, P]``; ``codes``/``old_logprobs``: ``[N, T]``;
    ``advantages``/``valid``: ``[N]`` (``valid`` False = excluded from the loss)."""

    prompts: PromptBatch
    codes: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    valid: torch.Tensor


def sampling_params(cfg: Config) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(r.temperature, r.top_k, r.top_p, r.min_p, r.cfg_scale)


class Learner:
    """DeepSpeed GRPO learner (rank ``rank`` of ``world_size``) over the policy at ``model_path``."""

    def __init__(self, cfg: Config, model_path: str, rendezvous: str | None = None, rank: int = 0,
                 world_size: int = 1, reference_path: str | None = None):
        if world_size != 1:
            raise NotImplementedError("a data-parallel learner group needs the batch sharded across ranks")
        self.cfg = cfg
        self.model_path = model_path
        self.reference_path = reference_path or model_path  # KL is always against the run's start policy
        self.rendezvous = rendezvous
        self.rank = rank
        self.world_size = world_size
        self.version = 0
        self.in_update = False
        self.params = sampling_params(cfg)

    def setup(self, extensions_dir: str | None = None, threads: int | None = None, resume: bool = False) -> int:
        """Load policy and reference, join the process group, build the DeepSpeed engine.

        The group meets at ``rendezvous``; by default a ``file://`` store in a fresh temporary folder,
        which opens no listening socket (torch's TCP store listens on every interface). With ``resume``,
        ``model_path`` is a checkpoint of :meth:`save_checkpoint`: optimiser state, sampling generator
        and weight version continue from it."""
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's own sockets stay on loopback
        if extensions_dir:
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir)
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        import deepspeed  # after DS_ACCELERATOR is set: it picks the accelerator at import

        hf_logging.disable_progress_bar()
        torch.set_num_threads(threads or os.cpu_count() or 1)
        torch.manual_seed(self.cfg.run.seed + self.rank)
        self.policy = ShapesPolicy.from_pretrained(self.model_path)
        reference = self.policy if self.reference_path == self.model_path else ShapesPolicy.from_pretrained(
            self.reference_path)
        self.reference = copy.deepcopy(reference.model).eval().requires_grad_(False)
        model = self.policy.model.train()
        tr = self.cfg.trainer
        optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
        mini = self.cfg.batch_size // tr.mini_batches // self.world_size
        self.grad_accum = mini // tr.micro_batch_size
        rendezvous = self.rendezvous or (Path(tempfile.mkdtemp(prefix="omnigrpo-pg-")) / "store").as_uri()
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl",
                                   init_method=rendezvous, rank=self.rank, world_size=self.world_size,
                                   auto_mpi_discovery=False)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config={
                "train_micro_batch_size_per_gpu": tr.micro_batch_size,
                "gradient_accumulation_steps": self.grad_accum,
                "gradient_clipping": tr.max_grad_norm,
                "zero_optimization": {"stage": tr.zero_stage},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 10**9,
            },
        )
        self.generator = torch.Generator().manual_seed(self.cfg.run.seed + 1000 + self.rank)
        if resume:
            self.engine.load_checkpoint(str(Path(self.model_path) / "optimizer"), tag="state",
                                        load_module_strict=True, load_optimizer_states=True)
            state = torch.load(Path(self.model_path) / "learner_state.pt", weights_only=True)
            self.generator.set_state(state["generator"])
            self.version = int(state["version"])
        return self.version

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One GRPO update on ``batch``; returns the step's learner metrics."""
        tr = self.cfg.trainer
        n, t = batch.codes.shape
        if not batch.valid.any():  # nothing to learn from; an optimiser step would still move weights
            return {"grpo/skipped_update": 1.0, "version": float(self.version)}
        self.in_update = True
        mask = batch.valid[:, None].expand(n, t).float()
        ref = self._reference_logprobs(batch)
        sums = {"kl": 0.0, "entropy": 0.0, "clip_frac": 0.0, "tokens": 0.0, "mismatch": 0.0, "loss": 0.0}
        grad_norms = []
        for epoch in range(tr.epochs):
            order = torch.randperm(n, generator=self.generator)
            for mini in order.chunk(tr.mini_batches):
                norm = grpo.normaliser(mask[mini], tr.loss_agg)
                for micro in mini.split(tr.micro_batch_size):
                    on_policy = not grad_norms  # no optimiser step yet: the weights the batch was drawn with
                    logp, ent = sequence_logprobs(self.engine, batch.prompts.select(micro), batch.codes[micro],
                                                  self.policy.space, self.params)
                    terms = grpo.grpo_token_loss(logp, batch.old_logprobs[micro], ref[micro],
                                                 batch.advantages[micro], tr.clip_eps_low, tr.clip_eps_high,
                                                 tr.kl_coef)
                    m = mask[micro]
                    loss = grpo.aggregate(terms.loss, m, tr.loss_agg, norm)
                    boundary = self.engine.is_gradient_accumulation_boundary()
                    self.engine.backward(loss, scale_wrt_gas=False)
                    if boundary and tr.zero_stage == 0:  # ZeRO 0 does not record the norm itself
                        grad_norms.append(_grad_norm(self.engine.module))
                    self.engine.step()
                    if boundary and tr.zero_stage > 0:
                        grad_norms.append(float(self.engine.get_global_grad_norm()))
                    if epoch == 0:
                        with torch.no_grad():
                            sums["kl"] += float((terms.kl * m).sum())
                            sums["entropy"] += float((ent * m).sum())
                            sums["clip_frac"] += float((terms.clipped.float() * m).sum())
                            if on_policy:
                                gap = ((logp - batch.old_logprobs[micro]).abs() * m).max()
                                sums["mismatch"] = max(sums["mismatch"], float(gap))
                            sums["tokens"] += float(m.sum())
                            sums["loss"] += float(loss) * norm
        self.version += 1
        self.in_update = False
        tokens = max(sums["tokens"], 1.0)
        return {
            "loss": sums["loss"] / grpo.normaliser(mask, tr.loss_agg),
            "grpo/skipped_update": 0.0,
            "kl": sums["kl"] / tokens,
            "entropy": sums["entropy"] / tokens,
            "clip_frac": sums["clip_frac"] / tokens,
            "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grpo/logprob_mismatch": sums["mismatch"],
            "version": float(self.version),
        }

    @torch.no_grad()
    def _reference_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        chunks = []
        for idx in torch.arange(batch.codes.shape[0]).split(self.cfg.trainer.micro_batch_size):
            lp, _ = sequence_logprobs(self.reference, batch.prompts.select(idx), batch.codes[idx],
                                      self.policy.space, self.params)
            chunks.append(lp)
        return torch.cat(chunks)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full policy weights on CPU (gathered first under ZeRO-3), for the rollout workers."""
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None,
                                               enabled=self.cfg.trainer.zero_stage == 3):
            return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def save_checkpoint(self, root: str | Path, step: int | None = None, name: str = "step",
                        run_state: dict | None = None) -> str:
        """Atomically write ``root/{name}-NNNNNN``: the policy (a ``model.path``-ready directory), the
        DeepSpeed optimiser state, this learner's generator and version, and ``run_state`` (the
        driver's part, see ``omnigrpo.platform.driver``). ``step`` defaults to the updates made."""
        step = self.version if step is None else step
        weights = self.state_dict()

        def save(tmp: Path) -> None:
            self.policy.save_pretrained(tmp, state_dict=weights)
            self.engine.save_checkpoint(str(tmp / "optimizer"), tag="state")
            torch.save({"generator": self.generator.get_state(), "version": self.version}, tmp / "learner_state.pt")
            if run_state is not None:
                torch.save(run_state, tmp / "run_state.pt")

        # a crash inside train_step leaves weights part-way through an update: say so in the checkpoint
        info = {"version": self.version, "partial_update": self.in_update}
        return str(write_checkpoint(root, step, save, self.cfg.trainer.keep_last, info, name=name))


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
