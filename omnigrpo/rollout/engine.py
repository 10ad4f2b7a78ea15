"""A lean decode path for Llama-family decoder layers over a static KV cache: the fast sampler's core.

Why: on small models at image lengths HF ``generate`` spends most of a step outside the matmuls (masks, a cache
grown by concatenation, keyword routing), and on a GPU each small op is a kernel launch. Image sampling needs none
of that: rows advance in lockstep, the number of steps is known, CFG's branches are more rows. :class:`StaticKV`
allocates the cache, mask and rotary table once; :func:`forward_layers` runs the model's *own* Llama-layout layers
in as few kernels as the arithmetic allows (docs/design.md, "The decode step on a GPU"). The learner scores with
the ordinary forward; a test holds the two equal to 1e-5 in fp32 for every family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


class StaticKV:
    """Preallocated keys/values ``[B, H_kv, L_max, D]`` per layer, the additive key mask ``bias``
    ``[B, H_kv, 1, L_max]``
    (0 where a key may be attended, -inf where it is unfilled or padding; one row per key/value head, so that the
    CPU's decode attention adds it to ``[B * H_kv, G, L]`` scores without a copy) and the rotary table.

    Args:
        layers: the decoder layers the cache serves (their attention modules give head counts).
        batch: rows, CFG branches included.
        max_len: prompt length plus every token the sampler will feed (at least).
        static: decode steps keep fixed shapes (what a CUDA graph needs): the step's slot is the device tensor
            ``slot`` ``[1]`` rather than the Python ``length``, and attention spans the first ``span`` keys with
            the unfilled ones masked, instead of a prefix that grows by one each step.
        keys, values: existing per-layer buffers to use (views of a larger cache; :mod:`omnigrpo.rollout.graphs`).
    """

    def __init__(self, layers: Sequence[torch.nn.Module], batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, static: bool = False, keys=None, values=None):
        if keys is None:
            keys, values = [], []
            for layer in layers:
                attn = layer.self_attn
                shape = (batch, attn.k_proj.out_features // attn.head_dim, max_len, attn.head_dim)
                keys.append(torch.zeros(shape, dtype=dtype, device=device))
                values.append(torch.zeros(shape, dtype=dtype, device=device))
        self.keys, self.values = keys, values
        self.bias = torch.full((batch, keys[0].shape[1], 1, max_len), float("-inf"), dtype=dtype, device=device)
        self.length = 0
        self.static = static
        self.span = max_len
        """Keys a static decode step attends (a CUDA graph's span: :mod:`omnigrpo.rollout.graphs`)."""
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.rope: torch.Tensor | None = None
        """``[L_max, 2, d]``: cos and sign-folded sin per position (:func:`rope_table`), built on first use."""
        self.plans: list[LayerPlan] | None = None
        """The layers as :func:`plan_layers` reads them, built on first use and again after :meth:`reset`."""

    @property
    def max_len(self) -> int:
        return self.bias.shape[-1]

    def reset(self) -> None:
        """Empty the cache for a new batch of the same shape (stale keys stay, masked as unfilled)."""
        self.bias.fill_(float("-inf"))
        self.slot.zero_()
        self.length = 0
        self.plans = None  # a new sampling call reads the modules afresh


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """bool ``[B, 1, L, L]`` attention mask of a left-padded batch (``valid`` ``[B, L]``): causal over valid
    keys, and every query sees itself (padded rows stay finite)."""
    n = valid.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=valid.device)
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    return ((valid[:, None, :] & causal) | eye)[:, None]


def fuse(layers: Sequence[torch.nn.Module], read=getattr, repoint: bool = True, into: list[tuple] | None = None
         ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Pack each layer's q/k/v projections and its MLP's gate/up projections into one matrix each, and
    make the modules' own weights views of it: one GEMM instead of three (two), no extra memory, and a
    weight load (``load_state_dict``, the broadcast's in-place receive) writes through the views into
    the packed matrices. Meant for sampling modules (an optimiser stepping the views in place still
    updates the packed matrices, but ZeRO re-points parameters into its own buffers, so a DeepSpeed
    learner never packs: its sampler, under ``cluster.placement: hybrid``, uses :func:`pack_copies`).

    ``read(linear, "weight" | "bias")`` gives a projection's tensor; ``repoint=False`` leaves the modules alone;
    ``into``: an earlier result to refresh in place (``copy_``: its tensors keep their addresses, so CUDA graphs
    captured over them stay valid).

    Returns per layer ``(qkv weight [Hq*d + 2*Hkv*d, D], qkv bias or None, gate_up weight [2*I, D],
    head counts (Hq, Hkv, Hkv))``."""
    packed = []
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        old = into[i] if into is not None else (None, None, None, None)
        qkv_w = _pack(qkv, "weight", read, repoint, old[0])
        qkv_b = _pack(qkv, "bias", read, repoint, old[1]) if read(attn.q_proj, "bias") is not None else None
        heads = [m.out_features // attn.head_dim for m in qkv]
        packed.append((qkv_w, qkv_b, _pack([mlp.gate_proj, mlp.up_proj], "weight", read, repoint, old[2]), heads))
    return packed


def pack_copies(layers: Sequence[torch.nn.Module], read=getattr, into: list[tuple] | None = None) -> list[tuple]:
    """:func:`fuse`'s packed matrices as fresh copies (or refreshed in ``into``), leaving the modules' own
    parameters where they are: for sampling with a module an optimiser (DeepSpeed) owns, whose parameters must
    not be re-pointed.

    ``read`` as in :func:`fuse` (the learner passes one that merges a LoRA adapter). The copies cost the q/k/v
    and gate/up weights once more (``(Hq + 2 Hkv) d D + 2 I D`` elements per layer, about 2/3 of a Llama
    layer); they go stale at the next optimiser step, so the caller frees or refreshes them per sampling phase."""
    with torch.no_grad():
        return fuse(layers, read, repoint=False, into=into)


class PackedLayers:
    """One module's layers packed for the fast path, held by whoever owns the module (a policy for its own
    ``model``, a hybrid learner for its DeepSpeed module), never written onto the module itself.

    :meth:`of` packs with :func:`fuse` on first use; since fuse makes the module's weights views of the packed
    matrices, a weight load writes through and nothing goes stale. Copies packed elsewhere (:func:`pack_copies`,
    which leaves the module alone) are set with :meth:`hold` and must be dropped with :meth:`invalidate` when the
    weights they were copied from change."""

    def __init__(self) -> None:
        self.layers: list[tuple] | None = None
        """Per layer ``(qkv weight, qkv bias, gate_up weight, head counts)`` (:func:`fuse`), None before packing."""

    def of(self, layers: Sequence[torch.nn.Module]) -> list[tuple]:
        """The packed ``layers``: the ones held, else :func:`fuse` of ``layers`` (kept)."""
        if self.layers is None:
            self.layers = fuse(layers)
        return self.layers

    def hold(self, packed: list[tuple]) -> None:
        """Use ``packed`` (copies made by the owner) until :meth:`invalidate`."""
        self.layers = packed

    def invalidate(self) -> None:
        """Drop the packed layers: the next :meth:`of` packs afresh."""
        self.layers = None


def _pack(linears: list[torch.nn.Linear], name: str, read=getattr, repoint: bool = True,
          into: torch.Tensor | None = None) -> torch.Tensor:
    parts = [read(m, name).detach() for m in linears]
    whole = torch.cat(parts) if into is None else torch.cat(parts, out=into)
    if repoint:
        for m, part in zip(linears, whole.split([m.out_features for m in linears]), strict=True):
            setattr(m, name, torch.nn.Parameter(part, requires_grad=getattr(m, name).requires_grad))
    return whole


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """The Llama-family RMSNorm of ``norm`` (fp32 statistics) as one ``F.rms_norm`` (a single kernel on CUDA)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def rope_table(rotary: torch.nn.Module, length: int, like: torch.Tensor) -> torch.Tensor:
    """``[length, 2, d]``: the model's own cos and sin at positions ``0 .. length - 1`` (in ``like``'s dtype), the
    sin's first half negated so that ``rotate_half(x) * sin == swap_halves(x) * table[:, 1]``."""
    positions = torch.arange(length, device=like.device)[None]
    cos, sin = rotary(like, positions)
    half = sin.shape[-1] // 2
    sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)
    return torch.stack([cos[0], sin[0]], 1)


class LayerPlan(NamedTuple):
    """What a step reads of one decoder layer, looked up once per sampling call instead of once per token: on a
    small model the ``nn.Module`` attribute lookups of every step cost about a fifth of the CPU's step."""

    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    gate_up_w: torch.Tensor
    hq: int
    hkv: int
    head_dim: int
    scale: float
    norm_in: tuple
    """(shape, weight, eps) of the input RMSNorm."""
    norm_post: tuple
    """(shape, weight, eps) of the post-attention RMSNorm."""
    o_proj: torch.nn.Module
    o_t: torch.Tensor | None
    """``o_proj.weight.t()`` for a plain bias-free ``nn.Linear`` (one ``addmm`` with the residual), else None."""
    down_proj: torch.nn.Module
    down_t: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]


