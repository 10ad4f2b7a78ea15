"""Shared fixtures: a tiny config of the real classes and its SFT checkpoint, built once per session.

DeepSpeed's CPU communication op is compiled once into a cache that outlives the session
(``TORCH_EXTENSIONS_DIR``), so only the first test run on a machine pays for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from omnigrpo.cluster.environment import prepare_local_ray_env

prepare_local_ray_env("")  # as the CLI does, before anything imports Ray
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "omnigrpo" / "torch_extensions"))

from omnigrpo.config.loader import load_config  # noqa: E402
from omnigrpo.config.schema import Config  # noqa: E402

TINY = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
    "model.intermediate_size=64", "world.codebook_size=64", "sft.steps=40", "sft.batch_size=32",
    "sft.kmeans_images=128", "rollout.prompts_per_step=4", "rollout.group_size=4",
    "trainer.micro_batch_size=8", "eval.samples_per_prompt=2", "tracking.image_every=1", "tracking.images=4",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_config(cache_dir, tmp_path):
    """``tiny_config(*overrides, path=None)`` -> a validated Config of a tiny model writing under ``tmp_path``
    (``path``: a YAML file to start from)."""

    def make(*overrides: str, path: Path | None = None) -> Config:
        return load_config(path, [*TINY, f"run.cache_dir={cache_dir}", f"run.dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture(scope="session")
def sft_path(cache_dir) -> Path:
    """The tiny config's SFT checkpoint (trained once per session, then reused from the cache)."""
    from omnigrpo.trainers.sft import sft_checkpoint

    cfg = load_config(None, [*TINY, f"run.cache_dir={cache_dir}"])
    return sft_checkpoint(cfg, threads=2)


def policy_weights(path) -> dict[str, torch.Tensor]:
    """The built-in policy's weights saved at ``path`` (a checkpoint or SFT directory)."""
    from omnigrpo.rollout.families.builtin import WorldPolicy

    return WorldPolicy.from_pretrained(path).model.state_dict()


def metric_values(cfg: Config, run_id: str, key: str) -> list[float]:
    """The values a run of ``cfg`` logged for ``key``, in step order (read back from its MLflow store)."""
    from mlflow.tracking import MlflowClient

    from omnigrpo.app.tracking import history, store_uri

    return [m.value for m in history(MlflowClient(store_uri(cfg)), run_id, key)]


def refused(main, argv: list[str], capsys, *needles: str) -> str:
    """Run the CLI's ``main(argv)`` and check it refused: exit status 2, every stderr line an ``omnigrpo:`` line
    (no traceback), each of ``needles`` in the message; returns stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("omnigrpo: ") for line in lines), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture
def plugins(monkeypatch) -> Path:
    """``tests/plugins`` on the import path of this process and of the Ray workers it starts, so tests name the
    reward modules there as ``module:attr``."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])))
    return PLUGINS


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP written the way open_clip publishes models: config JSON + safetensors."""
    import open_clip
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("tiny_clip")
    (directory / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{directory}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "open_clip_model.safetensors")
    return directory
