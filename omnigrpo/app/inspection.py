"""What a resumed, evaluated or starting checkpoint must be before anything loads it.

Why: a checkpoint directory is input like any other, and a shared ``run.dir`` makes it other people's input:
its pickles are listed without unpickling (nothing in it may run code), its stamps and run state are read as
the plain data they must be (FIFOs and devices refused unopened), the run state may name only this config's
own starting policy, and its model must be the configured one. Part of :mod:`omnigrpo.app.preflight`; each
failure is a :class:`~omnigrpo.config.loader.ConfigError` naming the key and the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from omnigrpo.app.state import NotARunState, RunState
from omnigrpo.config.inputs import read_input
from omnigrpo.config.loader import ConfigError
from omnigrpo.config.schema import Config, ModelConfig
from omnigrpo.rollout.loader import CheckpointError, check_checkpoint


def check_resume(cfg: Config) -> tuple[Path, RunState]:
    """The newest resumable checkpoint of ``run.dir`` and its run state, checked against the cluster shape."""
    from omnigrpo.trainers.checkpoint import latest_checkpoint, latest_resumable, load_state, written

    root = Path(cfg.run.dir).resolve() / "checkpoints"
    for stamp in sorted(root.glob("*/step-*/omnigrpo_step.json")) + sorted(root.glob("*/crash-*/omnigrpo_step.json")):
        readable_json(stamp, "run.resume")
    resume_from = latest_resumable(root)
    newest = latest_checkpoint(root)
    if resume_from is None or (newest is not None and written(newest) > written(resume_from)):
        raise ConfigError(nothing_to_resume(root, newest))
    check_loadable(resume_from, "run.resume")
    try:
        data = load_state(resume_from / "run_state.pt")
    except Exception as err:  # noqa: BLE001 - truncated, corrupt or not a run state at all
        raise ConfigError(f"run.resume: {resume_from / 'run_state.pt'} cannot be read ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); remove that checkpoint to resume the one "
                          "before it") from None
    state = check_state(cfg, data, resume_from / "run_state.pt")
    check_same_model(cfg.model, resume_from)
    check_refreshed_reference(cfg.model, resume_from)
    info = readable_json(resume_from / "omnigrpo_step.json", "run.resume")
    if "version" in info and info["version"] != state.version:
        raise ConfigError(f"run.resume: {resume_from} holds weights v{info['version']} but a run state of v"
                          f"{state.version}; it cannot be resumed exactly (start a new run from it with model.path)")
    if len(state.rollout_rng) != cfg.samplers:
        key = "learner_workers (hybrid)" if cfg.cluster.placement == "hybrid" else "rollout_workers"
        raise ConfigError(f"cluster.{key}: resuming {resume_from} needs {len(state.rollout_rng)} samplers")
    ranks = info.get("learners", 1)
    if ranks != cfg.cluster.learner_workers:
        raise ConfigError(f"cluster.learner_workers: resuming {resume_from} needs {ranks} (its optimiser state is "
                          "sharded that way)")
    return resume_from, state


def check_state(cfg: Config, state: object, path: Path) -> RunState:
    """The run state loaded from ``path``: its keys of their types (:meth:`RunState.from_state`), naming as its KL
    reference only this config's ``model.path`` or a policy of its SFT cache: anyone who can write ``run.dir``
    could otherwise point the learner at any directory or hub id."""
    from omnigrpo.rollout.hub import absolute
    from omnigrpo.trainers.sft import cache_root

    try:
        run = RunState.from_state(state)
    except NotARunState as err:
        raise ConfigError(f"run.resume: {path} is not a run state omnigrpo wrote ({err}); remove that checkpoint "
                          "to resume the one before it") from None
    reference = run.reference_path
    local = Path(reference).is_absolute()
    if local and Path(reference).resolve().is_relative_to(cache_root(cfg.run.cache_dir) / "sft"):
        check_loadable(Path(reference), "run.resume")
    elif reference != absolute(cfg.model.path):
        raise ConfigError(f"run.resume: {path} names {reference!r} as the run's starting policy, which is neither "
                          f"model.path ({cfg.model.path or 'unset'}) nor a policy of this config's SFT cache; "
                          "resume with the model.path the run started from")
    return run


def check_loadable(directory: Path, key: str) -> None:
    """Nothing in a checkpoint ``directory`` could run code when loaded (``omnigrpo.trainers.checkpoint``)."""
    from omnigrpo.trainers.checkpoint import unsafe_contents

    found = unsafe_contents(directory)
    if found:
        raise ConfigError("\n".join(f"{key}: {line}; not a file omnigrpo writes, and loading it could run code: "
                                    "refusing it (remove the checkpoint, or restore it from a copy you trust)"
                                    for line in found))


def readable_json(path: Path, key: str) -> dict:
    """The JSON object in ``path`` (a regular file of at most 16 MB: a FIFO or a device is refused unopened), or a
    ConfigError naming ``key`` and the file."""
    try:
        data = json.loads(read_input(path, 16 << 20).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ConfigError(f"{key}: {path} cannot be read as JSON ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {path} holds a JSON {type(data).__name__}, not an object")
    return data


SHAPE_KEYS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "num_kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size"}
"""``model.*`` keys of the built-in policy and the ``config.json`` keys that hold them."""


def check_same_model(model: ModelConfig, checkpoint: Path) -> None:
    """A resumed checkpoint must be of the configured family and (built-in policy) shape: otherwise the run would
    train a new SFT for the new shape and then resume the old weights without a word."""
    saved = readable_json(checkpoint / "config.json", "run.resume")
    try:
        check_checkpoint(model.family, str(checkpoint), model.image_codes or None)
    except CheckpointError as err:
        raise ConfigError(f"run.resume: {checkpoint}: {str(err).partition(': ')[2]}") from None
    if model.family != "builtin" or model.path:
        return
    differ = [f"model.{ours} is {getattr(model, ours)} but the checkpoint has {saved.get(theirs)}"
              for ours, theirs in SHAPE_KEYS.items() if saved.get(theirs) != getattr(model, ours)]
    if differ:
        raise ConfigError(f"run.resume: {checkpoint} holds a policy of another shape: " + "; ".join(differ))


def check_refreshed_reference(model: ModelConfig, checkpoint: Path) -> None:
    """A checkpoint written after the KL reference was refreshed (``trainer.ref_refresh_*``; counted in its
    ``learner_state.pt``) carries that reference as a policy folder of the configured model, which the resume takes
    as its reference; one without a refresh carries none. Anything else would resume against another reference."""
    from omnigrpo.trainers.checkpoint import REFERENCE_DIR, load_state

    folder, learner = checkpoint / REFERENCE_DIR, checkpoint / "learner_state.pt"
    try:
        counted = int(load_state(learner).get("ref_refreshes", 0)) if learner.exists() else 0
    except Exception as err:  # noqa: BLE001 - truncated, corrupt or not a learner state at all
        raise ConfigError(f"run.resume: {learner} cannot be read ({type(err).__name__}); remove that checkpoint to "
                          "resume the one before it") from None
    if counted and not folder.is_dir():
        raise ConfigError(f"run.resume: {checkpoint} was written after {counted} refresh(es) of the KL reference but "
                          f"holds no {REFERENCE_DIR}/ folder; it cannot be resumed exactly")
    if folder.exists() and not counted:
        raise ConfigError(f"run.resume: {folder} is a KL reference, but {learner.name} counts no refresh of it: not "
                          "a checkpoint omnigrpo wrote; remove that folder or the checkpoint")
    if counted:
        check_same_model(model, folder)


def nothing_to_resume(root: Path, newest: Path | None) -> str:
    """Why ``run.resume`` cannot continue exactly: no checkpoint, or a newer one without a run state."""
    if newest is None:
        return (f"run.resume: no checkpoint under {root} to resume; drop --resume (run.resume=true) to start a "
                "fresh run, or point run.dir at the run to continue")
    info = json.loads((newest / "omnigrpo_step.json").read_text())
    why = "in the middle of an update" if info.get("partial_update") else "while the weights were being updated or sent"
    return (f"run.resume: the newest checkpoint, {newest}, was written {why} and cannot be resumed exactly; "
            f"start a new run from its weights with model.path={newest} (and another run.dir), or remove it to "
            "resume the checkpoint before it")
