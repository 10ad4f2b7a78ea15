"""The rollout worker's sampling stream travels with its batches (a plain class, no Ray)."""

import torch

from omnigrpo.config.roles import Role
from omnigrpo.config.runtime import actor_seed
from omnigrpo.rollout.worker import RolloutWorker
from omnigrpo.worlds import shapes
from omnigrpo.worlds.world import prompts_of


def test_a_batch_carries_the_stream_a_restored_worker_continues(tiny_config, sft_path):
    cfg = tiny_config()
    seed = actor_seed(cfg.run.seed, Role.ROLLOUT, 0)
    a, b, c = (RolloutWorker.from_config(cfg.rollout, cfg.model, str(sft_path), seed, threads=1) for _ in range(3))
    for w in (a, b, c):
        w.setup()
    prompts, metadata = prompts_of(shapes.train_items()[:2])
    first = a.generate(prompts, metadata, 2)
    assert torch.equal(first.rng_state, a.rng_state())
    assert torch.equal(a.generate(prompts, metadata, 2, seed=7).rng_state, first.rng_state)  # evaluation: untouched
    b.restore(first.rng_state, 0)
    assert torch.equal(a.generate(prompts, metadata, 2).codes, b.generate(prompts, metadata, 2).codes)
    # nothing drawn yet (None in the run state): the seeded stream goes on, as an uninterrupted worker's does
    c.restore(None, 0)
    assert torch.equal(c.generate(prompts, metadata, 2).codes, first.codes)
