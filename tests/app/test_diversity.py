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
