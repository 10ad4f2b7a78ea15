"""``omnigrpo bench``: the figures users pick a platform by, each measured side by side in one run.

Why: a speed claim only means something next to its reference, on the same machine, in the same
run. Four parts, each printing a table and landing in one JSON file:

1. ``rollout``: our sampler vs HF ``generate`` on the same policy, batch (``prompts_per_step *
   group_size`` images of equal-length prompts), guidance and sampling settings, both restricted to
   image codes (``omnigrpo.bench.generate``); with and without classifier-free guidance.
2. ``trl``: GRPO on the config's world, omnigrpo vs TRL's ``GRPOTrainer``, one after the other from the
   same weights with the same prompts per step, group size, reward, learning rate, beta and steps:
   samples/s (training time only, loading excluded on both sides) and reward at the first and last step.
3. ``sync``: seconds per GB of the learner -> rollout weight sync on a real Ray cluster, three ways:
   the object store, the gloo broadcast in ``cluster.sync_bucket_mb`` buckets, and one call per tensor,
   for a random policy of ``model.*``'s sizes (override them to measure a realistic size).
4. ``rewards``: images/s of every configured judge on the world's rendered images.
5. ``placement``: the same GRPO run (``--steps``, from the same weights and seed) under ``cluster.placement``
   colocated and hybrid: median step, rollout and sync seconds after the first step, samples/s, the weight
   bytes sent per step and the last step's reward.

Timings are medians over ``--repeats`` after one warm-up.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
from pathlib import Path

import numpy as np
import torch
import transformers

from omnigrpo.bench.generate import hf_generate, hf_generate_batched, hf_generate_janus, median_seconds
from omnigrpo.config.runtime import use_threads
from omnigrpo.config.schema import Config
from omnigrpo.rewards.worker import RewardWorker
from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.rollout.families.codebook import PATCH, PatchCodebook
from omnigrpo.rollout.loader import load_policy
from omnigrpo.rollout.policy import ImagePolicy
from omnigrpo.rollout.sampler import SamplingParams, sample_images
from omnigrpo.trainers.sft import sft_checkpoint
from omnigrpo.worlds import registry as worlds
from omnigrpo.worlds.world import prompts_of

log = logging.getLogger(__name__)
PARTS = ("rollout", "trl", "sync", "rewards", "placement")
"""The benchmark's parts, in the order they run when all are asked for."""
GUIDED_SCALE = 3.0  # the guided rollout row uses this scale when the config samples without guidance


def machine() -> dict[str, object]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat()}


def equal_length_prompts(policy: ImagePolicy, prompts: list[str], n: int) -> list[str]:
    """``n`` prompts (cycled) of the most common token length: HF's CFG positions ignore padding."""
    lengths = [int(policy.prompt_batch([p]).mask.sum()) for p in prompts]
    common = max(set(lengths), key=lengths.count)
    same = [p for p, n_words in zip(prompts, lengths, strict=True) if n_words == common]
    return [same[i % len(same)] for i in range(n)]


def bench_rollout(cfg: Config, model_path: str, repeats: int) -> dict:
    """Image tokens/s and images/s: our sampler vs ``generate`` on the same policy (builtin: HF's CFG and
    batched CFG over the LM head; janus: Janus's own image ``generate``)."""
    family = cfg.model.family
    if family not in ("builtin", "janus", "emu3"):
        raise ValueError(f"bench rollout: no HF generate baseline for family {family!r} (builtin, janus, emu3)")
    policy = load_policy(family, model_path)
    prompts = equal_length_prompts(policy, worlds.train_prompts(cfg.world.name)[0][:64], cfg.batch_size)
    batch, space, lm = policy.prompt_batch(prompts), policy.space, policy.lm()
    base = SamplingParams.of(cfg.rollout)
    settings = {f"cfg={base.cfg_scale:g}": base}
    if not base.guided:
        settings[f"cfg={GUIDED_SCALE:g}"] = dataclasses.replace(base, cfg_scale=GUIDED_SCALE)
    rows = {}
    for label, params in settings.items():
        sides = {"omnigrpo": lambda p=params: sample_images(lm, batch, p)}
        if family == "janus" and params.cfg_scale > 1:  # Janus's generate needs guidance
            boi = policy.tokenizer.convert_tokens_to_ids(policy.boi)
            sides["hf_generate"] = lambda p=params, boi=boi: hf_generate_janus(policy.model, batch, boi, p)
        elif family in ("builtin", "emu3"):  # codes are vocabulary tokens: generate + an image-only processor
            sides["hf_generate"] = lambda p=params: hf_generate(policy.model, batch, space, p)
        if params.guided and family == "builtin":
            sides["hf_generate_batched_cfg"] = lambda p=params: hf_generate_batched(policy.model, batch, space, p)
        row = {}
        for side, fn in sides.items():
            seconds = median_seconds(fn, repeats)
            row[side] = {"seconds": seconds, "images_per_s": len(prompts) / seconds,
                         "tokens_per_s": len(prompts) * space.tokens_per_image / seconds}
        for side in sides:
            if side != "omnigrpo":
                row[f"speedup_vs_{side}"] = row["omnigrpo"]["tokens_per_s"] / row[side]["tokens_per_s"]
        rows[label] = row
    return {"images": len(prompts), "tokens_per_image": space.tokens_per_image, "settings": rows}


