"""Every check made before a cluster starts, in one place.

Why: a mistake found after SFT ran or a cluster started costs minutes; found here it costs a second.
``load_config`` has already checked each key's type and range and the rules that span keys; this module checks
what needs more than the config: the prompt source, the checkpoint and X-Omni's decoder, the memory plan against
the GPUs, every reward (found, its arguments accepted; the judges load in the reward actors), what a resume or an
evaluation needs. Every failure is a :class:`~omnigrpo.config.loader.ConfigError` naming the key, file or line,
which the CLI prints as ``omnigrpo:`` lines with exit status 2 (docs/bad_input.md).
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omnigrpo.app import planner
from omnigrpo.app.inspection import check_loadable, check_resume, readable_json
from omnigrpo.app.state import RunState
from omnigrpo.cluster.payload import Payload, gather
from omnigrpo.config.loader import ConfigError
from omnigrpo.config.schema import Config, DataConfig, DecoderConfig, ModelConfig, RewardSpec, TrainerConfig
from omnigrpo.config.validation import SECRET_WORDS
from omnigrpo.data.benchmarks import split
from omnigrpo.data.prompts import PromptFileError, load_prompts
from omnigrpo.rewards.protocol import is_reward_function
from omnigrpo.rewards.registry import RewardArgumentError, RewardNotFound, build_reward, check_arguments, resolve_reward
from omnigrpo.rewards.worker import DryRun, applies_to
from omnigrpo.rollout.loader import CheckpointError, check_checkpoint, family_class
from omnigrpo.worlds import registry as worlds


@dataclass(frozen=True)
class RunPlan:
    """What the checks found: the training prompts and, when resuming, the checkpoint and its state."""

    prompts: list[str]
    metadata: list[dict]
    dry_run: DryRun
    resume_from: Path | None = None
    state: RunState | None = None


def check_run(cfg: Config) -> RunPlan:
    """Everything a training run needs that can be checked without a cluster; raises ConfigError."""
    check_run_dir(cfg.run.dir)
    check_tracking(cfg.tracking.uri)
    prompts, metadata = training_prompts(cfg.data, cfg.world.look_share)
    check_options(cfg)
    if cfg.model.path:
        check_model(cfg.model)
    if cfg.cluster.gpu_memory_gb:
        check_memory(cfg)
    dry_run = check_rewards(cfg, prompts, metadata)
    resume_from, state = check_resume(cfg) if cfg.run.resume else (None, None)
    return RunPlan(prompts, metadata, dry_run, resume_from, state)


def check_options(cfg: Config) -> None:
    """The options that need another section to make sense (a decoder, a style reader, a watchdog, a KL term):
    what ``train`` and ``submit`` both check."""
    check_decoder(cfg.model, cfg.decoder)
    check_style_options(cfg.trainer, cfg.world.name)
    check_watch_options(cfg.trainer, cfg.rewards)
    check_refresh_options(cfg.trainer)


def check_style_options(trainer: TrainerConfig, world_name: str) -> None:
    """Options that read a sample's style back need a world with a style reader and its attribute names."""
    world = worlds.get(world_name)
    if trainer.diversity_space == "style" and not hasattr(world, "read_style"):
        raise ConfigError(f"trainer.diversity_space: 'style' needs a world that reads its styles back (glyphs); "
                          f"{world_name!r} does not: use 'pixels'")
    if not trainer.baseline_by:
        return
    if not hasattr(world, "read_style"):
        raise ConfigError(f"trainer.baseline_by: world {world_name!r} does not read its styles back (glyphs does)")
    known = [f.name for f in dataclasses.fields(world.Style)]
    unknown = [name for name in trainer.baseline_by if name not in known]
    if unknown:
        raise ConfigError(f"trainer.baseline_by: {', '.join(map(repr, unknown))} is not a style attribute of world "
                          f"{world_name!r}; choose from {', '.join(known)}")


def check_watch_options(trainer: TrainerConfig, rewards: list[RewardSpec]) -> None:
    """An option that reads a watchdog's scores needs a watchdog reward."""
    if trainer.kl_uncertain_frac < 1.0 and not any(r.watch for r in rewards):
        raise ConfigError(f"trainer.kl_uncertain_frac: {trainer.kl_uncertain_frac:g} ranks each sample under a "
                          "watchdog reward, and no reward has watch: true (add one with weight 0, or set 1.0)")


