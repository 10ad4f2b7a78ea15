"""``omnigrpo bench``: the figures users pick a platform by, each measured side by side in one run.

Why: a speed claim only means something next to its reference, on the same machine, in the same run. Four parts,
each printing a table into one JSON file: ``rollout`` (our sampler vs HF ``generate``), ``trl`` (GRPO vs TRL's
``GRPOTrainer`` by the protocol of ``omnigrpo.bench.protocol``), ``sync`` (seconds per GB of the weight sync, each
way) and ``rewards`` (images/s per judge). docs/bench.md says what each part holds equal; BENCHMARKS.md has the
results.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers

from omnigrpo.bench import kernels
from omnigrpo.bench.generate import (
    hf_generate,
    hf_generate_batched,
    hf_generate_janus,
    interleaved_medians,
    median_seconds,
)
from omnigrpo.bench.protocol import bench_trl, mode_configs, table_lines
from omnigrpo.config.runtime import use_threads
from omnigrpo.config.schema import Config, ModelConfig, RewardSpec, RolloutConfig, WorldConfig
from omnigrpo.rewards.worker import RewardWorker
from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.rollout.families.codebook import PATCH, PatchCodebook
from omnigrpo.rollout.family import Family
from omnigrpo.rollout.loader import family_record, family_records, load_policy
from omnigrpo.rollout.policy import ImagePolicy
from omnigrpo.rollout.sampler import SamplingParams, sample_images
from omnigrpo.trainers.sft import sft_checkpoint
from omnigrpo.worlds import registry as worlds
from omnigrpo.worlds.world import prompts_of

log = logging.getLogger(__name__)
PARTS = ("rollout", "trl", "sync", "rewards")
"""The benchmark's parts, in the order they run when all are asked for."""
GUIDED_SCALE = 3.0  # the guided rollout row uses this scale when the config samples without guidance


def machine() -> dict[str, object]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(),
            "omp_wait": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}}


def equal_length_prompts(policy: ImagePolicy, prompts: list[str], n: int) -> list[str]:
    """``n`` prompts (cycled) of the most common token length: HF's CFG positions ignore padding."""
    lengths = [int(policy.prompt_batch([p]).mask.sum()) for p in prompts]
    common = max(set(lengths), key=lengths.count)
    same = [p for p, n_words in zip(prompts, lengths, strict=True) if n_words == common]
    return [same[i % len(same)] for i in range(n)]


def bench_rollout(rollout: RolloutConfig, family_name: str, world_name: str, model_path: str, repeats: int) -> dict:
    """Image tokens/s and images/s: our sampler vs ``generate`` on the same ``family_name`` policy, on a step's
    batch of ``world_name``'s prompts, by the family's
    :attr:`~omnigrpo.rollout.family.Family.baseline` (``causal_lm``: HF's CFG, batched CFG over the LM head and
    kernels per step; ``vocabulary``: HF's CFG; ``image_generate``: the model's own image ``generate``)."""
    family = family_record(family_name)
    if not family.baseline:
        known = ", ".join(f.name for f in family_records() if f.baseline)
        raise ValueError(f"bench rollout: no HF generate baseline for family {family.name!r} ({known})")
    policy = load_policy(family.name, model_path)
    prompts = equal_length_prompts(policy, worlds.train_prompts(world_name)[0][:64], rollout.batch_size)
    batch, space, lm = policy.prompt_batch(prompts), policy.space, policy.lm()
    base = SamplingParams.of(rollout)
    settings = {f"cfg={base.cfg_scale:g}": base}
    if not base.guided:
        settings[f"cfg={GUIDED_SCALE:g}"] = dataclasses.replace(base, cfg_scale=GUIDED_SCALE)
    rows = {}
    for label, params in settings.items():
        sides = {"omnigrpo": lambda p=params: sample_images(lm, batch, p), **baselines(family, policy, batch, params)}
        row = {}
        for side, seconds in interleaved_medians(sides, repeats).items():
            row[side] = {"seconds": seconds, "images_per_s": len(prompts) / seconds,
                         "tokens_per_s": len(prompts) * space.tokens_per_image / seconds}
        for side in sides:
            if side != "omnigrpo":
                row[f"speedup_vs_{side}"] = row["omnigrpo"]["tokens_per_s"] / row[side]["tokens_per_s"]
        if family.baseline == "causal_lm":
            row["kernels"] = step_kernels(policy.model, batch, space, params, repeats)
        rows[label] = row
    return {"images": len(prompts), "tokens_per_image": space.tokens_per_image, "settings": rows}


