"""``omnigrpo bench``: each part runs tiny, and its references sample what ours samples."""

import json

import numpy as np
import pytest
import torch
from conftest import leftovers

from omnigrpo.bench.generate import hf_generate, hf_generate_batched, interleaved_medians
from omnigrpo.bench.harness import run_bench
from omnigrpo.bench.protocol import STAGES, bench_trl, table_lines
from omnigrpo.bench.sides import shown, user_env
from omnigrpo.bench.trl import frozen_settings
from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.rollout.sampler import SamplingParams, sample_images
from omnigrpo.worlds import shapes


def test_the_rollout_sides_are_timed_in_turn():
    calls = []
    medians = interleaved_medians({"ours": lambda: calls.append("ours"), "hf": lambda: calls.append("hf")}, repeats=3)
    assert calls == ["ours", "hf"] + ["ours", "hf"] * 3  # one warm-up each, then alternating rounds
    assert set(medians) == {"ours", "hf"} and all(m >= 0 for m in medians.values())


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_generate_baselines_draw_the_same_images_greedily(sft_path, cfg_scale):
    """With top-k 1 every sampler must pick the mode of the same guided distribution, token after token."""
    policy = WorldPolicy.from_pretrained(sft_path)
    batch = policy.prompt_batch([s.prompt for s in shapes.held_out_items()[:4]])
    params = SamplingParams(top_k=1, cfg_scale=cfg_scale)
    ours, _ = sample_images(policy.lm(), batch, params)
    assert torch.equal(hf_generate(policy.model, batch, policy.space, params), ours)
    if params.guided:
        assert torch.equal(hf_generate_batched(policy.model, batch, policy.space, params), ours)


@pytest.mark.usefixtures("ray_cluster")
def test_every_part_runs_and_reports(tiny_config, sft_path, tmp_path, capsys):
    cfg = tiny_config(f"model.path={sft_path}")
    results = run_bench(cfg, ["rollout", "rewards", "sync"], steps=2, repeats=1, out=str(tmp_path / "b.json"))
    assert not leftovers()
    assert json.loads((tmp_path / "b.json").read_text())["world"] == "shapes"

    rollout = results["rollout"]["settings"]
    assert set(rollout) == {"cfg=1", "cfg=3"} and "hf_generate_batched_cfg" in rollout["cfg=3"]
    for row in rollout.values():
        assert all(m["tokens_per_s"] > 0 for k, m in row.items() if not k.startswith("speedup") and k != "kernels")
        assert row["speedup_vs_hf_generate"] > 0
        kernels = row["kernels"]
        assert kernels["omnigrpo"]["total"] < min(v["total"] for k, v in kernels.items() if k != "omnigrpo")
        assert all(v["total"] == v["outside"] + v["layers"] * v["per_layer"] for v in kernels.values())

    n_params = sum(p.numel() for p in WorldPolicy.from_pretrained(sft_path).model.parameters())
    paths = results["sync"]["paths"]
    assert set(paths) == {"object store", "broadcast, bucketed", "broadcast, per tensor"}
    for m in paths.values():
        assert m["bytes"] == 4 * n_params and m["s_per_gb"] > 0
        assert m["rollouts_match_learner"] and m["still_broadcasting"]  # no silent fallback to the object store
    assert results["rewards"]["shapes"]["images_per_s"] > 0
    out = capsys.readouterr().out
    assert "s/GB" in out and "| shapes |" in out and "kernels/step" in out


@pytest.mark.cluster  # each omnigrpo side starts a cluster of its own
def test_the_trl_comparison_runs_each_side_in_a_fresh_process(tiny_config, sft_path):
    cfg = tiny_config(f"model.path={sft_path}")
    t = bench_trl(cfg, str(sft_path), steps=2, rounds=1, modes=["colocated"], settle_s=1.0, rows={"trl": ""})
    check_trl_protocol(t, cfg)  # the PASSIVE row is the same run with one variable more (test_protocol.py)
    out = "\n".join(table_lines(t))
    assert "| omnigrpo colocated |" in out and "| TRL |" in out and "| TRL, OMP_WAIT_POLICY=PASSIVE |" not in out
    assert "sync MB" in out and "CPU busy before each run" in out


