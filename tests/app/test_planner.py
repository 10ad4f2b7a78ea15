"""``omnigrpo plan`` and the memory check before launch.

The plan's parameter, gradient and optimiser bytes are compared with the tensors a tiny CPU learner really
allocates; model sizes come from a ``config.json`` alone, found by hub id in an offline Hugging Face cache."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import refused
from test_hub_configs import place_in_cache

from omnigrpo.app import planner
from omnigrpo.cli import main
from omnigrpo.config.loader import load_config
from omnigrpo.rollout.sampler import SamplingParams
from omnigrpo.rollout.worker import RolloutWorker
from omnigrpo.trainers.batch import TrainBatch
from omnigrpo.trainers.learner import Learner
from omnigrpo.trainers.reference import FrozenCopy
from omnigrpo.worlds import shapes
from omnigrpo.worlds.world import prompts_of

CONFIGS = Path(__file__).parents[2] / "configs"
_refused = functools.partial(refused, main)


def _janus(hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    from transformers import JanusConfig

    text = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": intermediate, "vocab_size": 102400, "tie_word_embeddings": False}
    # SigLIP-L 384 px encoder, 16384-code VQ: transformers' defaults
    return JanusConfig(text_config=text, tie_word_embeddings=False).to_dict()


def _emu3() -> dict:
    from transformers import Emu3Config

    visual = {f"<|visual token {k:06d}|>": 151854 + k for k in range(32768)}  # as Emu3-Gen-hf's vocabulary_map
    return Emu3Config(vocabulary_map={**visual, "<|extra_200|>": 151845, "<image>": 151846}).to_dict()
    # transformers' other defaults are Emu3-Gen's: an 8 B Llama body with 8 kv heads, 32768 codes


def _xomni() -> dict:
    from omnigrpo.rollout.families.xomni import XOmniConfig

    return XOmniConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=36, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, num_mm_adap_layers=4, num_mm_head_layers=4).to_dict()


HUB = {  # hub id -> config.json: the published architectures (X-Omni: a Qwen2.5-7B body + 8 vision blocks)
    "deepseek-community/Janus-Pro-1B": lambda: _janus(2048, 24, 16, 5504),
    "deepseek-community/Janus-Pro-7B": lambda: _janus(4096, 30, 32, 11008),
    "BAAI/Emu3-Gen-hf": _emu3,
    "X-Omni/X-Omni-SFT": _xomni,
}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline hub cache holding only the ``config.json`` of every model the shipped configs name."""
    home = tmp_path / "hf"
    for repo, make in HUB.items():
        directory = tmp_path / "src" / repo.replace("/", "--")
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps(make()))
        place_in_cache(directory, home, repo)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub  # read when imported: point this process's copy there too

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return home


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize(("stage", "lora"), [(0, 0), (2, 0), (0, 8), (2, 8)])
def test_plan_bytes_equal_what_a_learner_allocates(tiny_config, sft_path, stage, lora):
    cfg = tiny_config(f"trainer.zero_stage={stage}", f"trainer.lora_rank={lora}", "trainer.kl_coef=0.1")
    learner = Learner(cfg.trainer, cfg.model, cfg.rollout, str(sft_path), seed=cfg.run.seed)
    learner.setup(threads=2)
    rollout = RolloutWorker(str(sft_path), SamplingParams.of(cfg.rollout), seed=0, threads=2)
    rollout.setup()
    engine, optimizer = learner.engine, learner.engine.optimizer
    grads = {}
    step = engine.step

    def measured_step():  # gradients exist between the last backward and the optimiser step
        if engine.is_gradient_accumulation_boundary():
            held = [p.grad for p in engine.module.parameters() if p.grad is not None]  # ZeRO 0
            held += [t for ts in (getattr(optimizer, "averaged_gradients", None) or {}).values() for t in ts or []]
            grads["bytes"] = _bytes(held)  # ZeRO 2: this rank's fp32 partition of the reduced gradients
        return step()

    engine.step = measured_step
    batch = rollout.generate(*prompts_of(shapes.train_items()[:4]), 4)
    learner.train_step(TrainBatch(batch.prompt_batch, batch.codes, batch.logprobs, torch.linspace(-1, 1, 16),
                                  torch.ones(16, dtype=torch.bool)))
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO >= 1 wraps torch's AdamW
    moments = [t for state in inner.state.values() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq")]
    measured = {
        "weights": _bytes(engine.module.parameters()),
        "reference": _bytes(learner.reference.module.parameters()) if isinstance(learner.reference, FrozenCopy) else 0,
        "gradients": grads["bytes"],
        "master_fp32": _bytes(getattr(optimizer, "single_partition_of_fp32_groups", None) or []),
        "optimizer": _bytes(moments),  # AdamW's scalar ``step`` counters (4 B per tensor) are not counted
    }
    plan = planner.learner_memory(cfg, planner.model_size(cfg.model, cfg.world, cfg.trainer))
    assert {k: plan[k] for k in measured} == measured
    assert (plan["reference"] == 0) == bool(lora)


def test_a_hub_id_with_only_its_config_resolves_offline(hub_cache):
    """In a fresh process, as a user runs it: ``HF_HOME`` + ``HF_HUB_OFFLINE=1``, a snapshot with config.json only."""
    env = {**os.environ, "HF_HOME": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    cli = Path(sys.executable).parent / "omnigrpo"
    proc = subprocess.run([str(cli), "plan", "configs/janus_pro_7b.yaml", "--json"], cwd=CONFIGS.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["fits"] is True
    cfg = load_config(CONFIGS / "janus_pro_7b.yaml")
    size = planner.model_size(cfg.model, cfg.world, cfg.trainer)
    assert size.layers == 30 and size.hidden == 4096 and size.kv_heads == 32 and size.head_dim == 128
    assert size.image_tokens == 576 and size.codes == 16384
    assert 7.2e9 < size.params < 7.5e9  # the LM and its head, SigLIP encoder, VQ model, generation head
    assert size.adapter == cfg.trainer.lora_rank * 30 * (4 * (4096 + 4096) + 3 * (4096 + 11008))


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_plan_prints_a_table_for_every_shipped_config(name, hub_cache, capsys):
    code = main(["plan", str(CONFIGS / name)])
    out = capsys.readouterr().out
    assert code in (0, 1) and "iB per actor" in out and "learner x" in out and "weights" in out, out
    assert main(["plan", str(CONFIGS / name), "--json"]) in (0, 1)
    data = json.loads(capsys.readouterr().out)
    assert {r["role"] for r in data["roles"]} >= {"learner", "rollout", "reward"}


def _gpu_plan(name: str, *overrides: str) -> planner.MemoryPlan:
    return planner.plan(load_config(CONFIGS / name, ["cluster.gpu_memory_gb=80", *overrides]))


@pytest.mark.parametrize("name", ["janus_pro_1b.yaml", "janus_pro_7b.yaml", "emu3_gen.yaml", "xomni.yaml",
                                  "janus_pro_1b_geneval.yaml", "xomni_longtext.yaml"])
def test_shipped_gpu_configs_fit_80_gib(name, hub_cache):
    plan = _gpu_plan(name)
    assert plan.fits, planner.render(plan)


def test_janus_pro_7b_needs_its_choices(hub_cache):
    """The 7B config fits 80 GiB GPUs because of LoRA and ZeRO; a full fine-tune with a full reference copy per
    rank under ZeRO-0 would need well over 80 GiB for the learner alone."""
    full = _gpu_plan("janus_pro_7b.yaml", "trainer.lora_rank=0", "trainer.zero_stage=0")
    learner = next(r for r in full.roles if r.role == "learner")
    assert learner.total > 80 * planner.GIB and full.fits is False
    assert learner.parts["reference"] == learner.parts["weights"] > 13 * planner.GIB


def test_train_refuses_a_config_that_cannot_fit(hub_cache, capsys, tmp_path):
    err = _refused(["train", str(CONFIGS / "janus_pro_7b.yaml"), "trainer.lora_rank=0", "trainer.zero_stage=0",
                    "cluster.gpu_memory_gb=80", f"run.dir={tmp_path / 'run'}"], capsys,
                   "cluster.gpu_memory_gb: a GPU holding learner 0 + rollout 0", "but has 80.0 GiB",
                   "largest: learner")
    assert "optimizer" in err and not (tmp_path / "run").exists()


def test_plan_without_gpus_has_nothing_to_check(capsys):
    assert main(["plan", str(CONFIGS / "shapes.yaml"), "cluster.gpu_memory_gb=1"]) == 0
    assert "nothing to check" in capsys.readouterr().out


def test_hybrid_puts_the_sampler_on_the_learner_and_no_rollout_role(hub_cache):
    colocated = _gpu_plan("janus_pro_7b.yaml")
    hybrid = _gpu_plan("janus_pro_7b.yaml", "cluster.placement=hybrid")
    assert "rollout" not in {r.role for r in hybrid.roles}
    learner = next(r for r in hybrid.roles if r.role == "learner")
    rollout = next(r for r in colocated.roles if r.role == "rollout")
    assert learner.parts["sampler kv_cache"] == rollout.parts["kv_cache"]
    assert 0 < learner.parts["sampler packed copy"] < rollout.parts["weights"]
    assert max(g.need for g in hybrid.gpus) < max(g.need for g in colocated.gpus)  # the policy held once per GPU


def test_async_rollout_holds_its_batches_ahead_in_the_driver(hub_cache, capsys):
    sync = _gpu_plan("janus_pro_7b.yaml")
    ahead = _gpu_plan("janus_pro_7b.yaml", "trainer.max_staleness=2")
    assert sync.host_ahead == 0 and [g.need for g in ahead.gpus] == [g.need for g in sync.gpus]
    # Janus: 576 codes of 16 x 16 pixels -> a 384 x 384 RGB image plus 12 bytes of codes and log-probs per code
    batch = load_config(CONFIGS / "janus_pro_7b.yaml", []).batch_size
    assert ahead.host_ahead == 2 * batch * (384 * 384 * 3 + 576 * 12)
    assert main(["plan", str(CONFIGS / "shapes.yaml"), "trainer.max_staleness=1"]) == 0
    assert "batches drawn ahead" in capsys.readouterr().out
