"""Rules that span several config fields, checked after each field's own type and range.

Why: most impossible runs are impossible because of how two settings meet (a micro-batch that does not
divide a learner's share, a fractional GPU that would put two NCCL ranks on one device, LoRA under
ZeRO-3, a family without a checkpoint). They are found here, before SFT runs or a cluster starts, and
reported all at once with the keys to change; ``omnigrpo.config.schema`` raises them as one error.
"""

from __future__ import annotations

import typing
from urllib.parse import urlsplit

from omnigrpo.config.roles import Role
from omnigrpo.config.schema import ClusterConfig, Config, WorldConfig

WORLD_NAMES = typing.get_args(typing.get_type_hints(WorldConfig)["name"])
"""The built-in worlds' names (``world.name``'s choices): their prompt sets are named the same."""


def cross_field_problems(cfg: Config) -> list[str]:
    """One line per violated rule, naming the keys involved (empty: the config can run)."""
    problems = []
    batch, tr, ranks = cfg.batch_size, cfg.trainer, cfg.cluster.learner_workers
    if batch % (tr.mini_batches * ranks) or (batch // tr.mini_batches // ranks) % tr.micro_batch_size:
        problems.append(
            f"  trainer.micro_batch_size: {tr.micro_batch_size} must divide each learner's share of a "
            f"mini-batch, {batch // max(tr.mini_batches, 1) // ranks} samples (rollout.prompts_per_step * "
            f"rollout.group_size = {batch}, split into trainer.mini_batches = {tr.mini_batches}, shared by "
            f"cluster.learner_workers = {ranks})"
        )
    if not cfg.rewards:
        problems.append("  rewards: at least one reward is needed")
    names = [r.key for r in cfg.rewards]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"  rewards: {dup!r} is listed twice (give one an alias to use a judge twice)")
    for i, r in enumerate(cfg.rewards):
        if r.watch and r.weight:
            problems.append(f"  rewards.{i}.weight: a watchdog ({r.key!r}, watch: true) is never trained on; "
                            f"its weight must be 0, not {r.weight:g}")
    if cfg.rewards and sum(r.weight for r in cfg.rewards) <= 0:
        problems.append("  rewards: the weights sum to 0")
    if cfg.model.hidden_size % cfg.model.num_heads or cfg.model.num_heads % cfg.model.num_kv_heads:
        problems.append("  model.num_heads: must divide model.hidden_size and be a multiple of model.num_kv_heads")
    for role in (Role.ROLLOUT, Role.LEARNER, Role.DECODER):
        gpus = getattr(cfg.cluster, f"{role}_gpus")
        if gpus > 1:
            problems.append(f"  cluster.{role}_gpus: {gpus:g}: a {role} actor uses one device; ask for 1 or a "
                            "fraction (actors sharing a GPU, e.g. colocated)")
    c, learner_gpus = cfg.cluster, cfg.cluster.learner_gpus
    if 0 < learner_gpus < 1 and (c.placement == "split" or _colocated_gpus(c, cfg.actor_counts) <= 0.5):
        problems.append(f"  cluster.learner_gpus: {learner_gpus:g} could put two NCCL ranks on one GPU; a fraction "
                        "works only colocated, with each bundle's GPUs (all roles of index i) above 0.5")
    if cfg.trainer.resolved_tis_cap and not cfg.trainer.recompute_old:
        problems.append(f"  trainer.tis_cap: {cfg.trainer.resolved_tis_cap:g} needs trainer.old_logprobs: learner (the "
                        "weights correct the sampler's log-probs towards the learner's recomputed ones)")
    if c.sync_backend == "nccl" and (c.learner_gpus < 1 or c.rollout_gpus < 1):
        problems.append(f"  cluster.sync_backend: nccl needs a whole GPU per member (cluster.learner_gpus "
                        f"{c.learner_gpus:g} and cluster.rollout_gpus {c.rollout_gpus:g} must be 1)")
    if cfg.trainer.max_staleness and cfg.cluster.placement == "hybrid":
        problems.append(f"  trainer.max_staleness: {cfg.trainer.max_staleness} needs rollout actors (cluster.placement "
                        "colocated or split); under hybrid placement the learner ranks sample between updates")
    if cfg.data.prompts in WORLD_NAMES and cfg.data.prompts != cfg.world.name:
        problems.append(f"  data.prompts: {cfg.data.prompts!r} is a built-in world's prompt set, but world.name is "
                        f"{cfg.world.name!r}")
    if cfg.world.look_share and cfg.world.name != "glyphs":
        problems.append(f"  world.look_share: only the glyphs world names looks in its prompts; world.name is "
                        f"{cfg.world.name!r}")
    return problems + _model_problems(cfg) + _credential_problems(cfg)


