"""A lean decode path for Llama-family decoder layers over a static KV cache: the fast sampler's core.

Why: on small models and at image lengths (hundreds of tokens per sample) HF ``generate`` spends most
of each step outside the matmuls: building masks, growing the cache by concatenation, routing
keyword arguments through every layer. Image sampling needs none of that generality: every row of a
batch advances in lockstep, the number of steps is known in advance, and CFG's two branches are just
more rows. :class:`StaticKV` therefore allocates the whole cache and the whole attention mask once;
:func:`forward_layers` runs the model's *own* modules (norms, projections, MLP, rotary embedding) and
only re-writes the attention glue: write this step's keys/values into the cache in place, then one
``scaled_dot_product_attention`` over the filled prefix. Nothing grows per token.

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
from transformers.models.llama.modeling_llama import rotate_half


class StaticKV:
    """Preallocated keys/values ``[B, H_kv, L_max, D]`` per layer and the key-validity mask ``[B, L_max]``.

    Args:
        layers: the decoder layers the cache serves (their attention modules give head counts).
        batch: rows, CFG branches included.
        max_len: prompt length plus every token the sampler will feed (at least).
        static: decode steps keep fixed shapes (what a CUDA graph needs): the step's slot is the device tensor
            ``slot`` ``[1]`` rather than the Python ``length``, and attention spans all ``max_len`` keys with the
            unfilled ones masked, instead of a prefix that grows by one each step.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, static: bool = False):
        self.keys, self.values = [], []
        for layer in layers:
            attn = layer.self_attn
            kv_heads = attn.k_proj.out_features // attn.head_dim
            shape = (batch, kv_heads, max_len, attn.head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.static = static
        self.slot = torch.zeros(1, dtype=torch.long, device=device)

    def reset(self) -> None:
        """Empty the cache for a new batch of the same shape (stale keys stay, masked as unfilled)."""
        self.valid.zero_()
        self.slot.zero_()
        self.length = 0


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """bool ``[B, 1, L, L]`` attention mask of a left-padded batch (``valid`` ``[B, L]``): causal over valid
    keys, and every query sees itself (padded rows stay finite)."""
    n = valid.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=valid.device)
    causal = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()
    return ((valid[:, None, :] & causal) | eye)[:, None]


