"""A data-parallel learner group: two DeepSpeed ranks (ZeRO-2, ZeRO-3) take the step one learner takes."""

import os
import stat

import pytest
import ray
import torch
from conftest import REFERENCE

from omnigrpo.app.driver import train
from omnigrpo.cluster import actors, shards
from omnigrpo.rollout.families.builtin import WorldPolicy


@pytest.mark.parametrize("stage", [2, 3])  # ZeRO-3: the KL reference is sharded too, its log-probs all-gathered
@pytest.mark.usefixtures("ray_cluster")
def test_two_ranks_stay_identical_and_rollouts_get_their_weights(tiny_config, sft_path, tmp_path, stage):
    # a run.dir with a space, a non-ASCII letter, ? and #: the groups' file stores are opened by their plain paths
    run_dir = tmp_path / "my runs ä?#1"
    cfg = tiny_config("cluster.learner_workers=2", f"trainer.zero_stage={stage}", f"model.path={sft_path}",
                      f"run.dir={run_dir}")
    actors.connect(cfg.cluster)
    workers = actors.spawn(cfg, str(sft_path), os.environ["TORCH_EXTENSIONS_DIR"])
    assert workers.meeting.parent == run_dir and stat.S_IMODE(workers.meeting.stat().st_mode) == 0o700
    assert workers.sync.broadcasting and {p.name for p in workers.meeting.iterdir()} >= {"learners"}
    try:
        prompts, metadata = ["a red circle at the top left", "a blue square at the bottom right"] * 2, [{}] * 4
        from omnigrpo.trainers.batch import TrainBatch
        from omnigrpo.trainers.grpo import advantages

        for version in (1, 2):
            batch = shards.generate(workers, prompts, metadata, cfg.rollout.group_size)
            result = shards.score(workers, batch)
            valid = torch.from_numpy(result.valid)
            adv = advantages(torch.from_numpy(result.total), cfg.rollout.group_size, valid).values
            update = actors.train_step(workers, TrainBatch(batch.prompt_batch, batch.codes, batch.logprobs, adv,
                                                           valid))
            assert update.version == version and update.metrics["learner/grad_norm"] > 0 and not update.skipped
            actors.sync_weights(workers, version)
        ranks = ray.get([learner.checksum.remote() for learner in workers.learners])
        rollouts = ray.get([w.checksum.remote() for w in workers.rollouts])
        assert ranks[0] == ranks[1] == rollouts[0]
    finally:
        actors.release(workers)
    assert list(run_dir.iterdir()) == []  # the stores' folder went with the run


@pytest.mark.usefixtures("ray_cluster")
def test_two_ranks_train_like_one(tiny_config, sft_path, reference_run):
    """Same seed, same samples: the 2-rank run ends where the 1-rank reference run does (up to summation order)."""
    start = WorldPolicy.from_pretrained(sft_path).model.state_dict()
    one = WorldPolicy.from_pretrained(reference_run[1]["checkpoint"]).model.state_dict()
    summary = train(tiny_config(*REFERENCE, "cluster.learner_workers=2"))
    assert summary["rollout_versions"] == [4]
    two = WorldPolicy.from_pretrained(summary["checkpoint"]).model.state_dict()
    moved = sum(float((one[k] - start[k]).pow(2).sum()) for k in start) ** 0.5
    apart = sum(float((two[k] - one[k]).pow(2).sum()) for k in start) ** 0.5
    assert moved > 0 and apart < 1e-3 * moved
