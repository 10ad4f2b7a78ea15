"""A checkpoint's files cannot run code when a run resumes, evaluates or starts from them: a pickle planted in any
file a checkpoint holds is named before anything loads it, and DeepSpeed's own loads admit only plain data."""

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from omnigrpo.cli import main
from omnigrpo.trainers.checkpoint import load_state, unsafe_contents
from omnigrpo.trainers.learner import Learner

SHAPES = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")


class Planted:
    """Unpickling this makes the directory ``marker``: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def written(sft_path, tmp_path_factory, cache_dir) -> Path:
    """A real ZeRO-2 checkpoint of the tiny policy with a run state, as a run writes it (no Ray)."""
    from conftest import TINY

    from omnigrpo.config.loader import load_config

    cfg = load_config(None, [*TINY, f"run.cache_dir={cache_dir}", "trainer.zero_stage=2"])
    learner = Learner(cfg.trainer, cfg.model, cfg.rollout, str(sft_path), seed=cfg.run.seed)
    learner.setup(threads=2)
    root = tmp_path_factory.mktemp("written") / "run" / "checkpoints" / "r1"
    state = {"step": 1, "version": 1, "rollout_rng": [None] * cfg.samplers, "run_id": "r1", "cursor": "{}",
             "reference_path": str(sft_path)}
    return Path(learner.save_checkpoint(root, 1, run_state=state))


def _plant(path: Path, marker: Path) -> None:
    if path.suffix == ".npy":
        np.save(path, np.array([Planted(marker)], dtype=object), allow_pickle=True)
    else:
        torch.save({"state": Planted(marker)}, path)


def test_a_written_checkpoint_holds_nothing_unsafe_and_deepspeed_resumes_it_weights_only(written, tiny_config):
    files = {p.relative_to(written).as_posix() for p in written.rglob("*.pt")}
    assert any("optim_states" in f for f in files) and {"learner_state.pt", "run_state.pt"} <= files
    assert unsafe_contents(written) == []
    cfg = tiny_config("trainer.zero_stage=2")
    learner = Learner(cfg.trainer, cfg.model, cfg.rollout, str(written), seed=cfg.run.seed)
    assert learner.setup(threads=2, resume=True) == 0  # the learner was saved before any update
    assert learner.engine.checkpoint_engine.load is load_state


@pytest.mark.parametrize("name", ["optimizer/state/mp_rank_00_model_states.pt",
                                  "optimizer/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "learner_state.pt", "run_state.pt", "codebook.npy"])
def test_a_pickle_planted_in_a_checkpoint_runs_nothing_on_resume_and_is_named(written, name, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(written, run / "checkpoints" / "r1" / written.name)
    target, marker = run / "checkpoints" / "r1" / written.name / name, tmp_path / "ran"
    _plant(target, marker)
    code = main(["train", SHAPES, f"run.dir={run}", "run.resume=true", *_tiny_shape(written)])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists(), err
    lines = [line for line in err.splitlines() if line.startswith("omnigrpo:")]
    assert len(lines) == 1 and str(target) in lines[0] and "could run code" in lines[0], err
    if target.suffix == ".pt":  # the loads themselves refuse it too, whatever a check before them saw
        with pytest.raises(pickle.UnpicklingError):
            load_state(target)
        assert not marker.exists()


def test_a_planted_pickle_is_refused_by_eval_and_as_model_path(written, tmp_path, capsys):
    checkpoint = tmp_path / "ck"
    shutil.copytree(written, checkpoint)
    _plant(checkpoint / "learner_state.pt", tmp_path / "ran")
    assert main(["eval", SHAPES, "--checkpoint", str(checkpoint)]) == 2
    assert "--checkpoint: " in capsys.readouterr().err
    code = main(["train", SHAPES, f"model.path={checkpoint}", f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"model.path: {checkpoint / 'learner_state.pt'}" in err, err
    assert not (tmp_path / "ran").exists()


def test_deepspeed_loading_a_planted_optimizer_state_runs_nothing(written, tiny_config, tmp_path):
    checkpoint = tmp_path / "ck"
    shutil.copytree(written, checkpoint)
    _plant(checkpoint / "optimizer/state/zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "ran")
    cfg = tiny_config("trainer.zero_stage=2")
    learner = Learner(cfg.trainer, cfg.model, cfg.rollout, str(checkpoint), seed=cfg.run.seed)
    with pytest.raises(pickle.UnpicklingError):
        learner.setup(threads=2, resume=True)
    assert not (tmp_path / "ran").exists()


def _tiny_shape(checkpoint: Path) -> list[str]:
    """Overrides that make the shapes config's policy the shape of the tiny checkpoint."""
    saved = json.loads((checkpoint / "config.json").read_text())
    return [f"model.hidden_size={saved['hidden_size']}", f"model.num_layers={saved['num_hidden_layers']}",
            f"model.num_heads={saved['num_attention_heads']}", f"model.num_kv_heads={saved['num_key_value_heads']}",
            f"model.intermediate_size={saved['intermediate_size']}"]


def test_a_fifo_or_a_linked_folder_in_a_checkpoint_is_named_not_read(written, tmp_path, capsys):
    import os

    run = tmp_path / "run"
    step = run / "checkpoints" / "r1" / written.name
    shutil.copytree(written, step)
    (step / "omnigrpo_step.json").unlink()
    os.mkfifo(step / "omnigrpo_step.json")  # opened, it would wait for a writer forever
    assert main(["train", SHAPES, f"run.dir={run}", "run.resume=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omnigrpo: run.resume: ") and f"{step / 'omnigrpo_step.json'}: is a FIFO" in err, err
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(step / "optimizer"), elsewhere)
    (step / "optimizer").symlink_to(elsewhere)
    assert any("a link to the folder" in line for line in unsafe_contents(step))


def test_a_run_state_may_name_only_the_configs_own_starting_policy(written, tmp_path, capsys):
    run = tmp_path / "run"
    step = run / "checkpoints" / "r1" / written.name
    shutil.copytree(written, step)
    state = torch.load(step / "run_state.pt", weights_only=True)
    state.update(run_id="r1", cursor="{}", reference_path=str(tmp_path / "someone-elses-model"))
    torch.save(state, step / "run_state.pt")
    assert main(["train", SHAPES, f"run.dir={run}", "run.resume=true", *_tiny_shape(written)]) == 2
    err = capsys.readouterr().err
    assert "names" in err and "someone-elses-model" in err and "neither model.path" in err, err
    torch.save({"step": 1, "version": "1"}, step / "run_state.pt")  # plain data, not a run state
    assert main(["train", SHAPES, f"run.dir={run}", "run.resume=true", *_tiny_shape(written)]) == 2
    assert "is not a run state omnigrpo wrote (version, run_id" in capsys.readouterr().err