def bench_rewards(cfg: Config, repeats: int) -> dict:
    """Images/s of each configured judge on ``batch_size`` rendered world images."""
    world = worlds.get(cfg.world.name)
    items, images = world.sample_pairs(world.train_items(), cfg.batch_size, np.random.default_rng(cfg.run.seed))
    prompts, metadata = prompts_of(items)
    out = {}
    for spec in cfg.rewards:
        judge = RewardWorker([spec])
        judge.setup()
        seconds = median_seconds(lambda j=judge: j.score(images, prompts, metadata), repeats)
        out[spec.name] = {"images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds}
    return out


def random_policy(cfg: Config, directory: Path) -> str:
    """A randomly initialised policy of ``cfg.model``'s sizes saved in ``directory`` (sync moves bytes:
    no SFT needed, and ``model.*`` overrides scale it up to measure s/GB on a realistic size)."""
    shape = worlds.get(cfg.world.name).IMAGE_SHAPE
    codebook = PatchCodebook(np.zeros((cfg.world.codebook_size, PATCH * PATCH * 3), np.float32), shape)
    WorldPolicy.create(cfg.model, codebook, cfg.run.seed, cfg.world.name).save_pretrained(directory)
    return str(directory)


def bench_sync(cfg: Config, repeats: int) -> dict:
    """Seconds per GB of ``actors.sync_weights`` (learner -> every rollout actor) on a Ray cluster, for a
    random policy of the configured size."""
    import tempfile

    import ray

    from omnigrpo.cluster import actors
    from omnigrpo.trainers.sft import cache_root

    started = not ray.is_initialized()
    actors.connect(cfg)
    out = {}
    staging = tempfile.TemporaryDirectory(prefix="omnigrpo-bench-")
    model_path = random_policy(cfg, Path(staging.name))
    try:
        for label, mode, bucket_mb in (("object store", "object_store", 0.0), ("broadcast, bucketed", "broadcast",
                                       cfg.cluster.sync_bucket_mb), ("broadcast, per tensor", "broadcast", 0.0)):
            cluster = dataclasses.replace(cfg.cluster, weight_sync=mode, sync_bucket_mb=bucket_mb)
            workers = actors.spawn(dataclasses.replace(cfg, cluster=cluster), model_path,
                                   str(cache_root(cfg) / "torch_extensions"))
            try:
                state = ray.get(workers.learner.state_dict.remote())
                nbytes = sum(t.numel() * t.element_size() for t in state.values())
                # the learner has made no update: every repeat sends its version 0 again
                seconds = median_seconds(lambda w=workers: actors.sync_weights(w, 0), repeats)
                sums = {round(c, 3) for c in ray.get([w.checksum.remote() for w in workers.rollouts])}
                expected = round(float(sum(t.double().sum() for t in state.values())), 3)
                clean = (workers.broadcast and not workers.sync_fallbacks) or mode != "broadcast"  # no fallback
                out[label] = {"bytes": nbytes, "tensors": len(state), "seconds": seconds,
                              "s_per_gb": seconds / (nbytes / 1e9), "gb_per_s": nbytes / 1e9 / seconds,
                              "bucket_mb": bucket_mb, "still_broadcasting": clean,
                              "rollouts_match_learner": sums == {expected}}
            finally:
                actors.release(workers)
    finally:
        if started:
            ray.shutdown()
        staging.cleanup()
    return {"rollout_actors": cfg.cluster.rollout_workers, "paths": out}


def bench_trl(cfg: Config, model_path: str, steps: int) -> dict:
    """``steps`` GRPO steps with omnigrpo, then with TRL, from the same weights and settings."""
    from omnigrpo.app.driver import train
    from omnigrpo.app.tracking import Tracker
    from omnigrpo.bench.trl import run_trl_grpo

    root = Path(cfg.run.dir) / "bench"
    ours_cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, dir=str(root / "omnigrpo"), resume=False),
        model=dataclasses.replace(cfg.model, path=model_path),
        trainer=dataclasses.replace(cfg.trainer, steps=steps, save_every=0),
        eval=dataclasses.replace(cfg.eval, every=0, samples_per_prompt=1),
        tracking=dataclasses.replace(cfg.tracking, uri="", image_every=0, run_name="bench-omnigrpo"))
    summary = train(ours_cfg)
    client = Tracker(ours_cfg).client
    history = {key: [m.value for m in sorted(client.get_metric_history(summary["run_id"], key), key=lambda m: m.step)]
               for key in ("timing/step_s", "reward/total/mean")}
    ours_wall = float(sum(history["timing/step_s"]))
    samples = steps * cfg.batch_size
    ours = {"wall_s": ours_wall, "samples": samples, "samples_per_s": samples / ours_wall,
            "reward_first": history["reward/total/mean"][0], "reward_last": history["reward/total/mean"][-1],
            "reward_curve": history["reward/total/mean"]}

    prompts, metadata = worlds.train_prompts(cfg.world.name)
    judge = RewardWorker(cfg.rewards)
    judge.setup()

    def total(images, prompts, metadata):  # the same combined reward ours optimises; excluded -> unscored
        result = judge.score(np.asarray(images), prompts, metadata)
        return [float(t) if ok else None for t, ok in zip(result.total, result.valid, strict=True)]

    r = cfg.rollout
    theirs = run_trl_grpo(model_path, prompts, metadata, total, steps=steps, prompts_per_step=r.prompts_per_step,
                          group_size=r.group_size, lr=cfg.trainer.lr, beta=cfg.trainer.kl_coef,
                          temperature=r.temperature, seed=cfg.run.seed, out_dir=str(root / "trl"),
                          threads=cfg.cluster.torch_threads or os.cpu_count())
    theirs = {k: theirs[k] for k in ("wall_s", "samples", "samples_per_s", "reward_first", "reward_last",
                                     "reward_curve", "max_non_image_tokens")}
    return {"steps": steps, "omnigrpo": ours, "trl": theirs,
            "speedup_samples_per_s": ours["samples_per_s"] / theirs["samples_per_s"],
            "settings": {"prompts_per_step": r.prompts_per_step, "group_size": r.group_size, "lr": cfg.trainer.lr,
                         "beta": cfg.trainer.kl_coef, "temperature": r.temperature,
                         "rewards": [s.name for s in cfg.rewards]}}


