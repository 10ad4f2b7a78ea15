"""Supervised start for a built-in world: fit the codebook, then train the policy on synthetic pairs.

Why: GRPO improves a policy that already draws something; X-Omni starts RL from an SFT checkpoint, and so does the
embedded default. Training is seeded, so the same config gives the same checkpoint, cached under
``<cache_dir>/sft/<hash of the config sections that shape it>``, and kept short so the start is clearly imperfect.
The loss is the negative log-likelihood of each code under :func:`sequence_logprobs`, the same image-masked
distribution the sampler and the GRPO learner use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from tqdm import tqdm

from omnigrpo.config.runtime import use_threads
from omnigrpo.config.schema import ModelConfig, RunConfig, SFTConfig, WorldConfig
from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.rollout.families.codebook import PatchCodebook
from omnigrpo.rollout.sampler import SamplingParams, sequence_logprobs
from omnigrpo.worlds import registry as worlds
from omnigrpo.worlds import world as world_module

log = logging.getLogger(__name__)
ETA_AFTER = 10
"""Steps timed before the SFT logs its pace and the time it still needs."""
_SFT_FORMAT = 2  # bump when the SFT procedure changes, so stale caches are not reused


def cache_root(cache_dir: str) -> Path:
    """Where cached checkpoints and compiled ops live: ``run.cache_dir``, else ``$OMNIGRPO_CACHE_DIR``, else
    ``~/.cache/omnigrpo``."""
    root = cache_dir or os.environ.get("OMNIGRPO_CACHE_DIR") or Path.home() / ".cache" / "omnigrpo"
    return Path(root).expanduser().resolve()


def sft_key(sft: SFTConfig, model: ModelConfig, world: WorldConfig, run: RunConfig) -> str:
    """Hash of everything that determines the SFT checkpoint (of ``run``, only its seed)."""
    payload = {
        "format": _SFT_FORMAT,
        "seed": run.seed,
        "world": repr(world),  # without world.look_share (out of its repr), added only when set
        **({"look_share": world.look_share} if world.look_share else {}),
        # the world's code (and the drawing it shares) makes the SFT data: a change must not reuse a stale checkpoint
        "world_code": hashlib.sha256(b"".join(Path(m.__file__).read_bytes()
                                              for m in (world_module, worlds.get(world.name)))).hexdigest(),
        "model": repr(model),
        "sft": repr(sft),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def sft_checkpoint(sft: SFTConfig, model: ModelConfig, world: WorldConfig, run: RunConfig, threads: int | None = None,
                   replace: bool = False) -> Path:
    """Path of the SFT checkpoint of these sections (under ``run.cache_dir``), training it first if the cache does
    not hold it (or, with ``replace``, training it again and replacing the cached one). Runs that need the same
    checkpoint at once (two jobs on a machine) train it once: the others wait on its lock file."""
    target = cache_root(run.cache_dir) / "sft" / sft_key(sft, model, world, run)
    if (target / "sft.json").exists() and not replace:
        log.info("reusing SFT checkpoint %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if (target / "sft.json").exists() and not replace:  # trained by another run while this one waited
            log.info("reusing SFT checkpoint %s", target)
            return target
        log.info("no SFT checkpoint for this model, world and sft config under %s: training it first (%d steps; "
                 "cached for every later run of the same config, `omnigrpo sft` trains it alone)", target,
                 sft.steps)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            stats = train_sft(sft, model, world, run, tmp, threads=threads)
            (tmp / "sft.json").write_text(json.dumps(stats, indent=2))
            if target.exists():  # a half-written leftover from a crash, or the checkpoint being replaced
                shutil.rmtree(target)
            os.replace(tmp, target)  # atomic: a reader sees no checkpoint or a whole one
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def train_sft(sft: SFTConfig, model: ModelConfig, world: WorldConfig, run: RunConfig, out_dir: Path,
              threads: int | None = None) -> dict:
    """Fit the codebook and train a fresh policy; writes a ``save_pretrained`` directory."""
    use_threads(threads)
    rng = np.random.default_rng(run.seed)
    source = worlds.get(world.name)  # the world module: its prompts and drawings
    items = worlds.train_items(world.name, world.look_share)
    _, fit_images = source.sample_pairs(items, sft.kmeans_images, rng)
    codebook = PatchCodebook.fit(fit_images, world.codebook_size, run.seed)
    policy = WorldPolicy.create(model, codebook, run.seed, world.name)
    module = policy.model.train()
    opt = torch.optim.AdamW(module.parameters(), lr=sft.lr, weight_decay=0.01)
    steps = sft.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    plain = SamplingParams()
    losses = []
    started = time.perf_counter()
    for step in tqdm(range(steps), desc="sft", mininterval=5.0):
        if step == ETA_AFTER:
            per_step = (time.perf_counter() - started) / step
            log.info("SFT: %.2f s per step on %d thread(s), about %.0f min to go", per_step, torch.get_num_threads(),
                     per_step * (steps - step) / 60)
        batch, images = source.sample_pairs(items, sft.batch_size, rng)
        drop = torch.from_numpy(rng.random(len(batch)) < sft.cfg_dropout)
        prompts = policy.prompt_batch([s.prompt for s in batch], drop_text=drop)
        logprobs, _ = sequence_logprobs(policy.lm(module), prompts, policy.encode_images(images), plain)
        loss = -logprobs.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    policy.model.eval()
    policy.save_pretrained(out_dir)
    return {"steps": steps, "final_loss": float(np.mean(losses[-20:])), "key": sft_key(sft, model, world, run)}
