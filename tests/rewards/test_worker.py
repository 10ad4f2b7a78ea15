"""Reward failures are reported and excluded, never scored 0; combination rules by hand."""

import math

import numpy as np
import pytest

from omnigrpo.config.schema import RewardSpec
from omnigrpo.rewards.worker import DryRun, JudgeStartError, RewardResult, RewardWorker, combine
from omnigrpo.worlds import shapes


@pytest.fixture
def plugin(plugins):
    return "my_rewards"


def _batch(n=4):
    scenes = shapes.train_items()[:n]
    return np.stack([shapes.render(s) for s in scenes]), [s.prompt for s in scenes], [{} for _ in scenes]


def _score(specs, n=4):
    worker = RewardWorker(specs)
    worker.setup()
    return worker.score(*_batch(n))


@pytest.mark.parametrize("fn", ["boom", "short"])
def test_a_reward_that_raises_or_miscounts_fails_the_samples(plugin, fn):
    result = _score([RewardSpec(name="shapes"), RewardSpec(name=f"{plugin}:{fn}")])
    assert result.failed[1].all() and not result.valid.any()
    assert np.isnan(result.total).all()  # excluded, not 0
    metrics = result.metrics()
    assert metrics["reward/failed"] == 4 and metrics[f"reward/{plugin}:{fn}/failed"] == 4
    assert metrics["reward/shapes/mean"] == 1.0  # the healthy reward is still logged
    assert fn in result.errors or f"{plugin}:{fn}" in result.errors


def test_a_judge_that_cannot_be_built_or_miscounts_its_dry_run_is_named_at_set_up(plugins):
    with pytest.raises(JudgeStartError, match=r"^rewards.1: reward 'ocr' could not be built: ValueError"):
        RewardWorker([RewardSpec(name="shapes"), RewardSpec(name="ocr", kwargs={"score": "nonsense"})]).setup()
    worker = RewardWorker([RewardSpec(name="shapes"), RewardSpec(name="broken_judge:score")])
    assert worker.setup() == ["shapes", "broken_judge:score"]  # it builds; only a dry run finds it miscounts
    with pytest.raises(JudgeStartError, match=r"^rewards.1: reward 'broken_judge:score' returned 1 scores for 2 "
                                              r"images in its dry run$"):
        worker.setup(DryRun((16, 16), ["a", "b"], [{}, {}]))


def test_nan_fails_only_that_sample(plugin):
    result = _score([RewardSpec(name="shapes"), RewardSpec(name=f"{plugin}:nan_first")])
    assert result.valid.tolist() == [False, True, True, True]
    assert result.total[1:] == pytest.approx([2.0, 2.0, 2.0])
    assert result.metrics()["reward/failed"] == 1


def test_a_score_infinite_in_float32_is_a_named_failure(plugin, caplog):
    with caplog.at_level("WARNING"):
        result = _score([RewardSpec(name=f"{plugin}:overflowing")])
    assert result.failed[0].tolist() == [False, True, True, False]
    assert result.valid.tolist() == [True, False, False, True]
    assert result.metrics()[f"reward/{plugin}:overflowing/failed"] == 2
    assert any(f"reward {plugin}:overflowing: 2 of 4 scores are not finite numbers (as float32)" in r.getMessage()
               for r in caplog.records)


def test_optional_failure_renormalises_the_total(plugin):
    specs = [RewardSpec(name="shapes", weight=1.0),
             RewardSpec(name=f"{plugin}:boom", weight=3.0, required=False)]
    result = _score(specs)
    assert result.valid.all()
    # only `shapes` scored (1.0, weight 1 of 4): total = 1.0 * 1 * 4 / 1
    assert result.total == pytest.approx([4.0] * 4)
    assert result.failed[1].all()


def test_not_applicable_is_not_a_failure(plugin):
    worker = RewardWorker([RewardSpec(name="shapes"), RewardSpec(name=f"{plugin}:text_only", weight=1.0)])
    worker.setup()
    images, prompts, _ = _batch(2)
    result = worker.score(images, prompts, [{"text": "hi"}, {}])
    assert result.valid.all() and not result.failed.any()
    assert result.applicable[1].tolist() == [True, False]
    assert result.total == pytest.approx([2.0, 2.0])  # second: only shapes scored, re-scaled by 2/1


def test_weights_kwargs_factories_and_async(plugin):
    result = _score([
        RewardSpec(name=f"{plugin}:constant", weight=2.0, kwargs={"value": 0.25}),
        RewardSpec(name=f"{plugin}:async_half", weight=1.0),
        RewardSpec(name=f"{plugin}:Brightness", weight=0.0, kwargs={"scale": 2.0}),
    ])
    assert result.valid.all()
    assert result.total == pytest.approx([2 * 0.25 + 0.5] * 4)
    assert result.scores[2][0] > 0  # the factory ran with its kwargs, logged though weighted 0


