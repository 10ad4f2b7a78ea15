"""The KL reference refreshed to the policy (``trainer.ref_refresh_every`` / ``ref_refresh_kl``): each kind takes the
policy's current weights, the KL right after is 0, LoRA's merge leaves the sampled policy as it was, and a
checkpoint carries the refreshed reference into the resume."""

import dataclasses
from pathlib import Path

import pytest
import torch

from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.rollout.sampler import sequence_logprobs
from omnigrpo.trainers import adapter
from omnigrpo.trainers.batch import TrainBatch
from omnigrpo.trainers.checkpoint import REFERENCE_DIR
from omnigrpo.trainers.learner import Learner
from omnigrpo.trainers.reference import AdaptersOff, FrozenCopy, ShardedCopy
from omnigrpo.trainers.tally import RankUpdate, merge_ranks

PROMPTS = ["a red circle at the top left", "a blue square at the bottom right", "a green triangle in the middle",
           "a yellow circle at the top right"] * 4


def _learner(cfg, path, resume: bool = False, reference_path=None) -> Learner:
    learner = Learner(cfg.trainer, cfg.model, cfg.rollout, str(path), seed=cfg.run.seed,
                      reference_path=reference_path and str(reference_path))
    learner.setup(threads=2, resume=resume)
    return learner


def _codes(learner: Learner) -> tuple:
    """The tiny config's 16 rows: its prompts and fixed random image codes ``[16, T]``."""
    space = learner.policy.space
    codes = torch.randint(space.num_codes, (len(PROMPTS), space.tokens_per_image),
                          generator=torch.Generator().manual_seed(0))
    return learner.policy.prompt_batch(PROMPTS), codes


def _logprobs(learner: Learner, prompts, codes) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logprobs(learner.lm, prompts, codes, learner.params)[0]


def _update(learner: Learner, prompts, codes) -> dict[str, float]:
    """One update on the fixed rows, drawn (old log-probs) with the learner's current weights."""
    batch = TrainBatch(prompts, codes, _logprobs(learner, prompts, codes), torch.linspace(-1.0, 1.0, len(codes)),
                       torch.ones(len(codes), dtype=torch.bool))
    return merge_ranks([learner.train_step(batch)]).metrics


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def test_every_nth_update_refreshes_a_frozen_copy_in_place(tiny_config, sft_path):
    learner = _learner(tiny_config("trainer.kl_coef=0.1", "trainer.lr=1e-2", "trainer.ref_refresh_every=2"), sft_path)
    assert type(learner.reference) is FrozenCopy
    storage = [t.data_ptr() for t in learner.reference.module.state_dict().values()]
    rows = _codes(learner)
    metrics = [_update(learner, *rows) for _ in range(4)]
    assert [m["learner/ref_refreshes"] for m in metrics] == [0.0, 1.0, 1.0, 2.0]
    kl = [m["learner/kl"] for m in metrics]
    assert kl[0] == kl[2] == 0.0 and kl[1] > 0.0 and kl[3] > 0.0  # right after a refresh the KL is 0
    with learner.reference.weights() as reference:
        assert _same(learner.state_dict(), reference)
        assert [t.data_ptr() for t in reference.values()] == storage  # copied in place


def test_a_kl_above_the_threshold_refreshes_and_every_rank_decides_on_the_merged_kl(tiny_config, sft_path,
                                                                                    monkeypatch):
    learner = _learner(tiny_config("trainer.kl_coef=0.1", "trainer.lr=1e-2", "trainer.ref_refresh_kl=1e-9"),
                       sft_path)
    rows = _codes(learner)
    metrics = [_update(learner, *rows) for _ in range(4)]
    # the first update starts at the reference (KL 0: no refresh); the second moved away (refresh); and so on
    assert [m["learner/ref_refreshes"] for m in metrics] == [0.0, 1.0, 1.0, 2.0]
    learner.trainer = dataclasses.replace(learner.trainer, ref_refresh_kl=10.0)
    later = [_update(learner, *rows)["learner/kl"] for _ in range(2)]
    assert later[1] > 0.0 and learner.ref_refreshes == 2  # a KL below the threshold refreshes nothing

    other = {"kl": 3.0, "tokens": 10.0}  # what a second rank measured

    def all_gather(parts, mine):
        parts[0].copy_(mine)
        parts[1].copy_(torch.tensor([other["kl"], other["tokens"]], dtype=torch.float64))

    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    monkeypatch.setattr(learner, "world_size", 2)
    mine = {"kl": 0.1 / 3, "tokens": 30.0}
    logged = merge_ranks([RankUpdate(1, 0.0, sums=dict.fromkeys(("entropy", "clip_frac", "mismatch", "loss",
                                                                 "tis_capped"), 0.0) | s) for s in (mine, other)])
    assert learner._merged_kl(mine) == logged.metrics["learner/kl"] == pytest.approx((0.1 / 3 + 3.0) / 40.0)


