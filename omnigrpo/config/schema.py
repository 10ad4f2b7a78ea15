"""Typed run configuration: one frozen dataclass per subsystem, every key declared once.

Why: a typo found after a cluster has started wastes the user's time. Each key here has a docstring, a
type and its legal range; pydantic (``extra="forbid"``) refuses anything else when
``omnigrpo.config.loader`` builds a :class:`Config` from YAML and overrides.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from omnigrpo.config.roles import Role

_STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)
"""Unknown keys are refused, and so is NaN or infinity in any float field."""
DAY_S = 86400.0
"""Upper bound of the timeouts: a day is far past any useful wait and within what every clock type holds."""
ASYNC_TIS_CAP = 2.0
"""``trainer.tis_cap`` when unset and ``trainer.max_staleness > 0`` (verl's truncated-IS default)."""
PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
FamilyName = Literal["builtin", "janus", "emu3", "xomni"]
"""The model families: each is the module ``omnigrpo.rollout.families.<name>`` and its ``FAMILY`` record (the
config layer cannot import the records, so their names are listed here, and only here)."""


@dataclass(frozen=True, config=_STRICT)
class RunConfig:
    dir: Annotated[str, Field(min_length=1)] = "runs/shapes"
    """Where the run writes everything: MLflow store (by default), checkpoints, logs."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    """Seed of every random choice in the run: prompts, sampling, initialisation, SFT data."""
    resume: bool = False
    """Continue the newest checkpoint under ``<run.dir>/checkpoints`` (same MLflow run, optimiser state,
    random streams and prompt order); refused before anything starts when there is none to resume exactly."""
    cache_dir: str = ""
    """Where reusable artefacts (the SFT checkpoint, DeepSpeed's compiled ops) are cached across
    runs; empty means ``$OMNIGRPO_CACHE_DIR`` or else ``~/.cache/omnigrpo``."""


@dataclass(frozen=True, config=_STRICT)
class WorldConfig:
    name: Literal["shapes", "glyphs"] = "shapes"
    """Built-in world that supplies prompts, the image tokenizer and the held-out evaluation:
    ``shapes`` (coloured shapes, judged from pixels) or ``glyphs`` (rendered strings, judged by OCR)."""
    codebook_size: Annotated[int, Field(ge=8, le=4096)] = 256
    """Number of image codes of the world's k-means patch tokenizer."""
    # out of repr: the SFT cache key hashes repr(world), and adds this only when set (runs without it keep their key)
    look_share: Probability = Field(0.0, repr=False)
    """Share of the world's training prompts that name part of the look, so RL cannot gain by drawing everything
    in one easy style (``glyphs`` only): ``write "KP7" small yellow top``, each of size, colour and height named
    with probability 1/2 (at least one), the same prompts in every run and process (``omnigrpo.worlds.glyphs``).
    SFT draws a named prompt's image with the named attributes and the others random; RL uses them when
    ``data.prompts`` is the world's; the ``glyphs_look`` reward scores them. Held-out prompts stay plain."""


@dataclass(frozen=True, config=_STRICT)
class DataConfig:
    prompts: Annotated[str, Field(min_length=1)] = "shapes"
    """Training prompts: the built-in world's (``shapes`` / ``glyphs``, must equal ``world.name``) or a
    ``.txt`` / ``.jsonl`` / ``.parquet`` file or a ``datasets`` directory (see ``omnigrpo.data.prompts``);
    shuffled each epoch with ``run.seed``."""
    held_out_share: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Share of the distinct prompts kept out of training, chosen by ``data.held_out_seed`` and each prompt's
    text alone (``omnigrpo.data.benchmarks.split``): the same prompts in every run and process, for evaluation."""
    held_out_seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    """Seed of the ``data.held_out_share`` split, apart from ``run.seed`` so runs of any seed hold out the same."""


@dataclass(frozen=True, config=_STRICT)
class ModelConfig:
    family: FamilyName = "builtin"
    """Policy family (``omnigrpo/rollout/families/<family>.py``): ``builtin`` (the built-in Qwen2 policy over
    the world's patch codes), ``janus`` (Janus-Pro, transformers' ``JanusForConditionalGeneration``),
    ``emu3`` (``Emu3ForConditionalGeneration``), ``xomni`` (X-Omni, our implementation of its architecture)."""
    path: str = ""
    """Hub id or local directory of the starting checkpoint; empty = the built-in SFT checkpoint,
    trained and cached on first use (``builtin`` only: every other family needs a path)."""
    image_grid: list[PositiveInt] = Field(default_factory=list)
    """Image size in codes ``[rows, cols]`` for the families where it is a choice (``emu3``: 8 px per code,
    default 90 x 90; ``xomni``: 16 px per code, default 32 x 32); empty = the checkpoint's or family's default."""
    image_codes: NonNegInt = 0
    """Expected image vocabulary size; a checkpoint with another one is refused before the cluster starts.
    0 = take the checkpoint's."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights of rollout and learner: ``bfloat16`` halves their memory and KV cache (the learner then runs
    DeepSpeed bf16, fp32 master weights in the optimiser); rollout/learner log-probs agree to 1e-5 only in
    ``float32`` (``learner/logprob_mismatch`` shows the gap)."""
    hidden_size: PositiveInt = 128
    """Width of the built-in policy (used only when SFT builds it)."""
    num_layers: PositiveInt = 4
    """Transformer layers of the built-in policy."""
    num_heads: PositiveInt = 4
    """Attention heads of the built-in policy."""
    num_kv_heads: PositiveInt = 2
    """Key/value heads of the built-in policy (grouped-query attention)."""
    intermediate_size: PositiveInt = 384
    """MLP width of the built-in policy."""


@dataclass(frozen=True, config=_STRICT)
class DecoderConfig:
    path: str = ""
    """Directory of a diffusion decoder (``omnigrpo.rollout.families.diffusion``: ``transformer/``, ``projector/``,
    ``vae/``, ``scheduler/``) run as its own pool of ``cluster.decoder_workers`` actors (``xomni`` only);
    empty = the policy's own decoder, inside the rollout worker."""
    steps: PositiveInt = 28
    """Flow-matching steps per image."""
    guidance: Annotated[float, Field(ge=0.0)] = 1.0
    """True CFG of the decoder against zeroed code features; 1.0 = one branch."""


@dataclass(frozen=True, config=_STRICT)
class SFTConfig:
    steps: PositiveInt = 800
    """Optimiser steps of supervised training on synthetic prompt/image pairs."""
    batch_size: PositiveInt = 64
    """Pairs per SFT step."""
    lr: Annotated[float, Field(gt=0.0)] = 2e-3
    """SFT learning rate (AdamW, cosine decay)."""
    cfg_dropout: Probability = 0.1
    """Share of SFT pairs whose prompt is replaced by padding, so the policy learns the
    unconditional branch that classifier-free guidance needs."""
    kmeans_images: PositiveInt = 1024
    """Synthetic images whose 4x4 patches fit the world's codebook."""


@dataclass(frozen=True, config=_STRICT)
class RolloutConfig:
    prompts_per_step: PositiveInt = 8
    """Distinct prompts sampled per GRPO step."""
    group_size: Annotated[int, Field(ge=2)] = 8
    """Images drawn per prompt; advantages are normalised within each group, so at least 2."""
    temperature: Annotated[float, Field(gt=0.0)] = 1.0
    """Softmax temperature of the sampling distribution (also applied to the learner's log-probs)."""
    top_k: NonNegInt = 0
    """Keep only the k most likely image codes; 0 disables."""
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """Nucleus sampling mass; 1.0 disables."""
    min_p: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Drop codes whose probability is below ``min_p`` times the top one; 0 disables."""
    cfg_scale: Annotated[float, Field(ge=0.0)] = 1.0
    """Classifier-free guidance: logits = uncond + scale * (cond - uncond); 1.0 = no guidance."""
    sample_batch: NonNegInt = 0
    """Most images one sampler call draws (CFG doubles its rows); a rollout actor's share of a step is
    sampled in pieces of this size, which bounds the static KV cache. 0 = all at once."""
    chunks: PositiveInt = 1
    """Sample a step's prompts in this many pieces, each judged while the next one samples (same
    weights: still on-policy); pays off when rewards run on their own devices."""
    cuda_graphs: bool = True
    """On a CUDA device, replay each decode step from CUDA graphs captured once per batch shape (both CFG
    branches, the draw and every layer in one launch; ``omnigrpo.rollout.graphs``): bitwise the eager static loop
    and several times faster per step (BENCHMARKS.md section 6). A failed capture decodes eagerly. No effect on
    the CPU."""

    @property
    def batch_size(self) -> int:
        """Samples per GRPO step: prompts_per_step * group_size."""
        return self.prompts_per_step * self.group_size


@dataclass(frozen=True, config=_STRICT)
class RewardSpec:
    name: Annotated[str, Field(min_length=1)]
    """Registry name, entry point of group ``omnigrpo.rewards``, or a ``module:attr`` string."""
    weight: Annotated[float, Field(ge=0.0)] = 1.0
    """Weight of this reward in the total."""
    required: bool = True
    """A failure of a required reward excludes the sample from the step; an optional one that
    fails drops out of that sample's total, which is re-normalised over the rewards that scored."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the reward's factory."""
    memory_gb: Annotated[float, Field(ge=0.0)] = 0.0
    """GPU memory in GiB this judge needs on a reward actor, for ``omnigrpo plan`` and the check before
    launch; 0 = the built-in table's figure (``omnigrpo.app.planner.JUDGE_GIB``), or nothing for other judges."""
    tags: list[str] = Field(default_factory=list)
    """If set, the reward applies only to prompts whose metadata ``tags`` share one of these; it is
    not computed for the others (not applicable, like a ``None`` score)."""
    alias: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]*$")] = ""
    """The reward's name in metrics (``reward/<alias>/mean``) and error reports; lets one judge appear twice with
    keys of its own (say OCR read at two scales). Empty: ``name``."""
    watch: bool = False
    """A watchdog (needs ``weight: 0``): scored and logged every step like any reward, never trained on and never
    excluding a sample (a failure is counted in ``reward/<alias>/failed``, not fatal). An independent judge
    catches a policy that pleases the training judges only (docs/design.md, watchdogs)."""

    @property
    def key(self) -> str:
        """The reward's name in metrics: ``alias``, else ``name``."""
        return self.alias or self.name