def fuse(layers: Sequence[torch.nn.Module], read=getattr,
         repoint: bool = True) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Pack each layer's q/k/v projections and its MLP's gate/up projections into one matrix each, and
    make the modules' own weights views of it: one GEMM instead of three (two), no extra memory, and a
    weight load (``load_state_dict``, the broadcast's in-place receive) writes through the views into
    the packed matrices. Meant for sampling modules (an optimiser stepping the views in place still
    updates the packed matrices, but ZeRO re-points parameters into its own buffers, so a DeepSpeed
    learner never packs: its sampler, under ``cluster.placement: hybrid``, uses :func:`pack_copies`).

    ``read(linear, "weight" | "bias")`` gives a projection's tensor; ``repoint=False`` leaves the modules alone.

    Returns per layer ``(qkv weight [Hq*d + 2*Hkv*d, D], qkv bias or None, gate_up weight [2*I, D],
    head counts (Hq, Hkv, Hkv))``."""
    packed = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        qkv_w = _pack(qkv, "weight", read, repoint)
        qkv_b = _pack(qkv, "bias", read, repoint) if read(attn.q_proj, "bias") is not None else None
        heads = [m.out_features // attn.head_dim for m in qkv]
        packed.append((qkv_w, qkv_b, _pack([mlp.gate_proj, mlp.up_proj], "weight", read, repoint), heads))
    return packed


def pack_copies(layers: Sequence[torch.nn.Module], read=getattr) -> list[tuple]:
    """:func:`fuse`'s packed matrices as fresh copies, leaving the modules' own parameters where they are: for
    sampling with a module an optimiser (DeepSpeed) owns, whose parameters must not be re-pointed.

    ``read`` as in :func:`fuse` (the learner passes one that merges a LoRA adapter). The copies cost the q/k/v
    and gate/up weights once more (``(Hq + 2 Hkv) d D + 2 I D`` elements per layer, about 2/3 of a Llama
    layer); the caller frees them after its sampling phase, as they go stale at the next optimiser step."""
    with torch.no_grad():
        return fuse(layers, read, repoint=False)


def _pack(linears: list[torch.nn.Linear], name: str, read=getattr, repoint: bool = True) -> torch.Tensor:
    whole = torch.cat([read(m, name).detach() for m in linears])
    if repoint:
        for m, part in zip(linears, whole.split([m.out_features for m in linears]), strict=True):
            setattr(m, name, torch.nn.Parameter(part, requires_grad=getattr(m, name).requires_grad))
    return whole


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """The Llama-family RMSNorm of ``norm`` in its own arithmetic (fp32 statistics), without the module call."""
    h = x if x.dtype == torch.float32 else x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * (h if x.dtype == torch.float32 else h.to(x.dtype))


def attend(layer: torch.nn.Module, packed: tuple, index: int, x: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, cache: StaticKV, mask: torch.Tensor) -> torch.Tensor:
    """One decoder layer on ``x`` ``[B, L, D]`` whose keys go to cache slots ``length .. length + L - 1``.

    ``packed``: the layer's entry of :func:`fuse`; ``cos``/``sin``: ``[B, 1, L, d]``; ``mask``: bool
    ``[B, 1, L, length + L]``, True where a query may attend a key, or for a decode step (L = 1) the
    additive float mask ``[B, 1, 1, length + 1]`` (0 or -inf).
    """
    attn, mlp = layer.self_attn, layer.mlp
    qkv_w, qkv_b, gate_up_w, heads = packed
    b, n, _ = x.shape
    d = attn.head_dim
    h = rms_norm(x, layer.input_layernorm)
    q, k, v = F.linear(h, qkv_w, qkv_b).view(b, n, -1, d).transpose(1, 2).split(heads, 1)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    if cache.static and n == 1:  # fixed shapes: the slot is a device tensor, attention spans the whole cache
        cache.keys[index].index_copy_(2, cache.slot, k)
        cache.values[index].index_copy_(2, cache.slot, v)
        keys, values = cache.keys[index], cache.values[index]
    else:
        start, end = cache.length, cache.length + n
        cache.keys[index].narrow(2, start, n).copy_(k)
        cache.values[index].narrow(2, start, n).copy_(v)
        keys, values = cache.keys[index].narrow(2, 0, end), cache.values[index].narrow(2, 0, end)
    if n == 1:  # decode: grouped heads as one matmul each, no copy of the cache per group
        scores = torch.matmul(q.reshape(b, heads[1], -1, d), keys.transpose(-1, -2))
        probs = scores.mul_(attn.scaling).add_(mask).softmax(-1)
        out = torch.matmul(probs, values).view(b, -1, 1, d)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
    x = x + attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
    h = rms_norm(x, layer.post_attention_layernorm)
    gate, up = F.linear(h, gate_up_w).chunk(2, -1)
    return x + mlp.down_proj(mlp.act_fn(gate) * up)


def forward_layers(layers: Sequence[torch.nn.Module], packed: list[tuple], rotary: torch.nn.Module, x: torch.Tensor,
                   positions: torch.Tensor, new_valid: torch.Tensor, cache: StaticKV,
                   image_only: Sequence[bool] = (), image: bool | torch.Tensor = False) -> torch.Tensor:
    """Run ``x`` ``[B, L, D]`` at RoPE ``positions`` ``[B, L]`` through ``layers`` and append it to ``cache``.

    ``new_valid``: bool ``[B, L]``, False for left padding (never attended by later tokens). A padded
    query still attends itself, so its (unused) output stays finite and no NaN reaches the cache.
    ``image_only[i]`` marks X-Omni's vision blocks: they still see (and cache) every token, but only
    image positions take their output; ``image`` says whether the new tokens are image tokens (a bool, or
    bool ``[B, L]`` per position).
    """
    n, start = x.shape[1], cache.length
    end = start + n
    if cache.static and n == 1:  # the slot from the device tensor; every key position, unfilled ones masked
        cache.valid.index_copy_(1, cache.slot, new_valid)
        mask = torch.zeros(cache.valid.shape[0], 1, 1, cache.valid.shape[1], dtype=x.dtype,
                           device=x.device).masked_fill_(~cache.valid[:, None, None, :], float("-inf"))
    elif n == 1:  # a decode step: every filled slot, itself included, is visible
        cache.valid[:, start:end] = new_valid
        mask = torch.zeros(cache.valid.shape[0], 1, 1, end, dtype=x.dtype, device=x.device).masked_fill_(
            ~cache.valid[:, None, None, :end], float("-inf"))
    else:
        cache.valid[:, start:end] = new_valid
        causal = torch.ones(n, end, dtype=torch.bool, device=x.device).tril(start)
        self_key = torch.zeros_like(causal)
        self_key[:, start:] = torch.eye(n, dtype=torch.bool, device=x.device)
        mask = ((cache.valid[:, None, :end] & causal) | self_key)[:, None]  # [B, 1, L, end]
    cos, sin = rotary(x, positions)
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, L, d]: broadcast over heads
    for i, layer in enumerate(layers):
        out = attend(layer, packed[i], i, x, cos, sin, cache, mask)
        if i < len(image_only) and image_only[i]:  # a vision block: only image positions take its output
            out = torch.where(image[..., None], out, x) if torch.is_tensor(image) else (out if image else x)
        x = out
    cache.length = end
    if cache.static:
        cache.slot.add_(n)  # in place: a captured graph advances it on every replay
    return x
