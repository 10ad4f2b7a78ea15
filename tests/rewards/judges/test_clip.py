"""open_clip judges through the loading path a user takes: a local-dir model and an HPS-style checkpoint."""

import json

import numpy as np
import pytest
import torch

from omnigrpo.rewards.registry import build_reward
from omnigrpo.worlds import shapes


def _batch():
    scenes = shapes.train_items()[:3]
    return np.stack([shapes.render(s) for s in scenes]), [s.prompt for s in scenes], [{} for _ in scenes]


def test_clip_score_is_the_cosine_of_the_models_own_embeddings(tiny_clip_dir):
    import open_clip
    from PIL import Image

    fn = build_reward("clip", {"model": f"local-dir:{tiny_clip_dir}", "pretrained": None})
    images, prompts, metadata = _batch()
    scores = fn(images, prompts, metadata)
    assert len(scores) == 3 and all(-1.0 <= s <= 1.0 for s in scores)
    # the same numbers straight from open_clip, with the model's own transform and tokenizer
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    tok = open_clip.get_tokenizer(f"local-dir:{tiny_clip_dir}")
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(i)) for i in images]), normalize=True)
        txt = model.encode_text(tok(prompts), normalize=True)
    assert scores == pytest.approx((img * txt).sum(-1).tolist(), abs=1e-5)
    assert len(set(np.round(scores, 6))) == 3  # depends on the input, not a constant


def test_hps_loads_a_checkpoint_over_the_architecture(tiny_clip_dir, tmp_path):
    import open_clip

    torch.manual_seed(1)
    tuned = open_clip.create_model(f"local-dir:{tiny_clip_dir}", load_weights=False)
    torch.save({"state_dict": tuned.state_dict()}, tmp_path / "HPS_v2_tiny.pt")  # HPS's published layout
    base = build_reward("clip", {"model": f"local-dir:{tiny_clip_dir}", "pretrained": None})
    hps = build_reward("hps", {"model": f"local-dir:{tiny_clip_dir}", "checkpoint": str(tmp_path / "HPS_v2_tiny.pt")})
    images, prompts, metadata = _batch()
    assert hps(images, prompts, metadata) != pytest.approx(base(images, prompts, metadata))


def test_a_checkpoint_of_another_architecture_is_refused(tiny_clip_dir, tmp_path):
    torch.save({"state_dict": {"visual.proj": torch.zeros(3)}}, tmp_path / "wrong.pt")
    with pytest.raises(Exception, match="does not fit|size mismatch"):
        build_reward("hps", {"model": f"local-dir:{tiny_clip_dir}", "checkpoint": str(tmp_path / "wrong.pt")})


def test_aesthetic_head_on_clip_image_embeddings(tiny_clip_dir, tmp_path):
    torch.manual_seed(2)
    # the published head's layout, scaled to the tiny embedding: Linear at 0, 2, 4, 6, 7 (dropout between)
    dims = [32, 24, 16, 8, 4, 1]
    index = [0, 2, 4, 6, 7]
    state = {}
    for i, (d_in, d_out) in zip(index, zip(dims, dims[1:], strict=False), strict=True):
        state[f"layers.{i}.weight"] = torch.randn(d_out, d_in) * 0.3
        state[f"layers.{i}.bias"] = torch.randn(d_out) * 0.1
    torch.save(state, tmp_path / "aesthetic_head.pth")
    fn = build_reward("aesthetic", {"head": str(tmp_path / "aesthetic_head.pth"), "model": f"local-dir:{tiny_clip_dir}",
                                    "pretrained": None})
    images, prompts, metadata = _batch()
    scores = fn(images, prompts, metadata)
    assert len(scores) == 3 and len(set(np.round(scores, 6))) == 3
    assert fn(images, ["anything"] * 3, metadata) == pytest.approx(scores)  # image-only judge


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    """A tiny random transformers CLIP with its processor, saved with save_pretrained (PickScore's form)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    directory = tmp_path_factory.mktemp("tiny_pickscore")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(3)
    CLIPModel(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def test_pickscore_through_transformers(pickscore_dir):
    from transformers import CLIPModel

    fn = build_reward("pickscore", {"model": str(pickscore_dir), "processor": None})
    images, prompts, metadata = _batch()
    scores = fn(images, prompts, metadata)
    assert len(scores) == 3 and len(set(np.round(scores, 6))) == 3
    scale = CLIPModel.from_pretrained(pickscore_dir).logit_scale.exp().item()
    assert all(abs(s) <= scale / 26 + 1e-6 for s in scores)  # a scaled cosine
    unscaled = build_reward("pickscore", {"model": str(pickscore_dir), "processor": None, "scale": 1.0})
    assert unscaled(images, prompts, metadata) == pytest.approx([s * 26 for s in scores], rel=1e-5)