@dataclass(frozen=True, config=_STRICT)
class TrainerConfig:
    steps: PositiveInt = 250
    """GRPO steps (rollout, reward, update, weight sync)."""
    lr: Annotated[float, Field(gt=0.0)] = 2e-4
    """Learning rate of the policy (AdamW, constant)."""
    kl_coef: Annotated[float, Field(ge=0.0)] = 0.02
    """beta: weight of the k3 KL estimate against the frozen reference policy."""
    ref_refresh_every: NonNegInt = 0
    """GARDO's reference refresh: after every N-th update the KL reference becomes the current policy, so the KL
    holds the policy near where it is, not where it started (``omnigrpo.trainers.reference``); 0 = off. Needs
    ``kl_coef`` above 0. Refreshes are counted in ``learner/ref_refreshes``."""
    ref_refresh_kl: Annotated[float, Field(ge=0.0)] = 0.0
    """Refresh the KL reference to the current policy after an update whose ``learner/kl`` (merged over the learner
    ranks, so every rank decides alike) is above this; 0 = off. With ``ref_refresh_every`` too, either refreshes.
    Needs ``kl_coef`` above 0."""
    clip_eps_low: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    """PPO ratio clip below 1: ratio >= 1 - clip_eps_low."""
    clip_eps_high: Annotated[float, Field(gt=0.0)] = 0.2
    """PPO ratio clip above 1: ratio <= 1 + clip_eps_high (DAPO raises it to 0.28)."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std; false gives Dr.GRPO's mean-only centring."""
    loss_agg: Literal["token-mean", "seq-mean"] = "token-mean"
    """token-mean: average over every image token of the batch; seq-mean: per image, then over images."""
    epochs: PositiveInt = 1
    """Optimisation passes over each rollout batch."""
    mini_batches: PositiveInt = 1
    """Optimiser steps per pass; the batch is split into this many mini-batches."""
    micro_batch_size: PositiveInt = 32
    """Samples per forward/backward; gradients accumulate over a mini-batch."""
    max_staleness: NonNegInt = 0
    """Asynchronous rollout with a fixed lag k: the rollout actors draw step s's batch with the weights of step
    ``s - 1 - k`` (step 0's for the first k+1 steps) while the learner trains on an earlier batch. 0 = the
    synchronous loop (every batch drawn with the newest weights). Not with ``cluster.placement: hybrid`` (the
    learner ranks are the samplers there). A fixed lag keeps runs reproducible; batches drawn ahead are kept in
    the run state, so resuming stays exact (docs/design.md, asynchronous rollout)."""
    old_logprobs: Literal["auto", "sampler", "learner"] = "auto"
    """Old log-probs of the PPO ratio: ``sampler`` (those the rollout drew with) or ``learner`` (recomputed by
    the learner before the update's first optimiser step, as verl and OpenRLHF do: the ratio starts at exactly
    1 even where the sampler's kernels or dtype differ; one extra no-grad forward of the batch, shared by the
    learner ranks). ``auto``: ``learner`` when ``max_staleness > 0`` (decoupled PPO: the clip is taken around
    the learner's current policy, the sampler's stale one enters through ``tis_cap``), else ``sampler``."""
    tis_cap: Annotated[float, Field(ge=0.0)] | None = None
    """Truncated importance sampling against the sampler: each token's loss is weighted by
    ``min(exp(learner_old - sampler), tis_cap)`` (needs recomputed old log-probs); 0 = off. Corrects for what
    the sampler drew differently from the learner (bf16 kernels, a code at the top-k edge, weights up to
    ``max_staleness`` updates old). Unset: 2.0 when ``max_staleness > 0`` (the behaviour correction
    asynchronous rollout needs), else off."""
    diversity_bonus: Annotated[float, Field(ge=0.0)] = 0.0
    """A remedy against collapse: each good sample's total (valid, at or above its group's mean) gains this
    times its mean thumbnail distance (0..1) to the group's other good samples before advantages
    (``omnigrpo.app.shaping``), so among the samples that do what was asked the one least like
    its siblings is preferred; 0 = off. Logged as ``diversity/bonus_mean``. On glyphs it slows the collapse but does
    not stop it; ``kl_coef: 0.25`` does (BENCHMARKS.md section 5)."""
    diversity_space: Literal["pixels", "style"] = "pixels"
    """What the diversity bonus measures a sample's distance to its siblings in: ``pixels``, the RMS distance of
    16 x 16 thumbnails (any world; a policy can game it with stray marks); ``style``, the attributes the world reads
    back from the pixels (``read_style``: glyphs' colour, size and height), the attribute collapsing most over the
    step weighing most (``omnigrpo.app.diversity.style_distances``). ``style`` needs a world with ``read_style``."""
    baseline_by: list[str] = Field(default_factory=list)
    """Style attributes (fields of the world's ``read_style``; glyphs: ``colour``, ``advance`` = size, ``shift`` =
    height) whose values split each group's baseline: a sample is compared only with its siblings drawn with the
    same values, so reward gaps between those looks (a font the OCR reads more easily) push no look over another
    and the KL alone holds their shares. Done by shaping the totals before the group normalisation
    (``omnigrpo.app.shaping``): a readable sample's total becomes its total minus its look's mean plus the mean of
    the group's readable samples; an unreadable one keeps its total. Each look is centred on itself and the group's
    mean is kept: an unreadable sample keeps the group's baseline, the readable ones share their gap to it, one
    alone in its look carries only that share (no signal when all are readable), and the scale is the std of the
    shaped totals (the spread within the looks). Empty = one baseline per group."""
    diversity_advantage: Annotated[float, Field(ge=0.0)] = 0.0
    """GARDO's diversity-aware advantage: each positive advantage is multiplied by ``1 + diversity_advantage * d``,
    ``d`` the sample's distance to its nearest valid sibling divided by the largest such distance in its group (0
    when they are all equal), so among the samples better than their group the most novel is pushed most; negative
    advantages are left alone. Distances in style space where the world reads its styles back (glyphs), else the
    16 x 16 thumbnails' RMS distance; applied after the group normalisation (``omnigrpo.app.shaping``). 0 = off."""
    kl_uncertain_frac: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    """GARDO's gated KL: the share of the batch's samples that keep the KL penalty, those whose rank under the
    training total and under the first watchdog reward (``rewards.N.watch``) disagree most; the others get none,
    so the KL holds back the policy only where the watchdog doubts the training judges. Samples the watchdog did
    not score keep the KL. 1.0 = KL on every sample; below 1 needs a watchdog reward."""
    max_grad_norm: Annotated[float, Field(gt=0.0)] = 1.0
    """Gradient clipping threshold (global L2 norm)."""
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    """AdamW weight decay."""
    zero_stage: Annotated[int, Field(ge=0, le=3)] = 2
    """DeepSpeed ZeRO stage of the learner."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (transformers' checkpointing): far less
    memory for long image sequences (Emu3: ~4k tokens per row) at about a third more compute."""
    lora_rank: NonNegInt = 0
    """LoRA rank of the learner's adapters (peft); 0 = full fine-tuning. Rollouts always receive merged
    weights (``omnigrpo.trainers.adapter``)."""
    lora_alpha: Annotated[float, Field(gt=0.0)] = 32.0
    """LoRA scaling numerator: adapted weight = W + B A * lora_alpha / lora_rank."""
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"])
    """Module names that get adapters (the Llama / Qwen2 projections of every family's body)."""
    save_every: NonNegInt = 0
    """Write a checkpoint every N steps (0: only at the end and on a crash)."""
    keep_last: PositiveInt = 2
    """Checkpoints kept on disk; older ones are deleted."""
    max_skipped_updates: NonNegInt = 10
    """Updates skipped or not finite in a row (no valid sample; a non-finite advantage, loss or gradient) after
    which the run stops with a resumable checkpoint and says why; 0 = never stop for this."""

    @property
    def recompute_old(self) -> bool:
        """The learner recomputes the ratio's old log-probs (``old_logprobs`` resolved)."""
        return self.old_logprobs == "learner" or (self.old_logprobs == "auto" and self.max_staleness > 0)

    @property
    def resolved_tis_cap(self) -> float:
        """The TIS cap in force (``tis_cap`` resolved; 0 = off)."""
        if self.tis_cap is not None:
            return self.tis_cap
        return ASYNC_TIS_CAP if self.max_staleness > 0 else 0.0


