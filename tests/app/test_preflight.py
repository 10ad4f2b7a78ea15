"""Bad input that needs more than the config to find (a reward's arguments, a checkpoint, a prompt file, the
command's own options) ends in ``omnigrpo:`` lines, exit status 2, no traceback, before any cluster starts."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from conftest import leftovers, refused
from mlflow.tracking import MlflowClient

from omnigrpo.app.preflight import PSEUDO_FILE_SYSTEMS, file_system
from omnigrpo.cli import main
from omnigrpo.rollout.families import tiny

SHAPES = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")


def _refused(argv: list[str], capsys, *needles: str) -> str:
    err = refused(main, argv, capsys, *needles)
    assert not leftovers()  # refused before anything was reserved on a cluster
    return err


@pytest.mark.parametrize("rewards, needle", [
    ("[{name: shapes, kwargs: {strict: true}}]", "rewards.0.kwargs: reward 'shapes' takes no argument 'strict'"),
    ("[{name: ocr, kwargs: {scroe: exact}}]", "takes no argument 'scroe' (did you mean 'score'?)"),
    ("[{name: shapes}, {name: hps, kwargs: {}}]", "rewards.1.kwargs: reward 'hps' needs the argument(s) checkpoint"),
])
def test_reward_arguments_are_checked_against_the_signature(rewards, needle, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _refused(["train", SHAPES, f"rewards={rewards}", f"run.dir={run_dir}"], capsys, needle)
    assert not run_dir.exists()


def test_a_checkpoint_with_another_image_vocabulary_is_refused(tmp_path, capsys):
    path = tiny.build("janus", tmp_path / "janus")
    capsys.readouterr()  # transformers' save progress
    _refused(["train", SHAPES, "model.family=janus", f"model.path={path}", "model.image_codes=7",
              f"run.dir={tmp_path / 'run'}"], capsys, "model.image_codes: is 7, but the checkpoint")
    (tmp_path / "empty").mkdir()
    _refused(["train", SHAPES, "model.family=janus", f"model.path={tmp_path / 'empty'}",
              f"run.dir={tmp_path / 'run'}"], capsys, "model.path:", "holds no checkpoint (no config.json")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    _refused(["train", SHAPES, "model.family=janus", f"model.path={tmp_path / 'broken'}",
              f"run.dir={tmp_path / 'run'}"], capsys, "model.path:", "names no model_type")
    _refused(["train", SHAPES, "model.family=emu3", f"model.path={path}", f"run.dir={tmp_path / 'run'}"], capsys,
             "model.family: is 'emu3', but the checkpoint", "is a 'janus' model")
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "janus"}')
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in path.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes()[: f.stat().st_size // 2] if f.suffix == ".safetensors"
                                         else f.read_bytes())
    _refused(["train", SHAPES, "model.family=janus", f"model.path={truncated}", f"run.dir={tmp_path / 'run'}"],
             capsys, "model.path:", "model.safetensors cannot be read")
    _refused(["train", SHAPES, "model.family=janus", f"model.path={tmp_path / 'broken'}", "model.image_codes=7",
              f"run.dir={tmp_path / 'run'}"], capsys, "model.path: cannot read the image vocabulary")
    _refused(["train", SHAPES, "model.family=janus", f"model.path={tmp_path / 'broken'}",
              f"run.dir={tmp_path / 'run'}"], capsys, "model.path: cannot read the checkpoint's configuration")
    _refused(["train", SHAPES, "model.family=janus", f"model.path={tmp_path / 'missing'}",
              f"run.dir={tmp_path / 'run'}"], capsys, "model.path:", "does not exist")


def test_xomni_without_a_decoder_is_refused_for_training_and_evaluation(tmp_path, capsys):
    path = tiny.build("xomni", tmp_path / "xomni")
    capsys.readouterr()
    needle = "decoder.path: X-Omni paints its images with a diffusion decoder"
    _refused(["train", SHAPES, "model.family=xomni", f"model.path={path}", f"run.dir={tmp_path / 'run'}"], capsys,
             needle)
    _refused(["eval", SHAPES, "--checkpoint", str(path), "model.family=xomni", f"model.path={path}",
              f"run.dir={tmp_path / 'run'}"],
             capsys, needle)


def test_a_bad_prompt_line_names_the_key_file_and_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": \n')
    _refused(["train", SHAPES, f"data.prompts={prompts}", f"run.dir={tmp_path / 'run'}"], capsys,
             f"data.prompts: {prompts}:2: not valid JSON")


def test_eval_bench_curves_and_tiny_options(tmp_path, capsys):
    _refused(["eval", SHAPES, "--checkpoint", str(tmp_path / "nope")], capsys, "--checkpoint:", "is not a directory")
    (tmp_path / "ckpt").mkdir()
    _refused(["eval", SHAPES, "--checkpoint", str(tmp_path / "ckpt"), "--prompts", str(tmp_path / "none.txt")],
             capsys, "--prompts: ", "none.txt' is neither a built-in world")
    _refused(["bench", SHAPES, "--parts", "rollout,warp"], capsys, "--parts: unknown part(s) warp")
    _refused(["bench", SHAPES, "--parts", "trl", "--modes", "hybrid,warp"], capsys, "--modes: unknown mode(s) warp")
    _refused(["bench", SHAPES, "--parts", "trl", "--rounds", "0"], capsys, "--rounds: must be at least 1, got 0")
    _refused(["curves", SHAPES, f"run.dir={tmp_path}", "--out", str(tmp_path / "c.png")], capsys,
             "run.dir: no MLflow store at")
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # an empty store
    capsys.readouterr()
    _refused(["curves", SHAPES, f"run.dir={tmp_path}", "--out", str(tmp_path / "c.png")], capsys,
             "no training run of experiment")
    _refused(["eval", SHAPES, "--checkpoint", str(tmp_path / "ckpt")], capsys, "is not a built-in world policy")
    _refused(["curves", SHAPES, f"run.dir={tmp_path}", "--run-id", "0" * 32, "--out", str(tmp_path / "c.png")],
             capsys, "--run-id")
    _refused(["status", "raysubmit_none", "--address", "http://127.0.0.1:9"], capsys, "job 'raysubmit_none'")
    _refused(["tiny", "dalle", str(tmp_path / "t")], capsys, "dalle")
    _refused(["serve-reward", "shapes", "strict=true"], capsys, "takes no argument 'strict'")
    _refused(["serve-reward", "shapes", "oops"], capsys, "is not key=value")


def test_resume_names_an_unreadable_or_mismatched_checkpoint_before_anything_starts(tiny_config, sft_path, tmp_path):
    import json
    import shutil

    import torch

    from omnigrpo.app.preflight import check_resume
    from omnigrpo.config.loader import ConfigError

    cfg = tiny_config("run.resume=true")
    step = Path(cfg.run.dir) / "checkpoints" / "r1" / "step-000002"
    shutil.copytree(sft_path, step)  # the weights and config.json of a real built-in policy
    stamp = {"step": 2, "written_ns": 1, "version": 2, "partial_update": False, "learners": 1}
    (step / "omnigrpo_step.json").write_text(json.dumps(stamp))
    torch.save({"step": 2, "version": 2, "rollout_rng": [None] * cfg.samplers, "run_id": "r1", "cursor": "{}",
                "reference_path": str(sft_path)}, step / "run_state.pt")
    assert check_resume(cfg)[0] == step.resolve()  # whole: it resumes
    with pytest.raises(ConfigError, match="holds a policy of another shape: model.hidden_size is"):
        check_resume(tiny_config("run.resume=true", f"model.hidden_size={2 * _hidden(step)}"))
    with pytest.raises(ConfigError, match="run.resume: .* is a 'qwen2' model"):
        check_resume(tiny_config("run.resume=true", "model.family=janus", f"model.path={sft_path}"))
    (step / "run_state.pt").write_bytes((step / "run_state.pt").read_bytes()[:50])  # truncated
    with pytest.raises(ConfigError, match="run_state.pt cannot be read"):
        check_resume(cfg)
    (step / "omnigrpo_step.json").write_text('{"step": 2, "writ')
    with pytest.raises(ConfigError, match="run.resume: .*omnigrpo_step.json cannot be read as JSON"):
        check_resume(cfg)


def _hidden(checkpoint: Path) -> int:
    import json

    return json.loads((checkpoint / "config.json").read_text())["hidden_size"]


def test_a_run_dir_that_is_a_file_and_a_dead_tracking_server_are_refused_before_ray(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _refused(["train", SHAPES, f"run.dir={tmp_path / 'file'}"], capsys, "run.dir:", "exists and is not a directory")
    for system in ("/", "/etc", "/usr/local/runs", "/var", "/proc/self/new", "/sys/fs/x", "/dev/shm/run"):
        _refused(["train", SHAPES, f"run.dir={system}"], capsys, "run.dir:", "is a system directory")
    (tmp_path / "to-etc").symlink_to("/etc")
    _refused(["train", SHAPES, f"run.dir={tmp_path / 'to-etc' / 'runs'}"], capsys, "run.dir: /etc/runs is a system")
    assert file_system(Path("/proc/self")) == "proc" and file_system(tmp_path) not in PSEUDO_FILE_SYSTEMS
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)  # anyone may write into it (as /tmp): anyone could plant a checkpoint there
    _refused(["train", SHAPES, f"run.dir={shared}"], capsys, f"run.dir: {shared} belongs to another user or anyone")
    _refused(["train", SHAPES, "run.dir=/tmp"], capsys, "run.dir: /tmp belongs to another user or anyone may write")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)  # nobody's
    _refused(["train", SHAPES, f"run.dir={theirs}"], capsys, f"run.dir: {theirs} belongs to another user")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nothing listens there
    _refused(["train", SHAPES, f"run.dir={tmp_path / 'run'}", f"tracking.uri=http://127.0.0.1:{port}"], capsys,
             f"tracking.uri: the MLflow server at http://127.0.0.1:{port} is not usable")
