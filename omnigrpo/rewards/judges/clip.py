"""CLIP-family judges: ``clip``, ``hps`` and ``aesthetic`` through open_clip, ``pickscore`` through transformers.

Why: X-Omni's ensemble starts with HPSv2, an OpenCLIP ViT-H-14 fine-tuned on human preferences, and CLIP score is
the standard text-image alignment baseline. All are one computation: encode the image with the model's *own*
validation transform and the prompt with its tokenizer, and take the cosine of the normalised embeddings (the
aesthetic MLP reads the image embedding alone). Weights load as a user's would, with no download when given local
files (``model``, ``pretrained``, ``checkpoint``: docs/rewards.md, "Built-in judges").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from omnigrpo.rewards.protocol import judge_device
from omnigrpo.rewards.registry import register_reward


class OpenClipScorer:
    """Cosine similarity of image and prompt embeddings under one open_clip model.

    ``__call__(images [B, H, W, 3] uint8, prompts) -> [B]`` float cosines in [-1, 1].
    """

    def __init__(self, model: str, pretrained: str | None = None, checkpoint: str | None = None,
                 device: str = "auto", batch_size: int = 32):
        import open_clip

        device = judge_device(device)  # "auto": the reward actor's GPU if it was given one

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device)
        if checkpoint:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"checkpoint {checkpoint} does not fit {model}: {len(missing)} missing, "
                                 f"{len(unexpected)} unexpected keys (e.g. {(missing or unexpected)[:3]})")
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` -> normalised image embeddings ``[B, D]`` (the model's own transform)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = [self.preprocess(Image.fromarray(np.asarray(im))) for im in chunk]
            out.append(self.model.encode_image(torch.stack(pixels).to(self.device), normalize=True).float())
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> list[float]:
        image = self.encode_images(images)
        text = torch.cat([self.model.encode_text(self.tokenizer(prompts[i : i + self.batch_size]).to(self.device),
                                                 normalize=True).float()
                          for i in range(0, len(prompts), self.batch_size)])
        return (image * text).sum(-1).cpu().tolist()


def _per_sample(scorer: OpenClipScorer) -> Callable:
    def judge(images, prompts, metadata):
        return scorer(images, list(prompts))

    return judge


@register_reward("clip")
def clip_reward(model: str = "ViT-L-14", pretrained: str | None = "openai", checkpoint: str | None = None,
                device: str = "auto") -> Callable:
    """CLIP score: cosine(image, prompt) under an open_clip model.

    Inputs: uint8 images ``[B, H, W, 3]`` and prompts. Backbone: ``model`` (default OpenAI ViT-L/14;
    ``pretrained`` a tag or local weights file). Range [-1, 1], ~0.2-0.35 for matching pairs.
    """
    return _per_sample(OpenClipScorer(model, pretrained, checkpoint, device))


@register_reward("hps")
def hps_reward(checkpoint: str, model: str = "ViT-H-14", pretrained: str | None = None,
               device: str = "auto") -> Callable:
    """HPSv2 / v2.1 human-preference score: cosine(image, prompt) under the HPS-tuned OpenCLIP ViT-H-14.

    Inputs: uint8 images ``[B, H, W, 3]`` (resized by the model's own 224 px transform) and prompts.
    ``checkpoint``: a local ``HPS_v2*.pt`` file (required; HPS weights are not an open_clip tag).
    Range ~0.2-0.35 for real images.
    """
    return _per_sample(OpenClipScorer(model, pretrained, checkpoint, device))


class AestheticHead(torch.nn.Module):
    """The LAION aesthetic predictor's MLP: normalised CLIP image embedding -> a 1-10 score.

    Built from its checkpoint: every ``layers.<i>.weight`` is a Linear layer, in order (the published
    v2 head is 768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropout between the first ones, no activations).
    """

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        indices = sorted(int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight"))
        if not indices:
            raise ValueError("aesthetic head checkpoint has no layers.<i>.weight tensors")
        self.layers = torch.nn.ModuleDict({str(i): torch.nn.Linear(*state[f"layers.{i}.weight"].shape[::-1])
                                           for i in indices})
        self.layers.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` -> ``[B]``."""
        x = embedding
        for layer in self.layers.values():
            x = layer(x)
        return x.squeeze(-1)


@register_reward("aesthetic")
def aesthetic_reward(head: str, model: str = "ViT-L-14", pretrained: str | None = "openai",
                     device: str = "auto") -> Callable:
    """LAION aesthetic score: CLIP ViT-L/14 image embedding into the aesthetic MLP head.

    Inputs: uint8 images ``[B, H, W, 3]`` only (prompts are ignored). ``head``: a local state dict
    of the MLP (e.g. ``sac+logos+ava1-l14-linearMSE.pth``). Range ~1-10.
    """
    device = judge_device(device)
    scorer = OpenClipScorer(model, pretrained, None, device)
    mlp = AestheticHead(torch.load(head, map_location="cpu", weights_only=True)).to(device).eval()

    def judge(images, prompts, metadata):
        with torch.no_grad():
            return mlp(scorer.encode_images(images)).cpu().tolist()

    return judge


@register_reward("pickscore")
def pickscore_reward(model: str = "yuvalkirstain/PickScore_v1",
                     processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", scale: float = 1 / 26,
                     device: str = "auto", batch_size: int = 32) -> Callable:
    """PickScore: a transformers CLIP (ViT-H-14) fine-tuned on Pick-a-Pic preferences.

    Inputs: uint8 images ``[B, H, W, 3]`` and prompts, through the processor's own transform and
    tokenizer (``processor``: a hub id or local directory; ``None`` = the model's directory). Score:
    ``logit_scale.exp() * cosine(image, prompt) * scale``; the default ``scale`` 1/26 follows flow_grpo,
    putting typical scores near 0.8-0.9.
    """
    from transformers import AutoModel, AutoProcessor

    device = judge_device(device)
    proc = AutoProcessor.from_pretrained(processor or model)
    net = AutoModel.from_pretrained(model).to(device).eval().requires_grad_(False)

    def judge(images, prompts, metadata):
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = slice(start, start + batch_size)
                inputs = proc(text=list(prompts[chunk]), images=[Image.fromarray(np.asarray(i)) for i in images[chunk]],
                              return_tensors="pt", padding=True, truncation=True, max_length=77).to(device)
                out = net(**inputs)  # image_embeds / text_embeds come out L2-normalised
                logits = net.logit_scale.exp() * (out.image_embeds * out.text_embeds).sum(-1)
                scores += (logits * scale).float().cpu().tolist()
        return scores

    return judge
