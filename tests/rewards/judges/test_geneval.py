"""The GenEval judge: its rules on hand-made detections, its colour and detector steps on tiny random models of
the real classes, and the ``geneval`` reward loaded by hub id from an offline cache."""

import numpy as np
import pytest
import torch

from omnigrpo.rewards.judges.geneval_rules import (
    COCO_CLASSES,
    COLOURS,
    Detection,
    GenEvalPrompt,
    GenEvalRules,
    relations,
)

RULES = GenEvalRules()
SHA = "0123456789abcdef0123456789abcdef01234567"
DETECTRON2_COCO = [  # the COCO instance checkpoints' own spelling (detectron2 / mmdet / the hub's Mask2Former)
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]


def det(label, score=0.95, box=(0, 0, 10, 10)):
    return Detection(label, score, tuple(float(v) for v in box))


def asked(tag, *include, exclude=()):
    return GenEvalPrompt.from_metadata({"tag": tag, "include": list(include), "exclude": list(exclude)})


def counting(label, n):
    return asked("counting", {"class": label, "count": n}, exclude=[{"class": label, "count": n + 1}])


def at(x, y, size=10):
    """A ``size``-square box centred on (x, y)."""
    return (x - size / 2, y - size / 2, x + size / 2, y + size / 2)


# ---- rules ---------------------------------------------------------------------------------------------------------


def test_single_and_two_objects():
    bench = asked("single_object", {"class": "bench", "count": 1})
    assert RULES.judge([det("bench")], bench).strict
    missing = RULES.judge([det("cow")], bench)
    assert not missing.strict and missing.partial == 0 and missing.reason == "bench >= 1: found 0"
    pair = asked("two_object", {"class": "bench", "count": 1}, {"class": "sports ball", "count": 1})
    half = RULES.judge([det("bench")], pair)
    assert [c.kind for c in half.checks] == ["count", "count"] and half.partial == 0.5 and not half.strict


def test_a_count_one_short_and_an_exact_count_broken_by_one_extra():
    clocks = counting("clock", 2)
    assert RULES.judge([det("clock"), det("clock")], clocks).strict
    short = RULES.judge([det("clock")], clocks)
    assert [c.passed for c in short.checks] == [False, True] and short.partial == 0.5
    extra = RULES.judge([det("clock")] * 3, clocks)  # counting excludes count + 1: the count is exact
    assert [c.kind for c in extra.checks] == ["count", "exclude"] and [c.passed for c in extra.checks] == [True, False]
    assert extra.reason == "clock < 3: found 3"


def test_an_excluded_class_present():
    no_dog = asked("single_object", {"class": "cat", "count": 1}, exclude=[{"class": "dog", "count": 1}])
    assert RULES.judge([det("cat"), det("dog", score=0.2)], no_dog).strict  # under the threshold: absent
    assert RULES.judge([det("cat"), det("dog")], no_dog).partial == 0.5


def test_a_detection_must_exceed_the_threshold():
    bench = asked("single_object", {"class": "bench", "count": 1})
    assert not RULES.judge([det("bench", 0.3)], bench).strict
    assert RULES.judge([det("bench", 0.31)], bench).strict
    assert GenEvalRules(threshold=0.1).judge([det("bench", 0.2)], bench).strict


def test_counting_has_its_own_threshold():
    doubtful = [det("clock", 0.85), det("clock", 0.85)]
    assert not RULES.judge(doubtful, counting("clock", 2)).checks[0].passed
    assert RULES.judge(doubtful[:1], asked("single_object", {"class": "clock", "count": 1})).strict
    assert GenEvalRules(counting_threshold=0.8).judge(doubtful, counting("clock", 2)).strict
    # the exclude counts with the same threshold: a doubtful third clock does not break the count
    assert RULES.judge([det("clock"), det("clock"), det("clock", 0.85)], counting("clock", 2)).strict


def test_colour_is_judged_on_the_count_most_confident_only():
    red_car = asked("colors", {"class": "car", "count": 1, "color": "red"})
    cars = [det("car", 0.9, (0, 0, 5, 5)), det("car", 0.95, (5, 5, 9, 9)), det("car", 0.5, (1, 1, 2, 2))]
    paint = {(5.0, 5.0, 9.0, 9.0): "red", (0.0, 0.0, 5.0, 5.0): "blue", (1.0, 1.0, 2.0, 2.0): "blue"}
    seen = []

    def colours(chosen):
        seen.append([d.score for d in chosen])
        return [paint[d.box] for d in chosen]

    assert RULES.judge(cars, red_car, colours).strict and seen == [[0.95]]
    paint[(5.0, 5.0, 9.0, 9.0)], paint[(0.0, 0.0, 5.0, 5.0)] = "blue", "red"  # the red car is second
    verdict = RULES.judge(cars, red_car, colours)
    assert [c.passed for c in verdict.checks] == [True, False] and verdict.reason == "red car: found blue"
    two_red = asked("colors", {"class": "car", "count": 2, "color": "red"})
    assert not RULES.judge(cars, two_red, colours).strict  # each of the two must be red
    assert RULES.judge(cars, two_red, lambda chosen: ["red"] * len(chosen)).strict


