"""The OCR judge reads text rendered with a real TrueType font (the one Pillow ships) through PP-OCR."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from omnigrpo.rewards.judges.ocr import edit_score, target_text, word_recall
from omnigrpo.rewards.registry import build_reward


def render(text: str, size=(320, 96), font_size=40) -> np.ndarray:
    image = Image.new("RGB", size, "white")
    font = ImageFont.load_default(size=font_size)
    assert isinstance(font, ImageFont.FreeTypeFont)  # a real outline font, not the bitmap fallback
    ImageDraw.Draw(image).text((12, (size[1] - font_size) // 2 - 4), text, fill="black", font=font)
    return np.asarray(image)


@pytest.fixture(scope="module")
def ocr():
    return build_reward("ocr")


def test_exact_text_scores_high_and_wrong_text_clearly_lower(ocr):
    words = ["OPEN", "Hello", "omni grpo", "RL 2025"]
    images = [render(w) for w in words]
    prompts = [f'a sign that says "{w}"' for w in words]
    exact = ocr(images, prompts, [{}] * 4)
    assert min(exact) >= 0.95, exact
    wrong = ocr(images, ['a sign that says "CLOSED"', 'a sign that says "world"', 'a sign that says "zebra"',
                         'a sign that says "xyz"'], [{}] * 4)
    assert max(wrong) <= 0.5, wrong


def test_metadata_text_wins_and_prompts_without_text_are_not_applicable(ocr):
    image = render("CAFE")
    scores = ocr([image, image], ["a storefront", "a storefront"], [{"text": "CAFE"}, {}])
    assert scores[0] >= 0.95 and scores[1] is None


def test_small_images_are_upscaled_for_the_detector(ocr):
    small = render("STOP", size=(96, 32), font_size=22)
    assert ocr([small], ['"STOP"'], [{}])[0] >= 0.95


def test_blank_image_reads_nothing(ocr):
    blank = np.full((96, 320, 3), 255, np.uint8)
    assert ocr([blank], ['"OPEN"'], [{}]) == [0.0]


def test_word_recall_mode():
    recall = build_reward("ocr", {"score": "recall", "detect": False})
    image = render("big red door")
    assert recall([image], ['"big red door"'], [{}]) == [1.0]
    assert recall([image], ['"big blue door"'], [{}])[0] == pytest.approx(2 / 3)


def test_unknown_score_is_refused():
    with pytest.raises(ValueError, match="score must be one of"):
        build_reward("ocr", {"score": "bleu"})


def test_scores_by_hand():
    assert target_text('a poster with "Hello" and “World”', {}) == "Hello World"
    assert target_text("no quotes", None) is None
    assert target_text('a sign that says " " or "!!!"', {}) is None  # nothing readable asked for
    assert edit_score("hello world", "HelloWorld") == 1.0
    assert edit_score("", "abcd") == 0.0
    assert edit_score("abxd", "abcd") == pytest.approx(0.75)
    assert word_recall("统一 模型", "统一模型") == 1.0  # CJK counted per character


def test_one_reading_serves_every_score_that_reads_the_same_way(monkeypatch):
    """edit and exact at the same scale share a reader and read each image once; another scale reads again."""
    from omnigrpo.rewards.judges.ocr import shared_reader

    edit, exact = build_reward("ocr", {"detect": False}), build_reward("ocr", {"score": "exact", "detect": False})
    larger = build_reward("ocr", {"score": "exact", "detect": False, "min_height": 200})
    reader = shared_reader(False, 64, 1.2)
    reader.memory.clear()  # the process's reader may have read these images in an earlier test
    reads = []
    real = reader._read
    monkeypatch.setattr(reader, "_read", lambda image: reads.append(image.shape) or real(image))
    images = [render("OPEN"), render("OPFN")]
    assert edit(images, ['"OPEN"'] * 2, [{}] * 2) == [1.0, 0.75]
    assert exact(images, ['"OPEN"'] * 2, [{}] * 2) == [1.0, 0.0]
    assert len(reads) == 2  # the exact score reused both readings
    assert larger(images, ['"OPEN"'] * 2, [{}] * 2) == [1.0, 0.0] and len(reads) == 2  # its own reader
    assert shared_reader(False, 200, 1.2) is not reader