@dataclass(frozen=True, config=_STRICT)
class AlarmConfig:
    window: Annotated[int, Field(ge=2)] = 20
    """Steps the alarm averages (diversity) or fits a slope over (rewards)."""
    diversity_share: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    """Raise when the mean ``diversity/group`` of the last ``window`` steps falls below this share of its mean
    over the run's first ``window`` steps; 0 = off."""
    watch_slopes: bool = True
    """Raise when a watchdog's (``rewards.N.watch``) mean reward falls over the last ``window`` steps (negative
    least-squares slope) while the training reward rises."""
    stop: bool = False
    """Stop the run when the alarm is raised, with a resumable checkpoint (as ``omnigrpo stop`` does)."""


@dataclass(frozen=True, config=_STRICT)
class EvalConfig:
    every: NonNegInt = 50
    """Held-out evaluation every N steps, besides the start and the end (0: start and end only)."""
    samples_per_prompt: PositiveInt = 32
    """Images drawn per held-out prompt."""
    held_out: bool = True
    """Evaluate the world's held-out prompts with the world's metrics (start, every ``eval.every`` steps,
    end); false skips it, e.g. for a model family whose images the world's judges were not made for."""


@dataclass(frozen=True, config=_STRICT)
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty = a sqlite store at ``<run.dir>/mlflow.db`` (no server needed)."""
    experiment: Annotated[str, Field(min_length=1)] = "omnigrpo"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name; empty lets MLflow pick one."""
    image_every: NonNegInt = 10
    """Log a captioned grid of samples every N steps (0 disables)."""
    images: PositiveInt = 16
    """Samples in each grid."""