def test_a_missing_object_fails_its_colour_without_asking():
    verdict = RULES.judge([], asked("colors", {"class": "car", "count": 1, "color": "red"}), lambda c: 1 / 0)
    assert [c.passed for c in verdict.checks] == [False, False]


@pytest.mark.parametrize(("where", "relation"), [((0, 50), "left of"), ((100, 50), "right of"),
                                                  ((50, 0), "above"), ((50, 100), "below")])
def test_each_relation_direction(where, relation):
    assert relations(det("dog", box=at(*where)), det("cat", box=at(50, 50))) == {relation}
    prompt = asked("position", {"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": [relation, 0]})
    verdict = RULES.judge([det("cat", box=at(50, 50)), det("dog", box=at(*where))], prompt)
    assert [c.kind for c in verdict.checks] == ["count", "count", "position"] and verdict.strict
    others = [r for r in ("left of", "right of", "above", "below") if r != relation]
    for other in others:
        wrong = asked("position", {"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": [other, 0]})
        scene = [det("cat", box=at(50, 50)), det("dog", box=at(*where))]
        assert RULES.judge(scene, wrong).partial == pytest.approx(2 / 3)


def test_a_relation_inside_the_margin_does_not_hold():
    # centres 1.5 apart on x; the margin is 0.1 x (10 + 10) = 2: shrunk to 0, no relation at all
    assert relations(det("dog", box=at(48.5, 50)), det("cat", box=at(50, 50))) == set()
    assert relations(det("dog", box=at(48.5, 50)), det("cat", box=at(50, 50)), margin=0.0) == {"left of"}
    # 3.5 apart: 1.5 is left, under half the offset; 4.5 apart: 2.5 is left, over half
    assert relations(det("dog", box=at(46.5, 50)), det("cat", box=at(50, 50))) == set()
    assert relations(det("dog", box=at(45.5, 50)), det("cat", box=at(50, 50))) == {"left of"}


def test_the_share_is_of_the_offset_before_shrinking():
    # 40-px boxes 10 apart: the margin (8) leaves 2 of 10, a share of 0.2; of the shrunk offset it would be 1
    assert relations(det("dog", box=at(60, 50, 40)), det("cat", box=at(50, 50, 40))) == set()
    # a diagonal offset counts for both directions, a mostly vertical one for one
    assert relations(det("dog", box=at(60, 60, 0)), det("cat", box=at(50, 50, 0))) == {"right of", "below"}
    assert relations(det("dog", box=at(52, 60, 0)), det("cat", box=at(50, 50, 0))) == {"below"}


def test_position_is_checked_against_every_matched_target():
    prompt = asked("position", {"class": "teddy bear", "count": 2}, {"class": "dog", "count": 1,
                                                                     "position": ["right of", 0]})
    bears = [det("teddy bear", 0.9, at(0, 50)), det("teddy bear", 0.8, at(200, 50))]
    dog = det("dog", box=at(100, 50))
    assert not RULES.judge([*bears, dog], prompt).strict  # left of the second bear
    assert RULES.judge([*bears, det("teddy bear", 0.5, at(300, 50)), det("dog", box=at(250, 50))], prompt).strict
    lonely = RULES.judge([dog], prompt)  # no bear: the count and the position fail, the dog's count holds
    assert [c.passed for c in lonely.checks] == [False, True, False]
    assert lonely.checks[2].reason == "dog right of its target: one of them is missing"


def test_overlap_suppression_is_off_by_default():
    twins = [det("clock", box=(0, 0, 10, 10)), det("clock", 0.94, box=(1, 0, 11, 10))]
    assert RULES.judge(twins, counting("clock", 2)).strict
    dedup = GenEvalRules(overlap=0.5)
    assert not dedup.judge(twins, counting("clock", 2)).strict
    assert dedup.judge([twins[0], det("clock", box=(20, 0, 30, 10))], counting("clock", 2)).strict


