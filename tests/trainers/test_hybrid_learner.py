"""The hybrid learner samples with its own live weights (a plain class, no Ray)."""

import pytest
import torch

from omnigrpo.config.loader import ConfigError
from omnigrpo.rollout.sampler import sequence_logprobs
from omnigrpo.trainers.batch import TrainBatch
from omnigrpo.trainers.hybrid import HybridLearner
from omnigrpo.worlds import shapes
from omnigrpo.worlds.world import prompts_of


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_a_hybrid_learner_samples_with_its_updated_weights(tiny_config, sft_path, lora):
    cfg = tiny_config("trainer.lr=3e-2", "trainer.kl_coef=0.0", f"trainer.lora_rank={lora}",
                      "cluster.placement=hybrid")
    learner = HybridLearner(cfg.trainer, cfg.model, cfg.rollout, str(sft_path), seed=cfg.run.seed)
    learner.setup(threads=2)
    params = {name: p for name, p in learner.engine.module.named_parameters()}
    modes = {name: m.training for name, m in learner.engine.module.named_modules()}
    prompts, metadata = prompts_of(shapes.train_items()[:4])

    before = learner.generate(prompts, metadata, 4, seed=11)
    assert before.version == 0 and before.images.shape[0] == 16
    learner.train_step(TrainBatch(before.prompt_batch, before.codes, before.logprobs,
                                  torch.linspace(-1, 1, 16), torch.ones(16, dtype=torch.bool)))
    after = learner.generate(prompts, metadata, 4, seed=11)

    assert after.version == 1
    assert not torch.equal(before.codes, after.codes)  # same stream, new weights: other images
    with torch.no_grad():
        scored, _ = sequence_logprobs(learner.lm, after.prompt_batch, after.codes, learner.params)
    assert (scored - after.logprobs).abs().max() < 1e-5  # the sampler is the learner's current policy
    # sampling left the DeepSpeed module as it was: its own parameters, its own modes, no packed copies
    assert all(p is params[name] for name, p in learner.engine.module.named_parameters())
    assert {name: m.training for name, m in learner.engine.module.named_modules()} == modes
    assert learner.lm.packed_layers.layers is None


def test_the_sampler_stream_survives_a_restore(tiny_config, sft_path):
    cfg = tiny_config("cluster.placement=hybrid")
    a = HybridLearner(cfg.trainer, cfg.model, cfg.rollout, str(sft_path), seed=cfg.run.seed)
    b = HybridLearner(cfg.trainer, cfg.model, cfg.rollout, str(sft_path), seed=cfg.run.seed, decode=False)
    a.setup(threads=2)
    b.setup(threads=2)
    prompts, metadata = prompts_of(shapes.train_items()[:2])
    drawn = a.generate(prompts, metadata, 2)
    assert torch.equal(drawn.rng_state, a.rng_state())  # the batch carries the stream's state after it
    assert torch.equal(a.generate(prompts, metadata, 2, seed=3).rng_state, drawn.rng_state)  # evaluation: untouched
    b.restore(drawn.rng_state, 0)
    decoded, codes_only = a.generate(prompts, metadata, 2), b.generate(prompts, metadata, 2)
    assert torch.equal(decoded.codes, codes_only.codes)
    assert decoded.images.shape[1] > 0 and codes_only.images.shape[1:3] == (0, 0)  # a decoder stage paints those


def test_hybrid_refuses_zero_3(tiny_config):
    with pytest.raises(ConfigError, match="cluster.placement: hybrid"):
        tiny_config("cluster.placement=hybrid", "trainer.zero_stage=3")