def test_combine_by_hand():
    scores = np.array([[1.0, 0.0, np.nan], [0.5, np.nan, 0.2]])
    failed = np.array([[False, False, True], [False, True, False]])
    applicable = np.ones((2, 3), bool)
    total, valid = combine(scores, failed, applicable, weights=[1.0, 1.0], required=[True, False])
    assert valid.tolist() == [True, True, False]
    assert total[0] == pytest.approx(1.5) and total[1] == pytest.approx(0.0 * 2 / 1)
    assert math.isnan(total[2])


def test_a_sample_scored_only_by_weight_zero_rewards_is_excluded_not_zero():
    scores = np.array([[np.nan], [0.7]])
    total, valid = combine(scores, failed=np.array([[True], [False]]), applicable=np.ones((2, 1), bool),
                           weights=[1.0, 0.0], required=[False, True])
    assert valid.tolist() == [False] and math.isnan(total[0])


def test_tags_route_a_reward_to_the_prompts_it_applies_to(plugin):
    calls = []

    worker = RewardWorker([RewardSpec(name="shapes"), RewardSpec(name=f"{plugin}:constant", tags=["ocr"])])
    worker.setup()
    counting = worker.fns[1]
    worker.fns[1] = lambda images, prompts, metadata: calls.append(len(images)) or counting(images, prompts, metadata)
    images, prompts, _ = _batch(4)
    metadata = [{"tags": ["ocr"]}, {}, {"tags": "ocr"}, {"tags": ["other"]}]
    result = worker.score(images, prompts, metadata)
    assert calls == [2]  # computed only where it applies
    assert result.applicable[1].tolist() == [True, False, True, False]
    assert result.total == pytest.approx([1.5, 2.0, 1.5, 2.0])  # 1 + 0.5 where tagged, else 1 * 2 / 1
    assert not result.failed.any()


def test_sharded_scoring_joins_to_the_whole(plugin):
    worker = RewardWorker([RewardSpec(name="shapes"), RewardSpec(name=f"{plugin}:nan_first", required=False)])
    worker.setup()
    images, prompts, metadata = _batch(4)
    whole = worker.score(images, prompts, metadata)
    halves = RewardResult.concat([worker.score(images[:2], prompts[:2], metadata[:2]),
                                  worker.score(images[2:], prompts[2:], metadata[2:])])
    assert np.array_equal(whole.valid, halves.valid) and np.allclose(whole.total, halves.total)
    assert halves.failed[1].tolist() == [True, False, True, False]  # NaN on each shard's first sample


def test_a_watchdog_is_logged_under_its_alias_but_never_trains_or_excludes(plugin):
    """The same judge twice: once trained on, once as a weight-0 watchdog under an alias; a failing watchdog is
    counted, never fatal, and the totals are those of the training rewards alone."""
    specs = [RewardSpec(name="shapes"), RewardSpec(name="shapes", alias="shapes_watch", weight=0.0, watch=True),
             RewardSpec(name=f"{plugin}:boom", alias="boom_watch", weight=0.0, watch=True)]
    result = _score(specs)
    alone = _score([RewardSpec(name="shapes")])
    assert result.names == ["shapes", "shapes_watch", "boom_watch"]
    assert result.valid.all() and result.total == pytest.approx(alone.total)
    metrics = result.metrics()
    assert metrics["reward/shapes_watch/mean"] == metrics["reward/shapes/mean"] == 1.0
    assert metrics["reward/boom_watch/failed"] == 4 and metrics["reward/failed"] == 0
    assert "boom_watch" in result.errors


def test_a_judge_twice_needs_an_alias_and_a_watchdog_weight_zero():
    from omnigrpo.config.loader import ConfigError, load_config

    with pytest.raises(ConfigError, match="'shapes' is listed twice"):
        load_config(None, ["rewards=[{name: shapes}, {name: shapes}]"])
    with pytest.raises(ConfigError, match=r"rewards.1.weight: a watchdog \('w'"):
        load_config(None, ["rewards=[{name: shapes}, {name: shapes, alias: w, watch: true}]"])
    cfg = load_config(None, ["rewards=[{name: shapes}, {name: shapes, alias: w, watch: true, weight: 0}]"])
    assert [r.key for r in cfg.rewards] == ["shapes", "w"]


@pytest.mark.parametrize("fn", ["bools", "numpy_bools", "complexes", "numpy_complexes", "strings"])
def test_a_score_that_is_not_a_real_number_fails_never_coerced(plugins, fn, caplog):
    with caplog.at_level("WARNING"):
        result = _score([RewardSpec(name="shapes"), RewardSpec(name=f"odd_scores:{fn}")])
    assert result.failed[1].all() and not result.valid.any() and np.isnan(result.total).all()
    assert result.metrics()[f"reward/odd_scores:{fn}/failed"] == 4
    assert f"odd_scores:{fn}: 4 of 4 scores are not finite numbers" in caplog.text


def test_a_judge_that_calls_exit_fails_its_samples_and_the_worker_lives_on(plugins):
    result = _score([RewardSpec(name="shapes"), RewardSpec(name="odd_scores:exits")])
    assert result.failed[1].all() and not result.valid.any()
    assert result.errors["odd_scores:exits"] == "RuntimeError: the reward called exit(3)"
