"""The static-shape decode step (what a CUDA graph captures) draws what the growing-cache decode draws."""

import pytest
import torch

from omnigrpo.rollout.families import tiny
from omnigrpo.rollout.graphs import static_decoder
from omnigrpo.rollout.loader import load_policy
from omnigrpo.rollout.sampler import SamplingParams, sample_images


@pytest.mark.parametrize("family", ["janus", "emu3", "xomni"])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0], ids=["plain", "cfg"])
def test_static_decode_equals_growing_cache_decode(family, cfg_scale, tmp_path):
    """Attention over the whole cache with unfilled keys masked, the slot a device tensor, Emu3's end-of-line
    steps in between: the same codes and log-probs (fp32) from the same seed, and the generator left where the
    growing-cache decode leaves it."""
    policy = load_policy(family, str(tiny.build(family, tmp_path / family)))
    lm, params = policy.lm(), SamplingParams(top_k=20, cfg_scale=cfg_scale)
    prompts = policy.prompt_batch(["a red apple", 'a sign that says "open" in big letters', "x"])
    eager_gen, static_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    codes, logps = sample_images(lm, prompts, params, eager_gen)
    static_codes, static_logps = sample_images(lm, prompts, params, static_gen, graphed=static_decoder)
    assert torch.equal(codes, static_codes)
    assert torch.allclose(logps, static_logps, atol=1e-5)
    assert torch.equal(eager_gen.get_state(), static_gen.get_state())
