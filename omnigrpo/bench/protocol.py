"""The omnigrpo-vs-TRL comparison (``omnigrpo bench --parts trl``), measured by one fixed protocol.

Why: a single run of each side on a shared machine says little, and a figure nobody can repeat says less.
Round r runs omnigrpo once in each requested mode (a named set of config overrides, :data:`MODES`), then
TRL once (settings frozen in ``trl_settings.yaml``); ``rounds`` rounds alternate the sides so that a slow
spell of the machine hits both. Every run starts from the same weights and seed and makes ``steps`` steps.
Reported per side and mode: median samples/s over rounds with min, max and the per-round values; reward
(mean of the last :data:`REWARD_WINDOW` steps' mean reward, median over rounds); for omnigrpo, the median
per-step stage times after each run's first step (from the run's MLflow metrics); each mode's ratio to TRL.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from omnigrpo.config.loader import ConfigError, with_overrides
from omnigrpo.config.schema import Config
from omnigrpo.rewards.worker import RewardWorker
from omnigrpo.worlds import registry as worlds

MODES: dict[str, dict[str, object]] = {
    "colocated": {"cluster.placement": "colocated", "trainer.max_staleness": 0},
    "split": {"cluster.placement": "split", "trainer.max_staleness": 0},
    "hybrid": {"cluster.placement": "hybrid", "trainer.max_staleness": 0},
    "split-async": {"cluster.placement": "split", "trainer.max_staleness": 1},
    "colocated-async": {"cluster.placement": "colocated", "trainer.max_staleness": 1},
}
"""omnigrpo's modes: name -> ``{"section.key": value}`` overrides of the benchmarked config."""
REWARD_WINDOW = 10
"""A run's reward: the mean of its last this-many steps' mean reward (every step if the run is shorter)."""
STAGES = ("step", "rollout", "reward", "learn", "wait", "sync")
"""The per-step stage times (``timing/<stage>_s``) profiled for each omnigrpo mode."""


def mode_configs(cfg: Config, names: list[str]) -> dict[str, Config]:
    """``cfg`` under each named mode, validated before anything runs (an unknown mode or key is a ConfigError)."""
    unknown = [n for n in names if n not in MODES]
    if unknown or not names:
        raise ConfigError(f"--modes: unknown mode(s) {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(MODES)}")
    if len(set(names)) < len(names):
        raise ConfigError(f"--modes: a mode is named twice ({', '.join(names)})")
    configs = {}
    for name in names:
        try:
            configs[name] = with_overrides(cfg, MODES[name])
        except ConfigError as err:
            raise ConfigError(f"--modes: mode {name!r} ({MODES[name]}): {err}") from None
    return configs


def spread(values: list[float]) -> dict[str, object]:
    """Median, min, max and the values themselves.

    >>> spread([3.0, 1.0, 2.0])
    {'median': 2.0, 'min': 1.0, 'max': 3.0, 'rounds': [3.0, 1.0, 2.0]}
    """
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "rounds": list(values)}


def window_mean(curve: list[float]) -> float:
    """The mean of the last :data:`REWARD_WINDOW` values of a per-step reward curve."""
    return float(np.mean(curve[-REWARD_WINDOW:]))


def run_omnigrpo(cfg: Config) -> dict:
    """One GRPO run; samples/s over its training steps, its reward, its median stage times after step 1."""
    from omnigrpo.app.driver import train
    from omnigrpo.app.tracking import Tracker, history

    run_id = train(cfg)["run_id"]
    client = Tracker(cfg).client
    keys = [*(f"timing/{s}_s" for s in STAGES), "sync/bytes", "reward/total/mean"]
    h = {k: [m.value for m in history(client, run_id, k)] for k in keys}
    warm = slice(1, None) if len(h["timing/step_s"]) > 1 else slice(None)  # the first step pays for warm-up
    wall = float(sum(h["timing/step_s"]))
    samples = len(h["timing/step_s"]) * cfg.batch_size
    profile = {f"{s}_s": float(np.median(h[f"timing/{s}_s"][warm])) for s in STAGES}
    return {"samples": samples, "wall_s": wall, "samples_per_s": samples / wall,
            "reward": window_mean(h["reward/total/mean"]), "reward_curve": h["reward/total/mean"],
            "stages": {**profile, "sync_bytes": float(np.median(h["sync/bytes"][warm]))}}


def trl_runner(cfg: Config, model_path: str, steps: int):
    """``run(out_dir) -> record``: one TRL GRPO run of the same experiment (prompts and judge built once)."""
    from omnigrpo.bench.trl import run_trl_grpo

    prompts, metadata = worlds.train_prompts(cfg.world.name)
    judge = RewardWorker(cfg.rewards)
    judge.setup()

    def total(images, prompts, metadata):  # the same combined reward ours optimises; excluded -> unscored
        result = judge.score(np.asarray(images), prompts, metadata)
        return [float(t) if ok else None for t, ok in zip(result.total, result.valid, strict=True)]

    r = cfg.rollout

    def run(out_dir: str) -> dict:
        out = run_trl_grpo(model_path, prompts, metadata, total, steps=steps, prompts_per_step=r.prompts_per_step,
                           group_size=r.group_size, lr=cfg.trainer.lr, beta=cfg.trainer.kl_coef,
                           temperature=r.temperature, seed=cfg.run.seed, out_dir=out_dir,
                           threads=cfg.cluster.torch_threads or os.cpu_count())
        return {"samples": out["samples"], "wall_s": out["wall_s"], "samples_per_s": out["samples_per_s"],
                "reward": window_mean(out["reward_curve"]), "reward_curve": out["reward_curve"],
                "max_non_image_tokens": out["max_non_image_tokens"], "args": out["args"]}

    return run


