"""CUDA graphs for the decode step: capture once per batch shape, replay for every image token.

Why: on a GPU a small policy's decode step is a few hundred tiny kernels, and launching them from Python costs
far more than running them (measured on an H200: 35.6 ms per step against a 1.2 ms bandwidth floor,
BENCHMARKS.md section 6). A CUDA graph launches the whole step (head, guided log-probs with CFG's two
branches, the draw, embedding the code, every layer over the static KV cache) as one unit.

What it takes:

- static shapes: the cache is :class:`~omnigrpo.rollout.engine.StaticKV` with ``static=True`` (the step's slot
  is a device tensor, attention spans the whole cache with unfilled keys masked), its length rounded up to
  :data:`LENGTH_BUCKET` so prompts of nearby lengths share a graph;
- fixed input and output buffers: the caller's hidden states and positions are copied in before each replay;
- the sampler's randomness inside the graph: each graph draws from a generator of its own, registered with
  the graph (replays advance its Philox offset), whose state is set from the caller's generator before a
  sampling call and handed back after, so a graphed call consumes the caller's stream as an eager one does.

Weights are read in place: a weight load or broadcast writes into the same tensors and needs no re-capture
(the hybrid learner's packed copies are new tensors per phase, so it samples eagerly). Graphs are kept per
(rows, length, images, sampling settings), at most :data:`KEEP` per policy, least recently used dropped.
Not yet run on a GPU; ``tests/gpu/test_cuda.py`` checks replay against eager decoding where CUDA exists.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from omnigrpo.rollout.policy import ImageLM
from omnigrpo.rollout.sampler import SamplingParams, decode_step

LENGTH_BUCKET = 64
"""Cache lengths are rounded up to a multiple of this: one graph serves prompts of nearby lengths."""
KEEP = 4
"""Graphs (with their caches) kept per policy."""


def bucketed(length: int) -> int:
    """``length`` rounded up to a multiple of :data:`LENGTH_BUCKET`."""
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


class GraphedDecode:
    """One captured decode step for ``rows`` rows (``b`` images, CFG doubling included) over ``cache``."""

    def __init__(self, lm: ImageLM, params: SamplingParams, b: int, rows: int, length: int):
        weight = next(lm.module.parameters())
        device, hidden_size = weight.device, lm.embed_codes(torch.zeros(1, 1, dtype=torch.long,
                                                                        device=weight.device)).shape[-1]
        self.cache = lm.new_cache(rows, length, static=True)
        self.hidden = torch.zeros(rows, 1, hidden_size, dtype=weight.dtype, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.valid = torch.ones(rows, 1, dtype=torch.bool, device=device)
        self.generator = torch.Generator(device)
        self.source: torch.Generator | None = None
        """The caller's generator of the current sampling call (set by :func:`graphed_decoder`)."""
        self.graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture: allocations, lazy kernel loads
            for _ in range(2):
                decode_step(lm, self.hidden, self.positions, self.valid, self.cache, params, b, self.generator)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph.register_generator_state(self.generator)
        with torch.cuda.graph(self.graph):
            self.out = decode_step(lm, self.hidden, self.positions, self.valid, self.cache, params, b,
                                   self.generator)
        self.cache.reset()

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor):
        """Replay: codes ``[b]``, log-probs ``[b]`` and the next hidden states ``[R, 1, D]`` (graph-owned buffers,
        overwritten by the next replay)."""
        self.hidden.copy_(hidden)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.out

    def hand_back(self) -> None:
        """After a graphed sampling call: the caller's generator continues where the graph's stream stopped."""
        self.source.set_state(self.generator.get_state())


def graphed_decoder(lm: ImageLM, params: SamplingParams, b: int, rows: int, length: int,
                    generator: torch.Generator | None):
    """The graphed decode step for this shape (captured on first use) and its emptied static cache. The graph's
    generator continues ``generator``'s stream (the device's default generator when None); the sampler calls
    :meth:`GraphedDecode.hand_back` after its last replay to carry the stream on."""
    bucket = bucketed(length)
    graphs: OrderedDict = lm.__dict__.setdefault("_omnigrpo_graphs", OrderedDict())
    key = (rows, bucket, b, params)
    if key not in graphs:
        graphs[key] = GraphedDecode(lm, params, b, rows, bucket)
        while len(graphs) > KEEP:
            graphs.popitem(last=False)
    graphs.move_to_end(key)
    step = graphs[key]
    step.cache.reset()
    source = generator or torch.cuda.default_generators[step.generator.device.index or 0]
    step.generator.set_state(source.get_state())
    step.source = source
    return step, step.cache


class StaticStep:
    """The graphed step's computation without the capture (static cache, the caller's generator): what a graph
    replays, runnable anywhere; tests hold it equal to the growing-cache decode on the CPU."""

    def __init__(self, lm: ImageLM, params: SamplingParams, b: int, rows: int, length: int,
                 generator: torch.Generator | None):
        self.lm, self.params, self.b, self.generator = lm, params, b, generator
        self.cache = lm.new_cache(rows, bucketed(length), static=True)
        self.valid = torch.ones(rows, 1, dtype=torch.bool, device=self.cache.valid.device)

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor):
        return decode_step(self.lm, hidden, positions, self.valid, self.cache, self.params, self.b, self.generator)

    def hand_back(self) -> None:
        """Nothing to hand back: the caller's generator drew every code."""


def static_decoder(lm: ImageLM, params: SamplingParams, b: int, rows: int, length: int,
                   generator: torch.Generator | None):
    """:func:`graphed_decoder`'s interface over a :class:`StaticStep` (no CUDA needed)."""
    step = StaticStep(lm, params, b, rows, length, generator)
    return step, step.cache
