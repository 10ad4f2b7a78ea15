"""A full GRPO step per model family on a real local Ray cluster with a DeepSpeed learner: tiny random
Janus-Pro / Emu3 / X-Omni checkpoints loaded through ``model.path``."""


import pytest
import torch
from mlflow.tracking import MlflowClient

from omnigrpo.app.driver import train
from omnigrpo.app.tracking import store_uri
from omnigrpo.rollout.families import tiny
from omnigrpo.rollout.families.diffusion import DiffusionDecoder
from omnigrpo.rollout.loader import family_class, load_policy


# each family also exercises one learner option: plain, gradient checkpointing, LoRA
@pytest.mark.parametrize(("family", "option"), [("janus", "trainer.zero_stage=2"),
                                                ("emu3", "trainer.gradient_checkpointing=true"),
                                                ("xomni", "trainer.lora_rank=4")])
def test_one_grpo_step_per_family(tiny_config, tmp_path, plugins, family, option):
    start = tiny.build(family, tmp_path / "start")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle at the top left\na cat\na blue square\na dog in the middle\n")
    height, width = family_class(family).pixels(start)
    painted = []
    if family == "xomni":  # X-Omni's pixels come from its diffusion decoder
        decoder = tiny.diffusion_decoder(tmp_path / "decoder")
        height, width = DiffusionDecoder.pixels(str(decoder), (8, 8))
        painted = [f"decoder.path={decoder}", "decoder.steps=2"]
    cfg = tiny_config(f"model.family={family}", f"model.path={start}", f"data.prompts={prompts}", *painted,
                      "eval.held_out=false", "trainer.steps=1", "trainer.lr=1e-2", "rollout.cfg_scale=2.0", option,
                      f"rewards=[{{name: 'sized_reward:SizedSaturation', kwargs: {{height: {height}, "
                      f"width: {width}}}}}]")
    summary = train(cfg)
    assert summary["rollout_versions"] == [1]  # the update reached the rollout actor
    metrics = MlflowClient(store_uri(cfg)).get_run(summary["run_id"]).data.metrics
    assert metrics["reward/failed"] == 0  # every image reached the reward at the size the family decodes
    assert metrics["grpo/skipped_update"] == 0 and metrics["grpo/logprob_mismatch"] < 1e-4
    before = load_policy(family, start).model.state_dict()
    after = load_policy(family, summary["checkpoint"]).model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no parameter moved"


def test_xomni_with_a_diffusion_decoder_pool(tiny_config, tmp_path, plugins):
    """Rollout returns codes only; a pool of decoder actors paints them; the rewards get the pool's images."""
    start = tiny.build("xomni", tmp_path / "start")
    decoder = tiny.diffusion_decoder(tmp_path / "decoder")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na cat\n")
    # 8 x 8 codes, 2x2 latent patches of a 2x VAE: 32 px (the code map alone would be 128 px)
    cfg = tiny_config("model.family=xomni", f"model.path={start}", f"data.prompts={prompts}", "eval.held_out=false",
                      "trainer.steps=1", "trainer.lr=1e-2", f"decoder.path={decoder}", "decoder.steps=2",
                      "cluster.decoder_workers=2", "rollout.chunks=2",
                      "rewards=[{name: 'sized_reward:SizedSaturation', kwargs: {height: 32, width: 32}}]")
    summary = train(cfg)
    metrics = MlflowClient(store_uri(cfg)).get_run(summary["run_id"]).data.metrics
    assert metrics["reward/failed"] == 0 and summary["rollout_versions"] == [1]
