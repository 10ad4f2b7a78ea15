"""LongText-Bench's matching by hand, its aggregate, and the judge on a tiny random Qwen2-VL found by hub id in
an offline cache, in-process and behind an OpenAI-compatible server on loopback."""

import math
import shutil

import numpy as np
import pytest
import test_vlm

from omnigrpo.rewards.judges.longtext import QUESTION, LongTextJudge, Reading, aggregate
from omnigrpo.rewards.judges.vlm import TransformersVLM
from omnigrpo.rewards.registry import build_reward
from omnigrpo.worlds import glyphs
from omnigrpo.worlds.text_match import is_chinese, match, match_score, normalise


@pytest.fixture(scope="module")
def vlm_dir(tiny_vlm_dir):
    return tiny_vlm_dir
SHA = "0123456789abcdef0123456789abcdef01234567"
TARGETS = [{"text": ["GRAND OPENING", "Every day, every night"]}, {"text": "每日新鲜烘焙"}]


def _images(n: int = 2) -> np.ndarray:
    return np.stack([glyphs.render(item) for item in glyphs.held_out_items()[:n]])


def test_normalisation_drops_punctuation_case_and_extra_whitespace():
    assert normalise("  FRESH Brews,\tEVERY — morning!!  ") == "fresh brews every morning"
    assert normalise("CENTRAL PARK - 2 BLOCKS") == "central park 2 blocks"
    assert normalise("don't") == "dont" and normalise("£5.99") == "599"
    assert normalise("本地烘焙，始于 1998。", chinese=True) == "本地烘焙始于1998"
    assert is_chinese("中央公园 - 2公里") and not is_chinese("Central Park")


def test_words_match_as_multisets():
    assert match("every day", "every day every night") == (2, 4)  # one "every" read covers one of two
    assert match("Every, every DAY night.", "every day every night") == (4, 4)
    assert match("every every every", "every") == (1, 1)  # reading a word thrice counts it once
    assert match("", ["GRAND OPENING", "now"]) == (0, 3) and match_score("opening grand", "GRAND OPENING") == 1.0
    assert match_score("anything", "!!!") == 1.0  # nothing to read


def test_chinese_is_matched_by_characters():
    assert match("每日 新鲜", ["每日新鲜烘焙"]) == (4, 6)
    assert match("本地烘焙，始于1998年", "本地烘焙，始于1998") == (10, 10)  # digits count as characters
    assert match("焙焙", "烘焙烘焙") == (2, 4)


def test_aggregate_sums_units_over_images_per_category_and_length():
    readings = [Reading("a", 1, 1), Reading("", 0, 9), Reading(None, 0, 5), Reading("b c", 2, 4)]
    metadata = [{"category": "sign", "length": "short"}, {"category": "sign", "length": "long"},
                {"category": "slide", "length": "long"}, {"category": "slide", "length": "long"}]
    score = aggregate(readings, metadata)
    assert score.score == pytest.approx(3 / 14)  # summed over images, not a mean of 1, 0 and 0.5
    assert score.by_category == pytest.approx({"sign": 0.1, "slide": 0.5})
    assert score.by_length == pytest.approx({"short": 1.0, "long": 2 / 13})
    assert (score.images, score.failed) == (4, 1) and math.isnan(readings[2].score)
    assert score.metrics()["longtext/category/sign"] == pytest.approx(0.1)
    assert score.metrics("eval/lt")["eval/lt/failed"] == 1.0
    assert math.isnan(aggregate([Reading(None, 0, 3)], [{}]).score)


class _Reader:
    def __init__(self, replies):
        self.replies, self.questions = list(replies), []

    def generate(self, image, question):
        self.questions.append(question)
        return self.replies.pop(0)


def test_judge_asks_for_the_text_only_and_scores_each_image():
    reader = _Reader(["GRAND OPENING! Every day", "每日新鲜"])
    readings = LongTextJudge(reader).judge(_images(), TARGETS)
    assert readings == [Reading("GRAND OPENING! Every day", 4, 6), Reading("每日新鲜", 4, 6)]
    assert reader.questions == [QUESTION] * 2 and "text only" in QUESTION
    assert LongTextJudge(_Reader(["grand", "烘焙"]))(_images(), ["p", "q"], TARGETS) == [1 / 6, 2 / 6]


@pytest.mark.parametrize("metadata", [[{}], [{"text": 7}], [{"text": []}], [{"text": "?!"}], [None]])
def test_a_sample_without_text_is_a_clear_error(metadata):
    with pytest.raises(ValueError, match="longtext: sample 0"):
        LongTextJudge(_Reader(["x"])).judge(_images(1), metadata)


@pytest.fixture
def hub_id(vlm_dir, tmp_path, monkeypatch) -> str:
    """The tiny VLM placed in an offline hub cache (``models--ORG--NAME/snapshots/<sha>``, ``refs/main``)."""
    entry = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-qwen2-vl"
    shutil.copytree(vlm_dir, entry / "snapshots" / SHA)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(SHA)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub  # read when imported: point this process's copy there too

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return "tiny-org/tiny-qwen2-vl"


def test_in_process_reward_from_the_hub_cache_reads_with_the_vlm(hub_id, vlm_dir):
    reward = build_reward("longtext", {"model": hub_id, "max_new_tokens": 6, "device": "cpu"})
    images = _images()
    scores = reward(images, ["p", "q"], TARGETS)
    vlm = TransformersVLM(str(vlm_dir), max_new_tokens=6)
    expected = [match_score(vlm.generate(image, QUESTION), meta["text"])
                for image, meta in zip(images, TARGETS, strict=True)]
    assert scores == expected and all(0.0 <= s <= 1.0 for s in scores)  # greedy: the same reading again


def test_openai_backend_scores_the_servers_reply(vlm_dir):
    server = test_vlm._OpenAIServer(TransformersVLM(str(vlm_dir)), canned="Grand opening. EVERY NIGHT 每日")
    try:
        reward = build_reward("longtext", {"model": "tiny", "backend": "openai", "base_url": server.base_url,
                                           "max_concurrency": 2})
        assert reward(_images(), ["p", "q"], TARGETS) == pytest.approx([4 / 6, 2 / 6])
    finally:
        server.close()
    down = build_reward("longtext", {"model": "tiny", "backend": "openai", "base_url": server.base_url,
                                     "timeout": 0.3, "retries": 1, "backoff": 0.01})
    assert all(math.isnan(s) for s in down(_images(), ["p", "q"], TARGETS))  # failures, never 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="backend must be"):
        build_reward("longtext", {"model": "m", "backend": "grpc"})
    with pytest.raises(ValueError, match="needs base_url"):
        build_reward("longtext", {"model": "m", "backend": "openai"})
