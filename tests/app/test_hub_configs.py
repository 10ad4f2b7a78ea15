"""Each shipped family config runs as shipped, its model found by hub id in a Hugging Face cache, offline.

A tiny checkpoint of the real class is placed in the cache layout (``hub/models--ORG--NAME/snapshots/<sha>/``,
``refs/main``) under the config's own ``model.path``, with ``HF_HUB_OFFLINE=1``, and the CLI's ``train`` runs each
config for two steps, the three one after another in one fresh process on one local cluster (its imports and
start-up paid once). Overridden: resources, batch sizes, steps, the tiny checkpoint's image size and vocabulary, and
local stand-ins for the judges and decoder whose weights are not on this machine.
``model.path`` is never overridden: the run must resolve the hub id.

Each run is also the full GRPO step of its family on a DeepSpeed learner, with the shipped learner options
(Janus-Pro: ZeRO-2; Emu3: LoRA, ZeRO-2, activation checkpointing; X-Omni: ZeRO-3, activation checkpointing, a
pool of two diffusion-decoder actors painting two rollout chunks): the parameters move, the update reaches the
rollout side, and every image reaches the rewards at the size the family decodes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PLUGINS
from mlflow.tracking import MlflowClient

from omnigrpo.rollout.families import tiny
from omnigrpo.rollout.loader import load_policy

ROOT = Path(__file__).parents[2]
SHA = "0123456789abcdef0123456789abcdef01234567"
SMALL = ["cluster.address=", "cluster.placement=colocated", "cluster.learner_workers=1", "cluster.rollout_workers=1",
         "cluster.reward_workers=1", "cluster.learner_gpus=0", "cluster.rollout_gpus=0", "cluster.reward_gpus=0",
         "cluster.decoder_gpus=0", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.sample_batch=0",
         "trainer.micro_batch_size=4", "trainer.steps=2", "trainer.lr=1e-2", "tracking.image_every=0"]
SIZED = "{name: 'sized_reward:SizedSaturation', kwargs: {height: %d, width: %d}}"
OCR = "{name: ocr, required: false, tags: [text], kwargs: {score: edit, detect: false}}"
CASES = {  # config -> (family, its own overrides)
    "janus_pro_1b.yaml": ("janus", ["model.image_codes=64", f"rewards=[{SIZED % (32, 32)}, {OCR}]"]),
    "emu3_gen.yaml": ("emu3", ["model.image_codes=64", "model.image_grid=[8, 8]", "rollout.top_k=16",
                               f"rewards=[{SIZED % (32, 32)}]"]),
    "xomni.yaml": ("xomni", ["model.image_codes=64", "model.image_grid=[8, 8]", "rollout.chunks=2",
                             "cluster.decoder_workers=2",
                             f"rewards=[{SIZED % (32, 32)}, {OCR}]"]),
}


def place_in_cache(checkpoint: Path, hf_home: Path, repo: str) -> Path:
    """Copy a checkpoint directory where the hub cache keeps ``repo``'s main revision."""
    entry = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(checkpoint, entry / "snapshots" / SHA)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(SHA)
    return entry


RUN_ALL = """
import json, sys
from omnigrpo.cli import main
from omnigrpo.cluster import actors
from omnigrpo.config.loader import load_config
actors.connect(load_config(None, []).cluster)  # one local cluster; each run frees what it reserved
codes = {}
for config, argv in json.loads(sys.argv[1]).items():
    print("=====", config, flush=True)
    try:
        codes[config] = main(argv)
    except SystemExit as ended:
        codes[config] = ended.code
print(json.dumps(codes))
"""


@dataclass(frozen=True)
class HubRuns:
    """The shipped configs' runs: each config's tiny starting checkpoint, run directory and exit status, and the
    process's output."""

    start: dict[str, Path]
    run_dir: dict[str, Path]
    codes: dict[str, int]
    output: str


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory) -> HubRuns:
    """Every case of :data:`CASES` trained by ``omnigrpo.cli.main(["train", ...])``, one after another in one fresh
    process whose environment points at one Hugging Face cache holding the three tiny checkpoints."""
    root = tmp_path_factory.mktemp("hub")
    start, run_dir, argvs = {}, {}, {}
    for config, (family, overrides) in sorted(CASES.items()):
        repo = yaml.safe_load((ROOT / "configs" / config).read_text())["model"]["path"]
        start[config] = tiny.build(family, root / config / "tiny")
        place_in_cache(start[config], root / "hf", repo)
        if family == "xomni":  # the diffusion decoder's weights are not on this machine either: a tiny one
            decoder = tiny.diffusion_decoder(root / config / "decoder")
            overrides = [*overrides, f"decoder.path={decoder}", "decoder.steps=2"]
        run_dir[config] = root / config / "run"
        argvs[config] = ["train", f"configs/{config}", *SMALL, *overrides, f"run.dir={run_dir[config]}"]
    path = os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "OMNIGRPO_CACHE_DIR": str(root / "c"),
           "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", RUN_ALL, json.dumps(argvs)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    lines = proc.stdout.strip().splitlines()
    codes = json.loads(lines[-1]) if proc.returncode == 0 and lines else {}
    return HubRuns(start, run_dir, codes, proc.stdout[-3000:] + proc.stderr[-6000:])


@pytest.mark.cluster  # one of their own, started by a process whose environment points at the test's cache
@pytest.mark.parametrize("config", sorted(CASES))
def test_a_shipped_config_runs_from_its_hub_id_offline(config, hub_runs, tmp_path):
    family = CASES[config][0]
    repo = yaml.safe_load((ROOT / "configs" / config).read_text())["model"]["path"]
    assert repo.count("/") == 1 and not repo.startswith(("/", ".")), f"{config} names no hub id"
    assert hub_runs.codes.get(config) == 0, hub_runs.output
    client = MlflowClient(f"sqlite:///{hub_runs.run_dir[config] / 'mlflow.db'}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run.data.params["model.path"] == repo and run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward/total/mean"))
    assert steps == [1, 2]
    assert run.data.metrics["reward/sized_reward:SizedSaturation/failed"] == 0  # images of the family's size
    assert [m.value for m in client.get_metric_history(run.info.run_id, "learner/skipped_update")] == [0.0, 0.0]
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert summary["rollout_versions"] == [2]  # the last update reached the rollout actor
    before = load_policy(family, hub_runs.start[config]).model.state_dict()
    after = load_policy(family, summary["checkpoint"]).model.state_dict()
    assert [k for k in before if not torch.equal(before[k].to(after[k].dtype), after[k])], "no parameter moved"


def test_an_uncached_hub_id_offline_is_refused_before_anything_starts(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    cli = Path(sys.executable).parent / "omnigrpo"
    proc = subprocess.run([str(cli), "train", "configs/janus_pro_1b.yaml", f"run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.path: 'deepseek-community/Janus-Pro-1B' is no local directory, and HF_HUB_OFFLINE" in proc.stderr
    assert not (tmp_path / "run").exists()