@pytest.mark.parametrize(("metadata", "match"), [
    ({"prompt_id": 3}, "no GenEval metadata"),
    ({"tag": "single_object", "include": []}, "non-empty"),
    ({"tag": "single_object", "include": [{"class": "unicorn", "count": 1}]}, "no COCO class"),
    ({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "teal"}]}, "colour 'teal'"),
    ({"tag": "counting", "include": [{"class": "car", "count": 0}]}, "positive integer"),
    ({"tag": "position", "include": [{"class": "car", "count": 1, "position": ["above", 0]}]}, "earlier include"),
])
def test_metadata_that_is_not_genevals_is_refused(metadata, match):
    with pytest.raises(ValueError, match=match):
        GenEvalPrompt.from_metadata(metadata, "a photo")


# ---- colour ---------------------------------------------------------------------------------------------------------


def _scene():
    """A 20 x 30 image: blue everywhere, a red 4 x 6 object at rows 6-9, columns 7-12, boxed loosely."""
    image = np.zeros((20, 30, 3), np.uint8)
    image[...] = (0, 0, 255)
    mask = np.zeros((20, 30), bool)
    mask[6:10, 7:13] = True
    image[mask] = (255, 0, 0)
    return image, Detection("car", 0.9, (5.5, 4.2, 15.0, 12.0), mask)


def test_the_object_is_pasted_on_grey_and_cropped_to_its_box():
    from omnigrpo.rewards.judges.geneval import object_crop

    image, car = _scene()
    crop = object_crop(image, car)
    assert crop.shape == (8, 10, 3)  # rows 4..11, columns 5..14: the box rounded outward
    inside = np.zeros((8, 10), bool)
    inside[2:6, 2:8] = True
    assert (crop[inside] == (255, 0, 0)).all() and (crop[~inside] == 153).all()
    bare = object_crop(image, Detection("car", 0.9, car.box))  # no mask: the box's own pixels
    assert (bare == image[4:12, 5:15]).all()
    assert object_crop(image, Detection("car", 0.9, (29.5, 19.5, 29.5, 19.5))).shape == (1, 1, 3)


@pytest.fixture(scope="module")
def colour_classifier(tiny_clip_dir):
    from omnigrpo.rewards.judges.geneval import ColourClassifier

    return ColourClassifier(f"local-dir:{tiny_clip_dir}", None, "cpu")


def test_colour_prototypes_average_the_three_templates(colour_classifier):
    texts = colour_classifier.text_embeddings("car")
    assert texts.shape[0] == len(COLOURS) and torch.allclose(texts.norm(dim=-1), torch.ones(len(COLOURS)))
    clip = colour_classifier.clip
    with torch.no_grad():
        blue = clip.model.encode_text(clip.tokenizer(["a photo of a blue car", "a photo of a blue-colored car",
                                                      "a photo of a blue object"]), normalize=True).mean(0)
    assert torch.allclose(texts[COLOURS.index("blue")], blue / blue.norm(), atol=1e-5)


def test_the_classifier_sees_the_crop_and_takes_the_closest_colour(colour_classifier, monkeypatch):
    from omnigrpo.rewards.judges.geneval import object_crop

    image, car = _scene()
    seen = []
    encode = colour_classifier.clip.encode_images
    monkeypatch.setattr(colour_classifier.clip, "encode_images", lambda crops: seen.append(crops) or encode(crops))
    found = colour_classifier(image, [car])
    assert len(seen[0]) == 1 and (seen[0][0] == object_crop(image, car)).all() and found[0] in COLOURS
    # make red the second-best colour for this crop: blue is named, and a red car fails its colour check
    crop = encode([object_crop(image, car)])[0]
    other = torch.nn.functional.normalize(torch.randn(len(COLOURS), crop.numel()), dim=-1)
    other = torch.nn.functional.normalize(other - (other @ crop)[:, None] * crop, dim=-1) * 0.2  # ~orthogonal
    texts = other.clone()
    texts[COLOURS.index("blue")], texts[COLOURS.index("red")] = crop, 0.9 * crop + other[0]
    monkeypatch.setitem(colour_classifier._texts, "car", torch.nn.functional.normalize(texts, dim=-1))
    assert colour_classifier(image, [car]) == ["blue"]
    verdict = RULES.judge([car], asked("colors", {"class": "car", "count": 1, "color": "red"}),
                          lambda chosen: colour_classifier(image, chosen))
    assert not verdict.strict and verdict.reason == "red car: found blue"


# ---- detector and the reward ----------------------------------------------------------------------------------------


def test_detector_labels_map_to_geneval_names():
    from omnigrpo.rewards.judges.geneval import geneval_labels

    names = geneval_labels(dict(enumerate(DETECTRON2_COCO)))
    assert names[64] == "computer mouse" and names[65] == "tv remote" and names[66] == "computer keyboard"
    assert len(set(names.values())) == 80
    assert 80 not in geneval_labels({**dict(enumerate(DETECTRON2_COCO)), 80: "wall"})  # extra classes ignored
    with pytest.raises(ValueError, match="no class for 1 of GenEval's 80"):
        geneval_labels(dict(enumerate(DETECTRON2_COCO[:-1])))