def baselines(family: Family, policy: ImagePolicy, batch, params: SamplingParams) -> dict[str, Callable]:
    """The HF sides of one rollout row for ``family``'s baseline (none for Janus's generate without guidance)."""
    space = policy.space
    if family.baseline == "image_generate":  # Janus's generate needs guidance
        if params.cfg_scale <= 1:
            return {}
        boi = policy.tokenizer.convert_tokens_to_ids(policy.boi)
        return {"hf_generate": lambda: hf_generate_janus(policy.model, batch, boi, params)}
    sides = {"hf_generate": lambda: hf_generate(policy.model, batch, space, params)}  # codes are vocabulary tokens
    if params.guided and family.baseline == "causal_lm":
        sides["hf_generate_batched_cfg"] = lambda: hf_generate_batched(policy.model, batch, space, params)
    return sides


def step_kernels(model: torch.nn.Module, batch, space, params: SamplingParams, repeats: int) -> dict:
    """Kernels and host ms per decode step (:mod:`omnigrpo.bench.kernels`): ours vs HF ``generate`` (with guidance,
    on the doubled batch), same batch and settings."""
    views = kernels.Views()
    sides = {"omnigrpo": lambda m, sp: sample_images(views(m, sp), batch, params)}
    if params.guided:
        sides["hf_generate_batched_cfg"] = lambda m, sp: hf_generate_batched(m, batch, sp, params)
    else:
        sides["hf_generate"] = lambda m, sp: hf_generate(m, batch, sp, params)
    return kernels.compare(sides, model, space, repeats)


