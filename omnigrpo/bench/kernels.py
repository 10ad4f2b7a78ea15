"""Kernels per decode step, counted on any device: ours against HF ``generate``, per layer and outside the layers.

Why: on a GPU a small-batch decode step is bound by launching kernels, not by the bytes it moves (BENCHMARKS.md
section 6). The same aten ops run on the CPU, so how many kernels a step launches can be counted, compared and held
to a budget here, without a GPU: :class:`KernelCounter` counts the ops that do work (not views), and one step is the
difference of two sampling calls one code apart (docs/bench.md). On a GPU, :func:`device_kernels` also counts what
the profiler saw the device run.
"""

from __future__ import annotations

import copy
import weakref
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from omnigrpo.rollout.engine import PackedLayers
from omnigrpo.rollout.policy import ImageSpace, TextVocabLM

NOT_KERNELS = {"empty", "empty_strided", "empty_like", "lift_fresh", "detach", "_unsafe_view"}
"""Ops that allocate or relabel without launching a kernel."""


def _is_view(op) -> bool:
    """An op whose result aliases an input without writing it (``view``, ``transpose``, ``narrow`` ...)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in op._schema.returns)


class KernelCounter(TorchDispatchMode):
    """Counts aten ops that launch work, by name (``counts``) and in total (``total``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.removeprefix("aten::")
        if name not in NOT_KERNELS and not _is_view(func):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count(fn: Callable[[], object]) -> Counter[str]:
    """Kernels launched by one call of ``fn``, by op name."""
    with KernelCounter() as counter:
        fn()
    return counter.counts


def per_step(sample: Callable[[ImageSpace], object], space: ImageSpace, n: int = 3) -> Counter[str]:
    """Kernels of one decode step: ``sample(space)`` for a one-row image of ``n + 1`` codes minus one of ``n``."""
    short = ImageSpace(space.num_codes, 1, n, space.offset, None)
    longer = ImageSpace(space.num_codes, 1, n + 1, space.offset, None)
    sample(short)  # first-use work (packing the layers, loading kernels) stays out of the count
    a, b = count(lambda: sample(short)), count(lambda: sample(longer))
    b.subtract(a)
    return Counter({k: v for k, v in b.items() if v})


class Views:
    """``views(model, space)``: an image-mode view of ``model`` whose packed layers are held here, one cache per
    model, so a bench packs each model once, as a rollout worker does (first-use work, kept out of the counts),
    and each :func:`with_layers` copy packs its own."""

    def __init__(self) -> None:
        self.packed: weakref.WeakKeyDictionary[torch.nn.Module, PackedLayers] = weakref.WeakKeyDictionary()

    def __call__(self, model: torch.nn.Module, space: ImageSpace) -> TextVocabLM:
        return TextVocabLM(model, space, self.packed.setdefault(model, PackedLayers()))


def with_layers(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """A shallow copy of a ``*ForCausalLM`` whose body keeps its first ``layers`` decoder layers (weights
    shared): the same model with fewer layers, for :func:`per_layer`. For measuring only: sampling with it packs
    the shared layers' projections again (:func:`omnigrpo.rollout.engine.fuse`; same values)."""
    config = copy.copy(model.config)
    config.num_hidden_layers = layers
    body = copy.copy(model.model)
    body.__dict__.update(_modules=dict(model.model._modules), config=config)
    body._modules["layers"] = torch.nn.ModuleList(list(model.model.layers)[:layers])
    clone = copy.copy(model)
    clone.__dict__.update(_modules=dict(model._modules), config=config)
    clone._modules["model"] = body
    return clone


def per_layer(step_of: Callable[[torch.nn.Module], Counter[str]], model: torch.nn.Module) -> dict[str, object]:
    """``{"per_layer", "outside", "total", "layers", "ops"}``: one step's kernels split by
    ``step(L) = outside + L * per_layer``, from ``step_of(model)`` at one and at two layers."""
    one, two = step_of(with_layers(model, 1)), step_of(with_layers(model, 2))
    per = sum(two.values()) - sum(one.values())
    layers = model.config.num_hidden_layers
    outside = sum(one.values()) - per
    ops = Counter(two)
    ops.subtract(one)
    return {"per_layer": per, "outside": outside, "total": outside + layers * per, "layers": layers,
            "layer_ops": dict(sorted((k, v) for k, v in ops.items() if v)),
            "outside_ops": dict(sorted((k, v) for k, v in (one - ops).items() if v))}


def step_seconds(sample: Callable[[ImageSpace], object], space: ImageSpace, repeats: int = 3, n: int = 4,
                 more: int = 32, sync: Callable[[], None] = lambda: None) -> float:
    """Wall seconds of one decode step: the median call at ``n + more`` codes minus the one at ``n``, over
    ``more`` (prefill and set-up cancel; on the CPU this is the host's time per step)."""
    from omnigrpo.bench.generate import median_seconds

    short = ImageSpace(space.num_codes, 1, n, space.offset, None)
    longer = ImageSpace(space.num_codes, 1, n + more, space.offset, None)
    a = median_seconds(lambda: sample(short), repeats, 1, sync)
    b = median_seconds(lambda: sample(longer), repeats, 1, sync)
    return (b - a) / more


def compare(sides: dict[str, Callable], model: torch.nn.Module, space: ImageSpace, repeats: int = 3,
            sync: Callable[[], None] = lambda: None, more: int = 32) -> dict[str, dict]:
    """Kernels per decode step (per layer, outside, total) and ms per step (:func:`step_seconds` over ``more``
    steps) for each side. ``sides[name](model, space)`` samples one batch with ``model`` (:func:`with_layers`
    copies of it for the per-layer split)."""
    out = {}
    for name, sample in sides.items():
        split = per_layer(lambda m, s=sample: per_step(lambda sp: s(m, sp), space), model)
        split["ms_per_step"] = 1e3 * step_seconds(lambda sp, s=sample: s(model, sp), space, repeats, more=more,
                                                  sync=sync)
        out[name] = split
    return out


def device_kernels(sample: Callable[[ImageSpace], object], space: ImageSpace, n: int = 4, more: int = 8) -> dict:
    """Kernels the GPU ran per decode step (profiler kernel events at ``n + more`` codes minus ``n``, over ``more``)
    and the attention kernels among them; empty without CUDA."""
    if not torch.cuda.is_available():
        return {}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def launched(codes: int) -> list[str]:
        sample(ImageSpace(space.num_codes, 1, codes, space.offset, None))  # warm: captures and plans outside
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            sample(ImageSpace(space.num_codes, 1, codes, space.offset, None))
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]

    short, longer = launched(n), launched(n + more)
    attention = sorted({k for k in longer if any(w in k.lower() for w in ("attention", "fmha", "flash", "sdpa"))})
    return {"device_per_step": (len(longer) - len(short)) / more, "attention_kernels": attention[:6]}