def test_instances_map_masks_from_the_padded_input_back_to_the_image():
    from omnigrpo.rewards.judges.geneval import instances

    labels = dict(enumerate(DETECTRON2_COCO))
    logits = torch.full((3, 81), -10.0)
    logits[0, 16] = 10.0  # a sure dog
    logits[1, 17] = 10.0  # a sure horse with an empty mask: it places nothing
    logits[2, 80] = 10.0  # no object
    masks = torch.full((3, 16, 16), -10.0)  # logits on the input's 1/4 grid
    masks[0, 2:6, 8:12] = 10.0  # input rows 8-24, columns 32-48
    pixel_mask = torch.zeros(64, 64, dtype=torch.long)
    pixel_mask[:32] = 1  # a 50 x 100 image resized to 32 x 64, padded to 64 x 64
    found = instances(logits, masks, pixel_mask, (50, 100), labels, min_score=0.3)
    assert [d.label for d in found] == ["dog"] and found[0].score == pytest.approx(1.0, abs=0.05)
    assert found[0].box == pytest.approx((50, 12.5, 75, 37.5), abs=2.5)
    assert found[0].mask.shape == (50, 100) and found[0].mask.sum() == pytest.approx(25 * 25, rel=0.15)
    assert instances(logits, masks, pixel_mask, (50, 100), labels, min_score=1.01) == []


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory, tiny_detector_dir):
    """An offline hub cache holding a tiny random Mask2Former of the real class under GenEval's default id."""
    import shutil

    from omnigrpo.rewards.judges.geneval import DETECTOR

    home = tmp_path_factory.mktemp("hf")
    entry = home / "hub" / f"models--{DETECTOR.replace('/', '--')}"
    shutil.copytree(tiny_detector_dir, entry / "snapshots" / SHA)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(SHA)
    return home


@pytest.fixture
def offline_hub(hub_home, monkeypatch):
    import huggingface_hub.constants as hub  # read when imported: point this process's copy there too

    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(hub_home / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)


POSITION = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}]}
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"},
                                               {"class": "microwave", "count": 1, "color": "purple"}]}


def test_the_detector_loads_by_hub_id_and_finds_objects_in_images_of_any_size(offline_hub):
    from omnigrpo.rewards.judges.geneval import InstanceDetector

    detector = InstanceDetector(device="cpu", min_score=0.0)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 72, 3), dtype=np.uint8), rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)]
    found = detector(images)
    assert len(found) == 2 and all(found)
    for image, dets in zip(images, found, strict=True):
        for d in dets:
            rows, cols = np.flatnonzero(d.mask.any(1)), np.flatnonzero(d.mask.any(0))
            assert d.mask.shape == image.shape[:2] and d.box == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            assert d.label in COCO_CLASSES
            assert 0.0 <= d.score <= 1.0


def test_the_geneval_reward_end_to_end(offline_hub, tiny_clip_dir):
    from omnigrpo.rewards.judges.geneval_rules import Verdict
    from omnigrpo.rewards.registry import build_reward

    clip = {"clip_model": f"local-dir:{tiny_clip_dir}", "clip_pretrained": None, "device": "cpu"}
    images = np.random.default_rng(1).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    prompts = ["a photo of a dog right of a teddy bear", "a photo of a green bus and a purple microwave"]
    for thresholds in ({}, {"threshold": 0.0, "counting_threshold": 0.0}):  # GenEval's, then every detection
        judge = build_reward("geneval", {**clip, **thresholds})
        scores = judge(images, prompts, [POSITION, COLOR_ATTR])
        assert len(scores) == 2 and all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
        verdicts = judge.judge(images, [POSITION, COLOR_ATTR])
        assert all(isinstance(v, Verdict) for v in verdicts) and [v.partial for v in verdicts] == scores
        assert [c.kind for c in verdicts[0].checks] == ["count", "count", "position"]
        assert [c.kind for c in verdicts[1].checks] == ["count", "color", "count", "color"]
        assert all(isinstance(v.reason, str) and v.strict == (v.partial == 1.0) for v in verdicts)
    # every detection counts now: a colour asked of the class found first is judged by the colour model
    found = judge.detector(images[:1])[0][0].label
    colour = judge.judge(images[:1], [{"tag": "colors", "include": [{"class": found, "count": 1, "color": "red"}]}])
    assert colour[0].checks[0].passed and colour[0].checks[1].reason.split(": found ")[1] in COLOURS
    with pytest.raises(ValueError, match="prompt 'a cat' carries no GenEval metadata"):
        judge(images[:1], ["a cat"], [{}])