def _colocated_gpus(c: ClusterConfig, counts: dict[Role, int]) -> float:
    """The smallest GPU total of a colocated bundle that holds a learner rank (``counts``: actors per role)."""
    return min(c.learner_gpus + sum(getattr(c, f"{role}_gpus") for role, n in counts.items()
                                    if role != Role.LEARNER and n > i)
               for i in range(c.learner_workers))


def _model_problems(cfg: Config) -> list[str]:
    m, problems = cfg.model, []
    if m.family != "builtin" and not m.path:
        problems.append(f"  model.path: family {m.family!r} needs a checkpoint (hub id or local directory)")
    if m.image_grid and (len(m.image_grid) != 2 or m.family not in ("emu3", "xomni")):
        problems.append(f"  model.image_grid: must be [rows, cols], and only emu3 / xomni take one (family "
                        f"{m.family!r} has its size fixed by the checkpoint)")
    if cfg.trainer.lora_rank and not cfg.trainer.lora_targets:
        problems.append("  trainer.lora_targets: LoRA (trainer.lora_rank > 0) needs at least one target module name")
    if cfg.trainer.lora_rank and cfg.trainer.zero_stage == 3:
        problems.append("  trainer.lora_rank: LoRA runs with trainer.zero_stage 0-2 (the frozen base is replicated; "
                        "ZeRO-3 would partition it, and the adapters are too small to need it)")
    if cfg.cluster.placement == "hybrid" and cfg.trainer.zero_stage == 3:
        problems.append("  cluster.placement: hybrid samples with trainer.zero_stage 0-2 (under ZeRO-3 the fast "
                        "sampler would run under DeepSpeed's per-module gather hooks; use colocated or split)")
    if cfg.decoder.path and m.family != "xomni":
        problems.append(f"  decoder.path: the diffusion decoder stage paints X-Omni's codes (model.family xomni), "
                        f"not {m.family!r}'s (their VQ decoder runs in the rollout worker)")
    if m.family == "builtin" and m.image_codes and m.image_codes != cfg.world.codebook_size:
        problems.append(f"  model.image_codes: {m.image_codes} differs from world.codebook_size "
                        f"{cfg.world.codebook_size}")
    return problems


SECRET_WORDS = ("token", "secret", "password", "passwd", "_key", "apikey", "credential", "auth", "bearer",
                "cookie", "header")
"""Parts of a key name that mark its value as a credential (redacted in MLflow, refused in a submitted job)."""


def has_credentials(url: str) -> bool:
    """Does ``url`` carry a user name or password (``scheme://user:secret@host``)?

    >>> has_credentials("http://user:secret@10.0.0.1:5000"), has_credentials("http://10.0.0.1:5000")
    (True, False)
    """
    try:
        parts = urlsplit(url)
        return bool(parts.username or parts.password)
    except ValueError:  # not a URL at all: nothing to leak
        return False


def _credential_problems(cfg: Config) -> list[str]:
    """Secrets belong in the environment, never in a config that is logged and stored with the run."""
    problems = []
    if has_credentials(cfg.tracking.uri):
        problems.append("  tracking.uri: credentials in the URL; set MLFLOW_TRACKING_USERNAME and "
                        "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead")
    if has_credentials(cfg.cluster.address):
        problems.append("  cluster.address: credentials in the address; Ray reads its token from RAY_AUTH_TOKEN_PATH")
    for i, spec in enumerate(cfg.rewards):
        if spec.name.startswith("url:") and has_credentials(spec.name.removeprefix("url:")):
            problems.append(f"  rewards.{i}.name: credentials in the URL; put the token in $OMNIGRPO_REWARD_TOKEN")
        for key, value in spec.kwargs.items():
            if isinstance(value, str) and "://" in value and has_credentials(value):
                problems.append(f"  rewards.{i}.kwargs.{key}: credentials in the URL; pass them through the "
                                "environment (e.g. api_key_env)")
    return problems
