"""GPU benchmark: omnigrpo's rollout sampler and learner step on a Janus-Pro-1B-sized model.

Why: the two hot loops of GRPO on an autoregressive image generator are (1) sampling 576 image
tokens per image with classifier-free guidance (CFG) and (2) the teacher-forced forward+backward of
the learner. This script measures both on one GPU, side by side with Hugging Face ``generate`` and
against the machine's own limits (copy bandwidth, bf16 matmul rate), so a claim like "our sampler is
X times faster" or "decode runs at Y% of the bandwidth floor" comes with the numbers behind it.

The model is a stand-in. No weights can be downloaded on the benchmark machine and the script must
need only torch + transformers, so it builds a random-weight ``LlamaForCausalLM`` with the sizes of
Janus-Pro-1B's language model (a Llama-architecture DeepSeek-LLM: hidden 2048, MLP 5632, 24 layers,
16 heads, 16 KV heads, rope theta 1e4, RMS eps 1e-6) and a vocabulary of 102400 text ids + 16384
image codes at offset 102400. It stands in for Janus's LM + generation head: the 24 decoder layers
(1.23 B parameters) are identical; Janus then runs a small MLP head (2048 -> 2048 -> 16384, 38 M)
where the stand-in runs its LM head over all 118784 ids (243 M), so the stand-in does about 16% more
matmul work and weight reads per token (1.48 B vs 1.27 B parameters) and its times are, if anything,
pessimistic. Random weights change what is sampled, not how long it takes (every image has exactly
576 tokens).

Measured (``--out`` writes all of it as JSON, stdout gets a markdown table):

1. Rollout: ``omnigrpo.rollout.sampler.sample_images`` vs ``model.generate``, same prompts
   ``[B, P]`` (no padding), same CFG scale, temperature and top-k, both restricted to image codes.
   HF baseline "hf_unbatched_cfg" is HF's own decoder-only CFG (``guidance_scale`` +
   ``negative_prompt_ids`` -> ``UnbatchedClassifierFreeGuidanceLogitsProcessor``), which runs the
   unconditional branch as a *second* model forward of batch B per step (its own KV cache) inside
   the logits processor; ours runs one forward of batch 2B. "hf_batched_cfg" is ``generate`` on the
   doubled batch with a processor that mixes cond/uncond rows, samples once and forces both rows to
   that code. tokens/s counts each image's tokens once, not once per CFG branch.
2. Decode step vs floor: our step time ``(rollout - prefill) / (T - 1)`` against
   ``floor = (weight bytes read per step + KV bytes at the mean context) / copy bandwidth``, where
   the weight bytes exclude the embedding table (only B rows of it are read) and the bandwidth is
   ``2 * bytes / time`` of a large ``Tensor.copy_``. Not in the floor: transformers' ``DynamicCache``
   grows by ``torch.cat``, re-reading and re-writing the whole cache every step.
3. Learner: forward+backward of ``sequence_logprobs`` with CFG on ``--micro-batch`` sequences.
   ``FLOPs = 6 * N * R * L + 6 * layers * hidden * L^2 * R`` with N the matmul parameters (all but the
   embedding table), R = 2 * micro-batch rows (both CFG branches are forwarded), L = P + T - 1 tokens
   per row; the second term is causal attention (QK^T and AV). MFU = FLOPs / step time / the
   measured dense ``torch.matmul`` rate of an ``--matmul-n``^3 product in the model dtype.

Run from the repository root: ``python -m omnigrpo.bench.gpu --out gpu.json`` (H200: a few minutes); ``--tiny``
runs a toy model on CPU in fp32 in seconds, for the test suite. The sampler keeps its own static KV
cache (``omnigrpo.rollout.engine``), so any transformers with the Llama classes works (the device's 5.17).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from omnigrpo.bench.generate import hf_generate, hf_generate_batched, median_seconds
from omnigrpo.rollout.graphs import graphed_decoder
from omnigrpo.rollout.policy import ImageSpace, PromptBatch, TextVocabLM
from omnigrpo.rollout.sampler import SamplingParams, sample_images, sequence_logprobs

TEXT_VOCAB, IMAGE_CODES = 102400, 16384


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype) -> tuple[LlamaForCausalLM, ImageSpace]:
    """Random-weight Llama, Janus-Pro-1B-sized (or a toy for ``--tiny``), with image codes at the end."""
    if tiny:
        text, codes, side = 200, 64, 8  # enough decode steps that decode time dwarfs prefill noise
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=256)
    else:
        text, codes, side = TEXT_VOCAB, IMAGE_CODES, 24  # 384 px = 24 x 24 codes
        sizes = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                     num_key_value_heads=16, max_position_embeddings=16384)
    config = LlamaConfig(vocab_size=text + codes, rope_theta=10000.0, rms_norm_eps=1e-6, pad_token_id=0,
                         tie_word_embeddings=False, **sizes)
    with torch.device(device):  # initialise in place: fast on a GPU, no CPU copy of 1.7B parameters
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), ImageSpace(num_codes=codes, rows=side, cols=side, offset=text)


def make_prompts(batch: int, length: int, text_vocab: int, device: torch.device) -> PromptBatch:
    """``[B, P]`` random text prompts ending in one marker id; uncond = padding + the same marker."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, text_vocab, (batch, length), generator=gen)
    ids[:, -1] = text_vocab - 1
    uncond = torch.zeros_like(ids)
    uncond[:, -1] = text_vocab - 1
    return PromptBatch(ids.to(device), uncond.to(device), torch.ones_like(ids).to(device), pad_id=0)


