"""Each kind of KL reference scores a micro-batch as a hand-made reference does, and asks for each row once."""

from types import SimpleNamespace

import pytest
import torch

from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.rollout.sampler import SamplingParams, sequence_logprobs
from omnigrpo.trainers import adapter, grpo, reference
from omnigrpo.trainers.batch import TrainBatch
from omnigrpo.trainers.distributed import Rank
from omnigrpo.trainers.reference import AdaptersOff, FrozenCopy, NoReference, ShardedCopy

PROMPTS = ["a red circle at the top left", "a blue square at the bottom right", "a green triangle in the middle"] * 2
CPU = SimpleNamespace(device=torch.device("cpu"))


def _batch(policy: WorldPolicy) -> TrainBatch:
    """Six rows of random image codes under the tiny world's prompts."""
    generator = torch.Generator().manual_seed(0)
    n, t = len(PROMPTS), policy.space.tokens_per_image
    codes = torch.randint(policy.space.num_codes, (n, t), generator=generator)
    return TrainBatch(policy.prompt_batch(PROMPTS), codes, torch.zeros(n, t), torch.zeros(n), torch.ones(n, dtype=bool))


@torch.no_grad()
def _scored(module: torch.nn.Module, policy: WorldPolicy, batch: TrainBatch, params: SamplingParams) -> torch.Tensor:
    """The hand-made reference: ``module``'s log-probs ``[N, T]`` of the whole batch in one forward."""
    return sequence_logprobs(policy.lm(module), batch.prompts, batch.codes, params)[0]


def _counted(kind) -> list[int]:
    """Record the size of every micro-batch ``kind`` scores."""
    calls, score = [], kind.logprobs

    def counting(prompts, codes):
        calls.append(len(codes))
        return score(prompts, codes)

    kind.logprobs = counting
    return calls


def test_a_frozen_copy_scores_as_the_start_policy_and_each_row_once(tiny_config, sft_path):
    cfg = tiny_config("trainer.kl_coef=0.1")
    policy, params = WorldPolicy.from_pretrained(sft_path), SamplingParams.of(cfg.rollout)
    batch = _batch(policy)
    start = _scored(policy.model, policy, batch, params)
    frozen = reference.start_copy(cfg.trainer, lambda: policy)
    assert frozen is not policy.model and not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():  # training moves the policy; the copy stays the start policy
        for p in policy.model.parameters():
            p.add_(0.5)
    kind = reference.build(cfg.trainer, policy, params, CPU, frozen, {}, Rank())
    assert type(kind) is FrozenCopy
    calls = _counted(kind)
    table = kind.table(batch)
    first, second = torch.tensor([4, 1]), torch.tensor([1, 2])
    table.score(first)
    table.score(second)  # row 1 is scored already
    assert calls == [2, 1]
    assert torch.allclose(table.of(first, torch.zeros(2, 1)), start[first], atol=1e-6)
    assert torch.allclose(table.of(second, torch.zeros(2, 1)), start[second], atol=1e-6)


def test_a_sharded_copy_scores_every_row_before_any_micro_batch_asks(tiny_config, sft_path):
    """Every rank must run as many forwards as the others (ZeRO-3 gathers each layer), so the whole batch is scored
    up front in equal micro-batches; here one rank stands for the group."""
    cfg = tiny_config("trainer.kl_coef=0.1")
    policy, params = WorldPolicy.from_pretrained(sft_path), SamplingParams.of(cfg.rollout)
    batch = _batch(policy)
    frozen = reference.start_copy(cfg.trainer, lambda: policy)
    group = Rank()
    kind = ShardedCopy(policy, SimpleNamespace(module=frozen), params, lambda n, score: group.gather_rows(n, 4, score))
    calls = _counted(kind)
    table = kind.table(batch)
    assert calls == [4, 2]
    rows = torch.tensor([5, 0, 3])
    table.score(rows)
    assert calls == [4, 2]
    assert torch.allclose(table.of(rows, torch.zeros(3, 1)), _scored(frozen, policy, batch, params)[rows], atol=1e-6)


def test_lora_reference_is_the_policy_with_its_adapters_off(tiny_config, sft_path):
    cfg = tiny_config("trainer.kl_coef=0.1", "trainer.lora_rank=4")
    policy, params = WorldPolicy.from_pretrained(sft_path), SamplingParams.of(cfg.rollout)
    batch = _batch(policy)
    base = _scored(policy.model, policy, batch, params)
    assert reference.start_copy(cfg.trainer, lambda: pytest.fail("LoRA keeps no copy")) is None
    model = adapter.wrap(policy.model, policy.lm().body, 4, 8.0, cfg.trainer.lora_targets)
    with torch.no_grad():  # trained adapters: the adapted policy no longer is the base
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(_scored(adapter.base(model), policy, batch, params), base, atol=1e-3)
    kind = reference.build(cfg.trainer, policy, params, SimpleNamespace(module=model), None, {}, Rank())
    assert type(kind) is AdaptersOff
    table, rows = kind.table(batch), torch.arange(len(PROMPTS))
    table.score(rows)
    assert torch.allclose(table.of(rows, torch.zeros(1)), base, atol=1e-6)
    assert not torch.allclose(_scored(adapter.base(model), policy, batch, params), base, atol=1e-3)  # on again


def test_without_a_kl_term_the_policy_is_its_own_reference(tiny_config):
    cfg = tiny_config("trainer.kl_coef=0.0")
    assert reference.start_copy(cfg.trainer, lambda: pytest.fail("no reference, no copy")) is None
    kind = reference.build(cfg.trainer, None, None, None, None, {}, Rank())
    assert type(kind) is NoReference
    logp = torch.log_softmax(torch.randn(2, 5, 7), -1)[..., 0].requires_grad_()
    rows = torch.tensor([0, 1])
    table = kind.table(None)
    table.score(rows)
    ref = table.of(rows, logp)
    assert torch.equal(ref, logp) and not ref.requires_grad
    terms = grpo.grpo_token_loss(logp, logp.detach(), ref, torch.ones(2), 0.2, 0.2, 0.0)
    assert torch.equal(terms.kl, torch.zeros(2, 5))  # k3 of a policy against itself: exactly 0
