"""``omnigrpo bench``: each part runs tiny, and its references sample what ours samples."""

import json

import pytest
import ray
import torch

from omnigrpo.bench.generate import hf_generate, hf_generate_batched
from omnigrpo.bench.harness import run_bench
from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.rollout.sampler import SamplingParams, sample_images
from omnigrpo.worlds import shapes


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


def test_every_part_runs_and_reports(tiny_config, sft_path, tmp_path, capsys):
    cfg = tiny_config(f"model.path={sft_path}")
    results = run_bench(cfg, ["rollout", "rewards", "sync", "trl"], steps=2, repeats=1, out=str(tmp_path / "b.json"))
    assert not ray.is_initialized()
    assert json.loads((tmp_path / "b.json").read_text())["world"] == "shapes"

    rollout = results["rollout"]["settings"]
    assert set(rollout) == {"cfg=1", "cfg=3"} and "hf_generate_batched_cfg" in rollout["cfg=3"]
    for row in rollout.values():
        assert all(m["tokens_per_s"] > 0 for k, m in row.items() if not k.startswith("speedup"))
        assert row["speedup_vs_hf_generate"] > 0

    trl = results["trl"]
    for side in ("omnigrpo", "trl"):
        assert trl[side]["samples"] == 2 * cfg.batch_size and trl[side]["samples_per_s"] > 0
        assert len(trl[side]["reward_curve"]) == 2 and all(0 <= r <= 1 for r in trl[side]["reward_curve"])
    assert trl["trl"]["max_non_image_tokens"] == 0 and trl["speedup_samples_per_s"] > 0

    n_params = sum(p.numel() for p in WorldPolicy.from_pretrained(sft_path).model.parameters())
    paths = results["sync"]["paths"]
    assert set(paths) == {"object store", "broadcast, bucketed", "broadcast, per tensor"}
    for m in paths.values():
        assert m["bytes"] == 4 * n_params and m["s_per_gb"] > 0
        assert m["rollouts_match_learner"] and m["still_broadcasting"]  # no silent fallback to the object store
    assert results["rewards"]["shapes"]["images_per_s"] > 0
    out = capsys.readouterr().out
    assert "omnigrpo / TRL samples/s" in out and "s/GB" in out and "| shapes |" in out


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


def test_the_placement_part_compares_colocated_and_hybrid(tiny_config, sft_path, tmp_path, capsys):
    cfg = tiny_config(f"model.path={sft_path}")
    results = run_bench(cfg, ["placement"], steps=3, repeats=1, out=str(tmp_path / "b.json"))
    assert not ray.is_initialized()
    modes = results["placement"]["modes"]
    assert set(modes) == {"colocated", "hybrid"}
    assert modes["hybrid"]["sync_bytes"] == 0 and modes["colocated"]["sync_bytes"] > 0
    assert all(m["samples_per_s"] > 0 and m["step_s"] > 0 for m in modes.values())
    assert "hybrid / colocated samples/s" in capsys.readouterr().out
