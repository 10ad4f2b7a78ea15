"""Pixel-space diversity against values computed by hand."""

import numpy as np
import pytest
import torch

from omnigrpo.app.diversity import diversity, pixel_distances
from omnigrpo.worlds import shapes


def test_diversity_by_hand():
    black, white = np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)
    grey = np.full((32, 32, 3), 51, np.uint8)  # 0.2 of white
    images = np.stack([black, white, black, black])
    out = diversity(pixel_distances(images), torch.tensor([0, 0, 1, 1]))
    # group 0: black vs white = 1; group 1: two blacks = 0 -> mean 0.5; batch: 3 of the 6 pairs are black-white
    assert out["diversity/group"] == pytest.approx(0.5)
    assert out["diversity/batch"] == pytest.approx(0.5)
    out = diversity(pixel_distances(np.stack([black, grey])), np.array([0, 0]), prefix="eval/diversity_")
    assert out == pytest.approx({"eval/diversity_group": 0.2, "eval/diversity_batch": 0.2}, abs=1e-6)


def test_a_collapsed_group_scores_lower_than_a_varied_one():
    items = shapes.train_items()
    same = np.stack([shapes.render(items[0])] * 4)
    varied = np.stack([shapes.render(i) for i in items[:4]])
    groups = np.zeros(4, int)
    assert diversity(pixel_distances(same), groups)["diversity/group"] == 0.0
    assert diversity(pixel_distances(varied), groups)["diversity/group"] > 0.05
    singletons = diversity(pixel_distances(varied), np.arange(4))
    assert np.isnan(singletons["diversity/group"]) and singletons["diversity/batch"] > 0.05


def test_the_bonus_spread_skips_excluded_samples_and_other_groups():
    from omnigrpo.app.diversity import group_spread

    black, white = np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)
    images = np.stack([black, white, white, black, black])
    spread = group_spread(pixel_distances(images), np.array([0, 0, 0, 1, 1]), np.array([True, True, False, True, True]))
    # the excluded white counts as nobody's sibling (sample 0 sees only sample 1), but gets its own spread
    assert spread.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])


def test_the_bonus_pays_only_good_samples_for_being_unlike_the_good_ones():
    from omnigrpo.app.diversity import diversity_bonus

    black, white, grey = (np.full((16, 16, 3), v, np.uint8) for v in (0, 255, 128))
    images = np.stack([black, black, white, grey, black, white])
    group = np.array([0, 0, 0, 0, 1, 1])
    total = np.array([1.0, 1.0, 1.0, 0.0, 5.0, np.nan])  # the grey one failed its judge: below its group's mean
    valid = np.array([True, True, True, True, True, False])
    bonus = diversity_bonus(pixel_distances(images), group, total, valid, 3.0)
    # group 0 (mean 0.75): the white one is unlike both good blacks; the grey one is unlike everyone but is
    # below the mean, so it gains nothing and is nobody's sibling; group 1: the excluded white is no sibling
    assert bonus.tolist() == pytest.approx([1.5, 1.5, 3.0, 0.0, 0.0, 0.0])
