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


def test_the_bonus_pays_only_good_samples_for_being_unlike_the_good_ones():
    from omnigrpo.trainers.grpo import advantages

    black, white, grey = (np.full((16, 16, 3), v, np.uint8) for v in (0, 255, 128))
    images = np.stack([black, black, white, grey, black, white, black, black])
    total = torch.tensor([1.0, 1.0, 1.0, 0.0, 5.0, np.nan, 5.0, 5.0])  # the grey one: below its group's mean
    valid = torch.tensor([True, True, True, True, True, False, True, True])
    bonus = advantages(total, 4, valid, bonus=3.0, distances=pixel_distances(images)).bonus
    # group 0 (mean 0.75): the white one is unlike both good blacks; the grey one is unlike everyone but is
    # below the mean, so it gains nothing and is nobody's sibling; group 1: the excluded white (its judge failed)
    # is no sibling and the blacks are all alike
    assert bonus.tolist() == pytest.approx([1.5, 1.5, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0])


def test_the_style_bonus_pays_the_good_sample_drawn_in_the_collapsing_attribute():
    from omnigrpo.app.diversity import style_distances
    from omnigrpo.trainers.grpo import advantages
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
    adv = advantages(torch.ones(4), 4, torch.ones(4, dtype=torch.bool), bonus=1.0, distances=d)
    assert adv.bonus[2] > adv.bonus[3] > adv.bonus[0] == adv.bonus[1] > 0
    blank = np.full_like(images[0], glyphs.BACKGROUND)
    assert style_distances([None, glyphs.read_style(blank), styles[0]]).abs().sum() == 0  # nothing readable pays


def test_a_style_bonus_in_a_world_without_a_style_reader_is_refused(capsys, tmp_path, monkeypatch):
    from pathlib import Path

    from conftest import refused

    from omnigrpo.cli import main

    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[2] / "configs" / "shapes.yaml")
    refused(main, ["train", config, "trainer.diversity_space=style", "trainer.diversity_bonus=1"], capsys,
            "trainer.diversity_space: 'style' needs a world that reads its styles back")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("config, override, needle", [
    ("shapes", "trainer.baseline_by=[advance]", "trainer.baseline_by: world 'shapes' does not read its styles back"),
    ("glyphs", "trainer.baseline_by=[advance,font]", "trainer.baseline_by: 'font' is not a style attribute of world "
                                                     "'glyphs'; choose from colour, advance, shift"),
])
def test_a_baseline_by_look_needs_a_style_reader_and_its_attributes(config, override, needle, capsys, tmp_path,
                                                                     monkeypatch):
    from pathlib import Path

    from conftest import refused

    from omnigrpo.cli import main

    monkeypatch.chdir(tmp_path)
    refused(main, ["train", str(Path(__file__).parents[2] / "configs" / f"{config}.yaml"), override], capsys, needle)
    assert not any(tmp_path.iterdir())


def test_the_loop_labels_each_sample_by_its_look_read_from_the_pixels():
    from pathlib import Path
    from types import SimpleNamespace

    from omnigrpo.app.driver import Loop
    from omnigrpo.config.loader import load_config
    from omnigrpo.worlds import glyphs

    cfg = load_config(Path(__file__).parents[2] / "configs" / "glyphs.yaml", ["trainer.baseline_by=[advance]"])
    item = glyphs.held_out_items()[0]
    small, large = glyphs.ADVANCES
    drawn = [glyphs.Style("white", large, 0), glyphs.Style("cyan", small, 1), glyphs.Style("yellow", large, -1)]
    images = np.stack([glyphs.render(item, style=s) for s in drawn] + [np.full_like(glyphs.render(item),
                                                                                     glyphs.BACKGROUND)])
    labels = Loop.look_inputs(SimpleNamespace(cfg=cfg), SimpleNamespace(images=images), None)[1]
    assert labels[0] == labels[2] != labels[1] >= 0 and labels[3] == -1  # by size alone; a blank image has no look
