"""CUDA graphs for the decode loop: captured once per batch shape, one replay per image token.

Why: on a GPU a small-batch decode step is a few hundred small kernels, and launching them from Python costs far
more than running them (BENCHMARKS.md section 6). A graph launches the whole step (image head, guided log-probs,
the draw, the code's embedding, every layer over the static KV cache) as one unit, and the loop's state lives on
the device. :class:`GraphSet` keeps one cache and memory pool, graphs per attended span, the caller's random stream,
and eager decoding after a failed capture; :class:`StaticDecode` with ``capture=False`` runs the same kernels
eagerly, the reference the graphs are tested against (docs/design.md, "The decode step on a GPU").
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from omnigrpo.rollout.engine import StaticKV
from omnigrpo.rollout.policy import ImageLM
from omnigrpo.rollout.sampler import SamplingParams, sample_code

log = logging.getLogger(__name__)

SPAN = 128
"""Graphs attend the first multiple of this many cache slots that covers the filled prefix."""
KEEP = 4
"""Batch shapes whose graphs are kept per policy, least recently used dropped."""


def bucketed(length: int, unit: int = SPAN) -> int:
    """``length`` rounded up to a multiple of ``unit``."""
    return -(-length // unit) * unit


class StaticDecode:
    """The decode loop of one batch shape with its state on the device: hidden states, positions, the code column,
    the codes and log-probs drawn so far, over a static :class:`StaticKV`; captured per span as CUDA graphs
    (``capture=True``) or run eagerly with the same kernels.

    Args:
        b: images; ``rows``: batch rows (``2 b`` with CFG); ``length``: prompt width plus the fed segment.
        keys, values: per-layer cache buffers of at least ``[rows, H_kv, bucketed(length), d]`` (views are taken).
        pool: the CUDA graph memory pool shared with the policy's other graphs.
    """

    def __init__(self, lm: ImageLM, params: SamplingParams, b: int, rows: int, length: int,
                 generator: torch.Generator | None = None, capture: bool = False, keys=None, values=None,
                 pool=None, unit: int = SPAN):
        weight = next(lm.module.parameters())
        device, space, size = weight.device, lm.space, bucketed(length, unit)
        self.lm, self.params, self.b, self.rows, self.unit, self.capture = lm, params, b, rows, unit, capture
        views = None if keys is None else ([k[:rows, :, :size] for k in keys], [v[:rows, :, :size] for v in values])
        self.cache = StaticKV(lm.body.layers, rows, size, weight.dtype, device, True, *(views or (None, None)))
        hidden_size = lm.embed_codes(torch.zeros(1, 1, dtype=torch.long, device=device)).shape[-1]
        self.hidden = torch.zeros(rows, 1, hidden_size, dtype=weight.dtype, device=device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.valid = torch.ones(rows, 1, dtype=torch.bool, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        self.codes = torch.zeros(b, space.tokens_per_image, dtype=torch.long, device=device)
        self.logps = torch.zeros(b, space.tokens_per_image, device=device)
        eol = space.eol_id
        self.eol = None if eol is None else torch.full((rows, 1), eol, device=device)
        """End-of-line ids ``[R, 1]``: embedded inside the captured step, so a weight update reaches it."""
        self.generator = torch.Generator(device) if capture else generator
        self.source: torch.Generator | None = generator
        self.t = 0
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture(pool)

    @property
    def spans(self) -> list[int]:
        return list(range(self.unit, self.cache.max_len + 1, self.unit))

    def _code(self) -> None:
        """Draw the next code from ``hidden``, record it, and feed it (both CFG branches)."""
        code, logp = sample_code(self.lm, self.hidden, self.params, self.b, self.generator)
        self.codes.index_copy_(1, self.col, code[:, None])
        self.logps.index_copy_(1, self.col, logp[:, None])
        self.col.add_(1)
        self._feed(self.lm.embed_codes(code[:, None].repeat(self.rows // self.b, 1)))

    def _eol(self) -> None:
        self._feed(self.lm.embed_text(self.eol))

    def _feed(self, x: torch.Tensor) -> None:
        self.hidden.copy_(self.lm.fast_forward(x, self.pos, self.valid, True, self.cache))
        self.pos.add_(1)

    def _kinds(self):
        return {"code": self._code, **({"eol": self._eol} if self.eol is not None else {})}

    def _capture(self, pool) -> None:
        """Warm every (kind, span) step up on a side stream (allocations, lazy kernel loads, the rotary table), then
        capture each into the shared ``pool``; the state is emptied after."""
        device = self.hidden.device
        side = _side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for span in self.spans:
                for step in self._kinds().values():
                    self._rewind(span)
                    step()
        torch.cuda.current_stream(device).wait_stream(side)
        for span in self.spans:
            for kind, step in self._kinds().items():
                self._rewind(span)
                graph = torch.cuda.CUDAGraph()
                graph.register_generator_state(self.generator)
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    step()
                self.graphs[(kind, span)] = graph
        self._rewind(self.unit)

    def _rewind(self, span: int) -> None:
        self.cache.reset()
        self.cache.span = span
        self.col.zero_()
        self.pos.zero_()

    def start(self, generator: torch.Generator | None) -> StaticKV:
        """Begin a sampling call: the emptied cache for the prompt's prefill. A captured loop's generator takes up
        ``generator``'s stream (the device's default generator when None)."""
        self._rewind(self.unit)
        if self.capture:
            source = generator or torch.cuda.default_generators[self.hidden.device.index or 0]
            self.generator.set_state(source.get_state())
            self.source = source
        else:
            self.generator = self.source = generator
        return self.cache

    def prime(self, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        """After the prefill: its last hidden states ``[R, 1, D]`` and the first fed position ``[R, 1]``."""
        self.hidden.copy_(hidden)
        self.pos.copy_(positions)
        self.t = self.cache.length

    def step(self, kind: str) -> None:
        """Feed one token (``"code"``: drawn; ``"eol"``: the forced end-of-line) attending the span that covers it."""
        span = bucketed(self.t + 1, self.unit)
        if self.capture:
            self.graphs[(kind, span)].replay()
        else:
            self.cache.span = span
            self._kinds()[kind]()
        self.t += 1

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the last code (nothing is fed after it): codes ``[b, T]`` and log-probs ``[b, T]``."""
        if self.capture:
            self.source.set_state(self.generator.get_state())  # the caller's stream continues the graphs'
        code, logp = sample_code(self.lm, self.hidden, self.params, self.b, self.source)
        self.codes[:, -1], self.logps[:, -1] = code, logp
        return self.codes.clone(), self.logps.clone()


