"""open_clip judges through the loading path a user takes: a local-dir model and an HPS-style checkpoint."""

import json

import numpy as np
import pytest
import torch

from omnigrpo.platform import shapes
from omnigrpo.platform.registry import build_reward

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP written the way open_clip publishes models: config JSON + safetensors."""
    import open_clip
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("tiny_clip")
    (directory / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{directory}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "open_clip_model.safetensors")
    return directory


def _batch():
    scenes = shapes.train_scenes()[:3]
    return np.stack([shapes.render(s) for s in scenes]), [s.prompt for s in scenes], [{} for _ in scenes]


def test_clip_score_is_the_cosine_of_the_models_own_embeddings(clip_dir):
    import open_clip
    from PIL import Image

    fn = build_reward("clip", {"model": f"local-dir:{clip_dir}", "pretrained": None})
    images, prompts, metadata = _batch()
    scores = fn(images, prompts, metadata)
    assert len(scores) == 3 and all(-1.0 <= s <= 1.0 for s in scores)
    # the same numbers straight from open_clip, with the model's own transform and tokenizer
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tok = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(i)) for i in images]), normalize=True)
        txt = model.encode_text(tok(prompts), normalize=True)
    assert scores == pytest.approx((img * txt).sum(-1).tolist(), abs=1e-5)
    assert len(set(np.round(scores, 6))) == 3  # depends on the input, not a constant


def test_hps_loads_a_checkpoint_over_the_architecture(clip_dir, tmp_path):
    import open_clip

    torch.manual_seed(1)
    tuned = open_clip.create_model(f"local-dir:{clip_dir}", load_weights=False)
    torch.save({"state_dict": tuned.state_dict()}, tmp_path / "HPS_v2_tiny.pt")  # HPS's published layout
    base = build_reward("clip", {"model": f"local-dir:{clip_dir}", "pretrained": None})
    hps = build_reward("hps", {"model": f"local-dir:{clip_dir}", "checkpoint": str(tmp_path / "HPS_v2_tiny.pt")})
    images, prompts, metadata = _batch()
    assert hps(images, prompts, metadata) != pytest.approx(base(images, prompts, metadata))


def test_a_checkpoint_of_another_architecture_is_refused(clip_dir, tmp_path):
    torch.save({"state_dict": {"visual.proj": torch.zeros(3)}}, tmp_path / "wrong.pt")
    with pytest.raises(Exception, match="does not fit|size mismatch"):
        build_reward("hps", {"model": f"local-dir:{clip_dir}", "checkpoint": str(tmp_path / "wrong.pt")})


def test_aesthetic_head_on_clip_image_embeddings(clip_dir, tmp_path):
    torch.manual_seed(2)
    # the published head's layout, scaled to the tiny embedding: Linear at 0, 2, 4, 6, 7 (dropout between)
    dims = [32, 24, 16, 8, 4, 1]
    index = [0, 2, 4, 6, 7]
    state = {}
    for i, (d_in, d_out) in zip(index, zip(dims, dims[1:], strict=False), strict=True):
        state[f"layers.{i}.weight"] = torch.randn(d_out, d_in) * 0.3
        state[f"layers.{i}.bias"] = torch.randn(d_out) * 0.1
    torch.save(state, tmp_path / "aesthetic_head.pth")
    fn = build_reward("aesthetic", {"head": str(tmp_path / "aesthetic_head.pth"), "model": f"local-dir:{clip_dir}",
                                    "pretrained": None})
    images, prompts, metadata = _batch()
    scores = fn(images, prompts, metadata)
    assert len(scores) == 3 and len(set(np.round(scores, 6))) == 3
    assert fn(images, ["anything"] * 3, metadata) == pytest.approx(scores)  # image-only judge
