"""Settings resolved from several config fields."""

import pytest

from omnigrpo.config.loader import load_config


@pytest.mark.parametrize(("overrides", "nccl"), [
    ((), False),
    (("cluster.placement=split", "cluster.learner_gpus=1", "cluster.rollout_gpus=1"), True),
    (("cluster.placement=split", "cluster.learner_gpus=1", "cluster.rollout_gpus=0.5"), False),  # two on a GPU
    (("cluster.placement=colocated", "cluster.learner_gpus=0.5", "cluster.rollout_gpus=0.5"), False),
    (("cluster.placement=split", "cluster.learner_gpus=1", "cluster.rollout_gpus=1", "cluster.sync_backend=nccl"),
     True),
    (("cluster.placement=split", "cluster.learner_gpus=1", "cluster.rollout_gpus=1", "cluster.sync_backend=gloo"),
     False),
])
def test_the_broadcast_backend_resolves_to_nccl_only_with_a_gpu_per_member(overrides, nccl):
    assert load_config(None, list(overrides)).cluster.sync_nccl is nccl


def test_nccl_without_a_gpu_per_member_is_refused():
    from omnigrpo.config.loader import ConfigError

    with pytest.raises(ConfigError, match="cluster.sync_backend: nccl needs a whole GPU per member"):
        load_config(None, ["cluster.sync_backend=nccl"])