def bench_placement(cfg: Config, model_path: str, steps: int) -> dict:
    """``steps`` GRPO steps under colocated, then hybrid placement, from the same weights and seed."""
    from omnigrpo.app.driver import train
    from omnigrpo.app.tracking import Tracker

    out = {}
    keys = ("timing/step_s", "timing/rollout_s", "timing/sync_s", "throughput/samples_per_s", "sync/bytes",
            "reward/total/mean")
    for mode in ("colocated", "hybrid"):
        run_cfg = dataclasses.replace(
            cfg, run=dataclasses.replace(cfg.run, dir=str(Path(cfg.run.dir) / "bench" / mode), resume=False),
            model=dataclasses.replace(cfg.model, path=model_path),
            trainer=dataclasses.replace(cfg.trainer, steps=steps, save_every=0),
            eval=dataclasses.replace(cfg.eval, every=0, held_out=False),
            cluster=dataclasses.replace(cfg.cluster, placement=mode),
            tracking=dataclasses.replace(cfg.tracking, uri="", image_every=0, run_name=f"bench-{mode}"))
        summary = train(run_cfg)
        client = Tracker(run_cfg).client
        h = {k: [m.value for m in sorted(client.get_metric_history(summary["run_id"], k), key=lambda m: m.step)]
             for k in keys}
        warm = slice(1, None) if steps > 1 else slice(None)  # the first step pays for warm-up
        out[mode] = {"step_s": float(np.median(h["timing/step_s"][warm])),
                     "rollout_s": float(np.median(h["timing/rollout_s"][warm])),
                     "sync_s": float(np.median(h["timing/sync_s"][warm])),
                     "samples_per_s": float(np.median(h["throughput/samples_per_s"][warm])),
                     "sync_bytes": float(np.median(h["sync/bytes"][warm])),
                     "reward_last": h["reward/total/mean"][-1]}
    return {"steps": steps, "learner_workers": cfg.cluster.learner_workers,
            "rollout_workers": cfg.cluster.rollout_workers, "modes": out,
            "hybrid_vs_colocated_samples_per_s": out["hybrid"]["samples_per_s"] / out["colocated"]["samples_per_s"]}


