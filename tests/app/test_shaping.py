"""Reward shaping (diversity bonus, baseline per look, novelty-weighed advantages, gated KL) against values computed
by hand."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from omnigrpo.app.shaping import Shaping
from omnigrpo.config.schema import TrainerConfig
from omnigrpo.trainers.grpo import advantages

NO_IMAGES = np.zeros((0, 1, 1, 3), np.uint8)


@dataclass(frozen=True)
class Look:
    advance: int


def looks(*labels: int) -> np.ndarray:
    """Images ``[N, 1, 1, 3]`` whose one pixel holds a look label (255: no readable look), for :func:`read_look`."""
    return np.array([255 if label < 0 else label for label in labels], np.uint8).reshape(-1, 1, 1, 1).repeat(3, -1)


def read_look(image: np.ndarray) -> Look | None:
    return None if image[0, 0, 0] == 255 else Look(int(image[0, 0, 0]))


BY_LOOK = Shaping(TrainerConfig(baseline_by=["advance"]), 8, read_look)
"""A baseline per look over groups of 8, each look read from :func:`looks`' pixels."""


def test_the_diversity_bonus_pays_good_samples_for_being_unlike_the_good_ones():
    # one group: distances by hand; sample 3 is below the group's mean, sample 4 failed its judge
    d = torch.tensor([[0.0, 0.0, 1.0, 0.5, 1.0], [0.0, 0.0, 1.0, 0.5, 1.0], [1.0, 1.0, 0.0, 0.5, 0.0],
                      [0.5, 0.5, 0.5, 0.0, 0.5], [1.0, 1.0, 0.0, 0.5, 0.0]], dtype=torch.float64)
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, float("nan")], dtype=torch.float64)
    valid = torch.tensor([True, True, True, True, False])
    shaped = Shaping(TrainerConfig(diversity_bonus=3.0), 5)(rewards, valid, NO_IMAGES, d)
    # good: 0, 1, 2 (mean 0.75); 2 is unlike both others (mean distance 1), 0 and 1 are unlike one of two (0.5)
    assert shaped.bonus.tolist() == pytest.approx([1.5, 1.5, 3.0, 0.0, 0.0])
    assert shaped.totals[:4].tolist() == pytest.approx([2.5, 2.5, 4.0, 0.0])
    assert shaped.metrics() == {"diversity/bonus_mean": pytest.approx(1.5)}  # over the 4 valid samples
    a = advantages(shaped.totals, 5, valid).values
    assert a[2] > a[0] == a[1] > a[3] and a[4] == 0


def test_the_bonus_reads_only_distances_within_a_group():
    d = torch.ones(4, 4, dtype=torch.float64) - torch.eye(4, dtype=torch.float64)
    d[0, 1] = d[1, 0] = 0.0  # group 0 drawn alike; group 1 unlike each other, and everyone unlike across groups
    shaped = Shaping(TrainerConfig(diversity_bonus=1.0), 2)(torch.ones(4), torch.ones(4, dtype=torch.bool),
                                                            NO_IMAGES, d)
    assert shaped.bonus.tolist() == [0.0, 0.0, 1.0, 1.0]


