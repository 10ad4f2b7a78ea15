"""The glyphs world: disjoint splits, per-character prompts, renders that real OCR reads."""

import numpy as np
import pytest

from omnigrpo.rewards.registry import build_reward
from omnigrpo.rollout.families.codebook import PatchCodebook
from omnigrpo.worlds import glyphs
from omnigrpo.worlds.registry import get
from omnigrpo.worlds.world import blank_share, prompts_of


def test_splits_are_fixed_disjoint_and_within_the_grammar():
    train, held = {i.text for i in glyphs.train_items()}, {i.text for i in glyphs.held_out_items()}
    assert len(train) == glyphs.TRAIN_STRINGS and len(held) == glyphs.HELD_OUT_STRINGS and not train & held
    for text in train | held:
        assert glyphs.LENGTHS[0] <= len(text) <= glyphs.LENGTHS[1] and set(text) <= set(glyphs.ALPHABET)
    assert [i.text for i in glyphs.held_out_items()] == [i.text for i in get("glyphs").held_out_items()]


def test_prompt_words_spell_the_string_and_are_in_the_vocabulary():
    item = glyphs.held_out_items()[0]
    words = glyphs.words(item.prompt)
    assert "".join(words[2:-1]).rstrip("_") == item.text and set(words) <= set(glyphs.vocabulary())
    assert item.metadata == {"text": item.text}


def test_renders_vary_and_have_the_world_shape():
    items, images = glyphs.sample_pairs(glyphs.train_items(), 6, np.random.default_rng(0))
    again = glyphs.sample_pairs(glyphs.train_items(), 6, np.random.default_rng(0))[1]
    assert images.shape == (6, *glyphs.IMAGE_SHAPE, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again)
    assert len({tuple(map(tuple, im.reshape(-1, 3)[im.reshape(-1, 3).sum(1) > 300][:1])) for im in images}) > 1
    assert 0.5 < blank_share(images, glyphs.BACKGROUND) < 1.0


@pytest.fixture(scope="module")
def exact():
    return build_reward("ocr", {"score": "exact", "detect": False})


def test_real_ocr_reads_renders_and_their_patch_codes(exact):
    rng = np.random.default_rng(1)
    items, images = glyphs.sample_pairs(glyphs.held_out_items(), 24, rng)
    prompts, metadata = prompts_of(items)
    assert np.mean(exact(images, prompts, metadata)) >= 0.9
    codebook = PatchCodebook.fit(glyphs.sample_pairs(glyphs.train_items(), 256, rng)[1], 512, seed=0)
    decoded = codebook.decode(codebook.encode(images))
    assert codebook.tokens_per_image == (24 // 4) * (72 // 4)
    assert np.mean(exact(decoded, prompts, metadata)) >= 0.75  # the tokenizer keeps text readable


def test_blank_and_wrong_images_score_zero(exact):
    items = glyphs.held_out_items()[:2]
    blank = np.zeros((2, *glyphs.IMAGE_SHAPE, 3), np.uint8)
    blank[:] = glyphs.BACKGROUND
    swapped = np.stack([glyphs.render(items[1]), glyphs.render(items[0])])
    prompts, metadata = prompts_of(items)
    assert exact(blank, prompts, metadata) == [0.0, 0.0]
    assert exact(swapped, prompts, metadata) == [0.0, 0.0]


def test_the_style_reader_recovers_the_renderers_attributes():
    """Colour, size and height of every training string drawn in a random style are read back from pixels."""
    from omnigrpo.worlds.glyphs import Style, random_style, read_style

    rng = np.random.default_rng(7)
    drawn = [(item, random_style(rng)) for item in glyphs.train_items()]
    assert len({s for _, s in drawn}) == 18  # every colour x size x height occurs
    assert all(read_style(glyphs.render(item, style=style)) == style for item, style in drawn)
    assert read_style(np.full((*glyphs.IMAGE_SHAPE, 3), glyphs.BACKGROUND, np.uint8)) is None
    assert read_style(glyphs.render(glyphs.Item("KP7"))) == Style()


def test_style_entropy_counts_only_samples_that_read_correctly():
    from omnigrpo.app.diversity import style_entropy
    from omnigrpo.app.evaluator import world_metrics
    from omnigrpo.worlds.glyphs import Item, Style

    # two prompts x 3 samples: prompt 1 in two styles (+ a wrong one in a third), prompt 2 in one style
    styles = [Style("white"), Style("cyan"), Style("yellow"), Style(), Style(), Style()]
    assert style_entropy(styles, [1, 1, 0, 1, 1, 1], 3) == pytest.approx(0.5)
    assert np.isnan(style_entropy(styles, [0] * 6, 3))
    images = np.stack([glyphs.render(Item(t), style=s) for t, s in
                       [("KP7", Style("white")), ("KP7", Style("cyan", 12, 1)), ("AE", Style()), ("AE", Style())]])
    prompts = ['write "KP7"'] * 2 + ['write "AE"'] * 2
    metrics = world_metrics("glyphs", images, prompts, [{"text": "KP7"}] * 2 + [{"text": "AE"}] * 2, per_prompt=2)
    assert metrics["eval/exact_match"] == 1.0  # every sample reads, so every style counts
    assert metrics["eval/style_entropy"] == pytest.approx(0.5)  # 1 bit for KP7, 0 for AE


def test_held_out_report_has_longtext_score_beside_exact_match():
    """LongText-Bench's word match of the same reading: a wrong or blank sample reads none of its word."""
    from omnigrpo.app.evaluator import world_metrics

    items = glyphs.held_out_items()[:2]
    blank = np.full((*glyphs.IMAGE_SHAPE, 3), glyphs.BACKGROUND, np.uint8)
    images = np.stack([glyphs.render(items[0]), glyphs.render(items[1]), blank, glyphs.render(items[1])])
    metrics = world_metrics("glyphs", images, [items[0].prompt] * 2 + [items[1].prompt] * 2,
                            [items[0].metadata] * 2 + [items[1].metadata] * 2, per_prompt=2)
    assert metrics["eval/longtext_score"] == metrics["eval/exact_match"] == 0.5  # 2 of 4 right
    assert "eval/longtext_score_pass_at_1" not in metrics  # pass@k is the headline's only