def test_lora_merges_its_adapters_into_the_reference_and_restarts_them(tiny_config, sft_path):
    """The sampled policy is the same right before and after (the rollouts receive the same merged weights); the
    base with adapters off is now that policy, so the KL is 0; B restarts at 0 in the module and in DeepSpeed's fp32
    master copy, and AdamW's state restarts too."""
    from deepspeed.utils import safe_get_full_fp32_param

    lr = 3e-2
    learner = _learner(tiny_config("trainer.lora_rank=8", f"trainer.lr={lr}", "trainer.kl_coef=0.1"), sft_path)
    assert type(learner.reference) is AdaptersOff
    rows = _codes(learner)
    for _ in range(2):
        _update(learner, *rows)
    layers = [m for m in adapter.base(learner.engine.module).modules() if isinstance(m, adapter.LoraLayer)]
    a_before = [m.lora_A[adapter.ADAPTER].weight.clone() for m in layers]
    b = [m.lora_B[adapter.ADAPTER].weight for m in layers]
    assert all(p.abs().max() > 0 for p in b)
    before, merged = _logprobs(learner, *rows), learner.state_dict()
    learner.reference.refresh(learner.engine)
    after = _logprobs(learner, *rows)
    assert torch.allclose(after, before, atol=1e-5)
    assert _same(learner.state_dict(), merged)  # what a weight sync sends: unchanged
    assert torch.equal(learner.reference.logprobs(*rows), after)  # adapters off = the policy: KL exactly 0
    assert all(torch.equal(p, torch.zeros_like(p)) for p in b)
    assert all(not safe_get_full_fp32_param(p).any() for p in b)  # ZeRO-2's master copy too
    assert all(torch.equal(m.lora_A[adapter.ADAPTER].weight, a) for m, a in zip(layers, a_before, strict=True))
    state = learner.optimizer.optimizer.state.values()
    assert state and all(not v.any() for s in state for v in s.values() if torch.is_tensor(v))
    assert _update(learner, *rows)["learner/kl"] == 0.0
    assert max(float(p.detach().abs().max()) for p in b) <= lr * 1.01  # one step of a fresh AdamW from B = 0


def test_a_sharded_copy_refreshes_through_gathered_parameters(tiny_config, sft_path, monkeypatch, tmp_path):
    """ZeRO-3 with every parameter partitioned (no persistence threshold): the gathered policy is copied into the
    partitioned reference, which then scores as the policy does and is saved whole."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from omnigrpo.trainers import learner as module

    plain = module.deepspeed_config
    monkeypatch.setattr(module, "deepspeed_config", lambda *args: plain(*args) | {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    learner = _learner(tiny_config("trainer.zero_stage=3", "trainer.kl_coef=0.1", "trainer.lr=1e-2",
                                   "trainer.ref_refresh_every=1"), sft_path)
    assert type(learner.reference) is ShardedCopy
    assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in learner.reference.module.parameters())
    rows = _codes(learner)
    first = _update(learner, *rows)
    assert first["learner/ref_refreshes"] == 1.0
    saved = Path(learner.save_checkpoint(tmp_path)) / REFERENCE_DIR
    with learner.reference.weights() as reference:
        assert _same(learner.state_dict(), reference)
        assert _same(WorldPolicy.from_pretrained(saved).model.state_dict(), reference)
    assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in learner.reference.module.parameters())
    assert _update(learner, *rows)["learner/kl"] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_checkpoint_after_a_refresh_carries_the_reference_and_resumes_against_it(tiny_config, sft_path, tmp_path,
                                                                                   kind):
    """A checkpoint before any refresh holds no reference; one after holds it (LoRA: the base the adapters were
    merged into) as a policy folder, and the resumed learner's next update is the uninterrupted one's."""
    lora = ["trainer.lora_rank=8", "trainer.lr=3e-2"] if kind == "lora" else ["trainer.lr=1e-2"]
    cfg = tiny_config("trainer.kl_coef=0.1", "trainer.ref_refresh_every=2", *lora)
    learner = _learner(cfg, sft_path)
    rows = _codes(learner)
    assert not (Path(learner.save_checkpoint(tmp_path / "before")) / REFERENCE_DIR).exists()
    for _ in range(3):  # refreshed after the second; the third moves the policy away from it
        _update(learner, *rows)
    saved = Path(learner.save_checkpoint(tmp_path / "after"))
    with learner.reference.weights() as reference:
        assert _same(WorldPolicy.from_pretrained(saved / REFERENCE_DIR).model.state_dict(), reference)
    resumed = _learner(cfg, saved, resume=True, reference_path=sft_path)
    assert resumed.ref_refreshes == learner.ref_refreshes == 1
    with learner.reference.weights() as a, resumed.reference.weights() as b:
        assert _same(a, b)
    straight, again = _update(learner, *rows), _update(resumed, *rows)
    assert straight["learner/kl"] > 0.0 and again == pytest.approx(straight, abs=1e-7)
    a, b = learner.state_dict(), resumed.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_a_refresh_without_a_kl_term_is_refused(capsys, tmp_path, monkeypatch):
    from conftest import refused

    from omnigrpo.cli import main

    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")
    for key, value in (("ref_refresh_every", "2"), ("ref_refresh_kl", "0.05")):
        refused(main, ["train", config, "trainer.kl_coef=0", f"trainer.{key}={value}"], capsys,
                f"trainer.{key}: {value} refreshes the KL reference, and trainer.kl_coef is 0")
    assert not any(tmp_path.iterdir())
