"""The omnigrpo-vs-TRL comparison (``omnigrpo bench --parts trl``), run by one fixed protocol.

Why: a single run of each side on a shared machine says little, and a figure nobody can repeat says less. Round r
runs omnigrpo once in each requested mode (:data:`MODES`), then TRL (settings frozen in ``trl_settings.yaml``)
under the user's environment and again under omnigrpo's ``OMP_WAIT_POLICY``, each a fresh process
(``omnigrpo.bench.sides``) on a settled machine. Reported per side: median samples/s over rounds with the per-round
values and ratios to TRL, reward, omnigrpo's stage times and each side's environment (BENCHMARKS.md section 2).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from omnigrpo.config.loader import ConfigError, load_config, to_dict, with_overrides
from omnigrpo.config.schema import Config
from omnigrpo.rewards.worker import RewardWorker
from omnigrpo.worlds import registry as worlds

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

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


def omnigrpo_record(client: MlflowClient, run_id: str, batch_size: int) -> dict:
    """A finished GRPO run's samples/s over its training steps of ``batch_size`` samples, its reward and its median
    stage times after step 1, read from its MLflow store (``client``'s)."""
    from omnigrpo.app.tracking import history

    keys = [*(f"timing/{s}_s" for s in STAGES), "sync/bytes", "reward/total/mean"]
    h = {k: [m.value for m in history(client, run_id, k)] for k in keys}
    warm = slice(1, None) if len(h["timing/step_s"]) > 1 else slice(None)  # the first step pays for warm-up
    wall = float(sum(h["timing/step_s"]))
    samples = len(h["timing/step_s"]) * batch_size
    profile = {f"{s}_s": float(np.median(h[f"timing/{s}_s"][warm])) for s in STAGES}
    return {"samples": samples, "wall_s": wall, "samples_per_s": samples / wall,
            "reward": window_mean(h["reward/total/mean"]), "reward_curve": h["reward/total/mean"],
            "stages": {**profile, "sync_bytes": float(np.median(h["sync/bytes"][warm]))}}


def trl_runner(cfg: Config, model_path: str, steps: int):
    """``run(out_dir) -> record``: one TRL GRPO run of the same experiment (prompts and judge built once)."""
    from omnigrpo.bench.trl import harness_settings, run_trl_grpo

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
                           threads=harness_settings()["torch_threads"] or None)
        return {"samples": out["samples"], "wall_s": out["wall_s"], "samples_per_s": out["samples_per_s"],
                "reward": window_mean(out["reward_curve"]), "reward_curve": out["reward_curve"],
                "max_non_image_tokens": out["max_non_image_tokens"], "args": out["args"], "threads": out["threads"]}

    return run


def run_config(cfg: Config, model_path: str, steps: int, run_dir: Path, name: str) -> Config:
    """A mode's config as the benchmark runs it: the given weights and steps, no evaluations, checkpoints
    or sample grids, its own run directory and MLflow store."""
    return with_overrides(cfg, {
        "run.dir": str(run_dir), "run.resume": False, "model.path": model_path, "trainer.steps": steps,
        "trainer.save_every": 0, "eval.every": 0, "eval.held_out": False, "tracking.uri": "",
        "tracking.image_every": 0, "tracking.run_name": name}, source="bench")


TRL_ROWS = {"trl": "", "trl_passive": "PASSIVE"}
"""TRL's rows: the user's environment, and the same with omnigrpo's ``OMP_WAIT_POLICY`` (what the setting does)."""


def bench_trl(cfg: Config, model_path: str, steps: int, rounds: int = 3, modes: list[str] | None = None,
              settle_s: float = 60.0, rows: dict[str, str] = TRL_ROWS) -> dict:
    """``rounds`` rounds of omnigrpo in each of ``modes`` (default: the config's own placement), then TRL as
    each of ``rows`` (:data:`TRL_ROWS`; ``trl`` first); every run in a fresh process, after waiting up to
    ``settle_s`` for an idle CPU."""
    from omnigrpo.app.tracking import Tracker
    from omnigrpo.bench.sides import omnigrpo_side, trl_side

    names = modes or [cfg.cluster.placement]
    configs = mode_configs(cfg, names)
    root = Path(cfg.run.dir).resolve() / "bench"
    ours: dict[str, list[dict]] = {name: [] for name in names}
    theirs: dict[str, list[dict]] = {row: [] for row in rows}
    sequence: list[dict] = []
    for r in range(1, rounds + 1):
        for name in names:
            run = run_config(configs[name], model_path, steps, root / f"round-{r}" / f"omnigrpo-{name}",
                             f"bench-{name}-round-{r}")
            Path(run.run.dir).mkdir(parents=True, exist_ok=True)
            config = Path(run.run.dir) / "bench_config.yaml"
            config.write_text(yaml.safe_dump(to_dict(run), sort_keys=False))
            side = omnigrpo_side(config, Path(run.run.dir) / "output.log", settle_s)
            record = omnigrpo_record(Tracker.from_config(run).client, side["run_id"], run.batch_size)
            ours[name].append({**record, "env": side["env"], "before": side["before"]})
            sequence.append({"round": r, "run": f"omnigrpo/{name}"})
        trl_config = root / f"round-{r}" / "trl_config.yaml"
        trl_config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        for row, policy in rows.items():
            theirs[row].append(trl_side(trl_config, model_path, steps, root / f"round-{r}" / row, settle_s, policy))
            sequence.append({"round": r, "run": row})
    ro = cfg.rollout
    settings = {"prompts_per_step": ro.prompts_per_step, "group_size": ro.group_size, "lr": cfg.trainer.lr,
                "beta": cfg.trainer.kl_coef, "temperature": ro.temperature, "seed": cfg.run.seed,
                "rewards": [s.name for s in cfg.rewards]}
    return {**summarise(ours, theirs, sequence, steps, names), "settings": settings}


