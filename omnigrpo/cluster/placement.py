"""Where each role's actors run: resources per role, colocated, split or hybrid, as one Ray placement group.

Why: a run is rollout, (diffusion) decoder, reward and learner actors competing for the same CPUs and GPUs. The
config names what each role's actor needs (``cluster.<role>_cpus`` / ``_gpus``; 0 CPUs = an equal share of the
cluster) and the mode (docs/cluster.md, "Resource layouts"). Before any model loads, :func:`check_fits` compares
the demand with the cluster and fails naming the role and the shortfall; then :func:`build` reserves one placement
group (strategy ``PACK``) and waits for it, so a run never starts half-placed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from omnigrpo.config.roles import Role
from omnigrpo.config.schema import ClusterConfig


class ClusterShortfall(RuntimeError):
    """The cluster lacks the resources the config asks for; the message names role and amounts."""


@dataclass(frozen=True)
class Demand:
    """``count`` actors of ``role``, each reserving ``cpus`` CPUs and ``gpus`` GPUs."""

    role: Role
    count: int
    cpus: float
    gpus: float


def demands(cluster: ClusterConfig, counts: dict[Role, int], cluster_cpus: float) -> list[Demand]:
    """Per-role demand of ``counts`` actors (``Config.actor_counts``); a role with 0 CPUs configured gets an equal
    share of ``cluster_cpus``."""
    share = cluster_cpus / sum(counts.values())
    out = []
    for role in Role:
        cpus, gpus = getattr(cluster, f"{role}_cpus"), getattr(cluster, f"{role}_gpus")
        out.append(Demand(role, counts[role], cpus or share, gpus))
    return out


def check_fits(wanted: list[Demand], available: dict[str, float]) -> None:
    """Raise :class:`ClusterShortfall` if the cluster's totals cannot hold ``wanted``."""
    problems = []
    for resource, attr in (("CPU", "cpus"), ("GPU", "gpus")):
        need = sum(d.count * getattr(d, attr) for d in wanted)
        have = float(available.get(resource, 0.0))
        if need > have + 1e-6:
            parts = ", ".join(f"{d.role} {d.count} x {getattr(d, attr):g}" for d in wanted if getattr(d, attr))
            largest = max(wanted, key=lambda d: d.count * getattr(d, attr))
            problems.append(f"{resource}: the config asks for {need:g} ({parts}) but the cluster has {have:g}; "
                            f"short by {need - have:g} (largest demand: role '{largest.role}', "
                            f"cluster.{largest.role}_{attr} / cluster.{largest.role}_workers)")
    if problems:
        raise ClusterShortfall("the cluster cannot place this run:\n  " + "\n  ".join(problems))


class Placement:
    """A reserved placement group and the bundle of every actor ``(role, index)``; ``torch_threads`` is
    ``cluster.torch_threads``, ``overlap`` whether rollout overlaps the learner (``trainer.max_staleness > 0``)."""

    def __init__(self, wanted: list[Demand], group, bundle_of: dict[tuple[str, int], int], torch_threads: int = 0,
                 overlap: bool = False):
        self.wanted, self.group, self.bundle_of = {d.role: d for d in wanted}, group, bundle_of
        self.torch_threads, self.overlap = torch_threads, overlap

    def options(self, role: Role, index: int) -> dict:
        """Ray actor options putting actor ``index`` of ``role`` in its bundle with its resources."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        d = self.wanted[role]
        strategy = PlacementGroupSchedulingStrategy(self.group,
                                                    placement_group_bundle_index=self.bundle_of[role, index])
        return {"num_cpus": d.cpus, "num_gpus": d.gpus, "scheduling_strategy": strategy}

    def threads(self, role: Role) -> int:
        """Torch intra-op threads of a ``role`` actor: ``cluster.torch_threads``, or when that is 0 every core
        (0) while the stages of a step take turns, and the role's CPU share (at least 1) when rollout overlaps
        the learner (``trainer.max_staleness > 0``): two actors each spinning on every core of the same CPUs
        run several times slower than one thread each."""
        if self.torch_threads or not self.overlap:
            return self.torch_threads
        return max(1, int(self.wanted[role].cpus + 1e-6))

    def addresses(self) -> dict[tuple[str, int], str]:
        """The node address (as Ray reports it) of every actor's bundle: ``(role, index) -> address``."""
        import ray

        node_of = ray.util.placement_group_table(self.group)["bundles_to_node_id"]
        address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        return {key: address[node_of[bundle]] for key, bundle in self.bundle_of.items()}


def bundles(cluster: ClusterConfig, wanted: list[Demand]) -> tuple[list[dict[str, float]], dict[tuple[str, int], int]]:
    """Bundles of the configured mode (``cluster.placement``) and the bundle index of every actor."""
    sizes: list[dict[str, float]] = []
    bundle_of: dict[tuple[str, int], int] = {}
    if cluster.placement == "split":
        for d in wanted:
            for i in range(d.count):
                bundle_of[d.role, i] = len(sizes)
                sizes.append({"CPU": d.cpus, "GPU": d.gpus})
    else:
        totals: dict[int, dict[str, float]] = defaultdict(lambda: {"CPU": 0.0, "GPU": 0.0})
        for d in wanted:
            for i in range(d.count):
                bundle_of[d.role, i] = i
                totals[i]["CPU"] += d.cpus
                totals[i]["GPU"] += d.gpus
        sizes = [totals[i] for i in range(len(totals))]
    # Ray refuses empty resources; round down a hair so float shares (2/3 + 2/3 + 2/3) still fit
    clean = [{k: math.floor(v * 1e4) / 1e4 for k, v in b.items() if v > 0} or {"CPU": 1e-4} for b in sizes]
    return clean, bundle_of


def build(cluster: ClusterConfig, counts: dict[Role, int], max_staleness: int = 0,
          timeout_s: float = 120.0) -> Placement:
    """Check the demand of ``counts`` actors per role against the cluster, then reserve and wait for the placement
    group (``max_staleness``: ``trainer.max_staleness``, which sets the actors' threads)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    available = ray.cluster_resources()
    wanted = demands(cluster, counts, float(available.get("CPU", 1.0)))
    check_fits(wanted, available)
    sizes, bundle_of = bundles(cluster, wanted)
    wanted = [Demand(d.role, d.count, math.floor(d.cpus * 1e4) / 1e4, d.gpus) for d in wanted]
    group = placement_group(sizes, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise ClusterShortfall(f"the cluster has the resources in total but could not place the bundles {sizes} "
                               f"within {timeout_s:g} s (busy, or no single node holds a bundle)") from None
    return Placement(wanted, group, bundle_of, cluster.torch_threads, max_staleness > 0)
