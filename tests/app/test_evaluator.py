"""``omnigrpo eval``: a checkpoint scored on held-out prompts or a prompt file, reported to JSON and MLflow."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from mlflow.tracking import MlflowClient

from omnigrpo.app.evaluator import evaluate_checkpoint, pass_at_k, pass_at_k_metrics, pass_ks, world_metrics
from omnigrpo.app.tracking import store_uri
from omnigrpo.cli import main

CONFIGS = Path(__file__).parents[2] / "configs"


def test_held_out_report_is_written_and_logged(tiny_config, sft_path, tmp_path):
    cfg = tiny_config()
    report = evaluate_checkpoint(cfg, str(sft_path), samples=3, out=str(tmp_path / "r.json"))
    assert report["num_prompts"] == 8 and report["samples_per_prompt"] == 3
    metrics = report["metrics"]
    assert 0.0 <= metrics["eval/strict_acc"] <= 1.0 and 0.0 <= metrics["eval/reward_mean"] <= 1.0
    assert 0.0 < metrics["eval/blank_frac"] < 1.0
    best_of = [metrics[f"eval/strict_acc_pass_at_{k}"] for k in (1, 2, 3)]  # k = 1, powers of two, N = 3
    assert best_of[0] == pytest.approx(metrics["eval/strict_acc"]) and best_of == sorted(best_of)
    assert json.loads((tmp_path / "r.json").read_text())["metrics"] == metrics
    run = MlflowClient(store_uri(cfg.tracking, cfg.run.dir)).get_run(report["run_id"])
    assert run.info.run_name == f"eval:{sft_path.name}" and run.info.status == "FINISHED"
    assert run.data.metrics["eval/strict_acc"] == pytest.approx(metrics["eval/strict_acc"])
    assert run.data.metrics["eval/strict_acc_pass_at_3"] == pytest.approx(metrics["eval/strict_acc_pass_at_3"])
    again = evaluate_checkpoint(cfg, str(sft_path), samples=3, out=str(tmp_path / "again.json"))
    assert again["metrics"] == metrics  # its own seed: the same checkpoint always gets the same report
    with pytest.raises(ValueError, match="--out .*r.json: exists; refusing to write over it"):
        evaluate_checkpoint(cfg, str(sft_path), samples=3, out=str(tmp_path / "r.json"))
    forced = evaluate_checkpoint(cfg, str(sft_path), samples=2, out=str(tmp_path / "r.json"), force=True)
    assert json.loads((tmp_path / "r.json").read_text())["samples_per_prompt"] == 2 == forced["samples_per_prompt"]


def test_pass_at_k_on_two_prompts_of_four_samples():
    correct = np.array([[1, 0, 0, 1], [0, 0, 0, 0]], dtype=float)
    # prompt 1: 2 of 4 right -> pass@1 1/2, pass@2 1 - C(2,2)/C(4,2) = 5/6, pass@4 1; prompt 2: always 0
    assert [pass_at_k(correct, k) for k in (1, 2, 4)] == pytest.approx([0.25, 5 / 12, 0.5])
    for k in (1, 2, 3, 4):  # the estimator is the exact share of k-subsets holding a right sample
        subsets = [[any(row[list(c)]) for c in itertools.combinations(range(4), k)] for row in correct]
        assert pass_at_k(correct, k) == pytest.approx(np.mean([np.mean(s) for s in subsets]))
    assert pass_ks(8) == [1, 2, 4, 8] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(1) == [1]


def test_pass_at_k_leaves_out_prompts_that_are_not_scored():
    scores = [1.0, 0.0, None, None, 0.0, 0.0]  # 3 prompts x 2 samples, the second one not applicable
    assert pass_at_k_metrics("eval/m", scores, 2) == pytest.approx({"eval/m_pass_at_1": 0.25,
                                                                      "eval/m_pass_at_2": 0.5})
    assert np.isnan(pass_at_k_metrics("eval/m", [None, None], 2)["eval/m_pass_at_2"])


def test_glyphs_headline_gets_pass_at_k_from_the_scores_it_averages():
    from omnigrpo.worlds import glyphs

    items = glyphs.held_out_items()[:2]
    drawn = [glyphs.render(item) for item in items]
    blank = np.zeros_like(drawn[0]) + np.array(glyphs.BACKGROUND, dtype=np.uint8)
    images = np.stack([drawn[0], drawn[0], blank, drawn[1]])  # 2 prompts x 2 samples: 3 right, 1 blank
    prompts = [items[0].prompt] * 2 + [items[1].prompt] * 2
    metrics = world_metrics("glyphs", images, prompts, [items[0].metadata] * 2 + [items[1].metadata] * 2, 2)
    assert metrics["eval/exact_match"] == metrics["eval/exact_match_pass_at_1"] == 0.75
    assert metrics["eval/exact_match_pass_at_2"] == 1.0 and "eval/ocr_score_pass_at_1" not in metrics


def test_a_longtext_style_prompt_file_gets_ocr_word_recall(tiny_config, sft_path, tmp_path, capsys):
    prompts = tmp_path / "longtext.txt"
    prompts.write_text('A poster that says "GRAND OPENING"\na red circle at the top left\n')
    cfg = tiny_config()
    overrides = [*TINY, f"run.cache_dir={cfg.run.cache_dir}", f"run.dir={cfg.run.dir}"]
    code = main(["eval", str(CONFIGS / "shapes.yaml"), *overrides, "--checkpoint", str(sft_path),
                 "--prompts", str(prompts), "--samples", "2", "--out", str(tmp_path / "lt.json")])
    assert code == 0
    report = json.loads((tmp_path / "lt.json").read_text())
    assert report["num_prompts"] == 2 and report["prompts"] == str(prompts)
    # the tiny shapes policy draws no text: recall is a real score of 0, not a missing one
    assert report["metrics"]["text/word_recall"] == 0.0 and report["metrics"]["text/exact_match"] == 0.0
    assert report["metrics"]["text/exact_match_pass_at_1"] == report["metrics"]["text/exact_match_pass_at_2"] == 0.0
    assert "eval/strict_acc" not in report["metrics"]  # world metrics are for the world's own held-out set
    assert "text/word_recall" in capsys.readouterr().out


def test_bad_checkpoint_or_world_fails_clearly(tiny_config, sft_path, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("{}")
    code = main(["eval", str(tmp_path / "c.yaml"), "--checkpoint", str(tmp_path / "nope")])
    assert code == 2 and "is not a directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="trained on world 'shapes'"):
        evaluate_checkpoint(tiny_config("world.name=glyphs", "data.prompts=glyphs"), str(sft_path), samples=1)


def test_eval_of_a_family_checkpoint_on_a_prompt_file(tiny_config, tmp_path, plugins):
    from omnigrpo.rollout.families import tiny

    path = tiny.build("emu3", tmp_path / "emu3")
    prompts = tmp_path / "p.txt"
    prompts.write_text('a cat\na sign that says "OPEN"\n')
    cfg = tiny_config("model.family=emu3", f"model.path={path}",
                      "rewards=[{name: 'sized_reward:SizedSaturation', kwargs: {height: 32, width: 32}}]")
    report = evaluate_checkpoint(cfg, str(path), prompts_source=str(prompts), samples=2, out=str(tmp_path / "r.json"))
    assert report["num_prompts"] == 2 and report["samples_per_prompt"] == 2
    assert 0.0 <= report["metrics"]["eval/reward_mean"] <= 1.0  # every image reached the reward at 32 x 32


def test_eval_of_xomni_paints_through_its_diffusion_decoder(tiny_config, tmp_path, plugins):
    from omnigrpo.rollout.families import tiny

    path, decoder = tiny.build("xomni", tmp_path / "xomni"), tiny.diffusion_decoder(tmp_path / "decoder")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na red circle\n")
    # 8 x 8 codes: the decoder paints 32 px; the palette code map would be 128 px and fail SizedSaturation
    cfg = tiny_config("model.family=xomni", f"model.path={path}", f"decoder.path={decoder}", "decoder.steps=2",
                      "rewards=[{name: 'sized_reward:SizedSaturation', kwargs: {height: 32, width: 32}}]")
    report = evaluate_checkpoint(cfg, str(path), prompts_source=str(prompts), samples=2, out=str(tmp_path / "r.json"))
    assert report["metrics"]["eval/reward/failed"] == 0.0, report["metrics"]
    assert 0.0 <= report["metrics"]["eval/reward_mean"] <= 1.0


def test_style_metrics_report_each_attribute_beside_the_joint_style():
    from omnigrpo.app.evaluator import style_metrics
    from omnigrpo.worlds.glyphs import Style

    # one prompt, four right samples: two colours at one size and height, so the joint entropy is the colour's
    styles = [Style("white", 8, 0), Style("cyan", 8, 0), Style("white", 8, 0), Style("cyan", 8, 0), None]
    out = style_metrics(styles, [1, 1, 1, 1, 1], per_prompt=5)
    assert out == pytest.approx({"eval/style_entropy": 1.0, "eval/style_entropy_colour": 1.0,
                                 "eval/style_entropy_advance": 0.0, "eval/style_entropy_shift": 0.0})
    assert style_metrics(["a", "b"], [1, 1], per_prompt=2) == {"eval/style_entropy": 1.0}  # not a dataclass
