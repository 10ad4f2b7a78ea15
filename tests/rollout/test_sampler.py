"""Sampler tests on a tiny random shapes policy (the real Qwen2 class)."""

import numpy as np
import pytest
import torch

from omnigrpo.config.schema import ModelConfig
from omnigrpo.rollout.engine import decode_attention
from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.rollout.families.codebook import PatchCodebook
from omnigrpo.rollout.sampler import (
    SamplingParams,
    draw,
    exponential_race,
    guided_logprobs,
    inverse_cdf,
    sample_images,
    sequence_logprobs,
)
from omnigrpo.worlds import shapes

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def policy():
    _, images = shapes.sample_pairs(shapes.train_items(), 64, np.random.default_rng(0))
    return WorldPolicy.create(TINY, PatchCodebook.fit(images, 32, seed=0), seed=0)


def test_image_head_is_the_lm_head_restricted_to_image_codes(policy):
    hidden = torch.randn(2, 3, 32)
    full = policy.model.lm_head(hidden)
    lo, k = policy.space.offset, policy.space.num_codes
    head = policy.lm().head(hidden)
    assert head.shape == (2, 3, k) and lo > 0
    torch.testing.assert_close(head, full[..., lo : lo + k])


@pytest.mark.parametrize("method", [exponential_race, inverse_cdf, draw], ids=["race", "inverse-cdf", "draw"])
def test_draws_follow_the_distribution_and_never_a_filtered_code(method):
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]]).repeat(20000, 1)
    codes = method(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(codes, minlength=6).float() / len(codes)
    assert freq[[0, 2, 5]].sum() == 0
    assert torch.allclose(freq, probs[0], atol=0.015)


def test_the_inverse_cdf_never_passes_the_last_code_with_mass_when_the_total_falls_short():
    probs = torch.tensor([[0.3, 0.3, 0.39999, 0.0, 0.0]]).repeat(20000, 1)  # sums to 0.99999
    codes = inverse_cdf(probs, torch.Generator().manual_seed(1))
    assert codes.max() == 2 and codes.min() == 0


def test_sampler_never_emits_a_text_token_even_when_text_logits_dominate(policy):
    with torch.no_grad():
        head = policy.model.lm_head.weight
        saved = head.clone()
        head[: policy.space.offset] *= 1000.0  # text tokens would win any unmasked sample
    try:
        batch = policy.prompt_batch(["a red circle at the top left"] * 3)
        gen = torch.Generator().manual_seed(0)
        codes, logps = sample_images(policy.lm(), batch, SamplingParams(), gen)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert codes.shape == (3, 64) and codes.min() >= 0 and codes.max() < policy.space.num_codes
    assert torch.isfinite(logps).all() and (logps <= 0).all()


def test_top_k_top_p_min_p_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda **kw: torch.isfinite(guided_logprobs(logits, None, SamplingParams(**kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, then 0.8 > 0.7 stops
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(min_p=0.2) == [True, True, True, False]  # threshold 0.1
    renorm = guided_logprobs(logits, None, SamplingParams(top_k=2)).exp()[0, :2]
    assert renorm.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8])


def test_temperature_and_guidance_formula():
    cond, uncond = torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0]])
    lp = guided_logprobs(cond, uncond, SamplingParams(cfg_scale=3.0, temperature=0.5))
    expected = torch.log_softmax((uncond + 3.0 * (cond - uncond)) / 0.5, -1)
    assert torch.allclose(lp, expected)