_SIDE: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One warm-up stream per device for every capture: cuBLAS keeps a workspace per stream it ran on for the
    process's life, so a new stream per capture would leak one each time."""
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


class GraphSet:
    """One module's graphed decode loops, held by whoever samples with the module (a rollout worker, a hybrid
    learner): one cache of the largest shape, one memory pool, at most :data:`KEEP` shapes (rows, length, images,
    sampling settings, image space); ``failures``: why a shape fell back to eager decoding.

    The graphs read the weights in place, so a weight load needs nothing; :meth:`clear` drops every graph when the
    tensors they were captured over are replaced (a fresh pack, another attention backend)."""

    def __init__(self):
        self.loops: OrderedDict = OrderedDict()
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.pool = None
        self.failures: dict[tuple, str] = {}
        self.module: torch.nn.Module | None = None
        """The module the graphs were captured over (a set serves one)."""

    def clear(self) -> None:
        """Drop every captured loop, the cache and the recorded failures: the next call captures afresh."""
        self.loops.clear()
        self.keys = self.values = []
        self.pool, self.module = None, None
        self.failures.clear()

    def decoder(self, lm: ImageLM, params: SamplingParams, b: int, rows: int, length: int,
                generator: torch.Generator | None, unit: int = SPAN) -> StaticDecode | None:
        """The sampler's ``graphed`` hook: the captured decode loop for this shape (captured on first use, attention
        spans in multiples of ``unit``), started on ``generator``'s stream; None where capture failed (the sampler
        then decodes eagerly)."""
        loop = self.loop(lm, params, b, rows, length, unit)
        if loop is not None:
            loop.start(generator)
        return loop

    def _fits(self, rows: int, length: int) -> bool:
        return bool(self.keys) and self.keys[0].shape[0] >= rows and self.keys[0].shape[2] >= length

    def _grow(self, lm: ImageLM, rows: int, length: int) -> None:
        """A cache for the largest shape so far (every loop is re-captured over it)."""
        if self.keys:
            rows, length = max(rows, self.keys[0].shape[0]), max(length, self.keys[0].shape[2])
        self.loops.clear()
        self.keys = self.values = []
        torch.cuda.empty_cache()
        weight = next(lm.module.parameters())
        cache = StaticKV(lm.body.layers, rows, length, weight.dtype, weight.device, True)
        self.keys, self.values = cache.keys, cache.values
        self.pool = torch.cuda.graph_pool_handle()

    def loop(self, lm: ImageLM, params: SamplingParams, b: int, rows: int, length: int,
             unit: int = SPAN) -> StaticDecode | None:
        if self.module is None:
            self.module = lm.module
        elif lm.module is not self.module:
            raise ValueError("a GraphSet serves one module: its graphs were captured over another one's weights")
        key = (rows, bucketed(length, unit), b, params, lm.space, unit)
        if key in self.failures:
            return None
        if key not in self.loops:
            try:
                if not self._fits(rows, bucketed(length, unit)):
                    self._grow(lm, rows, bucketed(length, unit))
                self.loops[key] = StaticDecode(lm, params, b, rows, length, capture=True, keys=self.keys,
                                               values=self.values, pool=self.pool, unit=unit)
            except Exception as err:  # noqa: BLE001 - any capture error: sample eagerly, say why
                self.loops.clear()  # nothing half-captured stays, nor a cache grown for it
                self.keys = self.values = []
                self.failures[key] = f"{type(err).__name__}: {err}"
                log.warning("CUDA graph capture failed for %d rows x %d slots, decoding eagerly: %s", rows,
                            bucketed(length), self.failures[key])
                return None
            while len(self.loops) > KEEP:
                self.loops.popitem(last=False)
        self.loops.move_to_end(key)
        return self.loops[key]

    def held_bytes(self) -> int:
        """Bytes of the shared KV cache (the graphs' pool holds only one step's temporaries)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def static_decoder(lm: ImageLM, params: SamplingParams, b: int, rows: int, length: int,
                   generator: torch.Generator | None, unit: int = SPAN) -> StaticDecode:
    """:meth:`GraphSet.decoder`'s interface over an uncaptured :class:`StaticDecode` (no CUDA needed): the same
    kernels, run one by one."""
    loop = StaticDecode(lm, params, b, rows, length, generator, unit=unit)
    loop.start(generator)
    return loop
