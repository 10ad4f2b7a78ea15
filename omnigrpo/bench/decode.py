"""The decode step on its own: ours eager, ours replayed from CUDA graphs, and HF ``generate``, against floors.

Why: a rollout's time is almost all decode steps, and a 1B model's decode step at batch 32 is memory-bound: its
floor is the bytes it must read once (the decoder weights, the image head's code rows, the KV cache) over the
measured copy bandwidth, taken at the filled context and over the span a graphed step attends. A step's time is the
difference of two sampling calls ``more`` codes apart (:func:`omnigrpo.bench.kernels.step_seconds`), so prefill,
capture and set-up cancel. docs/bench.md names each row.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from omnigrpo.bench import kernels
from omnigrpo.bench.generate import hf_generate_batched
from omnigrpo.rollout.graphs import SPAN, GraphSet, bucketed, static_decoder
from omnigrpo.rollout.policy import ImageSpace, PromptBatch
from omnigrpo.rollout.sampler import SamplingParams, sample_images


def make_prompts(batch: int, length: int, text_vocab: int, device: torch.device) -> PromptBatch:
    """``[B, P]`` random text prompts ending in one marker id; uncond = padding + the same marker."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, text_vocab, (batch, length), generator=gen)
    ids[:, -1] = text_vocab - 1
    uncond = torch.zeros_like(ids)
    uncond[:, -1] = text_vocab - 1
    return PromptBatch(ids.to(device), uncond.to(device), torch.ones_like(ids).to(device), pad_id=0)


def sides(prompts: PromptBatch, params: SamplingParams, graphs: GraphSet | None = None) -> dict:
    """``name -> sample(model, space)`` for every decode path measured (graphs, captured into ``graphs``, on CUDA
    only)."""
    views = kernels.Views()
    out = {"ours_eager": lambda m, sp: sample_images(views(m, sp), prompts, params),
           "ours_static": lambda m, sp: sample_images(views(m, sp), prompts, params, graphed=static_decoder),
           "hf_batched_cfg": lambda m, sp: hf_generate_batched(m, prompts, sp, params)}
    if graphs is not None:
        out["ours_graphs"] = lambda m, sp: sample_images(views(m, sp), prompts, params, graphed=graphs.decoder)
    return out


def read_bytes(model: torch.nn.Module, space: ImageSpace, rows: int, context: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) a decode step must read: every decoder layer and the image head's code rows, and
    keys and values of ``context`` positions for ``rows`` rows."""
    cfg, weight = model.config, next(model.parameters())
    layers = sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()
    head = space.num_codes * cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * head_dim * context
    return (layers + head) * weight.element_size(), kv * weight.element_size()


def bench_decode(model: torch.nn.Module, space: ImageSpace, params: SamplingParams, batch: int, prompt_len: int,
                 bandwidth: float, device: torch.device, repeats: int = 3, more: int = 64) -> dict:
    """Per-step ms, kernels and floors of every side at the middle of an image (``prompt_len + T / 2`` context)."""
    mid = prompt_len + space.tokens_per_image // 2
    prompts = make_prompts(batch, mid, space.offset, device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    graphs = GraphSet() if cuda else None
    fns = sides(prompts, params, graphs)
    counted = {k: v for k, v in fns.items() if k != "ours_graphs"}
    result = kernels.compare(counted, model, space, repeats, sync, more)
    for name in ("ours_static", "hf_batched_cfg"):  # what the GPU itself ran (nothing to add on the CPU)
        result[name].update(kernels.device_kernels(lambda sp, f=fns[name]: f(model, sp), space))
    if cuda:  # a graph replays the kernels counted for ours_static
        for name, backends in (("ours_graphs", None), ("ours_graphs_efficient", [SDPBackend.EFFICIENT_ATTENTION])):
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                graphs.clear()  # captured anew under this attention backend
                result[name] = {"ms_per_step": 1e3 * kernels.step_seconds(
                    lambda sp: fns["ours_graphs"](model, sp), space, repeats, more=more, sync=sync)}
        graphs.clear()
    rows = 2 * batch if params.guided else batch
    context = mid + 4 + more // 2  # the mean context of the timed steps
    weights, kv = read_bytes(model, space, rows, context)
    _, kv_span = read_bytes(model, space, rows, bucketed(context, SPAN))
    floors = {"floor_context_ms": 1e3 * (weights + kv) / bandwidth,
              "floor_span_ms": 1e3 * (weights + kv_span) / bandwidth, "weight_bytes": weights,
              "kv_bytes_context": kv, "kv_bytes_span": kv_span, "context": context,
              "span": bucketed(context, SPAN), "rows": rows, "copy_bandwidth_gb_s": bandwidth / 1e9}
    for side in result.values():
        side["x_floor_context"] = side["ms_per_step"] / floors["floor_context_ms"]
    if "ours_graphs" in result:
        result["ours_graphs"]["x_floor_span"] = result["ours_graphs"]["ms_per_step"] / floors["floor_span_ms"]
    return {"sides": result, **floors, "sdpa_backend": sdpa_backend(model, rows, context, device)}


def sdpa_backend(model: torch.nn.Module, rows: int, context: int, device: torch.device) -> str:
    """The attention kernel PyTorch picks for a decode step's shapes (``torch._fused_sdp_choice``)."""
    cfg, weight = model.config, next(model.parameters())
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q = torch.zeros(rows, cfg.num_attention_heads, 1, d, dtype=weight.dtype, device=device)
    kv = torch.zeros(rows, cfg.num_key_value_heads, context, d, dtype=weight.dtype, device=device)
    mask = torch.zeros(rows, cfg.num_key_value_heads, 1, context, dtype=weight.dtype, device=device)
    try:
        choice = torch._fused_sdp_choice(q, kv, kv, mask[:, :1], 0.0, False, enable_gqa=True)
    except (AttributeError, RuntimeError, TypeError) as err:
        return f"unknown ({type(err).__name__})"
    return SDPBackend(choice).name


def decode_lines(d: dict) -> list[str]:
    """Markdown rows for :func:`bench_decode`'s result."""
    lines = [f"decode step at context {d['context']} ({d['rows']} rows), floors {d['floor_context_ms']:.3f} ms "
             f"(context) / {d['floor_span_ms']:.3f} ms (span {d['span']}) at {d['copy_bandwidth_gb_s']:.0f} GB/s",
             "| side | ms/step | x floor (context) | kernels/step | per layer | outside | GPU kernels/step |",
             "|---|---|---|---|---|---|---|"]
    for name, s in d["sides"].items():
        lines.append(f"| {name} | {s['ms_per_step']:.3f} | {s['x_floor_context']:.2f} | {s.get('total', '')} | "
                     f"{s.get('per_layer', '')} | {s.get('outside', '')} | {s.get('device_per_step', '')} |")
    return [*lines, f"attention: {d.get('sdpa_backend', '?')}"]