def test_sampling_follows_the_returned_distribution():
    # With a one-token image and a fixed distribution, empirical frequencies match exp(logprob).
    logits = torch.tensor([0.0, 1.0, 2.0])
    lp = guided_logprobs(logits, None, SamplingParams(temperature=2.0))
    draws = draw(lp.exp().repeat(20000, 1), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / 20000
    assert torch.allclose(freq, lp.exp(), atol=0.015)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(cfg_scale=3.0),
        SamplingParams(cfg_scale=2.0, temperature=0.8, top_k=20, top_p=0.9, min_p=0.03),
    ],
    ids=["plain", "cfg", "cfg+filters"],
)
def test_rollout_logprobs_equal_learner_recomputation(policy, params):
    # prompts of different lengths exercise left padding and position ids
    prompts = ["a red circle at the top left", "a blue square", "green", "a yellow triangle at the bottom right"]
    batch = policy.prompt_batch(prompts)
    assert (batch.mask == 0).any()
    codes, rollout_lp = sample_images(policy.lm(), batch, params, torch.Generator().manual_seed(1))
    learner_lp, ent = sequence_logprobs(policy.lm(), batch, codes, params)
    assert rollout_lp.dtype == torch.float32
    assert (rollout_lp - learner_lp).abs().max().item() < 1e-5
    assert ent.shape == codes.shape and (ent >= 0).all()


def test_guided_logprobs_differ_from_the_conditional_branch(policy):
    batch = policy.prompt_batch(["a red circle at the top left"] * 2)
    codes, _ = sample_images(policy.lm(), batch, SamplingParams(), torch.Generator().manual_seed(2))
    plain, _ = sequence_logprobs(policy.lm(), batch, codes, SamplingParams())
    guided, _ = sequence_logprobs(policy.lm(), batch, codes, SamplingParams(cfg_scale=4.0))
    assert (plain - guided).abs().max().item() > 1e-3


def test_unconditional_prompt_drops_only_the_text(policy):
    batch = policy.prompt_batch(["a red circle at the top left"])
    tok = policy.tokenizer
    assert batch.uncond_ids.shape == batch.ids.shape
    assert tok.convert_ids_to_tokens(batch.uncond_ids[0].tolist()) == ["<bos>"] + ["<pad>"] * 7 + ["<som>"]


def test_save_and_load_round_trip(policy, tmp_path):
    policy.save_pretrained(tmp_path)
    loaded = WorldPolicy.from_pretrained(tmp_path)
    assert loaded.space == policy.space
    for a, b in zip(loaded.model.parameters(), policy.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_loading_something_else_fails_with_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a built-in world policy checkpoint"):
        WorldPolicy.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_decode_attention_equals_sdpa_over_a_masked_cache(dtype):
    gen = torch.Generator().manual_seed(0)
    b, hkv, g, d, n = 3, 2, 4, 16, 11
    q, keys, values = (torch.randn(shape, generator=gen).to(dtype) for shape in
                       ((b, hkv, g, d), (b, hkv, n, d), (b, hkv, n, d)))
    bias = torch.zeros(b, hkv, 1, n, dtype=dtype)
    bias[0, :, :, :4] = float("-inf")  # a left-padded row
    got = decode_attention(q, keys, values, bias, d ** -0.5)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), keys.float(), values.float(),
                                                            attn_mask=bias.float(), scale=d ** -0.5)
    assert got.dtype == dtype and got.shape == (b, hkv, g, d)
    torch.testing.assert_close(got.float(), want, **({} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}))


def test_sampling_hands_back_ordinary_tensors_and_leaves_the_weights_loadable():
    _, images = shapes.sample_pairs(shapes.train_items(), 16, np.random.default_rng(1))
    policy = WorldPolicy.create(TINY, PatchCodebook.fit(images, 32, seed=1), seed=1)  # its own: weights change here
    lm = policy.lm()
    batch = policy.prompt_batch(["a red circle", "a blue square"])
    codes, logps = sample_images(lm, batch, SamplingParams(), torch.Generator().manual_seed(0))
    assert not codes.is_inference() and not logps.is_inference()
    assert not any(p.is_inference() for p in policy.model.parameters())
    state = {k: v + 0.01 for k, v in policy.model.state_dict().items()}
    policy.model.load_state_dict(state)  # a weight sync writes the packed weights in place, outside inference mode
    torch.testing.assert_close(lm.packed[0][0][0], state["model.layers.0.self_attn.q_proj.weight"][0])
    lp, _ = sequence_logprobs(lm, batch, codes, SamplingParams())  # the learner gathers with the sampled codes
    lp.sum().backward()
    assert policy.model.lm_head.weight.grad is not None