def test_the_pixel_bonus_measures_the_images_it_is_given():
    from omnigrpo.app.diversity import pixel_distances

    black, white, grey = (np.full((16, 16, 3), v, np.uint8) for v in (0, 255, 128))
    images = np.stack([black, black, white, grey, black, white, black, black])
    total = torch.tensor([1.0, 1.0, 1.0, 0.0, 5.0, np.nan, 5.0, 5.0])  # the grey one: below its group's mean
    valid = torch.tensor([True, True, True, True, True, False, True, True])
    shaping = Shaping(TrainerConfig(diversity_bonus=3.0), 4)
    bonus = shaping(total, valid, images).bonus
    # group 0 (mean 0.75): the white one is unlike both good blacks; the grey one is unlike everyone but is
    # below the mean, so it gains nothing and is nobody's sibling; group 1: the excluded white (its judge failed)
    # is no sibling and the blacks are all alike
    assert bonus.tolist() == pytest.approx([1.5, 1.5, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(shaping(total, valid, images, pixel_distances(images)).bonus, bonus)  # shared distances


def test_the_style_bonus_pays_the_good_sample_drawn_in_the_collapsing_attribute():
    from omnigrpo.app.diversity import style_distances
    from omnigrpo.worlds import glyphs

    item = glyphs.held_out_items()[0]
    small, large = glyphs.ADVANCES[0], glyphs.ADVANCES[-1]
    drawn = [glyphs.Style("white", small, 0), glyphs.Style("white", small, 0), glyphs.Style("cyan", small, 1),
             glyphs.Style("white", large, 0)]
    images = np.stack([glyphs.render(item, style=s) for s in drawn])
    styles = [glyphs.read_style(im) for im in images]
    assert styles == drawn  # read back from the pixels
    d = style_distances(styles)
    # colour and height: 3 of 4 alike (weight 0.75 each); size: 3 of 4 small (0.75): equal weights of 1/3
    assert d[0, 1] == 0 and d[0, 2] == pytest.approx(2 / 3) and d[0, 3] == pytest.approx(1 / 3)
    shaping = Shaping.for_world(TrainerConfig(diversity_bonus=1.0, diversity_space="style"), 4, glyphs)
    bonus = shaping(torch.ones(4), torch.ones(4, dtype=torch.bool), images, torch.zeros(4, 4)).bonus
    # 0 and 1: (0 + 2/3 + 1/3) / 3; 2 differs from 0 and 1 in two attributes, from 3 in all: (2/3 + 2/3 + 1) / 3;
    # 3: (1/3 + 1/3 + 1) / 3 -- the pixel distances passed in are not read
    assert bonus.tolist() == pytest.approx([1 / 3, 1 / 3, 7 / 9, 5 / 9])
    blank = np.full_like(images[0], glyphs.BACKGROUND)
    assert style_distances([None, glyphs.read_style(blank), styles[0]]).abs().sum() == 0  # nothing readable pays


def test_a_baseline_per_look_pushes_no_look_over_another():
    # one group of 8: look 0 (small font) is read right 3 times in 4, look 1 (large) once in 4
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    valid = torch.ones(8, dtype=torch.bool)
    shaped = BY_LOOK(rewards, valid, looks(0, 0, 0, 0, 1, 1, 1, 1))
    # r - look mean (0.75, 0.25) + the group's mean 0.5
    assert shaped.totals.tolist() == pytest.approx([0.75, 0.75, 0.75, -0.25, 1.25, 0.25, 0.25, 0.25])
    plain, split = advantages(rewards, 8, valid).values, advantages(shaped.totals, 8, valid).values
    assert plain[:4].sum() > 0 > plain[4:].sum()  # one baseline: the large font is pushed down as a whole
    std = (1.5 / 7) ** 0.5  # the scale: the spread left within the looks
    assert split.tolist() == pytest.approx([x / (std + 1e-6) for x in (0.25, 0.25, 0.25, -0.75, 0.75, -0.25, -0.25,
                                                                     -0.25)], rel=1e-5)


def test_a_sample_alone_in_its_look_carries_no_signal_when_every_sample_has_a_look():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    valid = torch.ones(8, dtype=torch.bool)
    shaped = BY_LOOK(rewards, valid, looks(0, 0, 0, 0, 1, 2, 2, 2))
    # readable mean 5/8; look 0's mean 1/2, look 2's 2/3; sample 4 alone: exactly the readable mean
    assert shaped.totals.tolist() == pytest.approx([9 / 8, 1 / 8, 9 / 8, 1 / 8, 5 / 8, -1 / 24, 23 / 24, 23 / 24])
    assert shaped.totals[4] == 5 / 8
    a = advantages(shaped.totals, 8, valid).values
    assert a[4].item() == pytest.approx(0.0, abs=1e-6) and a[5] < 0 < a[6]


def test_unreadable_samples_keep_the_group_baseline_and_readable_ones_share_their_gap():
    rewards = torch.tensor([1.0, 1.0, 1.0, float("nan"), 1.0, 0.0, 0.0, 0.0])
    valid = torch.tensor([True, True, True, False, True, True, True, True])  # sample 3's judge failed
    shaped = BY_LOOK(rewards, valid, looks(0, 0, 0, 0, 1, -1, -1, -1))
    # readable: 0, 1, 2 (look 0, all right) and 4 (alone in look 1), mean 1; unreadable 5, 6, 7 keep their totals
    assert shaped.totals[[0, 1, 2, 4, 5, 6, 7]].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    a = advantages(shaped.totals, 8, valid).values
    std = (2 / 7) ** 0.5  # of 1, 1, 1, 1, 0, 0, 0: the group's mean 4/7 is kept
    assert a.tolist() == pytest.approx([(3 / 7) / (std + 1e-6)] * 3 + [0.0, (3 / 7) / (std + 1e-6)]
                                       + [(-4 / 7) / (std + 1e-6)] * 3, rel=1e-5)


def test_the_bonus_comes_first_then_the_baseline_per_look():
    d = torch.ones(4, 4, dtype=torch.float64) - torch.eye(4, dtype=torch.float64)
    d[0, 1] = d[1, 0] = 0.0
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.5])  # mean 0.875: 0, 1, 2 are good
    shaping = Shaping(TrainerConfig(diversity_bonus=1.0, baseline_by=["advance"]), 4, read_look)
    shaped = shaping(rewards, torch.ones(4, dtype=torch.bool), looks(0, 1, 0, 1), d)
    assert shaped.bonus.tolist() == [0.5, 0.5, 1.0, 0.0]
    # with the bonus 1.5, 1.5, 2, 0.5: look 0 (samples 0, 2) mean 1.75, look 1 (1, 3) mean 1, all 1.375
    assert shaped.totals.tolist() == pytest.approx([1.125, 1.875, 1.625, 0.875])


