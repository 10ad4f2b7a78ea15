"""The rollout actors' weights: which version they hold, how the next sync travels, what the last one cost.

Why: a weight sync has state that outlives a step (the broadcast group, whether it must be re-formed after a
rollout actor was replaced, how often it fell back to the object store), and :class:`WeightSync` owns it. It sends
the learner's weights over a dedicated gloo or NCCL broadcast group (``cluster.weight_sync: broadcast``; a sync
that fails falls back to the object store) or as one object-store ``put``; under hybrid placement nothing is sent.
A replacement actor loads the current weights itself (docs/design.md, "The GRPO step").
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import ray

from omnigrpo.config.roles import Role
from omnigrpo.config.schema import ClusterConfig
from omnigrpo.sync.network import LOOPBACK

log = logging.getLogger(__name__)
DEAD = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
"""What a call to an actor that died raises."""


class SyncState(Enum):
    """How the next sync travels: the broadcast group's life, as one value."""

    UNJOINED = "unjoined"
    """No group formed (``cluster.weight_sync: object_store``, or not yet joined): the object store."""
    JOINED = "joined"
    """The group is formed: weights are broadcast."""
    BROKEN = "broken"
    """The group lost a member or a broadcast failed: re-form it (with any newcomer) at the next sync."""
    ABANDONED = "abandoned"
    """A re-forming failed: the object store for the rest of the run."""

    def after(self, event: str) -> SyncState:
        """The state after ``event``: ``joined`` (the group formed), ``lost`` (a member was replaced), ``failed``
        (a broadcast failed), ``reform_failed`` (forming the group again failed). A run on the object store for
        good stays there."""
        if self is SyncState.ABANDONED:
            return self
        return {"joined": SyncState.JOINED, "lost": SyncState.BROKEN, "failed": SyncState.BROKEN,
                "reform_failed": SyncState.ABANDONED}[event]