def check_trl_protocol(t: dict, cfg) -> None:
    """A round of colocated, then TRL, each a fresh process; every figure from the per-round runs; TRL as frozen,
    under the user's environment."""
    assert t["sequence"] == [{"round": 1, "run": run} for run in ["omnigrpo/colocated", "trl"]]
    trl = t["trl"]
    for side in [*t["omnigrpo"].values(), trl]:
        (run,) = side["runs"]
        assert run["samples"] == 2 * cfg.batch_size and run["samples_per_s"] > 0
        assert len(run["reward_curve"]) == 2 and run["reward"] == pytest.approx(np.mean(run["reward_curve"]))
        for key in ("samples_per_s", "reward"):  # each figure's spread is over the rounds' own runs, in order
            assert side[key]["rounds"] == [run[key]] and side[key]["median"] == run[key]
        assert {"leftover_processes", "cpu_busy_percent", "settled"} <= set(side["before"][0])
    for mode in t["omnigrpo"].values():
        assert (mode["vs_trl"] > 1) == (mode["samples_per_s"]["median"] > trl["samples_per_s"]["median"])
        ratio = mode["runs"][0]["samples_per_s"] / trl["runs"][0]["samples_per_s"]
        assert mode["vs_trl_rounds"] == [pytest.approx(ratio)]
        # the stages are parts of a step: they add up to no more than it
        stages = mode["stages"]
        assert 0 < sum(stages[f"{s}_s"] for s in STAGES if s != "step") <= stages["step_s"] * 1.05, stages
    assert t["omnigrpo"]["colocated"]["stages"]["sync_bytes"] > 0  # the weights went to the rollout actor
    assert trl["max_non_image_tokens"] == 0 and t["settings"]["group_size"] == cfg.rollout.group_size
    # TRL's process saw the user's environment, nothing the omnigrpo command set for itself; its twin, PASSIVE
    assert trl["env"] == shown(user_env())
    for key in ("OMP_WAIT_POLICY", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        assert trl["runs"][0]["env_seen"].get(key) == shown(user_env()).get(key), key  # what the user gave, if any
    args = trl["runs"][0]["args"]
    assert {k: args[k] for k in frozen_settings()} == frozen_settings()  # the file is what the trainer used
    assert (args["learning_rate"], args["beta"], args["temperature"], args["num_generations"], args["max_steps"],
            args["seed"]) == (cfg.trainer.lr, cfg.trainer.kl_coef, cfg.rollout.temperature, cfg.rollout.group_size,
                              2, cfg.run.seed)


def test_rollout_bench_on_a_tiny_janus_made_by_the_cli(tiny_config, tmp_path, capsys):
    from omnigrpo.cli import main

    assert main(["tiny", "janus", str(tmp_path / "janus")]) == 0
    assert main(["tiny", "chameleon", str(tmp_path / "x")]) == 2 and "no tiny builder" in capsys.readouterr().err
    cfg = tiny_config("model.family=janus", f"model.path={tmp_path / 'janus'}")
    rows = run_bench(cfg, ["rollout"], repeats=1, out=str(tmp_path / "b.json"))["rollout"]["settings"]
    assert set(rows["cfg=1"]) == {"omnigrpo"}  # Janus's own generate cannot run without guidance
    assert rows["cfg=3"]["speedup_vs_hf_generate"] > 0 and rows["cfg=3"]["hf_generate"]["tokens_per_s"] > 0


def test_hf_generate_draws_what_we_draw_on_emu3_greedily(tmp_path):
    """Emu3: the baseline also forces the end-of-line after every row; with top-k 1 both pick the same codes."""
    from omnigrpo.rollout.families import tiny
    from omnigrpo.rollout.loader import load_policy

    policy = load_policy("emu3", tiny.build("emu3", tmp_path / "emu3"))
    batch = policy.prompt_batch(["a red circle", "a cat in the garden"])
    params = SamplingParams(top_k=1)
    ours, _ = sample_images(policy.lm(), batch, params)
    assert torch.equal(hf_generate(policy.model, batch, policy.space, params), ours)