def test_no_shaping_leaves_the_totals_and_reads_no_style():
    def unread(image):
        raise AssertionError("no option reads styles")

    rewards = torch.tensor([0.5, float("nan"), 1.0, 0.0], dtype=torch.float64)
    valid = torch.tensor([True, False, True, True])
    shaped = Shaping(TrainerConfig(), 2, unread)(rewards, valid, looks(0, 0, 0, 0))
    assert torch.equal(shaped.totals[valid], rewards[valid]) and shaped.totals.dtype == torch.float64
    assert shaped.bonus.tolist() == [0.0] * 4 and shaped.metrics() == {"diversity/bonus_mean": 0.0}
    with pytest.raises(ValueError, match="read_style"):
        Shaping(TrainerConfig(baseline_by=["advance"]), 2)(rewards, valid, looks(0, 0, 0, 0))


def test_the_run_labels_each_sample_by_its_look_read_from_the_pixels():
    from omnigrpo.config.loader import load_config
    from omnigrpo.worlds import glyphs, shapes

    cfg = load_config(Path(__file__).parents[2] / "configs" / "glyphs.yaml", ["trainer.baseline_by=[advance]"])
    item = glyphs.held_out_items()[0]
    small, large = glyphs.ADVANCES
    drawn = [glyphs.Style("white", large, 0), glyphs.Style("cyan", small, 1), glyphs.Style("yellow", large, -1)]
    images = np.stack([glyphs.render(item, style=s) for s in drawn] + [np.full_like(glyphs.render(item),
                                                                                     glyphs.BACKGROUND)])
    shaped = Shaping.for_world(cfg.trainer, 4, glyphs)(torch.tensor([1.0, 0.0, 0.0, 0.5]), torch.ones(4, dtype=bool),
                                                       images)
    # by size alone: 0 and 2 share a look (mean 0.5), 1 is alone; the blank image has none; readable mean 1/3
    assert shaped.totals.tolist() == pytest.approx([5 / 6, 1 / 3, -1 / 6, 0.5])
    assert Shaping.for_world(cfg.trainer, 4, shapes).read_style is None


def _result(total: list[float], watch: list[float], valid: list[bool] | None = None):
    from omnigrpo.rewards.worker import RewardResult

    n = len(total)
    scores = np.array([total, watch], np.float32)
    failed = np.isnan(scores)
    valid = np.array(valid if valid is not None else [True] * n)
    return RewardResult(["ocr", "ocr_watch"], scores, failed, np.ones((2, n), bool), np.array(total), valid)


def test_positive_advantages_are_weighed_by_novelty_within_the_group():
    d = torch.zeros(8, 8, dtype=torch.float64)  # across the two groups: 0, never read
    d[:4, :4] = torch.tensor([[0.0, 0.2, 0.6, 0.8], [0.2, 0.0, 0.4, 0.9], [0.6, 0.4, 0.0, 0.5],
                              [0.8, 0.9, 0.5, 0.0]])
    d[4:, 4:] = torch.tensor([[0.0, 0.3, 0.6, 0.0], [0.3, 0.0, 0.6, 0.0], [0.6, 0.6, 0.0, 0.0],
                              [0.0, 0.0, 0.0, 0.0]])  # sample 7 is excluded: nobody's neighbour
    valid = torch.tensor([True] * 7 + [False])
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0, 1.0, 1.0, 1.0, 0.0])
    weighed = Shaping(TrainerConfig(diversity_advantage=2.0), 4).weigh(adv, valid, NO_IMAGES, d)
    # group 0: nearest 0.2, 0.2, 0.4, 0.5 -> / 0.5: 0.4, 0.4, 0.8, 1 -> weights 1.8, 1.8, 2.6, 3 (the negative kept)
    # group 1: nearest 0.3, 0.3, 0.6 -> 0.5, 0.5, 1 -> weights 2, 2, 3
    assert weighed.tolist() == pytest.approx([1.8, -1.0, 1.3, 6.0, 2.0, 2.0, 3.0, 0.0])
    assert weighed.dtype == adv.dtype