def check_refresh_options(trainer: TrainerConfig) -> None:
    """A refresh of the KL reference needs a KL term: with ``kl_coef`` 0 the learner keeps no reference at all."""
    for key in ("ref_refresh_every", "ref_refresh_kl"):
        if getattr(trainer, key) and not trainer.kl_coef:
            raise ConfigError(f"trainer.{key}: {getattr(trainer, key):g} refreshes the KL reference, and "
                              "trainer.kl_coef is 0 (no KL term, no reference to refresh): set kl_coef above 0, or "
                              f"{key} to 0")


SYSTEM_TREES = ("/proc", "/sys", "/dev", "/boot", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
                "/libx32")
"""Directories no run writes into, nor anywhere below them (root may write there, which is no reason to)."""
SYSTEM_ROOTS = ("/", "/var", "/run", "/home", "/opt", "/srv", "/mnt", "/media")
"""Directories a run may write below, but not into directly."""
PSEUDO_FILE_SYSTEMS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                       "securityfs", "pstore", "bpf", "configfs", "fusectl", "mqueue", "hugetlbfs", "autofs",
                       "binfmt_misc", "efivarfs"}


def check_run_dir(directory: str) -> None:
    """``run.dir`` is a writable directory of this user's that no one else may write into, or one that can be made
    (checked without making it: bad input writes nothing), and neither a system directory nor on a pseudo file
    system."""
    path = Path(directory).expanduser().absolute()
    resolved = path.resolve()
    if str(resolved) in SYSTEM_ROOTS or any(resolved.is_relative_to(tree) for tree in SYSTEM_TREES):
        raise ConfigError(f"run.dir: {resolved} is a system directory; give a directory of your own (e.g. ./runs/NAME)")
    kind = file_system(resolved)
    if kind in PSEUDO_FILE_SYSTEMS:
        raise ConfigError(f"run.dir: {resolved} lies on a {kind} pseudo file system, which cannot hold a run")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"run.dir: {existing} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir: {existing} is not writable")
    if existing == path and (path.stat().st_uid != os.geteuid() or path.stat().st_mode & 0o002):
        raise ConfigError(f"run.dir: {path} belongs to another user or anyone may write into it: whoever can plant "
                          "a checkpoint or a link there steers the run; give a directory of your own (e.g. "
                          f"{path / os.environ.get('USER', 'me')})")


def file_system(path: Path) -> str:
    """The type of the file system ``path`` lies on (its longest mount point in ``/proc/self/mountinfo``; "" where
    that cannot be read)."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    best, kind = "", ""
    for line in mounts:
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")  # spaces are written as \040
        fs_type = fields[fields.index("-") + 1]
        if path.is_relative_to(point) and len(point) >= len(best):
            best, kind = point, fs_type
    return kind


TRACKING_TIMEOUT_S = 10.0
"""How long preflight waits for an MLflow server's ``/health`` before refusing ``tracking.uri``."""


