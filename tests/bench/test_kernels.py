"""Kernels per decode step: ours is held to a budget per layer and outside the layers, under HF ``generate``'s count
on the same model, batch and settings (counted on the CPU: the same aten ops run on a GPU)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from omnigrpo.bench import kernels
from omnigrpo.bench.decode import make_prompts
from omnigrpo.bench.generate import hf_generate_batched
from omnigrpo.rollout.graphs import static_decoder
from omnigrpo.rollout.policy import ImageSpace, TextVocabLM
from omnigrpo.rollout.sampler import SamplingParams, sample_images

PER_LAYER = 16
"""Ours per layer in fp32 on the CPU, as the sampler runs (under ``inference_mode``, where an RMSNorm reaches the
dispatcher as one op: one fused kernel on CUDA): 2 RMSNorms, 2 GEMMs, 2 addmm (projection + residual), RoPE (3),
2 cache writes, attention (3 on the CPU: baddbmm, softmax, bmm; one SDPA kernel on CUDA), SiLU and its product."""
OUTSIDE = 22
"""Ours outside the layers (the static loop a CUDA graph replays; the eager loop needs fewer): head GEMM, CFG
lerp, log-softmax, the 4-op draw, gather + floor, code embedding, rope lookup, mask fill, final norm, state
updates."""


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=24,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def test_ours_stays_within_its_kernel_budget_and_under_hf_generate(model):
    space, params = ImageSpace(64, 8, 8, 200), SamplingParams(cfg_scale=5.0)
    prompts = make_prompts(4, 8, 200, torch.device("cpu"))
    sides = {"eager": lambda m, sp: sample_images(TextVocabLM(m, sp), prompts, params),
             "static": lambda m, sp: sample_images(TextVocabLM(m, sp), prompts, params, graphed=static_decoder),
             "hf": lambda m, sp: hf_generate_batched(m, prompts, sp, params)}
    counts = {name: kernels.per_layer(lambda m, s=s: kernels.per_step(lambda sp: s(m, sp), space), model)
              for name, s in sides.items()}
    for ours in ("eager", "static"):
        assert counts[ours]["per_layer"] <= PER_LAYER, counts[ours]["layer_ops"]
        assert counts[ours]["outside"] <= OUTSIDE, counts[ours]["outside_ops"]
        assert counts[ours]["per_layer"] < counts["hf"]["per_layer"]
        assert counts[ours]["total"] < counts["hf"]["total"]
    assert counts["hf"]["total"] == counts["hf"]["outside"] + 24 * counts["hf"]["per_layer"]


def test_the_counter_sees_kernels_not_views():
    x = torch.randn(4, 8)
    counted = kernels.count(lambda: (x.view(8, 4).t().contiguous() + 1).sum())
    assert counted == {"clone": 1, "add": 1, "sum": 1}
