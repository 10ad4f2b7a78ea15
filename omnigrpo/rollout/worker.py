"""The rollout worker: draws a group of images per prompt and decodes them to pixels.

Why: rollout is the half of GRPO that must be fast and must say exactly which weights it used. A
:class:`RolloutWorker` holds the policy, samples ``group_size`` images per prompt with the KV-cache sampler,
decodes codes to uint8 pixels inside the worker (a VQ-style decoder is cheap) and stamps the batch with its weight
version; weights change only through :meth:`load_weights`, between calls, so one batch never mixes versions. A
plain class with a cheap ``__init__`` and an explicit :meth:`setup`; ``omnigrpo.cluster`` wraps it into an actor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from omnigrpo.config.runtime import reseed, use_threads
from omnigrpo.config.schema import ModelConfig, RolloutConfig
from omnigrpo.rollout.graphs import GraphSet
from omnigrpo.rollout.loader import load_policy
from omnigrpo.rollout.policy import ImageLM, ImagePolicy, PromptBatch
from omnigrpo.rollout.sampler import SamplingParams, sample_images
from omnigrpo.sync.broadcast import WeightBroadcast
from omnigrpo.sync.network import LOOPBACK


@dataclass
class RolloutBatch:
    """``N = len(prompts)`` samples, each prompt repeated ``group_size`` times, groups contiguous.

    ``prompt_batch``: ``[N, P]``; ``codes``/``logprobs``: ``[N, T]``; ``images``: uint8 ``[N, H, W, 3]``;
    ``group``: ``[N]`` group index; ``version``: weight version the whole batch was drawn with;
    ``grid``: (rows, cols) of codes per image (what a decoder stage needs to paint them); ``rng_state``: the
    drawing worker's training-stream generator state after this batch (the cluster keeps each actor's latest for
    the run state; a joined batch has none).
    """

    prompts: list[str]
    metadata: list[dict]
    group: torch.Tensor
    prompt_batch: PromptBatch
    codes: torch.Tensor
    logprobs: torch.Tensor
    images: np.ndarray
    version: int
    grid: tuple[int, int] = (0, 0)
    rng_state: torch.Tensor | None = None

    @staticmethod
    def concat(parts: list[RolloutBatch]) -> RolloutBatch:
        """Join batches from several workers (which must hold the same weight version)."""
        versions = {p.version for p in parts}
        if len(versions) != 1:
            raise RuntimeError(f"rollout batches of different weight versions {sorted(versions)} cannot mix")
        offsets = np.cumsum([0] + [int(p.group.max()) + 1 for p in parts[:-1]])
        width = max(p.prompt_batch.ids.shape[1] for p in parts)

        def pad(x: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

        pad_id = parts[0].prompt_batch.pad_id
        return RolloutBatch(
            prompts=[s for p in parts for s in p.prompts],
            metadata=[m for p in parts for m in p.metadata],
            group=torch.cat([p.group + int(o) for p, o in zip(parts, offsets, strict=True)]),
            prompt_batch=PromptBatch(
                ids=torch.cat([pad(p.prompt_batch.ids, pad_id) for p in parts]),
                uncond_ids=torch.cat([pad(p.prompt_batch.uncond_ids, pad_id) for p in parts]),
                mask=torch.cat([pad(p.prompt_batch.mask, 0) for p in parts]),
                pad_id=pad_id,
                uncond_mask=torch.cat([pad(p.prompt_batch.uncond_mask, 0) for p in parts]),
            ),
            codes=torch.cat([p.codes for p in parts]),
            logprobs=torch.cat([p.logprobs for p in parts]),
            images=np.concatenate([p.images for p in parts]),
            version=versions.pop(),
            grid=parts[0].grid,
        )


    def state(self) -> dict:
        """The batch as tensors, strings and numbers only (the run state is loaded with ``weights_only``)."""
        pb = self.prompt_batch
        return {"prompts": list(self.prompts), "metadata": [dict(m) for m in self.metadata], "group": self.group,
                "prompt_batch": {"ids": pb.ids, "uncond_ids": pb.uncond_ids, "mask": pb.mask, "pad_id": pb.pad_id,
                                 "uncond_mask": pb.uncond_mask},
                "codes": self.codes, "logprobs": self.logprobs, "images": torch.from_numpy(self.images),
                "version": self.version, "grid": list(self.grid)}

    @staticmethod
    def from_state(state: dict) -> RolloutBatch:
        """Inverse of :meth:`state`."""
        return RolloutBatch(prompts=state["prompts"], metadata=state["metadata"], group=state["group"],
                            prompt_batch=PromptBatch(**state["prompt_batch"]), codes=state["codes"],
                            logprobs=state["logprobs"], images=state["images"].numpy(), version=state["version"],
                            grid=tuple(state["grid"]))


def draw_batch(policy: ImagePolicy, lm: ImageLM, prompts: list[str], metadata: list[dict], group_size: int,
               params: SamplingParams, generator: torch.Generator, device: torch.device, version: int,
               sample_batch: int = 0, decode: bool = True, graphed=None) -> RolloutBatch:
    """``group_size`` images for each prompt, sampled through ``lm`` (the fast path) and decoded by ``policy``,
    stamped with weight ``version``: the one sampling routine of rollout actors and of hybrid learners.
    ``graphed``: CUDA-graph decode steps (:meth:`omnigrpo.rollout.graphs.GraphSet.decoder`)."""
    repeated = [p for p in prompts for _ in range(group_size)]
    batch = policy.bounded_batch(repeated)
    step = sample_batch or len(repeated)  # pieces bound the KV cache; one generator stream throughout
    codes, logprobs, images = [], [], []
    for start in range(0, len(repeated), step):
        piece = batch.select(slice(start, start + step)).to(device)
        c, lp = sample_images(lm, piece, params, generator, graphed)
        images.append(policy.decode(c) if decode else np.zeros((len(c), 0, 0, 3), np.uint8))
        codes.append(c.cpu())
        logprobs.append(lp.cpu())
    return RolloutBatch(
        prompts=repeated,
        metadata=[dict(m) for m in metadata for _ in range(group_size)],
        group=torch.arange(len(prompts)).repeat_interleave(group_size),
        prompt_batch=batch,
        codes=torch.cat(codes),
        logprobs=torch.cat(logprobs),
        images=np.concatenate(images),
        version=version,
        grid=(policy.space.rows, policy.space.cols),
    )


class RolloutWorker:
    """Samples and decodes images with the ``family`` policy at ``model_path``.

    ``grid``: image size in codes (rows, cols) for families that take one (Emu3, X-Omni); ``decode``:
    False when a diffusion decoder stage turns codes into pixels (the batch then carries no images); ``graphs``:
    on a CUDA device, decode steps replay CUDA graphs (``rollout.cuda_graphs``); ``release``: the GPU is shared
    with other processes (colocated placement), so the allocator's cached blocks go back after every batch."""

    def __init__(self, model_path: str, params: SamplingParams, seed: int, threads: int = 0, family: str = "builtin",
                 grid: tuple[int, int] | None = None, decode: bool = True, sample_batch: int = 0,
                 dtype: str = "float32", graphs: bool = False, release: bool = False):
        self.model_path = model_path
        self.params = params
        self.seed = seed
        self.threads = threads
        self.family, self.grid, self.decode = family, grid, decode
        self.sample_batch, self.dtype, self.graphs, self.release = sample_batch, dtype, graphs, release
        self.version = 0

    @staticmethod
    def arguments(rollout: RolloutConfig, model: ModelConfig, model_path: str, seed: int, threads: int = 0,
                  decode: bool = True, release: bool = False) -> dict:
        """The constructor's arguments for a run's rollout worker (``ray.remote(RolloutWorker)`` takes them too):
        ``decode`` unless ``decoder.path`` is set, ``release`` under ``cluster.placement: colocated``."""
        return {"model_path": model_path, "params": SamplingParams.of(rollout), "seed": seed, "threads": threads,
                "family": model.family, "grid": tuple(model.image_grid) or None, "decode": decode,
                "sample_batch": rollout.sample_batch, "dtype": model.dtype, "graphs": rollout.cuda_graphs,
                "release": release}

    @classmethod
    def from_config(cls, rollout: RolloutConfig, model: ModelConfig, model_path: str, seed: int, threads: int = 0,
                    decode: bool = True, release: bool = False) -> RolloutWorker:
        """The rollout worker a run with these sections samples with (the evaluator's too)."""
        return cls(**cls.arguments(rollout, model, model_path, seed, threads, decode, release))

    def setup(self) -> int:
        hf_logging.disable_progress_bar()
        use_threads(self.threads)
        self.policy = load_policy(self.family, self.model_path, self.grid, self.dtype)
        # a GPU Ray assigned this actor (cluster.rollout_gpus) is its device 0; else the CPU
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.policy.model.to(self.device)
        self.lm = self.policy.lm()
        self.graph_set = GraphSet() if self.graphs and self.device.type == "cuda" else None
        """The policy's captured decode loops (weight loads write into the tensors they read: nothing to redo)."""
        self.generator = torch.Generator(self.device).manual_seed(self.seed)
        return self.version

    def generate(self, prompts: list[str], metadata: list[dict], group_size: int,
                 seed: int | None = None) -> RolloutBatch:
        """Draw ``group_size`` images for each prompt; with ``seed``, from a generator of its own, which
        leaves the training stream untouched (evaluation), so a resumed run samples what an
        uninterrupted one would."""
        generator = self.generator if seed is None else torch.Generator(self.device).manual_seed(seed)
        graphed = None if self.graph_set is None else self.graph_set.decoder
        batch = draw_batch(self.policy, self.lm, prompts, metadata, group_size, self.params, generator,
                           self.device, self.version, self.sample_batch, self.decode, graphed)
        batch.rng_state = self.generator.get_state()
        if self.release and self.device.type == "cuda":
            torch.cuda.empty_cache()  # the eager KV cache and logits of this batch, back to the GPU's co-tenants
        return batch

    def graph_failures(self) -> dict[str, str]:
        """Batch shapes whose CUDA-graph capture failed (they decode eagerly), with the reason."""
        failures = {} if self.graph_set is None else self.graph_set.failures
        return {str(key[:3]): why for key, why in failures.items()}

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """Replace the policy's weights (all of them: a partial sync is an error) and its version. The load writes
        into the tensors the packed layers and the graphs read, so neither is invalidated."""
        self.policy.model.load_state_dict(state_dict, strict=True)  # copies onto the model's device
        self.version = version
        return version

    def join_weight_group(self, store: str, rank: int, size: int, timeout_s: float, host: str = LOOPBACK,
                          backend: str = "gloo") -> None:
        """Join the weight-broadcast group (``backend`` gloo or nccl) as receiver ``rank`` (the learner's rank 0
        sends), bound to ``host``."""
        self.sync_group = WeightBroadcast(store, rank, size, timeout_s, host, backend=backend)

    def receive_weights(self, bucket_bytes: int) -> int:
        """Receive a broadcast straight into the policy's tensors; the sender's version becomes ours."""
        self.version = self.sync_group.receive(self.policy.model.state_dict(), bucket_bytes)
        return self.version

    def weight_version(self) -> int:
        return self.version

    def rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def restore(self, rng_state: torch.Tensor | None, version: int) -> None:
        """Continue a checkpointed run: its sampling stream (None: nothing was drawn, the seeded stream goes on)
        and weight version. A stream saved on another kind of device (a CPU run resumed on GPUs) cannot
        continue: the sampler is reseeded from the seed and the version instead, and says so."""
        if rng_state is not None and rng_state.numel() == self.generator.get_state().numel():
            self.generator.set_state(rng_state)
        elif rng_state is not None:
            logging.getLogger(__name__).warning(
                "rollout RNG state saved on another device type: reseeding (the resumed run samples a different "
                "stream than an uninterrupted one would)")
            self.generator.manual_seed(reseed(self.seed, version))
        self.version = version

    def checksum(self) -> float:
        """Sum of all weights, to compare with the learner's after a sync."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.policy.model.parameters()))