def table(results: dict) -> str:
    """Markdown tables of whatever parts ``results`` holds."""
    lines = [f"machine: {results['machine']}"]
    if "rollout" in results:
        ro = results["rollout"]
        lines += ["", f"rollout: {ro['images']} images x {ro['tokens_per_image']} tokens",
                  "| setting | sampler | tokens/s | images/s | omnigrpo speed-up |", "|---|---|---|---|---|"]
        for label, row in ro["settings"].items():
            for side, m in row.items():
                if side.startswith("speedup"):
                    continue
                ratio = row.get(f"speedup_vs_{side}")
                lines.append(f"| {label} | {side} | {m['tokens_per_s']:.0f} | {m['images_per_s']:.1f} | "
                             f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    if "trl" in results:
        t = results["trl"]
        lines += ["", f"GRPO, {t['steps']} steps each: omnigrpo vs TRL GRPOTrainer",
                  "| trainer | samples/s | reward first step | reward last step |", "|---|---|---|---|"]
        for side in ("omnigrpo", "trl"):
            m = t[side]
            lines.append(f"| {side} | {m['samples_per_s']:.1f} | {m['reward_first']:.3f} | {m['reward_last']:.3f} |")
        lines.append(f"omnigrpo / TRL samples/s: {t['speedup_samples_per_s']:.2f}x")
    if "sync" in results:
        s = results["sync"]
        lines += ["", f"weight sync to {s['rollout_actors']} rollout actor(s)",
                  "| path | MB | tensors | ms | s/GB |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {m['bytes'] / 1e6:.1f} | {m['tensors']} | {m['seconds'] * 1e3:.1f} | "
                  f"{m['s_per_gb']:.2f} |" for label, m in s["paths"].items()]
    if "placement" in results:
        p = results["placement"]
        lines += ["", f"placement, {p['steps']} GRPO steps each (medians after the first step)",
                  "| placement | step s | rollout s | sync s | sync MB | samples/s | reward last step |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {mode} | {m['step_s']:.3f} | {m['rollout_s']:.3f} | {m['sync_s']:.4f} | "
                  f"{m['sync_bytes'] / 1e6:.2f} | {m['samples_per_s']:.1f} | {m['reward_last']:.3f} |"
                  for mode, m in p["modes"].items()]
        lines.append(f"hybrid / colocated samples/s: {p['hybrid_vs_colocated_samples_per_s']:.2f}x")
    if "rewards" in results:
        lines += ["", "| judge | images/s |", "|---|---|"]
        lines += [f"| {name} | {m['images_per_s']:.1f} |" for name, m in results["rewards"].items()]
    return "\n".join(lines)


def run_bench(cfg: Config, parts: list[str], steps: int = 20, repeats: int = 3, out: str = "") -> dict:
    """Run the named parts (``rollout``, ``trl``, ``sync``, ``rewards``, ``placement``), print tables, write
    JSON."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown bench part(s) {unknown}; choose from {', '.join(PARTS)}")
    use_threads(cfg.cluster.torch_threads)
    trained = {"rollout", "trl", "placement"} & set(parts)  # sync and rewards need no trained policy
    model_path = cfg.model.path or (str(sft_checkpoint(cfg, cfg.cluster.torch_threads or None)) if trained else "")
    results: dict = {"machine": machine(), "model": model_path, "world": cfg.world.name}
    if "rollout" in parts:
        results["rollout"] = bench_rollout(cfg, model_path, repeats)
    if "rewards" in parts:
        results["rewards"] = bench_rewards(cfg, repeats)
    if "sync" in parts:
        results["sync"] = bench_sync(cfg, repeats)
    if "trl" in parts:
        results["trl"] = bench_trl(cfg, model_path, steps)
    if "placement" in parts:
        results["placement"] = bench_placement(cfg, model_path, steps)
    print(table(results), flush=True)
    target = Path(out) if out else Path(cfg.run.dir) / "bench.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2))
    print(f"wrote {target}")
    results["path"] = str(target)
    return results
