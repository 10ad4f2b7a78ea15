"""``omnigrpo eval --benchmark``: the protocol's subset, scores and report, and a whole GenEval evaluation of a tiny
Janus-Pro judged by a tiny detector and CLIP of the real classes (the report's structure, and scores that move with
the judges' verdicts, not that a random model scores well)."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from omnigrpo.app.benchmark import caption, geneval_scores, longtext_scores, subset
from omnigrpo.cli import main
from omnigrpo.data.benchmarks import load_benchmark, split
from omnigrpo.rewards.judges.geneval_rules import Check, Verdict
from omnigrpo.rewards.judges.longtext import Reading
from omnigrpo.rollout.families import tiny

ROOT = Path(__file__).parents[2]
TAGS = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


def test_a_limit_takes_prompts_in_turn_from_every_tag():
    _, metadata = load_benchmark("geneval")
    chosen = subset(metadata, "tag", 8)
    assert len(chosen) == 8 and chosen == sorted(chosen)
    assert {metadata[i]["tag"] for i in chosen} == TAGS
    assert subset(metadata, "tag", 0) == list(range(553))


def _verdict(tag: str, *passed: bool) -> Verdict:
    return Verdict(tag, tuple(Check("count", "dog", p, "" if p else "dog: 0 of 1") for p in passed))


def test_geneval_scores_average_the_tags_not_the_images():
    verdicts = [_verdict("counting", True), _verdict("counting", False, True), _verdict("colors", True, True)]
    metrics, rows = geneval_scores(verdicts, [{"tag": v.tag} for v in verdicts])
    assert metrics["geneval/counting"] == 0.5 and metrics["geneval/colors"] == 1.0
    assert metrics["geneval/overall"] == 0.75  # over tags; over images it would be 2/3
    assert metrics["geneval/partial"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert rows[1] == {"tag": "counting", "correct": False, "partial": 0.5, "reason": "dog: 0 of 1"}
    assert caption(rows[1]) == "NO dog: 0 of 1" and caption(rows[0]) == "OK correct"


def test_longtext_scores_sum_matches_over_images_and_count_failed_readings():
    readings = [Reading("open now", 2, 2), Reading("open", 1, 3), Reading(None, 0, 4)]
    metadata = [{"category": "sign", "length": "short"}, {"category": "poster", "length": "long"},
                {"category": "sign", "length": "long"}]
    metrics, rows = longtext_scores(readings, metadata, "longtext")
    assert metrics["longtext/score"] == pytest.approx(3 / 5) and metrics["longtext/failed"] == 1.0
    assert metrics["longtext/category/sign"] == 1.0 and metrics["longtext/length/long"] == pytest.approx(1 / 3)
    assert rows[2]["score"] is None and caption(rows[2]) == "failed"


@pytest.fixture(scope="module")
def tiny_janus(tmp_path_factory):
    return tiny.build("janus", tmp_path_factory.mktemp("janus"))


def _evaluate(tmp_path: Path, janus: Path, judges: dict, name: str) -> dict:
    out = tmp_path / f"{name}.json"
    rewards = json.dumps([{"name": "geneval", "kwargs": judges}])
    code = main(["eval", str(ROOT / "configs" / "janus_pro_1b_geneval.yaml"), "--benchmark", "geneval",
                 "--limit", "8", "--checkpoint", str(janus), "--out", str(out), f"run.dir={tmp_path / 'run'}",
                 "model.image_codes=64", "model.dtype=float32", "rollout.prompts_per_step=4", "rollout.sample_batch=0",
                 f"rewards={rewards}", f"tracking.run_name={name}"])
    assert code == 0
    return json.loads(out.read_text())


def test_geneval_end_to_end_on_a_tiny_janus(tmp_path, tiny_janus, tiny_detector_dir, tiny_clip_dir):
    judges = {"detector": str(tiny_detector_dir), "clip_model": f"local-dir:{tiny_clip_dir}", "clip_pretrained": None,
              "device": "cpu"}
    blind = _evaluate(tmp_path, tiny_janus, {**judges, "threshold": 0.999, "counting_threshold": 0.999}, "blind")
    seeing = _evaluate(tmp_path, tiny_janus, {**judges, "threshold": 0.0, "counting_threshold": 0.0}, "seeing")
    for report in (blind, seeing):
        assert report["num_prompts"] == 8 and report["samples_per_prompt"] == 4 and len(report["images"]) == 32
        assert {f"geneval/{t}" for t in TAGS} | {"geneval/overall", "geneval/partial"} == set(report["metrics"])
        assert {row["tag"] for row in report["images"]} == TAGS
        assert all(set(row) >= {"prompt", "sample", "correct", "partial", "reason"} for row in report["images"])
        assert report["judge"]["packages"]["transformers"] and report["judge"]["kwargs"]["device"] == "cpu"
        assert report["sampling"]["cfg_scale"] == 5.0 and report["model"]["family"] == "janus"
    # a detector that sees nothing fails every count; one that keeps every detection meets some requirements
    assert blind["metrics"]["geneval/overall"] == 0.0
    assert not any(row["correct"] for row in blind["images"])
    assert seeing["metrics"]["geneval/partial"] > blind["metrics"]["geneval/partial"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.mlflow.runName = 'seeing'")
    run = runs[0]
    assert run.data.metrics["geneval/overall"] == seeing["metrics"]["geneval/overall"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "benchmark_report.json" in artifacts
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert sum(any(tag in path for path in grids) for tag in TAGS) == 6


SMALL = ["cluster.address=", "cluster.learner_workers=1", "cluster.rollout_workers=1", "cluster.reward_workers=1",
         "cluster.learner_gpus=0", "cluster.rollout_gpus=0", "cluster.reward_gpus=0", "cluster.gpu_memory_gb=0",
         "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.sample_batch=0", "trainer.micro_batch_size=8",
         "trainer.steps=2", "trainer.lr=1e-2", "trainer.save_every=0", "tracking.image_every=0",
         "model.image_codes=64", "model.dtype=float32", "trainer.zero_stage=0"]


ASKED = [  # GenEval-format prompts naming classes the tiny random detector tends to find, so verdicts vary
    {"tag": "single_object", "include": [{"class": "tennis racket", "count": 1}],
     "prompt": "a photo of a tennis racket"},
    {"tag": "two_object", "include": [{"class": "bus", "count": 1}, {"class": "toothbrush", "count": 1}],
     "prompt": "a photo of a bus and a toothbrush"},
    {"tag": "counting", "include": [{"class": "fire hydrant", "count": 2}],
     "exclude": [{"class": "fire hydrant", "count": 3}], "prompt": "a photo of two fire hydrants"},
    {"tag": "two_object", "include": [{"class": "couch", "count": 1}, {"class": "carrot", "count": 1}],
     "prompt": "a photo of a couch and a carrot"},
    {"tag": "single_object", "include": [{"class": "toothbrush", "count": 1}], "prompt": "a photo of a toothbrush"},
]


@pytest.mark.usefixtures("ray_cluster")
def test_training_on_geneval_prompts_with_the_geneval_reward(tmp_path, tiny_janus, tiny_detector_dir, tiny_clip_dir):
    """The shipped GenEval config, two steps on a tiny Janus with tiny judges, on a prompt file in GenEval's format:
    the prompts' metadata reaches the judge (a prompt without it would fail every call), every sample is scored,
    the verdicts differ within groups and the policy moves."""
    from omnigrpo.app.driver import train
    from omnigrpo.config.loader import load_config
    from omnigrpo.rollout.loader import load_policy

    judges = {"detector": str(tiny_detector_dir), "clip_model": f"local-dir:{tiny_clip_dir}", "clip_pretrained": None,
              "device": "cpu", "threshold": 0.0, "counting_threshold": 0.0}
    rewards = json.dumps([{"name": "geneval", "kwargs": judges}])
    prompts = tmp_path / "geneval.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in ASKED))
    cfg = load_config(ROOT / "configs" / "janus_pro_1b_geneval.yaml",
                      [*SMALL, f"model.path={tiny_janus}", f"run.dir={tmp_path / 'run'}", f"rewards={rewards}",
                       f"data.prompts={prompts}"])
    summary = train(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    history = client.get_metric_history(summary["run_id"], "reward/geneval/mean")
    assert sorted(m.step for m in history) == [1, 2] and all(0.0 <= m.value <= 1.0 for m in history)
    assert all(m.value == 0 for m in client.get_metric_history(summary["run_id"], "reward/failed"))
    spread = client.get_metric_history(summary["run_id"], "grpo/zero_std_frac")
    assert min(m.value for m in spread) < 1.0  # some group's verdicts differ: the judge drives the update
    start, final = load_policy("janus", str(tiny_janus)).model, load_policy("janus", summary["checkpoint"]).model
    assert any(not a.equal(b) for a, b in zip(start.parameters(), final.parameters(), strict=True))


def test_longtext_end_to_end_on_a_tiny_janus(tmp_path, tiny_janus, tiny_vlm_dir):
    """LongText-Bench's protocol with a tiny random Qwen2-VL reading the images: one image per prompt, the score
    and its breakdown by category and length; a random reader matches little, but every image is read."""
    out = tmp_path / "longtext.json"
    rewards = json.dumps([{"name": "longtext", "kwargs": {"model": str(tiny_vlm_dir), "device": "cpu",
                                                          "max_new_tokens": 4}}])
    code = main(["eval", str(ROOT / "configs" / "janus_pro_1b_geneval.yaml"), "--benchmark", "longtext",
                 "--limit", "3", "--held-out", "--checkpoint", str(tiny_janus), "--out", str(out),
                 f"run.dir={tmp_path / 'run'}", "data.held_out_share=0.5", "model.image_codes=64",
                 "model.dtype=float32", "rollout.sample_batch=0", f"rewards={rewards}"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["samples_per_prompt"] == 1 and len(report["images"]) == 3
    _, (held, _) = split(*load_benchmark("longtext"), 0.5, 0)  # only prompts the training split leaves out
    assert report["prompts"].startswith("held out") and {row["prompt"] for row in report["images"]} <= set(held)
    assert len({row["category"] for row in report["images"]}) == 3  # one prompt from each of three categories
    metrics = report["metrics"]
    assert 0.0 <= metrics["longtext/score"] <= 1.0 and metrics["longtext/failed"] == 0.0
    assert {k.split("/")[1] for k in metrics} >= {"score", "category", "length"}
    matched = sum(row["matched"] for row in report["images"])
    assert metrics["longtext/score"] == pytest.approx(matched / sum(row["total"] for row in report["images"]))