@dataclass
class WeightSync:
    """Sync state of one run: the version every rollout actor holds and how the next sync travels."""

    cluster: ClusterConfig
    zero_stage: int = 0
    """The learner's ``trainer.zero_stage`` (3: every rank joins the gather of the full weights)."""
    meeting: Path | None = None
    """The run's owner-only folder where the broadcast group's file store meets on one machine."""
    version: int = 0
    """Weight version every rollout actor holds (a replacement gets it from the learner)."""
    state: SyncState = SyncState.UNJOINED
    """Whether weights go over the dedicated group, must re-form it first, or go through the object store."""
    fallbacks: int = 0
    """Broadcasts that failed and were redone through the object store (``fault/sync_fallbacks``)."""
    sent_bytes: int = 0
    """Weight bytes the last sync sent (``sync/bytes``; 0 when nothing was sent)."""
    weight_bytes: int = 0
    """Bytes of the full policy's parameters (asked of the learner once, for the object-store path)."""
    bucket_mb: float | None = None
    """Broadcast bucket size (None: ``cluster.sync_bucket_mb``; 0 = one tensor at a time)."""

    def __post_init__(self):
        if self.bucket_mb is None:
            self.bucket_mb = self.cluster.sync_bucket_mb

    @property
    def sends(self) -> bool:
        """Weights travel at all (not under hybrid placement, where the learner ranks sample)."""
        return self.cluster.placement != "hybrid"

    @property
    def broadcasting(self) -> bool:
        """Weights go over the dedicated group (else, or after a fallback, through the object store)."""
        return self.state is SyncState.JOINED

    @property
    def must_reform(self) -> bool:
        """The group is re-formed at the next sync."""
        return self.state is SyncState.BROKEN

    def metrics(self) -> dict[str, float]:
        """The last sync, as step metrics."""
        return {"fault/sync_fallbacks": self.fallbacks, "sync/broadcast": float(self.broadcasting),
                "sync/bytes": float(self.sent_bytes)}

    def ref(self, learners: list):
        """Object ref of the full policy weights (rank 0's; under ZeRO-3 every rank joins the gather)."""
        refs = [learner.state_dict.remote() for learner in learners]
        if self.zero_stage == 3:
            ray.wait(refs, num_returns=len(refs))
        return refs[0]

    def lost_member(self) -> None:
        """A rollout actor was replaced: the broadcast group is re-formed (with the newcomer) at the next sync."""
        if self.cluster.weight_sync == "broadcast" and self.state is not SyncState.ABANDONED:
            log.warning("the weight-broadcast group lost a member: it is re-formed at the next sync")
            self.state = self.state.after("lost")

    def join(self, learners: list, rollouts: list, where: dict) -> None:
        """Form the broadcast group: learner rank 0 (sender) and every rollout actor, meeting at a file store on
        one machine, or at a TCP store the learner serves on its node address across hosts (``where``:
        ``(role, index) -> address``, empty on loopback)."""
        size, timeout, cluster = 1 + len(rollouts), self.cluster.sync_timeout_s, self.cluster
        if where:
            store = ray.get(learners[0].serve.remote("weights", size, timeout))
        else:
            store = str(self.meeting / f"weights-{secrets.token_hex(4)}")  # a new one for each re-formed group
        hosts = [where.get((Role.ROLLOUT, i), LOOPBACK) for i in range(len(rollouts))]
        backend = "nccl" if cluster.sync_nccl else "gloo"
        ray.get([learners[0].join_weight_group.remote(store, size, timeout, backend)]
                + [w.join_weight_group.remote(store, i + 1, size, timeout, host, backend)
                   for i, (w, host) in enumerate(zip(rollouts, hosts, strict=True))])
        self.state = self.state.after("joined")

    def send(self, learners: list, rollouts: list, version: int, where: dict,
             resend: bool = False) -> list[tuple[int, Exception]]:
        """Learner -> every rollout actor, by broadcast or the object store; nothing when the rollouts already
        hold ``version`` (unless ``resend``, for benchmarks) or under hybrid placement. Returns the rollout
        actors that died while loading (index, error): the caller replaces them."""
        self.sent_bytes = 0
        if not self.sends or (version == self.version and not resend):
            self.version = version
            return []
        if self.must_reform:
            self._reform(learners, rollouts, where)
        if self.broadcasting and self._broadcast(learners, rollouts, version):
            return []
        weights = self.ref(learners)
        if not self.weight_bytes:
            self.weight_bytes = ray.get(learners[0].weight_bytes.remote())
        self.sent_bytes = self.weight_bytes  # one put, read by every rollout actor
        dead = []
        for i, w in enumerate(rollouts):
            try:
                ray.get(w.load_weights.remote(weights, version))
            except DEAD as err:
                dead.append((i, err))
        self.version = version
        return dead

    def _reform(self, learners: list, rollouts: list, where: dict) -> None:
        try:
            self.join(learners, rollouts, where)
            log.info("weight-broadcast group re-formed with %d rollout actor(s)", len(rollouts))
        except ray.exceptions.RayError as err:
            self.state = self.state.after("reform_failed")
            log.warning("could not re-form the weight-broadcast group (%s); staying on the object store",
                        str(err).splitlines()[0][:200])

    def _broadcast(self, learners: list, rollouts: list, version: int) -> bool:
        """One bucketed broadcast; False (and a fallback counted) when it failed or timed out."""
        bucket = int(self.bucket_mb * 2**20)
        refs = [learner.broadcast_weights.remote(bucket) for learner in learners]
        refs += [w.receive_weights.remote(bucket) for w in rollouts]
        try:
            answers = ray.get(refs, timeout=self.cluster.sync_timeout_s + 30)
            got = answers[len(learners):]
            if got != [version] * len(rollouts):
                raise RuntimeError(f"rollout actors report weight versions {got} after broadcasting v{version}")
            self.version, self.sent_bytes = version, int(answers[0])
            return True
        except (ray.exceptions.RayError, RuntimeError) as err:
            log.warning("weight broadcast of v%d failed (%s); this sync goes through the object store, and the "
                        "group is re-formed at the next", version, str(err).splitlines()[0][:200])
            self.state = self.state.after("failed")
            self.fallbacks += 1
            return False