def run_config(cfg: Config, model_path: str, steps: int, run_dir: Path, name: str) -> Config:
    """A mode's config as the benchmark runs it: the given weights and steps, no evaluations, checkpoints
    or sample grids, its own run directory and MLflow store."""
    return with_overrides(cfg, {
        "run.dir": str(run_dir), "run.resume": False, "model.path": model_path, "trainer.steps": steps,
        "trainer.save_every": 0, "eval.every": 0, "eval.held_out": False, "tracking.uri": "",
        "tracking.image_every": 0, "tracking.run_name": name}, source="bench")


def bench_trl(cfg: Config, model_path: str, steps: int, rounds: int = 3, modes: list[str] | None = None) -> dict:
    """``rounds`` rounds of omnigrpo in each of ``modes`` (default: the config's own placement), then TRL."""
    import ray

    from omnigrpo.cluster import actors

    names = modes or [cfg.cluster.placement]
    configs = mode_configs(cfg, names)
    trl = trl_runner(cfg, model_path, steps)
    root = Path(cfg.run.dir) / "bench"
    ours: dict[str, list[dict]] = {name: [] for name in names}
    theirs: list[dict] = []
    sequence: list[dict] = []
    for r in range(1, rounds + 1):
        started = not ray.is_initialized()
        actors.connect(cfg)  # one Ray session for a round's omnigrpo runs; each run spawns and frees its actors
        try:
            for name in names:
                run_dir = root / f"round-{r}" / f"omnigrpo-{name}"
                ours[name].append(run_omnigrpo(run_config(configs[name], model_path, steps, run_dir,
                                                          f"bench-{name}-round-{r}")))
                sequence.append({"round": r, "run": f"omnigrpo/{name}"})
        finally:
            if started:  # TRL never shares the cores with Ray's processes
                ray.shutdown()
        theirs.append(trl(str(root / f"round-{r}" / "trl")))
        sequence.append({"round": r, "run": "trl"})
    ro = cfg.rollout
    settings = {"prompts_per_step": ro.prompts_per_step, "group_size": ro.group_size, "lr": cfg.trainer.lr,
                "beta": cfg.trainer.kl_coef, "temperature": ro.temperature, "seed": cfg.run.seed,
                "rewards": [s.name for s in cfg.rewards]}
    return {**summarise(ours, theirs, sequence, steps, names), "settings": settings}


def summarise(ours: dict[str, list[dict]], theirs: list[dict], sequence: list[dict], steps: int,
              names: list[str]) -> dict:
    """Per-round records -> the report: spreads over rounds, stage medians, ratios to TRL."""
    trl = {"samples_per_s": spread([x["samples_per_s"] for x in theirs]),
           "reward": spread([x["reward"] for x in theirs]),
           "max_non_image_tokens": max(x["max_non_image_tokens"] for x in theirs), "runs": theirs}
    modes = {}
    for name, runs in ours.items():
        stages = {k: float(np.median([x["stages"][k] for x in runs])) for k in runs[0]["stages"]}
        speed = spread([x["samples_per_s"] for x in runs])
        modes[name] = {"overrides": MODES[name], "samples_per_s": speed, "reward": spread([x["reward"] for x in runs]),
                       "stages": stages, "vs_trl": speed["median"] / trl["samples_per_s"]["median"], "runs": runs}
    return {"steps": steps, "rounds": len(theirs), "modes": names, "reward_window": REWARD_WINDOW,
            "sequence": sequence, "omnigrpo": modes, "trl": trl}


def table_lines(t: dict) -> list[str]:
    """Markdown: samples/s and reward per side and mode, then where each omnigrpo mode's step goes."""
    lines = ["", f"GRPO, {t['steps']} steps per run, {t['rounds']} round(s) of omnigrpo ({', '.join(t['modes'])}) "
             f"then TRL GRPOTrainer; medians over rounds, reward = mean of the last {t['reward_window']} steps",
             "| trainer | samples/s | min | max | reward | vs TRL |", "|---|---|---|---|---|---|"]
    rows = [(f"omnigrpo {name}", m) for name, m in t["omnigrpo"].items()] + [("TRL", t["trl"])]
    for label, m in rows:
        s, ratio = m["samples_per_s"], m.get("vs_trl")
        lines.append(f"| {label} | {s['median']:.1f} | {s['min']:.1f} | {s['max']:.1f} | {m['reward']['median']:.3f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    lines += ["", "omnigrpo per-step stages (medians after the first step)",
              "| mode | step s | rollout s | reward s | learn s | wait s | sync s | sync MB |",
              "|---|---|---|---|---|---|---|---|"]
    for name, m in t["omnigrpo"].items():
        st = m["stages"]
        lines.append(f"| {name} | {st['step_s']:.3f} | {st['rollout_s']:.3f} | {st['reward_s']:.3f} | "
                     f"{st['learn_s']:.3f} | {st.get('wait_s', 0.0):.3f} | {st['sync_s']:.4f} | "
                     f"{st['sync_bytes'] / 1e6:.2f} |")
    return lines