def timed(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs, CUDA synchronised."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return median_seconds(fn, repeats, warmup, sync)


SIDES = {"ours": "our sampler", "ours_graphs": "our sampler, CUDA-graph decode steps",
         "hf_batched_cfg": "HF generate, batched CFG",
         "hf_unbatched_cfg": "HF generate, HF's CFG"}


def bench_rollout(model: LlamaForCausalLM, prompts: PromptBatch, space: ImageSpace, params: SamplingParams,
                  repeats: int, device: torch.device, side: str) -> dict[str, float]:
    """Images/s and image tokens/s of one ``side`` of :data:`SIDES`: our sampler or HF ``generate``."""
    b, t = len(prompts), space.tokens_per_image

    lm = TextVocabLM(model, space)  # one view: its captured graphs are reused across repeats

    def ours(graphed=None) -> object:
        with torch.device(device):  # the sampler allocates its step tensors on the default device
            return sample_images(lm, prompts, params, graphed=graphed)

    fn = {"ours": ours, "ours_graphs": lambda: ours(graphed_decoder),
          "hf_unbatched_cfg": lambda: hf_generate(model, prompts, space, params),
          "hf_batched_cfg": lambda: hf_generate_batched(model, prompts, space, params)}[side]
    seconds = timed(fn, repeats, device)
    return {"seconds": seconds, "tokens_per_s": b * t / seconds, "images_per_s": b / seconds}


def ratios(rollout: dict[str, object]) -> None:
    """Add our tokens/s over each HF side measured so far to ``rollout``."""
    ours = rollout["ours"]["tokens_per_s"]  # type: ignore[index]
    for side, key in [("hf_unbatched_cfg", "ratio_ours_over_hf"), ("hf_batched_cfg", "ratio_ours_over_hf_batched")]:
        if side in rollout:
            rollout[key] = ours / rollout[side]["tokens_per_s"]  # type: ignore[index]
    rollout["hf_cfg_note"] = ("hf_unbatched_cfg = generate(guidance_scale, negative_prompt_ids): HF's CFG processor "
                              "runs a second forward of batch B per step for the uncond branch; ours runs one forward "
                              "of 2B. hf_batched_cfg = generate on the doubled batch with a cond/uncond mixing "
                              "processor.")


def copy_bandwidth(nbytes: int, device: torch.device) -> float:
    """Bytes/s of ``dst.copy_(src)``, counting ``nbytes`` read + ``nbytes`` written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 5, device, warmup=2)
    return 2 * nbytes / seconds


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device) -> float:
    """Dense FLOP/s of an ``[n, n] @ [n, n]`` product in ``dtype`` (2 n^3 FLOPs)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = timed(lambda: [torch.matmul(a, b) for _ in range(10)], 3, device) / 10
    return 2 * n**3 / seconds


def matmul_params(model: LlamaForCausalLM) -> int:
    """Parameters read/multiplied per token: all but the embedding table (a row lookup)."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def bench_decode(model: LlamaForCausalLM, prompts: PromptBatch, space: ImageSpace, rollout_s: float, repeats: int,
                 bandwidth: float, device: torch.device, graphs_s: float | None = None) -> dict[str, float]:
    """Our per-step decode time, eager and (``graphs_s``: the graphed rollout's seconds) replayed from CUDA graphs,
    vs the bandwidth floor (weights + KV cache at the mean context)."""
    ids = torch.cat([prompts.ids, prompts.uncond_ids])
    mask = torch.cat([prompts.mask, prompts.mask])
    with torch.no_grad():
        prefill_s = timed(lambda: model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1),
                          repeats, device)
    t, cfg = space.tokens_per_image, model.config
    step_s = (rollout_s - prefill_s) / (t - 1)
    graph_s = (graphs_s - prefill_s) / (t - 1) if graphs_s else None
    elem = next(model.parameters()).element_size()
    weight_bytes = matmul_params(model) * elem
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    mean_ctx = prompts.ids.shape[1] + (t - 1) / 2
    kv_bytes = 2 * cfg.num_hidden_layers * ids.shape[0] * cfg.num_key_value_heads * head_dim * mean_ctx * elem
    floor_s = (weight_bytes + kv_bytes) / bandwidth
    graphed = {} if graph_s is None else {"graph_step_ms": graph_s * 1e3, "graph_efficiency": floor_s / graph_s}
    return {"step_ms": step_s * 1e3, "prefill_ms": prefill_s * 1e3, "floor_ms": floor_s * 1e3, **graphed,
            "efficiency": floor_s / step_s, "weight_bytes": weight_bytes, "kv_bytes_mean": kv_bytes,
            "mean_context": mean_ctx, "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": ids.shape[0]}


def bench_learner(model: LlamaForCausalLM, prompts: PromptBatch, space: ImageSpace, params: SamplingParams,
                  repeats: int, peak: float, device: torch.device) -> dict[str, object]:
    """Forward+backward of ``sequence_logprobs`` (CFG: 2 rows per sequence) on random codes ``[M, T]``."""
    m, t, cfg = len(prompts), space.tokens_per_image, model.config
    codes = torch.randint(0, space.num_codes, (m, t), device=device)
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logprobs, _ = sequence_logprobs(TextVocabLM(model, space), prompts, codes, params)
        (-logprobs.mean()).backward()

    seconds = timed(step, repeats, device)
    model.zero_grad(set_to_none=True)
    model.eval()
    rows = 2 * m if params.guided else m
    length = prompts.ids.shape[1] + t - 1
    flops = 6 * matmul_params(model) * rows * length + 6 * cfg.num_hidden_layers * cfg.hidden_size * length**2 * rows
    return {"step_s": seconds, "tokens_per_s": rows * length / seconds, "image_tokens_per_s": m * t / seconds,
            "flops_per_step": flops, "achieved_tflops": flops / seconds / 1e12, "matmul_tflops": peak / 1e12,
            "mfu": flops / seconds / peak, "sequences": m, "rows": rows, "row_length": length,
            "formula": "6*N*R*L + 6*layers*hidden*L^2*R; N = params - embedding, R = rows (2 per sequence with CFG), "
                       "L = prompt + T - 1; MFU = FLOPs / step_s / measured matmul FLOP/s"}


def machine(device: torch.device) -> dict[str, str]:
    """What ran: device name, library versions, UTC date."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "name": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.UTC).isoformat()}


def table(result: dict[str, dict]) -> str:
    """Markdown summary of what ``result`` holds so far."""
    r, m = result.get("rollout", {}), result["machine"]
    rows = [f"{m['name']} | torch {m['torch']} | transformers {m['transformers']} | {m['date']}", "",
            "| measure | value |", "|---|---|"]
    rows += [f"| rollout {side} | {r[side]['tokens_per_s']:.1f} tok/s, {r[side]['images_per_s']:.3f} img/s |"
             for side in SIDES if side in r]
    rows += [f"| ratio ours/hf ({label}) | {r[key]:.2f}x |" for key, label in
             [("ratio_ours_over_hf", "HF CFG"), ("ratio_ours_over_hf_batched", "batched CFG")] if key in r]
    if "decode" in result:
        d = result["decode"]
        if "graph_step_ms" in d:
            rows += [f"| decode step (ours, CUDA graphs) | {d['graph_step_ms']:.2f} ms "
                     f"({d['graph_efficiency']:.1%} of the floor) |"]
        rows += [f"| decode step (ours, {d['rows']} rows) | {d['step_ms']:.2f} ms |",
                 f"| decode floor ({d['copy_bandwidth_gb_s']:.0f} GB/s copy) | {d['floor_ms']:.3f} ms |",
                 f"| decode efficiency (floor/actual) | {d['efficiency']:.1%} |"]
    if "learner" in result:
        lrn = result["learner"]
        rows += [f"| learner fwd+bwd ({lrn['sequences']} seq) | {lrn['step_s'] * 1e3:.1f} ms, "
                 f"{lrn['tokens_per_s']:.0f} tok/s |",
                 f"| learner MFU | {lrn['mfu']:.1%} ({lrn['achieved_tflops']:.3g} / {lrn['matmul_tflops']:.3g} "
                 "TFLOP/s) |"]
    return "\n".join(rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy model on CPU in fp32 (seconds; for tests)")
    parser.add_argument("--batch", type=int, default=None, help="prompts per rollout (default 16; tiny 4)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens P (default 32; tiny 8)")
    parser.add_argument("--micro-batch", type=int, default=None, help="learner sequences (default 8; tiny 2)")
    parser.add_argument("--cfg-scale", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-k", type=int, default=0, help="top-k over image codes (0: off)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measure (median), after 1 warm-up")
    parser.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth buffer (default 2048; tiny 64)")
    parser.add_argument("--matmul-n", type=int, default=None, help="matmul-rate size n (default 8192; tiny 256)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (after each measure)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Measure in order of cost (ours, decode floor, learner, then HF's two baselines), printing and saving after
    each, so a run stopped by a time limit keeps what it measured."""
    args = parse(argv)
    tiny = args.tiny
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = torch.float32 if tiny else torch.bfloat16
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)

    model, space = build_model(tiny, device, dtype)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, cfg_scale=args.cfg_scale)
    batch, plen, micro = args.batch or (4 if tiny else 16), args.prompt_len or (8 if tiny else 32), args.micro_batch
    prompts = make_prompts(batch, plen, space.offset, device)
    rollout: dict[str, object] = {}
    result: dict[str, object] = {
        "machine": machine(device), "rollout": rollout,
        "config": {"tiny": tiny, "dtype": str(dtype), "batch": batch, "prompt_len": plen,
                   "tokens_per_image": space.tokens_per_image, "image_offset": space.offset,
                   "num_codes": space.num_codes, "cfg_scale": params.cfg_scale, "temperature": params.temperature,
                   "top_k": params.top_k, "repeats": args.repeats,
                   "params": sum(p.numel() for p in model.parameters()), "matmul_params": matmul_params(model)},
    }

    def done(what: str) -> None:
        print(f"measured {what}", flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))

    rollout["ours"] = bench_rollout(model, prompts, space, params, args.repeats, device, "ours")
    done(f"rollout ours: {rollout['ours']}")
    if device.type == "cuda":  # captured in the warm-up run, replayed in the timed ones
        rollout["ours_graphs"] = bench_rollout(model, prompts, space, params, args.repeats, device, "ours_graphs")
        rollout["ratio_graphs_over_eager"] = rollout["ours_graphs"]["tokens_per_s"] / rollout["ours"]["tokens_per_s"]
        done(f"rollout ours with CUDA graphs: {rollout['ours_graphs']}")
    bandwidth = copy_bandwidth((args.copy_mib or (64 if tiny else 2048)) << 20, device)
    graphs_s = rollout["ours_graphs"]["seconds"] if "ours_graphs" in rollout else None
    result["decode"] = bench_decode(model, prompts, space, rollout["ours"]["seconds"], args.repeats, bandwidth,
                                    device, graphs_s)
    done("decode floor")
    peak = matmul_rate(args.matmul_n or (256 if tiny else 8192), dtype, device)
    learner_prompts = make_prompts(micro or (2 if tiny else 8), plen, space.offset, device)
    result["learner"] = bench_learner(model, learner_prompts, space, params, args.repeats, peak, device)
    done("learner")
    for side in ("hf_batched_cfg", "hf_unbatched_cfg"):
        rollout[side] = bench_rollout(model, prompts, space, params, args.repeats, device, side)
        ratios(rollout)
        done(f"rollout {side}: {rollout[side]}")
    print(table(result))  # type: ignore[arg-type]
    return result


if __name__ == "__main__":
    main()
