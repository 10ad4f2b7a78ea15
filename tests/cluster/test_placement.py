"""Placement: per-role resources, colocated or split bundles, and a clear error when the cluster is short."""

import pytest
import ray
from conftest import leftovers

from omnigrpo.cli import main
from omnigrpo.cluster import placement
from omnigrpo.cluster.placement import ClusterShortfall, bundles, check_fits, demands
from omnigrpo.config.loader import load_config


def _cfg(*overrides):
    return load_config(None, ["cluster.rollout_workers=2", "cluster.learner_workers=2", *overrides])


def test_equal_shares_and_explicit_resources():
    cfg = _cfg("cluster.reward_cpus=1")
    wanted = {d.role: d for d in demands(cfg.cluster, cfg.actor_counts, cluster_cpus=10)}
    assert (wanted["rollout"].count, wanted["rollout"].cpus) == (2, 2.0)  # 10 CPUs / 5 actors
    assert (wanted["reward"].count, wanted["reward"].cpus) == (1, 1.0)
    assert (wanted["learner"].count, wanted["learner"].cpus) == (2, 2.0)


def test_colocated_actors_share_bundles_split_ones_do_not():
    cfg = _cfg("cluster.rollout_cpus=1", "cluster.learner_cpus=2", "cluster.reward_cpus=0.5",
               "cluster.reward_gpus=0.5")
    together, where = bundles(cfg.cluster, demands(cfg.cluster, cfg.actor_counts, 16))
    assert together == [{"CPU": 3.5, "GPU": 0.5}, {"CPU": 3.0}]
    assert where["rollout", 1] == where["learner", 1] == 1 and where["reward", 0] == 0
    apart, where = bundles(load_config(None, ["cluster.placement=split"]).cluster,
                           demands(cfg.cluster, cfg.actor_counts, 16))
    assert len(apart) == 5 and len(set(where.values())) == 5


def test_hybrid_reserves_learner_bundles_and_no_rollout_ones():
    cfg = _cfg("cluster.placement=hybrid", "cluster.learner_cpus=2", "cluster.learner_gpus=1", "cluster.reward_cpus=1")
    wanted = {d.role: d for d in demands(cfg.cluster, cfg.actor_counts, 16)}
    assert wanted["rollout"].count == 0 and cfg.samplers == 2  # the learner ranks sample
    sizes, where = bundles(cfg.cluster, list(wanted.values()))
    assert sizes == [{"CPU": 3.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert where["learner", 0] == where["reward", 0] == 0 and where["learner", 1] == 1
    assert not any(role == "rollout" for role, _ in where)


def test_a_short_cluster_is_named_by_role_and_amount():
    cfg = _cfg("cluster.learner_cpus=4", "cluster.reward_gpus=1")
    with pytest.raises(ClusterShortfall) as err:
        check_fits(demands(cfg.cluster, cfg.actor_counts, 4), {"CPU": 4.0})
    text = str(err.value)
    assert "CPU: the config asks for" in text and "short by" in text and "role 'learner'" in text
    assert "GPU: the config asks for 1 (reward 1 x 1) but the cluster has 0" in text


@pytest.mark.usefixtures("ray_cluster")
def test_a_run_asking_too_much_stops_before_any_model_loads(tiny_config, sft_path, tmp_path, capsys):
    cfg = tiny_config("cluster.learner_cpus=64")
    with pytest.raises(ClusterShortfall, match="short by"):
        placement.build(cfg.cluster, cfg.actor_counts, cfg.trainer.max_staleness)
    assert not leftovers()  # nothing was reserved
    # from the CLI, on a cluster the run starts itself (the session's ends here; the next test starts it again):
    # refused with one line, and the cluster the run started is shut down again
    ray.shutdown()
    (tmp_path / "c.yaml").write_text("cluster:\n  learner_cpus: 64\n  num_cpus: 2\n")
    code = main(["train", str(tmp_path / "c.yaml"), f"run.dir={tmp_path / 'run'}", f"model.path={sft_path}",
                 "rewards=[{name: shapes}]"])
    assert code == 2 and "the cluster cannot place this run" in capsys.readouterr().err
    assert not ray.is_initialized()
