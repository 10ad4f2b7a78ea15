import numpy as np

from omnigrpo.worlds import shapes


def test_held_out_combinations_never_appear_in_training():
    train = {(s.shape, s.color, s.position) for s in shapes.train_items()}
    held = {(s.shape, s.color, s.position) for s in shapes.held_out_items()}
    assert held and not train & held
    assert len(train) + len(held) == len(shapes.all_scenes())


def test_every_attribute_value_is_still_trained():
    train = shapes.train_items()
    assert {s.shape for s in train} == set(shapes.SHAPES)
    assert {s.color for s in train} == set(shapes.COLORS)
    assert {s.position for s in train} == set(shapes.POSITIONS)


def test_prompt_grammar_and_vocabulary():
    scene = shapes.Scene("triangle", "blue", "bottom left")
    assert scene.prompt == "a blue triangle at the bottom left"
    assert set(scene.prompt.split()) <= set(shapes.vocabulary())


def test_render_is_a_plain_scene_with_one_colour():
    image = shapes.render(shapes.Scene("square", "green", "top right"), np.random.default_rng(0))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert colours == {shapes.BACKGROUND, shapes.COLORS["green"]}
    rows, cols = np.nonzero((image != shapes.BACKGROUND).any(-1))
    assert rows.mean() < 16 and cols.mean() > 16  # top right


def test_sampling_is_seeded():
    a = shapes.sample_pairs(shapes.train_items(), 5, np.random.default_rng(3))
    b = shapes.sample_pairs(shapes.train_items(), 5, np.random.default_rng(3))
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