def check_tracking(uri: str) -> None:
    """An MLflow server named by ``tracking.uri`` answers now, before Ray and the actors start (a local store
    needs no check)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=TRACKING_TIMEOUT_S).raise_for_status()
    except requests.RequestException as err:
        reason = f"no answer within {TRACKING_TIMEOUT_S:g} s" if isinstance(err, requests.Timeout) else \
            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        raise ConfigError(f"tracking.uri: the MLflow server at {uri} is not usable ({reason}); start it, or leave "
                          "tracking.uri empty for a local store") from None


def check_prompts(source: str, key: str, look_share: float = 0.0) -> tuple[list[str], list[dict]]:
    """The prompts of a world name or prompt file; a bad file names itself and the line."""
    try:
        return load_prompts(source, look_share)
    except PromptFileError as err:
        raise ConfigError(f"{key}: {err}") from None


def training_prompts(data: DataConfig, look_share: float = 0.0) -> tuple[list[str], list[dict]]:
    """``data.prompts`` (a world's with ``world.look_share`` naming looks) without the ``data.held_out_share`` held
    out from training."""
    prompts, metadata = check_prompts(data.prompts, "data.prompts", look_share)
    if not data.held_out_share:
        return prompts, metadata
    try:
        return split(prompts, metadata, data.held_out_share, data.held_out_seed)[0]
    except ValueError as err:
        raise ConfigError(f"data.held_out_share: {err}") from None


def check_decoder(model: ModelConfig, decoder: DecoderConfig) -> None:
    """X-Omni's pixels come from its diffusion decoder: without one the judges would score the policy's palette
    code map (16 px of one colour per code), which rewards nothing a user wants."""
    if model.family == "xomni" and not decoder.path:
        raise ConfigError("decoder.path: X-Omni paints its images with a diffusion decoder; without one the rewards "
                          "would score a palette map of its codes. Set decoder.path to the decoder's directory or "
                          "hub id (omnigrpo.rollout.families.diffusion)")


def check_model(model: ModelConfig) -> None:
    """The checkpoint ``model.path`` exists (local, or a cached / reachable hub id), holds nothing that could run
    code when loaded, and has the configured image vocabulary."""
    if Path(model.path).expanduser().is_dir():
        check_loadable(Path(model.path).expanduser(), "model.path")
    try:
        check_checkpoint(model.family, model.path, model.image_codes or None)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None


def memory_plan(cfg: Config, prompt_tokens: int = planner.PROMPT_TOKENS) -> planner.MemoryPlan:
    """The config's memory plan; a checkpoint whose ``config.json`` cannot be read names ``model.path``."""
    if cfg.model.path:
        check_model(cfg.model)
    with unreadable("model.path", cfg.model.path or "(built-in)"):
        return planner.plan(cfg, prompt_tokens)


def check_memory(cfg: Config) -> None:
    """With ``cluster.gpu_memory_gb`` set, every GPU's planned load fits in it (``omnigrpo plan`` shows why not)."""
    problems = planner.shortfalls(memory_plan(cfg))
    if problems:
        raise ConfigError("\n".join(problems))


def image_shape(world_name: str, model: ModelConfig, decoder: DecoderConfig) -> tuple[int, int]:
    """(height, width) of the images the rewards will see, from config files only (no weights)."""
    shape = worlds.get(world_name).IMAGE_SHAPE
    if model.path:
        with unreadable("model.path", model.path):
            shape = family_class(model.family).pixels(model.path, tuple(model.image_grid) or None)
    if decoder.path:  # the decoder paints 2 * its VAE's scale px per code, i.e. scales the code map
        from omnigrpo.rollout.families.diffusion import DiffusionDecoder

        with unreadable("decoder.path", decoder.path):  # xomni: 16 px per code
            shape = DiffusionDecoder.pixels(decoder.path, (shape[0] // 16, shape[1] // 16))
    return shape


@contextmanager
def unreadable(key: str, path: str):
    """A checkpoint whose config files are missing or malformed becomes a ConfigError naming ``key``."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{key}: cannot read the checkpoint's configuration in {path!r} "
                          f"({type(err).__name__}: {err})") from None


def check_rewards(cfg: Config, prompts: list[str], metadata: list[dict]) -> DryRun:
    """What can be checked without loading a judge: each reward resolves, takes its kwargs and applies to some
    prompt. Returns what the reward actors dry-run their judges on once built, on their own devices (a 7B VLM
    judge never loads on the driver)."""
    check_reward_specs(cfg.rewards, metadata)
    return DryRun(image_shape(cfg.world.name, cfg.model, cfg.decoder), (prompts * 2)[:2], (metadata * 2)[:2])


def check_reward_specs(rewards: list[RewardSpec], metadata: list[dict]) -> None:
    """Each reward resolves (a plugin is imported; a judge's model is not loaded), takes its kwargs, and, with
    tags, applies to some prompt of ``metadata``."""
    for i, spec in enumerate(rewards):
        key = f"rewards.{i}"
        if spec.tags and not any(applies_to(spec.tags, m) for m in metadata):
            raise ConfigError(f"{key}.tags: reward {spec.name!r} has tags {spec.tags} but no training prompt "
                              "carries any of them")
        check_reward(spec.name, spec.kwargs, key)


def check_reward(name: str, kwargs: dict, key: str) -> None:
    """The reward resolves and takes ``kwargs``, checked without building it (no judge is loaded)."""
    try:
        obj = resolve_reward(name)  # a callable, or RewardNotFound
        check_arguments(name, obj, kwargs, skip=3 if is_reward_function(obj) else 0)
    except RewardArgumentError as err:
        raise ConfigError(f"{key}.kwargs: {err}") from None
    except RewardNotFound as err:
        raise ConfigError(f"{key}.name: {err}") from None


def reward_arguments(items: list[str]) -> dict:
    """``key=value`` reward arguments of the command line, each value parsed as YAML."""
    import yaml

    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"reward argument {item!r} is not key=value")
        try:
            kwargs[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"reward argument {key}: {value!r} is not a YAML value ({err})") from None
    return kwargs


def build_checked(name: str, kwargs: dict, key: str):
    """``build_reward`` with its failures as ConfigError naming ``key`` (``rewards.N``)."""
    try:
        return build_reward(name, kwargs)
    except RewardArgumentError as err:
        raise ConfigError(f"{key}.kwargs: {err}") from None
    except RewardNotFound as err:
        raise ConfigError(f"{key}.name: {err}") from None
    except Exception as err:  # noqa: BLE001 - a factory that raises on its arguments
        raise ConfigError(f"{key}: reward {name!r} could not be built: {type(err).__name__}: {err}") from None


def check_eval(cfg: Config, checkpoint: str, prompts_source: str) -> tuple[Path, list[str], list[dict]]:
    """An evaluation's checkpoint directory and prompts (a file, or the world's held-out set)."""
    check_decoder(cfg.model, cfg.decoder)
    path = Path(checkpoint).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"--checkpoint: {checkpoint!r} is not a directory")
    check_loadable(path, "--checkpoint")
    if prompts_source:
        prompts, metadata = check_prompts(prompts_source, "--prompts")
    else:
        prompts, metadata = worlds.held_out_prompts(cfg.world.name)
    if cfg.model.family == "builtin":
        saved = path / "policy.json"
        if not saved.exists():
            raise ConfigError(f"--checkpoint: {path} is not a built-in world policy (no policy.json); for another "
                              "family set model.family")
        world = readable_json(saved, "--checkpoint").get("world")
        if world != cfg.world.name:
            raise ConfigError(f"world.name: checkpoint {path} was trained on world {world!r}, but world.name is "
                              f"{cfg.world.name!r}")
    try:
        check_checkpoint(cfg.model.family, str(path), cfg.model.image_codes or None)
    except CheckpointError as err:
        raise ConfigError(f"--checkpoint: {err}") from None
    for i, spec in enumerate(cfg.rewards):  # found, with arguments it takes (the evaluator builds them once)
        check_reward(spec.name, spec.kwargs, f"rewards.{i}")
    return path, prompts, metadata


def check_submit(cfg: Config) -> Payload:
    """The checks of :func:`check_run` that hold on any machine, made before anything is sent: the prompts (a
    file must be a regular, readable prompt file), X-Omni's decoder, the style options and every reward (found,
    its arguments accepted, its tags matched; no judge or checkpoint is loaded). Then what the job would carry:
    refused, naming the key, for what cannot travel. A submitted run writes where every node sees it."""
    if not Path(cfg.run.dir).is_absolute():
        raise ConfigError(f"run.dir: a submitted run needs an absolute path on storage the cluster sees (got "
                          f"{cfg.run.dir!r}; a relative one would land in the job's temporary working directory)")
    _, metadata = training_prompts(cfg.data, cfg.world.look_share)
    check_options(cfg)
    for i, spec in enumerate(cfg.rewards):  # the job's config.yaml travels whole: no credential may be in it
        for key in spec.kwargs:
            if any(word in key.lower() for word in SECRET_WORDS) and not key.lower().endswith("_env"):
                raise ConfigError(f"rewards.{i}.kwargs.{key}: a submitted job would upload this credential in its "
                                  "config; give it through the environment of the cluster's nodes (for vlm_judge: "
                                  "api_key_env names the variable)")
    check_reward_specs(cfg.rewards, metadata)
    return gather(cfg)
