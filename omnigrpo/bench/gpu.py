"""GPU benchmark: omnigrpo's rollout sampler and learner step on a Janus-Pro-1B-sized model, beside HF ``generate``.

Why: GRPO's two hot loops on an autoregressive image generator are sampling hundreds of image tokens per image with
CFG and the learner's teacher-forced forward+backward. This measures both on one GPU, side by side with HF
``generate`` and against the machine's own limits (copy bandwidth, bf16 matmul rate). It needs only torch and
transformers, so the model is a random-weight Llama with Janus-Pro-1B's sizes. Run it from the repository root,
``python -m omnigrpo.bench.gpu --out gpu.json`` (``--tiny``: a toy model on the CPU, for the test suite);
docs/bench.md has its parts, the stand-in model and the FLOPs count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from omnigrpo.bench.decode import bench_decode, decode_lines, make_prompts
from omnigrpo.bench.generate import hf_generate_batched, median_seconds
from omnigrpo.rollout.graphs import GraphSet
from omnigrpo.rollout.policy import ImageSpace, PromptBatch, TextVocabLM
from omnigrpo.rollout.sampler import SamplingParams, sample_images, sequence_logprobs

TEXT_VOCAB, IMAGE_CODES = 102400, 16384
PARTS = ("decode", "rollout", "learner")


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


def timed(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs, CUDA synchronised."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return median_seconds(fn, repeats, warmup, sync)


def bench_rollout(model: LlamaForCausalLM, prompts: PromptBatch, space: ImageSpace, params: SamplingParams,
                  repeats: int, device: torch.device) -> dict[str, object]:
    """Images/s and image tokens/s of ours (graphed on CUDA, eager elsewhere) and HF ``generate`` with batched
    CFG, the graphs' capture seconds and memory, and the log-prob gap between sampler and learner.

    Each side's first full rollout is timed on its own (``first_call_s``) and kept out of the figures: on CUDA an
    eager decode meets a new key length at every step, and cuDNN attention builds a plan for each the first time
    (BENCHMARKS.md section 6); graphs see one shape per span."""
    b, t = len(prompts), space.tokens_per_image
    lm = TextVocabLM(model, space)  # one view, one graph set: its captured graphs are reused across repeats
    cuda = device.type == "cuda"
    ours = "ours_graphs" if cuda else "ours"
    graphs = GraphSet()
    fns = {ours: lambda: sample_images(lm, prompts, params, graphed=graphs.decoder if cuda else None),
           "hf_batched_cfg": lambda: hf_generate_batched(model, prompts, space, params)}
    out: dict[str, object] = {}
    for side, fn in fns.items():
        first = timed(fn, 1, device, warmup=0)
        if side == "ours_graphs":
            out["graphs"] = graph_memory(graphs, first)
        seconds = timed(fn, repeats, device, warmup=0)
        out[side] = {"seconds": seconds, "tokens_per_s": b * t / seconds, "images_per_s": b / seconds,
                     "first_call_s": first}
        print(f"rollout {side}: {seconds:.2f} s per call (first call {first:.1f} s)", flush=True)
    out["ratio_ours_over_hf_batched"] = out[ours]["tokens_per_s"] / out["hf_batched_cfg"]["tokens_per_s"]
    codes, sampled = fns[ours]()
    with torch.no_grad():
        scored, _ = sequence_logprobs(lm, prompts, codes, params)
    gap = (sampled.float() - scored.float()).abs()
    out["logprob_gap"] = {"sampler": ours, "mean": float(gap.mean()), "max": float(gap.max())}
    return out


def graph_memory(graphs: GraphSet, first_call_s: float) -> dict[str, object]:
    """What the first graphed call (it captures every span) cost: seconds, graphs, the shared KV cache."""
    return {"first_call_s": first_call_s, "graphs": sum(len(loop.graphs) for loop in graphs.loops.values()),
            "kv_cache_gb": graphs.held_bytes() / 1e9,
            "failures": {str(k[:3]): v for k, v in graphs.failures.items()}}


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
    m = result["machine"]
    rows = [f"{m['name']} | torch {m['torch']} | transformers {m['transformers']} | {m['date']}", ""]
    if "decode" in result:
        rows += decode_lines(result["decode"]) + [""]
    rows += ["| measure | value |", "|---|---|"]
    r = result.get("rollout", {})
    rows += [f"| rollout {side} | {r[side]['tokens_per_s']:.1f} tok/s, {r[side]['images_per_s']:.3f} img/s "
             f"(first call {r[side]['first_call_s']:.1f} s) |" for side in ("ours", "ours_graphs", "hf_batched_cfg")
             if side in r]
    if "ratio_ours_over_hf_batched" in r:
        rows += [f"| ratio ours/HF batched CFG | {r['ratio_ours_over_hf_batched']:.2f}x |",
                 f"| log-prob gap sampler/learner ({r['logprob_gap']['sampler']}) | "
                 f"mean {r['logprob_gap']['mean']:.2e}, max {r['logprob_gap']['max']:.2e} |"]
    if "graphs" in r:
        g = r["graphs"]
        rows += [f"| graphs: first call (captures {g['graphs']}) | {g['first_call_s']:.2f} s, KV cache "
                 f"{g['kv_cache_gb']:.2f} GB |"]
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
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
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
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        parser.error(f"--parts: choose from {', '.join(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Measure the asked parts in order (decode, rollout, learner), printing and saving after each, so a run
    stopped by a time limit keeps what it measured."""
    args = parse(argv)
    tiny = args.tiny
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    dtype = torch.float32 if tiny else torch.bfloat16
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)

    start = time.perf_counter()
    model, space = build_model(tiny, device, dtype)
    print(f"model built in {time.perf_counter() - start:.1f} s", flush=True)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, cfg_scale=args.cfg_scale)
    batch, plen, micro = args.batch or (4 if tiny else 16), args.prompt_len or (8 if tiny else 32), args.micro_batch
    result: dict[str, object] = {
        "machine": machine(device),
        "config": {"tiny": tiny, "dtype": str(dtype), "batch": batch, "prompt_len": plen,
                   "tokens_per_image": space.tokens_per_image, "image_offset": space.offset,
                   "num_codes": space.num_codes, "cfg_scale": params.cfg_scale, "temperature": params.temperature,
                   "top_k": params.top_k, "repeats": args.repeats, "parts": args.parts,
                   "params": sum(p.numel() for p in model.parameters()), "matmul_params": matmul_params(model)},
    }

    def done(what: str) -> None:
        print(f"measured {what}", flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))

    if "decode" in args.parts:
        bandwidth = copy_bandwidth((args.copy_mib or (64 if tiny else 2048)) << 20, device)
        result["decode"] = bench_decode(model, space, params, batch, plen, bandwidth, device, args.repeats,
                                        more=16 if tiny else 64)
        done("decode step")
    if "rollout" in args.parts:
        prompts = make_prompts(batch, plen, space.offset, device)
        result["rollout"] = bench_rollout(model, prompts, space, params, args.repeats, device)
        done("rollout")
    if "learner" in args.parts:
        peak = matmul_rate(args.matmul_n or (256 if tiny else 8192), dtype, device)
        learner_prompts = make_prompts(micro or (2 if tiny else 8), plen, space.offset, device)
        result["learner"] = bench_learner(model, learner_prompts, space, params, args.repeats, peak, device)
        done("learner")
    print(table(result))  # type: ignore[arg-type]
    return result


if __name__ == "__main__":
    main()