def plan_layers(layers: Sequence[torch.nn.Module], packed: list[tuple]) -> list[LayerPlan]:
    """One :class:`LayerPlan` per layer from the modules and their :func:`fuse` entries."""
    plans = []
    for layer, (qkv_w, qkv_b, gate_up_w, (hq, hkv, _)) in zip(layers, packed, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        norms = [(n.weight.shape, n.weight, n.variance_epsilon)
                 for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        plans.append(LayerPlan(qkv_w, qkv_b, gate_up_w, hq, hkv, attn.head_dim, attn.scaling, *norms,
                               attn.o_proj, _transposed(attn.o_proj), mlp.down_proj, _transposed(mlp.down_proj),
                               mlp.act_fn))
    return plans


def _transposed(linear: torch.nn.Module) -> torch.Tensor | None:
    """``weight.t()`` of a plain bias-free ``nn.Linear``; None for a wrapped or biased module (e.g. a LoRA layer),
    which runs through its own call."""
    return linear.weight.t() if type(linear) is torch.nn.Linear and linear.bias is None else None


def _residual(x: torch.Tensor, linear: torch.nn.Module, weight_t: torch.Tensor | None, h: torch.Tensor,
              inplace: bool) -> torch.Tensor:
    """``x + linear(h)`` for ``[B, L, D]``, as one ``addmm`` where ``weight_t`` is given; with ``inplace`` (``x`` is
    read by nobody else) and no autograd, written into ``x`` itself: CUDA's out-of-place ``addmm`` first copies its
    2-D ``self`` into the result, a hidden kernel per call."""
    if weight_t is None:
        return x + linear(h)
    shape, rows = x.shape, h.reshape(-1, h.shape[-1])
    if inplace and not torch.is_grad_enabled():
        return x.view(-1, shape[-1]).addmm_(rows, weight_t).view(shape)
    return torch.addmm(x.reshape(-1, shape[-1]), rows, weight_t).view(shape)


def attend(plan: LayerPlan, index: int, x: torch.Tensor, rope: torch.Tensor, cache: StaticKV,
           mask: torch.Tensor | None, owned: bool = False) -> torch.Tensor:
    """One decoder layer on ``x`` ``[B, L, D]`` whose keys go to cache slots ``length .. length + L - 1`` (a static
    decode step: slot ``cache.slot``, attending ``cache.span`` keys).

    ``rope``: ``[B, L, 1, 2, d]`` (cos, folded sin): RoPE of q and k together in three kernels (rolling the last
    dimension by half swaps its halves); ``mask``: bool ``[B, 1, L, length + L]``, True where a query may attend a
    key; None for a decode step (L = 1), which attends through the cache's additive ``bias``. ``owned``: nobody
    reads ``x`` after this layer, so its residual may be written into it.
    """
    qkv_w, qkv_b, gate_up_w, hq, hkv, d, scale, norm_in, norm_post, o_proj, o_t, down_proj, down_t, act = plan
    b, n, _ = x.shape
    qkv = F.linear(F.rms_norm(x, *norm_in), qkv_w, qkv_b).view(b, n, -1, d)
    rot = qkv[:, :, : hq + hkv]  # rolled whole, then sliced: CUDA's roll copies a non-contiguous input first
    qk = torch.addcmul(rot * rope[..., 0, :], qkv.roll(d // 2, -1)[:, :, : hq + hkv], rope[..., 1, :])
    k, v = qk[:, :, hq:].transpose(1, 2), qkv[:, :, hq + hkv :].transpose(1, 2)
    keys, values = cache.keys[index], cache.values[index]
    if n == 1:  # decode: the query heads sharing a key/value head are that head's query rows (GQA without copies)
        if cache.static:
            keys.index_copy_(2, cache.slot, k)
            values.index_copy_(2, cache.slot, v)
            end = cache.span
        else:
            keys.narrow(2, cache.length, 1).copy_(k)
            values.narrow(2, cache.length, 1).copy_(v)
            end = cache.length + 1
        q = qk[:, 0, :hq].view(b, hkv, hq // hkv, d)
        out = decode_attention(q, keys[:, :, :end], values[:, :, :end], cache.bias[..., :end], scale)
    else:
        start, end = cache.length, cache.length + n
        keys.narrow(2, start, n).copy_(k)
        values.narrow(2, start, n).copy_(v)
        out = F.scaled_dot_product_attention(qk[:, :, :hq].transpose(1, 2), keys[:, :, :end], values[:, :, :end],
                                             attn_mask=mask, scale=scale, enable_gqa=hq != hkv).transpose(1, 2)
    x = _residual(x, o_proj, o_t, out.reshape(b, n, -1), owned)
    gate, up = F.linear(F.rms_norm(x, *norm_post), gate_up_w).chunk(2, -1)
    return _residual(x, down_proj, down_t, act(gate) * up, True)  # this x is the layer's own


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """One decode step's attention: ``q`` ``[B, H_kv, G, d]`` (the G query heads sharing a key/value head as its query
    rows), ``keys``/``values`` ``[B, H_kv, L, d]``, additive ``bias`` ``[B, H_kv, 1, L]`` -> ``[B, H_kv, G, d]``.

    On CUDA one ``scaled_dot_product_attention`` kernel. Elsewhere a batched matmul with the mask and scale folded
    in (``baddbmm``), a softmax and a second matmul: PyTorch's CPU SDPA kernel is blocked for long sequences and
    takes several times longer at a decode step's shapes (one query row per head, tens of keys; BENCHMARKS.md
    section 1).
    """
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)
    b, h, g, d = q.shape
    n = keys.shape[2]
    scores = torch.baddbmm(bias.reshape(b * h, 1, n), q.reshape(b * h, g, d), keys.reshape(b * h, n, d).transpose(1, 2),
                           alpha=scale)
    probs = scores.softmax(-1) if q.dtype == torch.float32 else scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs, values.reshape(b * h, n, d)).view(b, h, g, d)


def _prefill_mask(cache: StaticKV, new_valid: torch.Tensor, n: int) -> torch.Tensor:
    """bool ``[B, 1, n, end]`` for ``n`` new tokens (causal over valid keys, each query sees itself); records
    which new keys later steps may attend in ``cache.bias``."""
    start, end = cache.length, cache.length + n
    cache.bias[:, :, 0, start:end] = torch.zeros_like(new_valid, dtype=cache.bias.dtype).masked_fill_(
        ~new_valid, float("-inf"))[:, None]
    valid = torch.isfinite(cache.bias[:, 0, 0, :end])
    causal = torch.ones(n, end, dtype=torch.bool, device=new_valid.device).tril(start)
    self_key = torch.zeros_like(causal)
    self_key[:, start:] = torch.eye(n, dtype=torch.bool, device=new_valid.device)
    return ((valid[:, None, :] & causal) | self_key)[:, None]


def forward_layers(layers: Sequence[torch.nn.Module], packed: list[tuple], rotary: torch.nn.Module, x: torch.Tensor,
                   positions: torch.Tensor, new_valid: torch.Tensor, cache: StaticKV,
                   image_only: Sequence[bool] = (), image: bool | torch.Tensor = False) -> torch.Tensor:
    """Run ``x`` ``[B, L, D]`` at RoPE ``positions`` ``[B, L]`` through ``layers`` and append it to ``cache``.

    ``new_valid``: bool ``[B, L]``, False for left padding (never attended by later tokens; a decode step's
    token, L = 1, is always valid). A padded query still attends itself, so its (unused) output stays finite and
    no NaN reaches the cache. ``image_only[i]`` marks X-Omni's vision blocks: they still see (and cache) every
    token, but only image positions take their output; ``image`` says whether the new tokens are image tokens
    (a bool, or bool ``[B, L]`` per position).
    """
    n = x.shape[1]
    if cache.rope is None:
        cache.rope = rope_table(rotary, cache.max_len, x)
    if n > 1:
        mask = _prefill_mask(cache, new_valid, n)
    elif cache.static:  # the slot from the device tensor: a CUDA graph replays this with a moving slot
        cache.bias.index_fill_(3, cache.slot, 0.0)
        mask = None
    else:
        cache.bias[..., cache.length] = 0.0
        mask = None
    if cache.plans is None:
        cache.plans = plan_layers(layers, packed)
    rope = cache.rope[positions][:, :, None]  # [B, L, 1, 2, d]
    owned = False  # x is the caller's (the embeddings, maybe reused) until a layer makes a new one
    for i, plan in enumerate(cache.plans):
        vision = i < len(image_only) and image_only[i]
        out = attend(plan, i, x, rope, cache, mask, owned and not vision)
        if vision:  # a vision block: only image positions take its output (so its input is read after it)
            out = torch.where(image[..., None], out, x) if torch.is_tensor(image) else (out if image else x)
        owned = owned or out is not x
        x = out
    cache.length += n
    if cache.static:
        cache.slot.add_(n)  # in place: a captured graph advances it on every replay
    return x
