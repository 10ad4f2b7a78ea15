"""The run state: what the driver needs to continue a run after a step exactly as if never interrupted.

Why: a resumable checkpoint carries it as ``run_state.pt``, a file that anyone who can write ``run.dir`` could
replace. The learner writes it as plain data (loaded weights-only); :meth:`RunState.from_state` is the one
place it is read back, refusing anything omnigrpo did not write before the driver acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


class NotARunState(ValueError):
    """The data is not a run state: the message names the keys missing or of another type."""


@dataclass(frozen=True)
class RunState:
    """The driver's part of a checkpoint after step :attr:`step` (``Loop.run_state``)."""

    step: int
    """The last completed step (0: before the first)."""
    version: int
    """Weight version the rollout actors (hybrid: the learner ranks) hold after it."""
    run_id: str
    """The MLflow run continued on resume; empty only at a fresh start, before the run exists."""
    reference_path: str
    """The run's starting policy, the KL reference (``model.path`` or a policy of the SFT cache)."""
    cursor: str
    """The prompt cursor's state (``PromptCursor.state``, JSON)."""
    before: dict = field(default_factory=dict)
    """Held-out metrics at step 0 (empty: evaluated again on resume)."""
    ahead: list = field(default_factory=list)
    """Batches drawn ahead with their rewards (``Lookahead.state``: one plain dict per batch)."""
    alarm: dict | None = None
    """The collapse alarms' history (``CollapseAlarm.state``; None: none kept)."""
    rollout_rng: list = field(default_factory=list)
    """Each sampler's generator state after its latest batch (None: its seeded stream, nothing drawn)."""

    @staticmethod
    def fresh(reference_path: str) -> RunState:
        """A new run's start: step 0, weights v0, nothing drawn, no MLflow run yet."""
        return RunState(step=0, version=0, run_id="", reference_path=reference_path, cursor="")

    @property
    def resumed(self) -> bool:
        """Read from a checkpoint (a fresh start has no MLflow run yet)."""
        return bool(self.run_id)

    def state(self) -> dict:
        """Plain data for ``run_state.pt`` (ints, strings, lists, dicts, tensors): loadable weights-only."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def from_state(state: object) -> RunState:
        """The run state in ``state`` (a loaded ``run_state.pt``); raises :class:`NotARunState` naming every key
        missing or of another type. Keys of later versions are ignored; ``before``, ``ahead`` and ``alarm`` may
        be absent (their defaults)."""
        if not isinstance(state, dict):
            raise NotARunState(f"a {type(state).__name__}, not a dict of {', '.join(REQUIRED)}")
        bad = [k for k, kind in REQUIRED.items() if type(state.get(k)) is not kind]
        bad += [k for k, kinds in OPTIONAL.items() if k in state and type(state[k]) not in kinds]
        if bad:
            order = [f.name for f in fields(RunState)]
            raise NotARunState(f"{', '.join(sorted(bad, key=order.index))} missing or of another type")
        if not state["run_id"]:
            raise NotARunState("run_id is empty")
        return RunState(**{f.name: state[f.name] for f in fields(RunState) if f.name in state})


REQUIRED = {"step": int, "version": int, "run_id": str, "reference_path": str, "cursor": str, "rollout_rng": list}
"""Keys every run state holds, with their exact types (``bool`` is no ``int`` here)."""
OPTIONAL = {"before": (dict,), "ahead": (list,), "alarm": (dict, type(None))}
"""Keys a run state may lack (older checkpoints), with the types allowed when present."""