def summarise(ours: dict[str, list[dict]], theirs: dict[str, list[dict]], sequence: list[dict], steps: int,
              names: list[str]) -> dict:
    """Per-round records -> the report: spreads over rounds, per-round ratios, stage medians, environments."""
    trl = {row: _side(runs) | {"max_non_image_tokens": max(x["max_non_image_tokens"] for x in runs)}
           for row, runs in theirs.items()}
    base = trl["trl"]
    modes = {}
    for name, runs in ours.items():
        stages = {k: float(np.median([x["stages"][k] for x in runs])) for k in runs[0]["stages"]}
        side = _side(runs)
        modes[name] = {"overrides": MODES[name], **side, "stages": stages,
                       "vs_trl": side["samples_per_s"]["median"] / base["samples_per_s"]["median"],
                       "vs_trl_rounds": [o["samples_per_s"] / t["samples_per_s"]
                                         for o, t in zip(runs, base["runs"], strict=True)]}
    return {"steps": steps, "rounds": len(base["runs"]), "modes": names, "reward_window": REWARD_WINDOW,
            "sequence": sequence, "omnigrpo": modes, "trl": base, "trl_passive": trl.get("trl_passive")}


def _side(runs: list[dict]) -> dict:
    """One side's figures over its rounds, with the environment and settling of its first run."""
    return {"samples_per_s": spread([x["samples_per_s"] for x in runs]), "reward": spread([x["reward"] for x in runs]),
            "env": runs[0]["env"], "before": [x["before"] for x in runs], "runs": runs}


def table_lines(t: dict) -> list[str]:
    """Markdown: samples/s, reward and ratios per side and round, where each mode's step goes, each side's
    environment."""
    lines = ["", f"GRPO, {t['steps']} steps per run, {t['rounds']} round(s) of omnigrpo ({', '.join(t['modes'])}) "
             f"then TRL GRPOTrainer, each run a fresh process; medians over rounds, reward = mean of the last "
             f"{t['reward_window']} steps", "| trainer | samples/s | per round | reward | vs TRL | per round |",
             "|---|---|---|---|---|---|"]
    rows = [(f"omnigrpo {name}", m) for name, m in t["omnigrpo"].items()]
    rows += [("TRL", t["trl"])] + ([("TRL, OMP_WAIT_POLICY=PASSIVE", t["trl_passive"])] if t["trl_passive"] else [])
    for label, m in rows:
        s, ratio = m["samples_per_s"], m.get("vs_trl")
        per_round = ", ".join(f"{v:.1f}" for v in s["rounds"])
        ratios = ", ".join(f"{v:.2f}x" for v in m.get("vs_trl_rounds", []))
        lines.append(f"| {label} | {s['median']:.1f} | {per_round} | {m['reward']['median']:.3f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} | {ratios} |")
    lines += ["", "omnigrpo per-step stages (medians after the first step)",
              "| mode | step s | rollout s | reward s | learn s | wait s | sync s | sync MB |",
              "|---|---|---|---|---|---|---|---|"]
    for name, m in t["omnigrpo"].items():
        st = m["stages"]
        lines.append(f"| {name} | {st['step_s']:.3f} | {st['rollout_s']:.3f} | {st['reward_s']:.3f} | "
                     f"{st['learn_s']:.3f} | {st.get('wait_s', 0.0):.3f} | {st['sync_s']:.4f} | "
                     f"{st['sync_bytes'] / 1e6:.2f} |")
    lines += ["", "environment each side started under (thread and omnigrpo variables; the omnigrpo command adds "
              "its own, e.g. OMP_WAIT_POLICY=PASSIVE, as it does for a user)"]
    for label, m in rows:
        busy = ", ".join(f"{b['cpu_busy_percent']:.0f}%" for b in m["before"])
        lines.append(f"- {label}: {m['env'] or '(none set)'}; CPU busy before each run: {busy}")
    return lines


def trl_record(config: str, model_path: str, steps: int, out_dir: str) -> dict:
    """One TRL run of ``config``'s experiment (this process being a fresh one); writes ``record.json``."""
    from omnigrpo.bench.sides import shown

    record = {**trl_runner(load_config(config), model_path, steps)(out_dir), "env_seen": shown(dict(os.environ))}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "record.json").write_text(json.dumps(record))
    return record


if __name__ == "__main__":  # python -m omnigrpo.bench.protocol CONFIG MODEL_PATH STEPS OUT_DIR (bench.sides)
    trl_record(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
