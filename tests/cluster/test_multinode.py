"""A run spread over two Ray nodes (two raylets on this machine, as ``ray.cluster_utils.Cluster`` builds them):
split placement puts the learner on one node and rollout / reward actors on the other, the learner group and
the weight broadcast meet across nodes, and the run finishes with the rollouts on the learner's weights."""

import threading
import time

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from omnigrpo.app.driver import train
from omnigrpo.app.tracking import store_uri


@pytest.mark.cluster
def test_a_run_across_two_nodes(tiny_config, sft_path):
    ray.shutdown()  # a connected session cluster, if any (the next test that needs it starts it again)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address)
    try:
        cfg = tiny_config("trainer.steps=2", "eval.every=0", "tracking.image_every=0", f"model.path={sft_path}",
                          f"cluster.address={cluster.address}", "cluster.placement=split", "cluster.rollout_cpus=1",
                          "cluster.reward_cpus=1", "cluster.learner_cpus=1", "cluster.torch_threads=1")
        result, nodes = {}, set()

        def run():
            result.update(train(cfg))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        while thread.is_alive():  # where the run's bundles landed, while it holds them
            for group in ray.util.placement_group_table().values():
                if group["state"] == "CREATED":
                    nodes |= set(group["bundles_to_node_id"].values())
            time.sleep(0.5)
        assert result.get("rollout_versions") == [2], result
        assert len(nodes) == 2  # three 1-CPU bundles cannot fit on one node of this cluster
        metrics = MlflowClient(store_uri(cfg.tracking, cfg.run.dir)).get_run(result["run_id"]).data.metrics
        assert metrics["sync/broadcast"] == 1.0 and metrics["fault/sync_fallbacks"] == 0.0
    finally:
        ray.shutdown()
        cluster.shutdown()
