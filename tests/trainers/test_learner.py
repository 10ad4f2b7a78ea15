"""The DeepSpeed learner with the rollout and reward workers as plain classes (no Ray)."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from omnigrpo.config.schema import RewardSpec
from omnigrpo.rewards.worker import RewardWorker
from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.rollout.sampler import SamplingParams, sequence_logprobs
from omnigrpo.rollout.worker import RolloutWorker
from omnigrpo.trainers.batch import TrainBatch
from omnigrpo.trainers.grpo import advantages
from omnigrpo.trainers.learner import Learner
from omnigrpo.trainers.reference import AdaptersOff, FrozenCopy, NoReference, ShardedCopy
from omnigrpo.trainers.tally import merge_ranks
from omnigrpo.worlds import shapes
from omnigrpo.worlds.world import prompts_of


def _metrics(parts) -> dict[str, float]:
    return merge_ranks(parts).metrics


def _workers(cfg, sft_path):
    learner = Learner(cfg.trainer, cfg.model, cfg.rollout, str(sft_path), seed=cfg.run.seed)
    learner.setup(threads=2)
    rollout = RolloutWorker(str(sft_path), SamplingParams.of(cfg.rollout), seed=cfg.run.seed, threads=2)
    rollout.setup()
    reward = RewardWorker(cfg.rewards)
    reward.setup()
    return learner, rollout, reward


def _step(learner, rollout, reward, prompts, metadata, group_size):
    batch = rollout.generate(prompts, metadata, group_size)
    result = reward.score(batch.images, batch.prompts, batch.metadata)
    valid = torch.from_numpy(result.valid)
    adv = advantages(torch.from_numpy(result.total), group_size, valid).values
    part = learner.train_step(TrainBatch(batch.prompt_batch, batch.codes, batch.logprobs, adv, valid))
    metrics = _metrics([part])
    rollout.load_weights(learner.state_dict(), learner.version)
    return float(np.nanmean(result.total)), metrics, batch.version


def test_grpo_raises_the_reward_and_moves_the_weights(tiny_config, sft_path, plugins):
    cfg = tiny_config("trainer.lr=3e-3", "trainer.kl_coef=0.0", "rollout.group_size=8",
                      "rewards=[{name: 'red_reward:redness'}]")
    learner, rollout, reward = _workers(cfg, sft_path)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    prompts, metadata = prompts_of(shapes.train_items()[:4])
    history, versions = [], []
    for _ in range(16):
        mean, metrics, version = _step(learner, rollout, reward, prompts, metadata, 8)
        history.append(mean)
        versions.append(version)
    assert versions == list(range(16))  # every batch drawn with the weights of the previous update
    assert np.mean(history[-3:]) > np.mean(history[:3]) + 0.06, history
    after = learner.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert metrics["learner/grad_norm"] > 0 and metrics["learner/lr"] == pytest.approx(3e-3)
    assert metrics["learner/logprob_mismatch"] < 1e-4  # sampler and learner agree on the same weights


@pytest.mark.parametrize("stage", [0, 3])
def test_weight_sync_gives_the_rollout_identical_weights(tiny_config, sft_path, stage):
    cfg = tiny_config(f"trainer.zero_stage={stage}", "trainer.lr=1e-3", "trainer.kl_coef=0.05",
                      "trainer.loss_agg=seq-mean", "trainer.mini_batches=2", "trainer.epochs=2")
    learner, rollout, reward = _workers(cfg, sft_path)
    start = rollout.checksum()
    prompts, metadata = prompts_of(shapes.train_items()[:4])
    _, metrics, _ = _step(learner, rollout, reward, prompts, metadata, 4)
    assert rollout.version == learner.version == 1
    weights = learner.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in rollout.policy.model.state_dict().items())
    assert rollout.checksum() != start
    assert np.isfinite(metrics["learner/grad_norm"]) and metrics["learner/grad_norm"] > 0
    assert metrics["learner/kl"] >= 0.0 and 0.0 <= metrics["learner/clip_frac"] <= 1.0
    # ZeRO-3: the frozen reference is partitioned like the policy (ZeRO-Inference), not a full copy per rank
    assert type(learner.reference) is (ShardedCopy if stage == 3 else FrozenCopy)
    assert all(hasattr(p, "ds_id") == (stage == 3) for p in learner.reference.module.parameters())


def test_a_batch_with_every_sample_excluded_changes_nothing(tiny_config, sft_path):
    cfg = tiny_config("trainer.lr=1e-2", "trainer.kl_coef=0.0")
    learner, rollout, reward = _workers(cfg, sft_path)
    prompts, metadata = prompts_of(shapes.train_items()[:4])
    _step(learner, rollout, reward, prompts, metadata, 4)  # a real update first: AdamW now has momentum
    batch = rollout.generate(prompts, metadata, 4)
    before = learner.state_dict()
    invalid = torch.zeros(16, dtype=torch.bool)
    update = merge_ranks([learner.train_step(TrainBatch(batch.prompt_batch, batch.codes, batch.logprobs,
                                                        torch.ones(16), invalid))])
    after = learner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert update.skipped and not update.nonfinite and update.version == learner.version == 1
    assert update.metrics == {"learner/skipped_update": 1.0, "learner/nonfinite": 0.0, "learner/staleness": 0.0}
    # an advantage that is infinite in float32 (a reward of 1e39 with unscaled rewards) skips the update too
    for bad in (torch.tensor([math.inf] + [0.5] * 15), torch.tensor([1e39] + [0.5] * 15, dtype=torch.float64)):
        update = merge_ranks([learner.train_step(TrainBatch(batch.prompt_batch, batch.codes, batch.logprobs, bad,
                                                            torch.ones(16, dtype=torch.bool)))])
        assert update.skipped and update.nonfinite and update.metrics["learner/nonfinite"] == 1.0
        assert learner.version == 1
    assert all(torch.equal(before[k], learner.state_dict()[k]) for k in before)


def test_a_micro_batch_with_a_non_finite_loss_is_left_out_and_the_weights_stay_finite(tiny_config, sft_path):
    # a sampler log-prob of -1e30 is finite in float32, so the inputs pass; its ratio exp(logp + 1e30) is not
    cfg = tiny_config("trainer.lr=1e-2", "trainer.micro_batch_size=4", "trainer.old_logprobs=sampler")
    learner, rollout, reward = _workers(cfg, sft_path)
    prompts, metadata = prompts_of(shapes.train_items()[:4])
    batch = rollout.generate(prompts, metadata, 4)
    adv = torch.tensor([-1.0, 1.0] * 8)
    old = batch.logprobs.clone()
    old[0] = -1e30
    before = learner.state_dict()
    update = merge_ranks([learner.train_step(TrainBatch(batch.prompt_batch, batch.codes, old, adv,
                                                        torch.ones(16, dtype=torch.bool)))])
    after = learner.state_dict()
    assert update.dropped_micro_batches == 1 and update.nonfinite and not update.skipped and update.version == 1
    metrics = update.metrics
    assert metrics["learner/dropped_micro_batches"] == 1.0 and metrics["learner/nonfinite"] == 1.0
    assert metrics["learner/skipped_update"] == 0.0 and math.isfinite(metrics["learner/loss"]) and learner.version == 1
    assert all(torch.isfinite(after[k]).all() for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the other three micro-batches learnt


@pytest.mark.parametrize("stage", [0, 2])
def test_micro_batching_does_not_change_the_update(tiny_config, sft_path, stage):
    # Gradient accumulation inside DeepSpeed must give the same step as one big micro-batch,
    # also when the excluded samples fall unevenly over the micro-batches.
    results = []
    for micro in (16, 4):
        cfg = tiny_config(f"trainer.zero_stage={stage}", f"trainer.micro_batch_size={micro}", "trainer.lr=1e-2",
                          "trainer.kl_coef=0.1", "run.seed=5")
        learner, rollout, _ = _workers(cfg, sft_path)
        prompts, metadata = prompts_of(shapes.train_items()[:4])
        batch = rollout.generate(prompts, metadata, 4)  # same seed: same images for both settings
        valid = torch.tensor([True] * 3 + [False] * 5 + [True] * 8)
        adv = torch.linspace(-1.0, 1.0, 16)
        learner.train_step(TrainBatch(batch.prompt_batch, batch.codes, batch.logprobs, adv, valid))
        results.append((batch.codes, learner.state_dict()))
    (codes_a, a), (codes_b, b) = results
    assert torch.equal(codes_a, codes_b)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # steps of lr 1e-2; summation order differs
    assert any(not torch.equal(a[k], WorldPolicy.from_pretrained(sft_path).model.state_dict()[k]) for k in a)


def test_a_zero_kl_weight_takes_the_kl_out_of_the_update(tiny_config, sft_path):
    results = []
    for kl_coef, weights in ((0.5, torch.zeros(16)), (0.0, None)):
        cfg = tiny_config(f"trainer.kl_coef={kl_coef}", "trainer.lr=1e-2", "run.seed=5")
        learner, rollout, _ = _workers(cfg, sft_path)
        prompts, metadata = prompts_of(shapes.train_items()[:4])
        batch = rollout.generate(prompts, metadata, 4)  # same seed: same batch for both
        for _ in range(2):  # the second update starts away from the reference: a KL there to take out
            update = merge_ranks([learner.train_step(TrainBatch(
                batch.prompt_batch, batch.codes, batch.logprobs, torch.linspace(-1.0, 1.0, 16),
                torch.ones(16, dtype=torch.bool), kl_weights=weights))])
        results.append((update.metrics["learner/kl"], learner.state_dict()))
    (kl_a, a), (kl_b, b) = results
    assert kl_a > 0.0 == kl_b  # logged unweighted: the KL was there, and weighed 0 in the loss
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_learner_agrees_with_the_sampler_under_guidance_and_filters(tiny_config, sft_path):
    cfg = tiny_config("rollout.cfg_scale=3.0", "rollout.top_k=20", "rollout.min_p=0.02", "rollout.temperature=0.9",
                      "trainer.mini_batches=2", "trainer.epochs=2", "trainer.micro_batch_size=4")
    learner, rollout, reward = _workers(cfg, sft_path)
    prompts, metadata = prompts_of(shapes.train_items()[:4])
    _, metrics, _ = _step(learner, rollout, reward, prompts, metadata, 4)
    assert metrics["learner/logprob_mismatch"] < 1e-5


def test_reward_specs_reach_the_worker():
    worker = RewardWorker([RewardSpec(name="shapes_strict")])
    assert worker.setup() == ["shapes_strict"]


def test_lora_trains_adapters_only_and_syncs_merged_weights(tiny_config, sft_path, tmp_path, plugins):
    cfg = tiny_config("trainer.lora_rank=8", "trainer.lora_alpha=16", "trainer.lr=1e-2", "trainer.kl_coef=0.0",
                      "rollout.group_size=8", "rewards=[{name: 'red_reward:redness'}]")
    learner, rollout, reward = _workers(cfg, sft_path)
    trainable = [n for n, p in learner.engine.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    assert list(before) == list(rollout.policy.model.state_dict())  # merged: the plain model's names, in order
    prompts, metadata = prompts_of(shapes.train_items()[:4])
    history = []
    for _ in range(12):
        mean, metrics, _ = _step(learner, rollout, reward, prompts, metadata, 8)
        history.append(mean)
    assert np.mean(history[-3:]) > np.mean(history[:3]) + 0.015, history  # slower than full FT, but rising
    after = learner.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = cfg.trainer.lora_targets
    assert changed and all(k.endswith(".weight") and k.split(".")[-2] in targets for k in changed)
    assert "model.embed_tokens.weight" not in changed and "lm_head.weight" not in changed
    assert rollout.checksum() == pytest.approx(learner.checksum(), rel=1e-9)
    assert metrics["learner/logprob_mismatch"] < 1e-4  # the rollout samples the merged adapter's distribution
    path = learner.save_checkpoint(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / Path(path).name / "adapter" / "adapter_config.json").exists()
    saved = WorldPolicy.from_pretrained(path).model.state_dict()
    assert all(torch.equal(saved[k], after[k]) for k in after)


def test_bfloat16_rollout_and_learner(tiny_config, tmp_path):
    """``model.dtype=bfloat16``: half-size weights on both sides, a DeepSpeed bf16 update, a small gap."""
    from omnigrpo.rollout.families import tiny

    path = str(tiny.build("janus", tmp_path / "janus"))
    cfg = tiny_config("model.family=janus", f"model.path={path}", "model.dtype=bfloat16", "rollout.cfg_scale=2",
                      "trainer.lr=1e-2", "rollout.prompts_per_step=2", "trainer.micro_batch_size=4")  # batch 8
    learner = Learner(cfg.trainer, cfg.model, cfg.rollout, path, seed=cfg.run.seed)
    learner.setup(threads=2)
    rollout = RolloutWorker(path, SamplingParams.of(cfg.rollout), seed=0, threads=2, family="janus", dtype="bfloat16")
    rollout.setup()
    assert next(rollout.policy.model.parameters()).dtype == torch.bfloat16
    batch = rollout.generate(["a cat", "a dog"], [{}, {}], 4)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * 2)
    metrics = _metrics([learner.train_step(TrainBatch(batch.prompt_batch, batch.codes, batch.logprobs,
                                                      advantages, torch.ones(8, dtype=torch.bool)))])
    after = learner.state_dict()
    assert next(iter(after.values())).dtype == torch.bfloat16
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert 0 < metrics["learner/logprob_mismatch"] < 0.05  # bf16 kernels differ; fp32 agrees to 1e-5
    rollout.load_weights(after, learner.version)
    assert rollout.checksum() == pytest.approx(learner.checksum(), rel=1e-6)


def test_lora_reference_is_the_base_with_adapters_off(tiny_config, sft_path):
    """LoRA holds no second copy of the weights: the KL reference is the frozen base with adapters disabled, so
    the KL is exactly 0 before the first update (adapters start at B = 0) and positive after it."""
    cfg = tiny_config("trainer.lora_rank=8", "trainer.lr=3e-2", "trainer.kl_coef=0.1")
    learner, rollout, reward = _workers(cfg, sft_path)
    assert isinstance(learner.reference, AdaptersOff)
    owned = {id(p) for p in learner.engine.module.parameters()}
    values = [*vars(learner).values(), *vars(learner.reference).values()]
    modules = [m for m in values if isinstance(m, torch.nn.Module)]
    held = [p for m in modules for p in m.parameters()]
    assert all(id(p) in owned for p in held)  # every module the learner holds is the engine's own
    prompts, metadata = prompts_of(shapes.train_items()[:4])
    _, first, _ = _step(learner, rollout, reward, prompts, metadata, 4)
    assert first["learner/kl"] == 0.0
    _, second, _ = _step(learner, rollout, reward, prompts, metadata, 4)
    assert second["learner/kl"] > 0.0


def test_no_reference_without_a_kl_term(tiny_config, sft_path):
    cfg = tiny_config("trainer.kl_coef=0.0", "trainer.lr=1e-2")
    learner, rollout, reward = _workers(cfg, sft_path)
    assert isinstance(learner.reference, NoReference)
    prompts, metadata = prompts_of(shapes.train_items()[:4])
    for _ in range(2):
        _, metrics, _ = _step(learner, rollout, reward, prompts, metadata, 4)
        assert metrics["learner/kl"] == 0.0 and np.isfinite(metrics["learner/loss"])


def _one_update(cfg, sft_path, shift: float):
    """One update of the tiny config on a fixed batch whose sampler log-probs are shifted by ``shift`` on every
    other token (a sampler that disagrees with the learner); returns the metrics and the new weights."""
    learner, rollout, _ = _workers(cfg, sft_path)
    prompts, metadata = prompts_of(shapes.train_items()[:4])
    batch = rollout.generate(prompts, metadata, 4)
    sampler = batch.logprobs.clone()
    sampler[:, ::2] -= shift
    adv = torch.linspace(-1.0, 1.0, 16)
    metrics = _metrics([learner.train_step(TrainBatch(batch.prompt_batch, batch.codes, sampler, adv,
                                                      torch.ones(16, dtype=torch.bool)))])
    return metrics, learner.state_dict()


def test_learner_recomputed_old_logprobs_and_truncated_importance_weights(tiny_config, sft_path):
    base = ("trainer.lr=1e-2", "trainer.kl_coef=0.0", "run.seed=3", "trainer.micro_batch_size=4")
    plain, _ = _one_update(tiny_config(*base), sft_path, 0.0)
    # the sampler disagrees by 0.5 nats on half the tokens: with its log-probs the first ratio is clipped...
    shifted, _ = _one_update(tiny_config(*base), sft_path, 0.5)
    assert shifted["learner/clip_frac"] > 0.1 and plain["learner/clip_frac"] == 0.0
    # ...recomputed by the learner it starts at 1: the update is the one an agreeing sampler gets
    fixed, w_fixed = _one_update(tiny_config(*base, "trainer.old_logprobs=learner"), sft_path, 0.5)
    assert fixed["learner/clip_frac"] == 0.0 and fixed["learner/tis_capped_frac"] == 0.0
    assert fixed["learner/loss"] == pytest.approx(plain["learner/loss"], abs=1e-5)
    # truncated importance sampling weighs each token by min(exp(learner - sampler), cap): exp(0.5) = 1.65 > 1.2
    tis, w_tis = _one_update(tiny_config(*base, "trainer.old_logprobs=learner", "trainer.tis_cap=1.2"), sft_path, 0.5)
    assert tis["learner/clip_frac"] == 0.0 and tis["learner/tis_capped_frac"] == pytest.approx(0.5, abs=0.02)
    assert any(not torch.equal(w_fixed[k], w_tis[k]) for k in w_tis)  # the weights counted


@pytest.mark.parametrize("mini_batches", [1, 2], ids=["one-step", "two-steps"])
def test_recomputed_old_logprobs_equal_the_learners_own_before_its_first_step(tiny_config, sft_path, mini_batches):
    """With one optimiser step the recomputation is each micro-batch's own forward (no extra pass); with two it is
    a no-grad pass before the first. Either way the update equals one whose sampler reported exactly the
    learner's log-probs, whatever the sampler really reported."""
    base = ("trainer.lr=1e-2", "trainer.kl_coef=0.0", "trainer.micro_batch_size=4", "trainer.tis_cap=0",
            f"trainer.mini_batches={mini_batches}")
    learner, rollout, _ = _workers(tiny_config(*base, "trainer.old_logprobs=learner"), sft_path)
    batch = _fixed_batch(rollout)
    assert (learner._old_logprobs(batch) is None) == (mini_batches == 1)
    with torch.no_grad():
        exact = sequence_logprobs(learner.lm, batch.prompts, batch.codes, learner.params)[0]
    skewed = dataclasses.replace(batch, old_logprobs=exact - 0.3 * torch.rand(exact.shape))  # a sampler that is off
    recomputed = _metrics([learner.train_step(skewed)])
    reference, _, _ = _workers(tiny_config(*base, "trainer.old_logprobs=sampler"), sft_path)
    agreeing = _metrics([reference.train_step(dataclasses.replace(batch, old_logprobs=exact))])
    assert recomputed["learner/clip_frac"] == agreeing["learner/clip_frac"]
    assert recomputed["learner/loss"] == pytest.approx(agreeing["learner/loss"], abs=1e-6)
    a, b, start = learner.state_dict(), reference.state_dict(), _fresh_weights(sft_path)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # steps of lr 1e-2; summation order differs
    assert any(not torch.equal(a[k], start[k]) for k in a)  # an update was made


def _fresh_weights(sft_path):
    return WorldPolicy.from_pretrained(sft_path).model.state_dict()


def _fixed_batch(rollout) -> TrainBatch:
    prompts, metadata = prompts_of(shapes.train_items()[:4])
    batch = rollout.generate(prompts, metadata, 4)
    return TrainBatch(batch.prompt_batch, batch.codes, batch.logprobs, torch.linspace(-1.0, 1.0, 16),
                      torch.ones(16, dtype=torch.bool))