def test_a_group_equally_far_apart_or_the_option_off_leaves_the_advantages():
    d = torch.ones(3, 3, dtype=torch.float64) - torch.eye(3, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.5])
    valid = torch.ones(3, dtype=torch.bool)
    assert torch.equal(Shaping(TrainerConfig(diversity_advantage=5.0), 3).weigh(adv, valid, NO_IMAGES, d), adv)
    assert Shaping(TrainerConfig(), 3).weigh(adv, valid, NO_IMAGES, d) is adv


def test_the_novelty_weight_reads_styles_where_the_world_has_them():
    shaping = Shaping(TrainerConfig(diversity_advantage=1.0), 4, read_look)
    adv = torch.ones(4)
    # one attribute: distance 1 between different looks; nearest 0, 0, 1, 1 -- the pixel distances are not read
    weighed = shaping.weigh(adv, torch.ones(4, dtype=torch.bool), looks(0, 0, 1, 2), torch.zeros(4, 4))
    assert weighed.tolist() == [1.0, 1.0, 2.0, 2.0]


def test_a_step_reads_each_style_once_for_the_baseline_and_the_novelty_weight():
    reads = []

    def counted(image):
        reads.append(1)
        return read_look(image)

    shaping = Shaping(TrainerConfig(diversity_advantage=1.0, baseline_by=["advance"]), 4, counted)
    images, valid = looks(0, 0, 1, 2), torch.ones(4, dtype=torch.bool)
    shaped = shaping(torch.tensor([1.0, 0.0, 1.0, 0.0]), valid, images)
    assert len(reads) == 4 and len(shaped.styles) == 4
    weighed = shaping.weigh(torch.ones(4), valid, images, torch.zeros(4, 4), shaped.styles)
    assert len(reads) == 4 and weighed.tolist() == [1.0, 1.0, 2.0, 2.0]  # the styles of the shaping, not read again


def test_the_kl_stays_on_the_samples_whose_ranks_disagree_most():
    from omnigrpo.app.shaping import uncertain

    main = torch.tensor([0.9, 0.8, 0.1, 0.5, 0.3, 0.7])
    watch = torch.tensor([0.9, 0.1, 0.2, 0.5, 0.7, float("nan")])
    scored = torch.tensor([True] * 5 + [False])
    # ranks of the scored five: main 4, 3, 0, 2, 1; watch 4, 0, 1, 2, 3 -> gaps 0, 3, 1, 0, 2
    assert uncertain(main, watch, scored, 0.4).tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert uncertain(main, watch, scored, 0.6).tolist() == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert uncertain(main, watch, scored, 0.0).tolist() == [0.0] * 5 + [1.0]  # the unscored one keeps it
    agree = torch.arange(10.0)
    assert uncertain(agree, agree, torch.ones(10, dtype=torch.bool), 0.3).tolist() == [1.0] * 3 + [0.0] * 7  # ties


def test_the_kl_weights_rank_the_total_against_the_watchdog():
    result = _result([0.9, 0.8, 0.1, 0.5, 0.3], [0.9, 0.1, 0.2, 0.5, float("nan")], [True, True, True, True, False])
    shaping = Shaping(TrainerConfig(kl_uncertain_frac=0.5), 5, watch="ocr_watch")
    # scored: 0-3 (4 failed its watchdog); ranks main 3, 2, 0, 1 vs watch 3, 0, 1, 2 -> gaps 0, 2, 1, 1: keep 2 of 4
    assert shaping.kl_weights(result).tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert Shaping(TrainerConfig(), 5).kl_weights(result) is None
    with pytest.raises(ValueError, match="watchdog"):
        Shaping(TrainerConfig(kl_uncertain_frac=0.5), 5).kl_weights(result)


def test_a_gated_kl_without_a_watchdog_is_refused(capsys, tmp_path, monkeypatch):
    from conftest import refused

    from omnigrpo.cli import main

    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")
    refused(main, ["train", config, "trainer.kl_uncertain_frac=0.5"], capsys,
            "trainer.kl_uncertain_frac: 0.5 ranks each sample under a watchdog reward")
    assert not any(tmp_path.iterdir())


def test_a_gated_kl_with_a_watchdog_passes_its_check():
    from omnigrpo.app.preflight import check_watch_options
    from omnigrpo.config.loader import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs" / "glyphs.yaml", ["trainer.kl_uncertain_frac=0.5"])
    check_watch_options(cfg.trainer, cfg.rewards)  # glyphs.yaml has one: nothing raised
