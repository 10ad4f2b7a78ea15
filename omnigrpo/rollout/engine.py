"""A lean decode path for Llama-family decoder layers over a static KV cache: the fast sampler's core.

Why: on small models and at image lengths (hundreds of tokens per sample) HF ``generate`` spends most
of each step outside the matmuls: building masks, growing the cache by concatenation, routing
keyword arguments through every layer; on a GPU each of those small ops is a kernel launch, and a
decode step of a 1B model is bound by launches, not by the bytes it moves. Image sampling needs none of
that generality: every row of a batch advances in lockstep, the number of steps is known in advance, and
CFG's two branches are just more rows. :class:`StaticKV` therefore allocates the whole cache, the additive
attention mask and a rotary table once; :func:`forward_layers` runs the model's *own* weights with as few
kernels per layer as the arithmetic allows (``omnigrpo bench --parts rollout`` counts them against HF's):

- one fused RMSNorm (``F.rms_norm``; one kernel on CUDA) per norm;
- q/k/v and gate/up packed into one GEMM each (:func:`fuse`);
- rotary embedding of q and k together in three kernels (multiply, roll by half, ``addcmul`` with a sign-folded
  sine), cos/sin looked up from a table built once per cache;
- the step's keys/values written in place, then one ``scaled_dot_product_attention`` over the attended span on
  CUDA (three ops on the CPU, where they are faster: :func:`decode_attention`); a decode step groups the query
  heads that share a key/value head as query rows: no key copy for GQA;
- output and down projections with their residual add in one ``addmm``.

It applies to any decoder layer with the Llama attribute layout (``input_layernorm``,
``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp``), which covers the Qwen2 body of the
built-in policy and X-Omni, Janus-Pro's Llama and Emu3. The learner never uses this path: it scores
with the model's ordinary HF forward, and a test holds the two equal to 1e-5 in fp32 for every family,
which is what keeps this re-implementation honest.
"""

from __future__ import annotations

from collections.abc import Sequence

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

    @property
    def max_len(self) -> int:
        return self.bias.shape[-1]

    def reset(self) -> None:
        """Empty the cache for a new batch of the same shape (stale keys stay, masked as unfilled)."""
        self.bias.fill_(float("-inf"))
        self.slot.zero_()
        self.length = 0


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


def _rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` ``[B, L, H, d]`` with ``rope`` ``[B, L, 1, 2, d]`` (cos, folded sin): three kernels (rolling the
    last dimension by half swaps its halves)."""
    return torch.addcmul(x * rope[..., 0, :], x.roll(x.shape[-1] // 2, -1), rope[..., 1, :])


def _residual(x: torch.Tensor, linear: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``x + linear(h)`` for ``[B, L, D]``; a plain bias-free ``nn.Linear`` as one ``addmm`` (a wrapped or biased
    module, e.g. a LoRA layer, through its own call)."""
    if type(linear) is not torch.nn.Linear or linear.bias is not None:
        return x + linear(h)
    shape = x.shape
    return torch.addmm(x.reshape(-1, shape[-1]), h.reshape(-1, h.shape[-1]), linear.weight.t()).view(shape)


def attend(layer: torch.nn.Module, packed: tuple, index: int, x: torch.Tensor, rope: torch.Tensor,
           cache: StaticKV, mask: torch.Tensor | None) -> torch.Tensor:
    """One decoder layer on ``x`` ``[B, L, D]`` whose keys go to cache slots ``length .. length + L - 1`` (a static
    decode step: slot ``cache.slot``, attending ``cache.span`` keys).

    ``packed``: the layer's entry of :func:`fuse`; ``rope``: ``[B, L, 1, 2, d]``; ``mask``: bool
    ``[B, 1, L, length + L]``, True where a query may attend a key; None for a decode step (L = 1), which attends
    through the cache's additive ``bias``.
    """
    attn, mlp = layer.self_attn, layer.mlp
    qkv_w, qkv_b, gate_up_w, (hq, hkv, _) = packed
    b, n, _ = x.shape
    d = attn.head_dim
    qkv = F.linear(rms_norm(x, layer.input_layernorm), qkv_w, qkv_b).view(b, n, -1, d)
    qk = _rotate(qkv[:, :, : hq + hkv], rope)
    k, v = qk[:, :, hq:].transpose(1, 2), qkv[:, :, hq + hkv :].transpose(1, 2)
    if n == 1:  # decode: the query heads sharing a key/value head are that head's query rows (GQA without copies)
        if cache.static:
            cache.keys[index].index_copy_(2, cache.slot, k)
            cache.values[index].index_copy_(2, cache.slot, v)
            end = cache.span
        else:
            cache.keys[index].narrow(2, cache.length, 1).copy_(k)
            cache.values[index].narrow(2, cache.length, 1).copy_(v)
            end = cache.length + 1
        keys, values = cache.keys[index].narrow(2, 0, end), cache.values[index].narrow(2, 0, end)
        q = qk[:, 0, :hq].view(b, hkv, hq // hkv, d)
        out = decode_attention(q, keys, values, cache.bias[..., :end], attn.scaling)
    else:
        start, end = cache.length, cache.length + n
        cache.keys[index].narrow(2, start, n).copy_(k)
        cache.values[index].narrow(2, start, n).copy_(v)
        keys, values = cache.keys[index].narrow(2, 0, end), cache.values[index].narrow(2, 0, end)
        out = F.scaled_dot_product_attention(qk[:, :, :hq].transpose(1, 2), keys, values, attn_mask=mask,
                                             scale=attn.scaling, enable_gqa=hq != hkv).transpose(1, 2)
    x = _residual(x, attn.o_proj, out.reshape(b, n, -1))
    gate, up = F.linear(rms_norm(x, layer.post_attention_layernorm), gate_up_w).chunk(2, -1)
    return _residual(x, mlp.down_proj, mlp.act_fn(gate) * up)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """One decode step's attention: ``q`` ``[B, H_kv, G, d]`` (the G query heads sharing a key/value head as its query
    rows), ``keys``/``values`` ``[B, H_kv, L, d]``, additive ``bias`` ``[B, H_kv, 1, L]`` -> ``[B, H_kv, G, d]``.

    On CUDA one ``scaled_dot_product_attention`` kernel. Elsewhere a batched matmul with the mask and scale folded
    in (``baddbmm``), a softmax and a second matmul: PyTorch's CPU SDPA kernel is blocked for long sequences and
    takes 2.5-4x longer at a decode step's shapes (one query row per head, tens of keys; BENCHMARKS.md section 1).
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
    rope = cache.rope[positions][:, :, None]  # [B, L, 1, 2, d]
    for i, layer in enumerate(layers):
        out = attend(layer, packed[i], i, x, rope, cache, mask)
        if i < len(image_only) and image_only[i]:  # a vision block: only image positions take its output
            out = torch.where(image[..., None], out, x) if torch.is_tensor(image) else (out if image else x)
        x = out
    cache.length += n
    if cache.static:
        cache.slot.add_(n)  # in place: a captured graph advances it on every replay
    return x