@dataclass(frozen=True, config=_STRICT)
class ClusterConfig:
    address: str = ""
    """Ray address to join; empty starts a local cluster on loopback for this run."""
    num_cpus: NonNegInt = 0
    """CPUs of the local cluster; 0 = all of this machine's."""
    rollout_workers: PositiveInt = 1
    """Rollout actors; a step's prompts are split between them."""
    reward_workers: PositiveInt = 1
    """Reward actors, each holding every configured reward; a step's images are split between them."""
    learner_workers: PositiveInt = 1
    """Learner actors forming one DeepSpeed data-parallel group; each takes an equal share of every
    mini-batch (so ``trainer.micro_batch_size`` must divide the mini-batch / learner_workers)."""
    placement: Literal["colocated", "split", "hybrid"] = "colocated"
    """``colocated``: actor i of every role shares bundle i of the run's placement group (the stages of a
    step take turns on it); ``split``: one bundle per actor (separate pools). See cluster/placement.py.
    ``hybrid``: no rollout actors; every learner rank samples its share of a step's prompts with its own live
    weights (no weight sync, the policy held once per rank; ``rollout_workers``, ``rollout_cpus`` and
    ``rollout_gpus`` are ignored); reward (and decoder) actor i share bundle i with learner rank i.
    trainer.zero_stage 0-2 (see trainers/hybrid.py)."""
    rollout_cpus: Annotated[float, Field(ge=0.0)] = 0.0
    """CPUs each rollout actor reserves; 0 = an equal share of the cluster with the other actors."""
    rollout_gpus: Annotated[float, Field(ge=0.0)] = 0.0
    """GPUs each rollout actor reserves (a fraction shares a GPU, e.g. colocated with a learner); > 0 moves
    the policy, the KV cache and sampling onto the GPU Ray assigns."""
    decoder_workers: PositiveInt = 1
    """Diffusion-decoder actors (only with ``decoder.path``); a step's token batches are split between them."""
    decoder_cpus: Annotated[float, Field(ge=0.0)] = 0.0
    """CPUs each decoder actor reserves; 0 = an equal share of the cluster with the other actors."""
    decoder_gpus: Annotated[float, Field(ge=0.0)] = 0.0
    """GPUs each decoder actor reserves (the decoder runs on the GPU Ray assigns it)."""
    reward_cpus: Annotated[float, Field(ge=0.0)] = 0.0
    """CPUs each reward actor reserves; 0 = an equal share of the cluster with the other actors."""
    reward_gpus: Annotated[float, Field(ge=0.0)] = 0.0
    """GPUs each reward actor reserves (fractions share a GPU); 0 on a CPU-only cluster."""
    learner_cpus: Annotated[float, Field(ge=0.0)] = 0.0
    """CPUs each learner actor reserves; 0 = an equal share of the cluster with the other actors."""
    learner_gpus: Annotated[float, Field(ge=0.0)] = 0.0
    """GPUs each learner actor reserves: 0 (gloo on CPU), or up to 1 (one DeepSpeed rank per GPU, NCCL; a
    fraction leaves the rest of that GPU to colocated actors)."""
    max_restarts: NonNegInt = 3
    """Rollout or reward actors that may die and be replaced in one run (their batch is retried on the
    replacement); one more death ends the run with a crash checkpoint."""
    reward_output_kb: NonNegInt = 64
    """What each reward actor's judges may print (stdout and stderr together, C libraries' included), in KB per
    minute; the rest is dropped and counted, so a chatty plugin cannot flood the driver's log. 0 = no cap."""
    weight_sync: Literal["broadcast", "object_store"] = "broadcast"
    """How new weights reach the rollout actors: a broadcast over a dedicated gloo group (learner rank 0
    -> every rollout actor, in buckets), or Ray's object store. The object store is also the fallback
    when a broadcast fails or times out, or once a rollout actor has been replaced."""
    sync_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """The broadcast group's backend: ``gloo`` (CPU tensors; GPU weights staged through host memory) or ``nccl``
    (GPU to GPU, buckets on the device). ``auto``: nccl when learners and rollout actors each hold whole GPUs
    of their own (``placement: split``, ``learner_gpus`` and ``rollout_gpus`` 1: NCCL cannot join two members
    on one GPU), else gloo. Not yet run on GPUs."""
    sync_bucket_mb: Annotated[float, Field(ge=0.0)] = 4.0
    """Broadcast bucket size in MB: smaller tensors are packed into flat buffers of up to this size, larger
    ones go alone without a copy; 0 = one call per tensor. Use hundreds of MB with nccl."""
    sync_timeout_s: Annotated[float, Field(gt=0.0, le=DAY_S)] = 120.0
    """Longest a weight broadcast may wait for a member before it fails (then: object store)."""
    call_timeout_s: Annotated[float, Field(ge=0.0, le=DAY_S)] = 900.0
    """Longest a reward or decoder actor may take for one shard; past it the actor is killed, replaced and the
    shard retried (counts against ``cluster.max_restarts``; ``fault/call_timeouts``). 0 = wait forever."""
    setup_timeout_s: Annotated[float, Field(ge=0.0, le=DAY_S)] = 1800.0
    """Longest the actors may take to set up (load models, build judges and dry-run them) before the run stops,
    naming the actors still setting up; 0 = wait forever. SIGTERM also ends a start-up at once."""
    stop_grace_s: Annotated[int, Field(ge=0, le=int(DAY_S))] = 600
    """Seconds a run asked to stop (``omnigrpo stop``, or a first SIGTERM) has to finish its step and write a
    resumable checkpoint; a submitted job gets this as Ray's ``RAY_JOB_STOP_WAIT_TIME_S``. A second SIGTERM
    ends the run at once with a crash checkpoint."""
    gpu_memory_gb: Annotated[float, Field(ge=0.0)] = 0.0
    """Memory of each GPU in GiB (``nvidia-smi``'s MiB / 1024; 80 for an 80 GB A100/H100). When set,
    ``omnigrpo train`` refuses before launch a config whose plan (``omnigrpo plan``) does not fit; 0 = unknown
    (nothing is checked)."""
    torch_threads: NonNegInt = 0
    """Intra-op threads per worker; 0 = all cores while the stages of a step run one after another, each role's
    CPU share (at least 1) when rollout overlaps learning (``trainer.max_staleness > 0``)."""

    @property
    def sync_nccl(self) -> bool:
        """The weight broadcast runs over NCCL (``sync_backend`` resolved)."""
        if self.sync_backend != "auto":
            return self.sync_backend == "nccl"
        return self.placement == "split" and self.learner_gpus >= 1 and self.rollout_gpus >= 1


@dataclass(frozen=True, config=_STRICT)
class Config:
    run: RunConfig = Field(default_factory=RunConfig)
    world: WorldConfig = Field(default_factory=WorldConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="shapes")])
    """Rewards combined into the total, each ``{name, weight, required, kwargs}``."""
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    alarm: AlarmConfig = Field(default_factory=AlarmConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @property
    def actor_counts(self) -> dict[Role, int]:
        """Actors per role (a decoder pool only with ``decoder.path``)."""
        c = self.cluster
        rollouts = 0 if c.placement == "hybrid" else c.rollout_workers  # hybrid: the learner ranks sample
        return {Role.ROLLOUT: rollouts, Role.DECODER: c.decoder_workers if self.decoder.path else 0,
                Role.REWARD: c.reward_workers, Role.LEARNER: c.learner_workers}

    @property
    def samplers(self) -> int:
        """Processes that sample a step's prompts: the rollout actors, or (hybrid) the learner ranks."""
        c = self.cluster
        return c.learner_workers if c.placement == "hybrid" else c.rollout_workers

    @property
    def batch_size(self) -> int:
        """Samples per GRPO step: prompts_per_step * group_size."""
        return self.rollout.batch_size
