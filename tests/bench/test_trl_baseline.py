"""The TRL baseline runs the same experiment: image codes only, one whole image each, and it trains."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from omnigrpo.bench.trl import frozen_settings, grpo_args, restrict_to_image_codes, run_trl_grpo
from omnigrpo.config.schema import ModelConfig
from omnigrpo.rewards.registry import build_reward
from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.rollout.families.codebook import PatchCodebook
from omnigrpo.rollout.sampler import SamplingParams, sample_images, sequence_logprobs
from omnigrpo.worlds import shapes
from omnigrpo.worlds.world import prompts_of


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory):
    """A random tiny policy checkpoint (no SFT: the baseline's plumbing, not its learning, is under test)."""
    rng = np.random.default_rng(0)
    _, images = shapes.sample_pairs(shapes.train_items(), 32, rng)
    codebook = PatchCodebook.fit(images, 32, seed=0)
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    path = tmp_path_factory.mktemp("tiny_policy")
    WorldPolicy.create(cfg, codebook, seed=0).save_pretrained(path)
    return path


def test_image_only_head_matches_omnigrpo_logprobs(tiny_policy_dir):
    """TRL's fused log-probs under the biased head equal omnigrpo's image-masked log-probs."""
    policy = WorldPolicy.from_pretrained(tiny_policy_dir)
    temperature = 0.8
    batch = policy.prompt_batch(["a red circle at the top left", "a blue square at the bottom right"])
    codes, _ = sample_images(policy.lm(), batch, SamplingParams(), torch.Generator().manual_seed(0))
    ours, _ = sequence_logprobs(policy.lm(), batch, codes, SamplingParams(temperature=temperature))

    restrict_to_image_codes(policy.model, policy.space)
    add_fused_lm_head(policy.model, temperature=temperature, outputs=("log_probs", "entropy"))
    ids = torch.cat([batch.ids, codes + policy.space.offset], -1)
    mask = torch.cat([batch.mask, torch.ones_like(codes)], -1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : batch.ids.shape[1]] = -100
    out = policy.model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    theirs = out.log_probs[:, -codes.shape[1] :]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(out.entropy).all()


def test_trl_grpo_two_steps(tiny_policy_dir, tmp_path):
    prompts, metadata = prompts_of(shapes.train_items())
    started = time.perf_counter()
    result = run_trl_grpo(str(tiny_policy_dir), prompts, metadata, build_reward("shapes"), steps=2,
                          prompts_per_step=2, group_size=4, lr=1e-3, beta=0.02, temperature=1.0, seed=0,
                          out_dir=str(tmp_path / "trl"), threads=2)
    assert result["steps"] == 2 and result["samples"] == 16
    elapsed = time.perf_counter() - started
    # the rate's own time (the two steps, without start-up) lies within the call's wall time
    assert 1e-3 * result["samples"] < result["samples"] / result["samples_per_s"] <= elapsed
    assert len(result["reward_curve"]) == 2
    assert all(0.0 <= r <= 1.0 for r in result["reward_curve"])
    assert result["param_delta"] > 0
    assert result["completions"] == 16
    assert result["max_non_image_tokens"] == 0
    assert json.loads((tmp_path / "trl" / "trl_grpo.json").read_text())["args"] == result["args"]
    frozen = frozen_settings()
    assert {k: result["args"][k] for k in frozen} == frozen  # the trainer ran with the file's settings
    args = result["args"]
    assert (args["learning_rate"], args["beta"], args["num_generations"], args["max_steps"]) == (1e-3, 0.02, 4, 2)


def test_the_frozen_settings_cannot_be_derived_too(tmp_path):
    with pytest.raises(ValueError, match="trl_settings.yaml sets loss_type, which the benchmark derives"):
        grpo_args({"output_dir": str(tmp_path), "loss_type": "grpo"})
