"""Glyphs prompts that name their look: the grammar, the share, the SFT pairs, the look judge, the option off."""

import numpy as np
import pytest

from omnigrpo.app.preflight import training_prompts
from omnigrpo.config.loader import ConfigError
from omnigrpo.config.schema import DataConfig, ModelConfig, RunConfig, SFTConfig, WorldConfig
from omnigrpo.rewards.registry import build_reward
from omnigrpo.trainers.sft import sft_key
from omnigrpo.worlds import glyphs, registry
from omnigrpo.worlds.glyphs import Item, Style, look_of, parse, read_style, render


def test_named_prompts_round_trip_through_the_grammar():
    items = [i for i in glyphs.train_items(1.0)]
    assert all(i.look for i in items)
    for item in items:
        assert parse(item.prompt) == item
        assert set(glyphs.words(item.prompt)) <= set(glyphs.vocabulary())
        assert item.metadata == {"text": item.text, "look": dict(item.look)}
        assert [a for a, _ in item.look] == [a for a in glyphs.LOOKS if a in dict(item.look)]  # LOOKS order
    assert parse('write "AE" cyan Top').look == (("colour", "cyan"), ("height", "top"))
    assert parse('write "AE"') == Item("AE")


def test_the_share_of_named_prompts_is_exact_nested_and_fixed():
    counts = {share: sum(bool(i.look) for i in glyphs.train_items(share)) for share in (0.0, 0.25, 0.5, 1.0)}
    assert counts == {0.0: 0, 0.25: 150, 0.5: 300, 1.0: glyphs.TRAIN_STRINGS}
    quarter, half = glyphs.train_items(0.25), glyphs.train_items(0.5)
    assert [i.text for i in quarter] == [i.text for i in half] == [i.text for i in glyphs.train_items()]
    assert all(h == q for q, h in zip(quarter, half, strict=True) if q.look)  # a larger share names more, alike
    glyphs._named_looks.cache_clear()  # drawn again, as another process would: the same prompts
    assert glyphs.train_items(0.5) == half
    sizes = [len(i.look) for i in glyphs.train_items(1.0)]
    assert set(sizes) == {1, 2, 3} and 1.5 < np.mean(sizes) < 1.95  # each attribute at 1/2, at least one: 12/7


def test_the_option_off_keeps_todays_prompts_and_sft_pairs():
    strings = glyphs._strings()[0]
    prompts, metadata = registry.train_prompts("glyphs")
    assert prompts == [f'write "{t}"' for t in strings] and metadata == [{"text": t} for t in strings]
    assert registry.train_items("glyphs", 0.0) == [Item(t) for t in strings]
    items, images = glyphs.sample_pairs(glyphs.train_items(), 8, np.random.default_rng(5))
    rng = np.random.default_rng(5)  # what the pairs were before looks: the same picks, one random style each
    picks = [Item(strings[i]) for i in rng.integers(0, len(strings), size=8)]
    assert items == picks
    assert np.array_equal(images, np.stack([render(i, style=glyphs.random_style(rng)) for i in picks]))
    assert repr(WorldConfig(name="glyphs")) == "WorldConfig(name='glyphs', codebook_size=256)"  # the SFT key's part
    key = [SFTConfig(), ModelConfig(), WorldConfig(name="glyphs"), RunConfig()]
    assert sft_key(*key) != sft_key(*key[:2], WorldConfig(name="glyphs", look_share=0.5), key[3])


def test_sft_pairs_draw_the_named_look_and_vary_the_rest():
    items, images = glyphs.sample_pairs(glyphs.train_items(1.0), 96, np.random.default_rng(0))
    drawn = [look_of(read_style(image)) for image in images]
    assert all(d[a] == w for item, d in zip(items, drawn, strict=True) for a, w in item.look)
    free = {a: {d[a] for item, d in zip(items, drawn, strict=True) if a not in dict(item.look)} for a in glyphs.LOOKS}
    assert all(len(words) == len(glyphs.LOOKS[a][1]) for a, words in free.items())  # unnamed: still every value


def test_the_run_trains_on_named_prompts_and_other_worlds_refuse_the_option(tiny_config):
    prompts, metadata = training_prompts(DataConfig(prompts="glyphs"), 0.5)
    assert sum("look" in m for m in metadata) == 300 and prompts[0].startswith('write "')
    assert training_prompts(DataConfig(prompts="glyphs")) == registry.train_prompts("glyphs")
    assert tiny_config("world.name=glyphs", "data.prompts=glyphs", "world.look_share=0.5").world.look_share == 0.5
    with pytest.raises(ConfigError, match="world.look_share: only the glyphs world"):
        tiny_config("world.look_share=0.5")


@pytest.fixture(scope="module")
def judge():
    return build_reward("glyphs_look")


def _scored(judge, image, look) -> float | None:
    item = Item("KP7", tuple((a, look[a]) for a in glyphs.LOOKS if a in look))
    return judge([image], [item.prompt], [item.metadata])[0]


def test_the_judge_gives_the_share_of_the_named_look_drawn(judge):
    image = render(Item("KP7"), style=Style("yellow", 8, -1))  # small, yellow, top
    assert _scored(judge, image, {"size": "small", "colour": "yellow", "height": "top"}) == 1.0
    assert _scored(judge, image, {"size": "small", "colour": "cyan"}) == 0.5
    assert _scored(judge, image, {"size": "large", "colour": "cyan", "height": "top"}) == pytest.approx(1 / 3)
    assert _scored(judge, image, {"size": "large", "height": "bottom"}) == 0.0
    blank = np.full((*glyphs.IMAGE_SHAPE, 3), glyphs.BACKGROUND, np.uint8)
    assert _scored(judge, blank, {"colour": "white"}) == 0.0  # nothing drawn matches nothing
    assert judge([image], ['write "KP7"'], [{"text": "KP7"}]) == [None]  # a plain prompt: not applicable
    assert judge([image], ['write "KP7" large yellow'], [{}]) == [0.5]  # no metadata: the prompt's words
    with pytest.raises(ValueError, match="'size': 'huge' is not a look"):
        judge([image], ['write "KP7"'], [{"look": {"size": "huge"}}])
