"""GRPO math against values computed by hand."""

import math

import pytest
import torch

from omnigrpo.trainers.grpo import (
    advantages,
    aggregate,
    grpo_token_loss,
    normaliser,
    tis_weights,
)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 4.0])
    a = advantages(rewards, 2, torch.ones(6, dtype=torch.bool), scale=True, eps=0.0)
    adv, flat = a.values, a.zero_std_frac
    # group 0: mean 0.5, unbiased std sqrt(0.5); group 1 equal rewards -> 0; group 2: mean 3, std sqrt(2)
    s = math.sqrt(0.5)
    assert adv.tolist() == pytest.approx([0.5 / s, -0.5 / s, 0.0, 0.0, -1 / math.sqrt(2), 1 / math.sqrt(2)])
    assert flat == pytest.approx(1 / 3)


def test_dr_grpo_only_centres():
    adv = advantages(torch.tensor([1.0, 0.0, 2.0, 4.0]), 2, torch.ones(4, dtype=torch.bool), scale=False).values
    assert adv.tolist() == pytest.approx([0.5, -0.5, -1.0, 1.0])


def test_all_equal_group_gives_zero_advantage():
    a = advantages(torch.full((4,), 0.7), 4, torch.ones(4, dtype=torch.bool))
    assert torch.equal(a.values, torch.zeros(4)) and a.zero_std_frac == 1.0


def test_invalid_samples_are_excluded_from_group_statistics():
    rewards = torch.tensor([1.0, 0.0, float("nan"), 3.0, 5.0, 4.0])  # sample 2's required reward failed
    valid = torch.tensor([True, True, False, True, False, False])
    a = advantages(rewards, 3, valid, scale=False)
    # group 1 keeps one valid sample: no spread to learn from
    assert a.values.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0, 0.0, 0.0]) and a.zero_std_frac == 0.5


def test_groups_are_contiguous_and_must_divide_the_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        advantages(torch.zeros(6), 4, torch.ones(6, dtype=torch.bool))


