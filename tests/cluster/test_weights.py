"""The weight sync's state machine: the broadcast group formed, broken, re-formed or given up for good."""

import pytest
import ray

from omnigrpo.cluster.weights import SyncState, WeightSync
from omnigrpo.config.loader import load_config

U, J, B, A = SyncState.UNJOINED, SyncState.JOINED, SyncState.BROKEN, SyncState.ABANDONED


@pytest.mark.parametrize(("state", "event", "after"), [
    (U, "joined", J), (B, "joined", J), (J, "lost", B), (U, "lost", B), (J, "failed", B), (B, "reform_failed", A),
    (A, "joined", A), (A, "lost", A), (A, "failed", A),
])
def test_each_transition(state, event, after):
    assert state.after(event) is after


def test_an_unknown_event_is_an_error():
    with pytest.raises(KeyError):
        J.after("rejoined")


def _sync(*overrides) -> WeightSync:
    cfg = load_config(None, list(overrides))
    return WeightSync(cfg.cluster, cfg.trainer.zero_stage)


def test_metrics_say_whether_the_group_carries_the_weights():
    sync = _sync("cluster.weight_sync=broadcast")
    assert sync.state is U and sync.metrics()["sync/broadcast"] == 0.0
    sync.state = J
    assert sync.broadcasting and sync.metrics() == {"fault/sync_fallbacks": 0, "sync/broadcast": 1.0,
                                                    "sync/bytes": 0.0}


def test_a_lost_member_breaks_a_broadcast_group_only():
    sync = _sync("cluster.weight_sync=broadcast")
    sync.state = J
    sync.lost_member()
    assert sync.must_reform and not sync.broadcasting
    store = _sync("cluster.weight_sync=object_store")
    store.lost_member()
    assert store.state is U and not store.must_reform


def test_a_failed_reforming_settles_on_the_object_store_for_good():
    sync = _sync("cluster.weight_sync=broadcast")
    sync.state = B

    def refuse(*args):
        raise ray.exceptions.RaySystemError("the store is gone")

    sync.join = refuse
    sync._reform([], [], {})
    assert sync.state is A
    sync.lost_member()
    assert sync.state is A and not sync.must_reform
