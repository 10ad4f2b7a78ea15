import numpy as np
import pytest

from omnigrpo.rewards.judges.shapes import parse_prompt, read_image
from omnigrpo.rewards.registry import build_reward
from omnigrpo.rollout.families.codebook import PatchCodebook
from omnigrpo.worlds import shapes


def test_reads_every_clean_scene():
    rng = np.random.default_rng(0)
    for scene in shapes.all_scenes():
        reading = read_image(shapes.render(scene, rng))
        assert (reading.shape, reading.color, reading.position) == (scene.shape, scene.color, scene.position)


def test_reads_codebook_reconstructions():
    rng = np.random.default_rng(0)
    _, fit = shapes.sample_pairs(shapes.train_items(), 1024, rng)
    codebook = PatchCodebook.fit(fit, 256, seed=0)
    scenes, images = shapes.sample_pairs(shapes.all_scenes(), 240, rng)
    strict = build_reward("shapes_strict")
    scores = strict(codebook.decode(codebook.encode(images)), [s.prompt for s in scenes], [{}] * 240)
    assert np.mean(scores) >= 0.95


def test_partial_credit_per_attribute():
    fn = build_reward("shapes")
    prompt = "a red circle at the top left"
    images = [
        shapes.render(shapes.Scene("circle", "red", "top left")),
        shapes.render(shapes.Scene("circle", "blue", "top left")),
        shapes.render(shapes.Scene("square", "blue", "top left")),
        shapes.render(shapes.Scene("square", "blue", "bottom right")),
    ]
    assert fn(images, [prompt] * 4, [{}] * 4) == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert build_reward("shapes_strict")(images, [prompt] * 4, [{}] * 4) == [1.0, 0.0, 0.0, 0.0]


def test_blank_image_scores_zero_and_prompt_without_attributes_is_not_applicable():
    blank = np.empty((32, 32, 3), np.uint8)
    blank[:] = shapes.BACKGROUND
    fn = build_reward("shapes")
    assert fn([blank, blank], ["a red circle at the top left", "a photo of a cat"], [{}, {}]) == [0.0, None]
    assert parse_prompt("A Green Triangle at the bottom right").color == "green"