def test_advantages_match_a_loop_over_groups():
    """The reshaped computation against the plain per-group definition (unbiased std, valid samples only)."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(40, generator=gen)
    valid = torch.rand(40, generator=gen) > 0.2
    got = advantages(rewards, 8, valid).values
    for g in range(5):
        r, ok = rewards[8 * g:8 * g + 8], valid[8 * g:8 * g + 8]
        want = (r[ok] - r[ok].mean()) / (r[ok].std() + 1e-6)
        assert got[8 * g:8 * g + 8][ok].tolist() == pytest.approx(want.tolist(), abs=1e-6)
        assert (got[8 * g:8 * g + 8][~ok] == 0).all()
    whole = advantages(rewards, 8, torch.ones(40, dtype=torch.bool)).values.view(5, 8)  # all valid: bit for bit
    r = rewards.view(5, 8)
    assert torch.equal(whole, (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6))


def test_clipping_on_both_sides():
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]]))  # ratios 1.5, 1.5, 0.5, 0.5
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    t = grpo_token_loss(logp, old, logp.detach(), adv, clip_eps_low=0.2, clip_eps_high=0.3, kl_coef=0.0)
    # A>0, r=1.5 -> clipped at 1.3; A<0, r=1.5 -> min(-1.5, -1.3) = -1.5 (unclipped, pessimistic)
    # A>0, r=0.5 -> min(0.5, 0.8) = 0.5 (unclipped); A<0, r=0.5 -> min(-0.5, -0.8) = -0.8 (clipped)
    assert t.loss.squeeze(-1).tolist() == pytest.approx([-1.3, 1.5, -0.5, 0.8])
    assert t.clipped.squeeze(-1).tolist() == [True, False, False, True]


def test_clipped_side_has_no_gradient():
    logp = torch.log(torch.tensor([[1.5]])).requires_grad_()
    t = grpo_token_loss(logp, torch.zeros(1, 1), logp.detach(), torch.tensor([1.0]), 0.2, 0.2, 0.0)
    t.loss.sum().backward()
    assert logp.grad.item() == 0.0


def test_k3_kl_by_hand():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    t = grpo_token_loss(logp, logp, ref, torch.tensor([0.0]), 0.2, 0.2, kl_coef=0.1)
    d = math.log(0.25) - math.log(0.5)
    expected_kl = math.exp(d) - d - 1  # 0.5 + ln 2 - 1
    assert t.kl.item() == pytest.approx(expected_kl)
    assert t.loss.item() == pytest.approx(0.1 * expected_kl)
    same = grpo_token_loss(logp, logp, logp, torch.tensor([0.0]), 0.2, 0.2, 0.1)
    assert same.kl.item() == 0.0


def test_token_mean_vs_seq_mean():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # token-mean: (4 + 4) / 5 tokens; seq-mean: (1 + 4) / 2 sequences
    assert aggregate(per_token, mask, "token-mean", normaliser(mask, "token-mean")).item() == pytest.approx(1.6)
    assert aggregate(per_token, mask, "seq-mean", normaliser(mask, "seq-mean")).item() == pytest.approx(2.5)


def test_micro_batches_sum_to_the_mini_batch_mean():
    torch.manual_seed(0)
    per_token, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    for mode in ("token-mean", "seq-mean"):
        norm = normaliser(mask, mode)
        whole = aggregate(per_token, mask, mode, norm)
        parts = sum(aggregate(per_token[i : i + 2], mask[i : i + 2], mode, norm) for i in range(0, 6, 2))
        assert parts.item() == pytest.approx(whole.item())


def test_a_floored_token_adds_no_kl_and_no_nan_gradient():
    from omnigrpo.rollout.sampler import LOGPROB_FLOOR

    raw = torch.tensor([[-40.0, -1.0]], requires_grad=True)
    logp = raw.clamp_min(LOGPROB_FLOOR)  # as gather_logprobs floors it
    ref = torch.tensor([[-3.0, -1.5]])
    t = grpo_token_loss(logp, logp.detach(), ref, torch.tensor([1.0]), 0.2, 0.2, kl_coef=0.1)
    assert t.kl[0, 0].item() == 0.0 and t.kl[0, 1].item() > 0.0
    t.loss.sum().backward()
    assert torch.isfinite(raw.grad).all() and raw.grad[0, 0].item() == 0.0


def test_decoupled_ratio_with_truncated_behaviour_weights_by_hand():
    """Asynchronous rollout's correction: the ratio is taken against the learner's recomputed (proximal) policy,
    and each token's loss weighed by min(exp(proximal - behaviour), cap) against the stale sampler."""
    logp = torch.log(torch.tensor([[1.1, 1.5, 1.0]]))
    proximal = torch.log(torch.tensor([[1.0, 1.0, 3.0]]))
    behaviour = torch.log(torch.tensor([[1.0, 0.8, 1.0]]))
    terms = grpo_token_loss(logp, proximal, logp, torch.tensor([1.0]), 0.2, 0.2, 0.0)
    weights, capped = tis_weights(proximal, behaviour, 2.0)
    # ratios 1.1 (inside the clip), 1.5 -> 1.2 (clipped), 1/3 (below 1 - eps with A > 0: not clipped);
    # behaviour weights 1, 1/0.8 = 1.25, 3 -> capped at 2
    assert torch.allclose(terms.ratio, torch.tensor([[1.1, 1.5, 1 / 3]]))
    assert torch.allclose(weights, torch.tensor([[1.0, 1.25, 2.0]]))
    assert capped.tolist() == [[False, False, True]]
    assert torch.allclose(terms.loss * weights, torch.tensor([[-1.1, -1.5, -2 / 3]]))


def test_kl_weights_scale_each_samples_kl_term():
    logp = torch.full((3, 2), math.log(0.5))
    ref = torch.full((3, 2), math.log(0.25))
    adv = torch.tensor([1.0, 1.0, -1.0])
    plain = grpo_token_loss(logp, logp, ref, adv, 0.2, 0.2, kl_coef=0.1)
    weighed = grpo_token_loss(logp, logp, ref, adv, 0.2, 0.2, 0.1, torch.tensor([1.0, 0.0, 0.5]))
    kl = math.exp(math.log(0.5)) - math.log(0.5) - 1  # per token, as in test_k3_kl_by_hand
    # ratio 1: the surrogate is -A; the KL term 0.1 * w * kl; the logged KL stays unweighted
    assert weighed.loss[:, 0].tolist() == pytest.approx([-1 + 0.1 * kl, -1.0, 1 + 0.05 * kl])
    assert torch.equal(weighed.kl, plain.kl)
    ones = grpo_token_loss(logp, logp, ref, adv, 0.2, 0.2, 0.1, torch.ones(3))
    assert torch.equal(ones.loss, plain.loss)