def bench_rewards(rewards: list[RewardSpec], world_name: str, batch_size: int, seed: int, repeats: int) -> dict:
    """Images/s of each judge of ``rewards`` on ``batch_size`` rendered images of ``world_name`` (drawn with
    ``seed``)."""
    world = worlds.get(world_name)
    items, images = world.sample_pairs(world.train_items(), batch_size, np.random.default_rng(seed))
    prompts, metadata = prompts_of(items)
    out = {}
    for spec in rewards:
        judge = RewardWorker([spec])
        judge.setup()
        seconds = median_seconds(lambda j=judge: j.score(images, prompts, metadata), repeats)
        out[spec.name] = {"images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds}
    return out


def random_policy(model: ModelConfig, world: WorldConfig, seed: int, directory: Path) -> str:
    """A randomly initialised policy of ``model``'s sizes saved in ``directory`` (sync moves bytes: no SFT needed,
    and ``model.*`` overrides scale it up to measure s/GB on a realistic size)."""
    shape = worlds.get(world.name).IMAGE_SHAPE
    codebook = PatchCodebook(np.zeros((world.codebook_size, PATCH * PATCH * 3), np.float32), shape)
    WorldPolicy.create(model, codebook, seed, world.name).save_pretrained(directory)
    return str(directory)


def _timed_sync(workers, broadcast: bool, bucket_mb: float, repeats: int) -> dict:
    """One sync path on a run's actors: the broadcast group (in ``bucket_mb`` buckets; 0 = per tensor) or, with
    ``broadcast`` False, the object store (the path a failed broadcast falls back to)."""
    import ray

    from omnigrpo.cluster import actors
    from omnigrpo.cluster.weights import SyncState

    sync = workers.sync
    sync.state, sync.bucket_mb = SyncState.JOINED if broadcast else SyncState.UNJOINED, bucket_mb
    state = ray.get(workers.learner.state_dict.remote())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    # the learner has made no update: every repeat sends its version 0 again
    seconds = median_seconds(lambda: actors.sync_weights(workers, 0, resend=True), repeats)
    sums = {round(c, 3) for c in ray.get([w.checksum.remote() for w in workers.rollouts])}
    expected = round(float(sum(t.double().sum() for t in state.values())), 3)
    return {"bytes": nbytes, "tensors": len(state), "seconds": seconds, "s_per_gb": seconds / (nbytes / 1e9),
            "gb_per_s": nbytes / 1e9 / seconds, "bucket_mb": bucket_mb,
            "still_broadcasting": sync.broadcasting == broadcast and not sync.fallbacks,  # no silent fallback
            "rollouts_match_learner": sums == {expected}}


def bench_sync(cfg: Config, repeats: int) -> dict:
    """Seconds per GB of ``actors.sync_weights`` (learner -> every rollout actor) on a Ray cluster, for a
    random policy of the configured size."""
    import tempfile

    import ray

    from omnigrpo.cluster import actors
    from omnigrpo.trainers.sft import cache_root

    started = not ray.is_initialized()
    actors.connect(cfg.cluster)
    out = {}
    staging = tempfile.TemporaryDirectory(prefix="omnigrpo-bench-")
    model_path = random_policy(cfg.model, cfg.world, cfg.run.seed, Path(staging.name))
    try:
        bucket = cfg.cluster.sync_bucket_mb
        backends = {"gloo": [("object store", False, 0.0), ("broadcast, bucketed", True, bucket),
                             ("broadcast, per tensor", True, 0.0)]}
        if cfg.cluster.sync_nccl:  # a whole GPU per learner and rollout actor: device to device
            backends["nccl"] = [("broadcast, nccl, bucketed", True, bucket)]
        for backend, paths in backends.items():  # one set of actors per backend; its paths in turn
            cluster = dataclasses.replace(cfg.cluster, weight_sync="broadcast", sync_backend=backend)
            workers = actors.spawn(dataclasses.replace(cfg, cluster=cluster), model_path,
                                   str(cache_root(cfg.run.cache_dir) / "torch_extensions"))
            try:
                for label, broadcast, bucket_mb in paths:
                    out[label] = _timed_sync(workers, broadcast, bucket_mb, repeats)
            finally:
                actors.release(workers)
    finally:
        if started:
            ray.shutdown()
        staging.cleanup()
    return {"rollout_actors": cfg.cluster.rollout_workers, "paths": out}


def table(results: dict) -> str:
    """Markdown tables of whatever parts ``results`` holds."""
    lines = [f"machine: {results['machine']}"]
    if "rollout" in results:
        ro = results["rollout"]
        lines += ["", f"rollout: {ro['images']} images x {ro['tokens_per_image']} tokens",
                  "| setting | sampler | tokens/s | images/s | omnigrpo speed-up |", "|---|---|---|---|---|"]
        for label, row in ro["settings"].items():
            for side, m in row.items():
                if side.startswith("speedup") or side == "kernels":
                    continue
                ratio = row.get(f"speedup_vs_{side}")
                lines.append(f"| {label} | {side} | {m['tokens_per_s']:.0f} | {m['images_per_s']:.1f} | "
                             f"{'' if ratio is None else f'{ratio:.2f}x'} |")
        lines += kernel_lines(ro["settings"])
    if "trl" in results:
        lines += table_lines(results["trl"])
    if "sync" in results:
        s = results["sync"]
        lines += ["", f"weight sync to {s['rollout_actors']} rollout actor(s)",
                  "| path | MB | tensors | ms | s/GB |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {m['bytes'] / 1e6:.1f} | {m['tensors']} | {m['seconds'] * 1e3:.1f} | "
                  f"{m['s_per_gb']:.2f} |" for label, m in s["paths"].items()]
    if "rewards" in results:
        lines += ["", "| judge | images/s |", "|---|---|"]
        lines += [f"| {name} | {m['images_per_s']:.1f} |" for name, m in results["rewards"].items()]
    return "\n".join(lines)


def kernel_lines(settings: dict) -> list[str]:
    """Markdown rows of kernels and host ms per decode step, where a setting measured them."""
    lines = ["", "| setting | sampler | kernels/step | per layer | outside layers | host ms/step |",
             "|---|---|---|---|---|---|"]
    for label, row in settings.items():
        for side, k in row.get("kernels", {}).items():
            lines.append(f"| {label} | {side} | {k['total']} | {k['per_layer']} | {k['outside']} | "
                         f"{k['ms_per_step']:.3f} |")
    return lines if len(lines) > 3 else []


def run_bench(cfg: Config, parts: list[str], steps: int = 20, repeats: int = 3, out: str = "", rounds: int = 3,
              modes: list[str] | None = None, settle_s: float = 60.0) -> dict:
    """Run the named parts (``rollout``, ``trl``, ``sync``, ``rewards``), print tables, write JSON. ``rounds``,
    ``modes`` (default: the config's own ``cluster.placement``) and ``settle_s`` (the longest wait for an idle
    CPU before each run) shape the ``trl`` part."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown bench part(s) {unknown}; choose from {', '.join(PARTS)}")
    if "trl" in parts:
        mode_configs(cfg, modes or [cfg.cluster.placement])  # a bad mode: a ConfigError before anything runs
    use_threads(cfg.cluster.torch_threads)
    trained = {"rollout", "trl"} & set(parts)  # sync and rewards need no trained policy
    model_path = cfg.model.path or (str(sft_checkpoint(cfg.sft, cfg.model, cfg.world, cfg.run,
                                                       cfg.cluster.torch_threads or None)) if trained else "")
    results: dict = {"machine": machine(), "model": model_path, "world": cfg.world.name}
    if "rollout" in parts:
        results["rollout"] = bench_rollout(cfg.rollout, cfg.model.family, cfg.world.name, model_path, repeats)
    if "rewards" in parts:
        results["rewards"] = bench_rewards(cfg.rewards, cfg.world.name, cfg.batch_size, cfg.run.seed, repeats)
    if "sync" in parts:
        results["sync"] = bench_sync(cfg, repeats)
    if "trl" in parts:
        results["trl"] = bench_trl(cfg, model_path, steps, rounds, modes, settle_s)
    print(table(results), flush=True)
    target = Path(out) if out else Path(cfg.run.dir) / "bench.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2))
    print(f"wrote {target}")
    results["path"] = str(target)
    return results
