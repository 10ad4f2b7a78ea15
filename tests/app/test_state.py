"""The run state: written as plain data that a weights-only load reads back whole, and nothing else accepted."""

import dataclasses

import pytest
import torch

from omnigrpo.app.state import NotARunState, RunState


def _state(**changes) -> RunState:
    written = RunState(step=3, version=2, run_id="r1", reference_path="/cache/sft/start", cursor='{"order": [1, 0]}',
                       before={"eval/accuracy": 0.25}, ahead=[{"expected_version": 2, "timings": {}}],
                       alarm={"history": {"diversity": [0.5]}, "raised": []},
                       rollout_rng=[torch.arange(4, dtype=torch.uint8), None])
    return dataclasses.replace(written, **changes)


def test_a_run_state_survives_a_weights_only_file(tmp_path):
    state = _state()
    torch.save(state.state(), tmp_path / "run_state.pt")
    back = RunState.from_state(torch.load(tmp_path / "run_state.pt", weights_only=True))
    assert back.rollout_rng[1] is None and torch.equal(back.rollout_rng[0], state.rollout_rng[0])
    assert dataclasses.replace(back, rollout_rng=[]) == dataclasses.replace(state, rollout_rng=[])
    assert list(state.state()) == [f.name for f in dataclasses.fields(RunState)]


def test_an_older_state_without_the_optional_keys_reads_with_their_defaults():
    data = {k: v for k, v in _state().state().items() if k not in ("before", "ahead", "alarm")}
    back = RunState.from_state({**data, "written_by_a_later_version": 1})
    assert (back.before, back.ahead, back.alarm, back.step) == ({}, [], None, 3)


@pytest.mark.parametrize(("data", "named"), [
    ({"step": 1, "version": "1"}, "version, run_id, reference_path, cursor, rollout_rng missing"),
    ({**_state().state(), "step": True}, "step missing"),  # a bool is no step number
    ({**_state().state(), "before": [0.5]}, "before missing or of another type"),
    ({**_state().state(), "alarm": "raised", "rollout_rng": (None,)}, "alarm, rollout_rng missing"),
    ({**_state().state(), "run_id": ""}, "run_id is empty"),
    ([1, 2], "a list, not a dict of step"),
])
def test_anything_else_is_refused_naming_what_is_wrong(data, named):
    with pytest.raises(NotARunState, match=named):
        RunState.from_state(data)


def test_a_fresh_start_is_step_zero_of_no_run_yet_and_a_read_state_is_resumed():
    fresh = RunState.fresh("/cache/sft/start")
    assert (fresh.step, fresh.version, fresh.reference_path, fresh.resumed) == (0, 0, "/cache/sft/start", False)
    assert RunState.from_state(_state().state()).resumed
    with pytest.raises(dataclasses.FrozenInstanceError):
        fresh.step = 1
