"""The static-shape decode loop (what CUDA graphs capture) draws what the growing-cache decode draws; a capture that
fails falls back to eager decoding; packed weight copies refresh in place."""

import logging
from functools import partial

import pytest
import torch

from omnigrpo.rollout.engine import pack_copies
from omnigrpo.rollout.families import tiny
from omnigrpo.rollout.graphs import GraphSet, static_decoder
from omnigrpo.rollout.loader import load_policy
from omnigrpo.rollout.sampler import SamplingParams, sample_images


@pytest.mark.parametrize("family", ["janus", "emu3", "xomni"])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0], ids=["plain", "cfg"])
def test_static_decode_equals_growing_cache_decode(family, cfg_scale, tmp_path):
    """Attention over spans of 16 slots with unfilled keys masked, the slot and positions device tensors, Emu3's
    end-of-line steps in between: the same codes and log-probs (fp32) from the same seed, and the generator left
    where the growing-cache decode leaves it."""
    policy = load_policy(family, str(tiny.build(family, tmp_path / family)))
    lm, params = policy.lm(), SamplingParams(top_k=20, cfg_scale=cfg_scale)
    prompts = policy.prompt_batch(["a red apple", 'a sign that says "open" in big letters', "x"])
    eager_gen, static_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    codes, logps = sample_images(lm, prompts, params, eager_gen)
    loop = partial(static_decoder, unit=16)
    static_codes, static_logps = sample_images(lm, prompts, params, static_gen, graphed=loop)
    assert torch.equal(codes, static_codes)
    assert torch.allclose(logps, static_logps, atol=1e-5)
    assert torch.equal(eager_gen.get_state(), static_gen.get_state())
    length = prompts.ids.shape[1] + len(policy.space.segment)
    assert len(loop(lm, params, 3, 6 if cfg_scale != 1 else 3, length, None).spans) > 2  # spans did switch


def test_a_failed_capture_decodes_eagerly_and_says_why(tmp_path, caplog):
    """Where a graph cannot be captured (here: no CUDA at all) the sampler decodes eagerly, the same as without
    graphs, logs one warning and records the reason; the shape is not retried."""
    policy = load_policy("janus", str(tiny.build("janus", tmp_path / "janus")))
    lm, params = policy.lm(), SamplingParams(cfg_scale=3.0)
    prompts = policy.prompt_batch(["a red apple", "x"])
    plain, _ = sample_images(lm, prompts, params, torch.Generator().manual_seed(2))
    graphs = GraphSet()
    with caplog.at_level(logging.WARNING, logger="omnigrpo.rollout.graphs"):
        fallback, _ = sample_images(lm, prompts, params, torch.Generator().manual_seed(2), graphed=graphs.decoder)
        again, _ = sample_images(lm, prompts, params, torch.Generator().manual_seed(2), graphed=graphs.decoder)
    assert torch.equal(plain, fallback) and torch.equal(plain, again)
    failures = graphs.failures
    assert len(failures) == 1 and next(iter(failures.values()))
    assert sum("decoding eagerly" in r.message for r in caplog.records) == 1


def test_packed_copies_refresh_in_place(tmp_path):
    """A refresh writes new weights into the same tensors (CUDA graphs captured over them stay valid)."""
    policy = load_policy("janus", str(tiny.build("janus", tmp_path / "janus")))
    layers = policy.lm().body.layers
    first = pack_copies(layers)
    with torch.no_grad():
        for p in layers.parameters():
            p.add_(1.0)
    second = pack_copies(layers, into=first)
    assert all(a[0] is b[0] and a[2] is b[2] for a, b in zip(first, second, strict=True))
    assert torch.equal(second[0][0], pack_copies(layers)[0][0])


@pytest.mark.parametrize("family", ["janus", "xomni"])
def test_the_residuals_written_in_place_never_touch_the_callers_tensors(family, tmp_path):
    """Sampling writes each layer's residual adds into the layer's own output, never into the embeddings passed in
    (a reused end-of-line embedding, X-Omni's text rows that skip a vision block): the same outputs as with
    autograd on (which never writes in place), and the input unchanged."""
    policy = load_policy(family, str(tiny.build(family, tmp_path / family)))
    lm = policy.lm()
    ids = policy.prompt_batch(["a red apple", "x"]).ids
    embeds = lm.embed_text(ids).detach()
    kept = embeds.clone()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    valid, image = torch.ones_like(ids, dtype=torch.bool), lm.prompt_image(ids)
    with torch.no_grad():  # as the sampler runs (there under inference_mode too)
        fast = lm.fast_forward(embeds, positions, valid, image, lm.new_cache(2, 32))
    assert torch.equal(embeds, kept)
    with torch.enable_grad():  # autograd on: every residual out of place
        slow = lm.fast_forward(embeds, positions, valid, image, lm.new_cache(2, 32))
    assert torch.allclose(fast, slow, atol=1e-6)
