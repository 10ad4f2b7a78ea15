"""``omnigrpo plan``: the GPU memory a config needs, per role and per GPU, before anything is launched.

Why: a 7B policy that does not fit is otherwise found out by an out-of-memory error minutes into a run, after the
cluster started and the weights loaded. Every figure is arithmetic on the config and the checkpoint's
``config.json`` (exact parameter counts from ``omnigrpo.app.sizing``): per learner rank the weights, reference,
gradients, master copy, moments and activations; per rollout actor the weights and KV cache; the judges; the
decoder; then summed per GPU as ``cluster.placement`` places the actors. The formulas, and which of them are checked
against real allocations: docs/memory.md and docs/design.md, "Memory plan".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from omnigrpo.app.sizing import PROMPT_TOKENS, ModelSize, model_size
from omnigrpo.config.roles import Role
from omnigrpo.config.schema import Config, RewardSpec, RolloutConfig
from omnigrpo.rollout.graphs import bucketed
from omnigrpo.rollout.loader import family_record

GIB = 2**30
PIXELS_PER_CODE = 16 * 16
"""Pixels one image code paints (the 16x-downsampling VQ tokenizers of Janus, Emu3 and X-Omni)."""
CONTEXT_GIB = 1.0
"""Per process on a GPU: CUDA context, kernels and allocator slack (not measured here; a common figure)."""
JUDGE_GIB = {"hps": 4.5, "clip": 2.0, "pickscore": 4.5, "aesthetic": 2.0, "vlm_judge": 18.0, "ocr": 0.0,
             "shapes": 0.0, "shapes_strict": 0.0}
"""GPU memory of the built-in judges (weights as loaded plus a batch): HPS v2.1 and PickScore are OpenCLIP
ViT-H-14 (~1 B parameters, fp32); aesthetic and a default CLIP are ViT-L/14; ``vlm_judge`` a Qwen2.5-VL-7B in
bf16; OCR runs on the CPU (onnxruntime). Judges not in the table count 0 unless ``rewards.N.memory_gb`` says."""


@dataclass(frozen=True)
class RoleMemory:
    """What one actor of ``role`` holds on its GPU, in bytes, by component."""

    role: Role
    count: int
    gpus: float
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass(frozen=True)
class GpuLoad:
    """One GPU: which actors share it and what they need together."""

    holds: list[str]
    need: int


@dataclass(frozen=True)
class MemoryPlan:
    size: ModelSize
    roles: list[RoleMemory]
    gpus: list[GpuLoad]
    gpu_bytes: int | None
    """Memory of one GPU (``cluster.gpu_memory_gb``), None when unknown."""
    host_ahead: int = 0
    """Driver host memory for the batches drawn ahead (``trainer.max_staleness``), bytes."""

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else all(g.need <= self.gpu_bytes for g in self.gpus)

    def to_json(self) -> dict:
        return {"model": asdict(self.size), "gpu_memory_bytes": self.gpu_bytes, "fits": self.fits,
                "roles": [{**asdict(r), "total": r.total} for r in self.roles],
                "gpus": [asdict(g) for g in self.gpus], "host_ahead_bytes": self.host_ahead}


def ahead_bytes(max_staleness: int, batch_size: int, size: ModelSize) -> int:
    """Host bytes of the ``trainer.max_staleness`` batches of ``batch_size`` samples the driver holds: per sample
    int64 codes and fp32 log-probs per image token, and the uint8 RGB image."""
    per_sample = size.image_tokens * (8 + 4) + size.image_tokens * PIXELS_PER_CODE * 3
    return max_staleness * batch_size * per_sample


def activation_bytes(cfg: Config, size: ModelSize, prompt_tokens: int = PROMPT_TOKENS) -> int:
    """Activations kept for the backward of one micro-batch: ``rows = micro_batch_size * (2 with CFG)`` sequences
    of ``L = prompt + image tokens``.

    Per token and layer a Llama block keeps about ``7 h + 2 kv + 4 I`` values (norm outputs, q/k/v, attention
    output, residuals; gate, up, their product and activation), ``kv = kv_heads * head_dim``; with
    ``trainer.gradient_checkpointing`` only each layer's input ``h`` is kept, plus one layer recomputed. The
    image head's fp32 logits ``rows * image tokens * K * 4 B`` are kept three times (logits, log-softmax,
    softmax for the entropy)."""
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    rows = cfg.trainer.micro_batch_size * (2 if cfg.rollout.cfg_scale != 1.0 else 1)
    tokens = rows * (prompt_tokens + size.image_tokens)
    per_layer = 7 * size.hidden + 2 * size.kv_heads * size.head_dim + 4 * size.intermediate
    if cfg.trainer.gradient_checkpointing:
        body = tokens * (size.layers * size.hidden + per_layer) * b
    else:
        body = tokens * size.layers * per_layer * b
    return body + 3 * rows * size.image_tokens * size.codes * 4


def learner_memory(cfg: Config, size: ModelSize, prompt_tokens: int = PROMPT_TOKENS) -> dict[str, int]:
    """One learner rank's bytes by component (see the module docstring)."""
    tr, ranks = cfg.trainer, cfg.cluster.learner_workers
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    z = tr.zero_stage
    trainable = size.adapter if tr.lora_rank else size.params
    frozen_and_trained = size.params * b + size.adapter * b
    sharded = (lambda n: -(-n // ranks))  # noqa: E731 - ceil(n / W): DeepSpeed pads partitions
    wraps = z >= 1 or cfg.model.dtype == "bfloat16"
    reference = size.params * b if tr.kl_coef > 0 and not tr.lora_rank else 0
    return {
        "weights": sharded(frozen_and_trained) if z == 3 else frozen_and_trained,
        "reference": sharded(reference) if z == 3 else reference,
        "gradients": sharded(trainable * b) if z >= 2 else trainable * b,
        "master_fp32": (sharded(trainable * 4) if z >= 1 else trainable * 4) if wraps else 0,
        "optimizer": sharded(trainable * 8) if z >= 1 else trainable * 8,
        "activations": activation_bytes(cfg, size, prompt_tokens),
    }


def sampler_rows(rollout: RolloutConfig, samplers: int) -> int:
    """Rows of one sampler call: images per call (``rollout.sample_batch`` or a sampler's share of the step, one
    of ``samplers``), x2 with CFG."""
    share = -(-rollout.batch_size // samplers)
    images = min(rollout.sample_batch, share) if rollout.sample_batch else share
    return images * (2 if rollout.cfg_scale != 1.0 else 1)


def rollout_memory(cfg: Config, size: ModelSize, prompt_tokens: int = PROMPT_TOKENS) -> dict[str, int]:
    """One rollout actor's bytes: weights, the static KV cache, and the step's fp32 image-code logits. With CUDA
    graphs the cache is the one held for the actor's life, its length rounded up to whole attention spans, and the
    graphs' shared pool holds one step's temporaries (counted as a second set of logits)."""
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    rows = sampler_rows(cfg.rollout, cfg.samplers)
    length = prompt_tokens + size.image_tokens
    graphs = cfg.rollout.cuda_graphs
    if graphs:
        length = bucketed(length)
    kv = rows * size.layers * 2 * size.kv_heads * size.head_dim * length * b
    logits = rows * size.codes * 4 * 2
    return {"weights": size.params * b, "kv_cache": kv, "logits": logits, **({"graph pool": logits} if graphs else {})}


def reward_memory(rewards: list[RewardSpec]) -> dict[str, int]:
    """One reward actor's bytes: every judge of ``rewards`` (each actor holds all of them)."""
    out = {}
    for i, spec in enumerate(rewards):
        gib = spec.memory_gb or JUDGE_GIB.get(spec.name, 0.0)
        if spec.name.startswith("url:") or spec.kwargs.get("backend") == "openai":
            gib = spec.memory_gb  # served elsewhere: nothing on this GPU unless stated
        out[f"judge {i}: {spec.name}"] = int(gib * GIB)
    return out


def decoder_memory(family: str) -> dict[str, int]:
    """One decoder actor's bytes: the memory of ``family``'s decoder stage (nothing for a family without one)."""
    decoder = family_record(family).decoder
    return {} if decoder is None else {"decoder": int(decoder.memory_gib * GIB)}


def plan(cfg: Config, prompt_tokens: int = PROMPT_TOKENS) -> MemoryPlan:
    """The memory plan of ``cfg``: per role, then per GPU under ``cluster.placement``."""
    size = model_size(cfg.model, cfg.world, cfg.trainer)
    c = cfg.cluster
    context = int(CONTEXT_GIB * GIB)
    parts = {Role.LEARNER: learner_memory(cfg, size, prompt_tokens),
             Role.ROLLOUT: rollout_memory(cfg, size, prompt_tokens), Role.REWARD: reward_memory(cfg.rewards),
             Role.DECODER: decoder_memory(cfg.model.family)}
    if c.placement == "hybrid":  # each learner rank samples too: the policy once, plus its sampling phase
        sampling = parts.pop(Role.ROLLOUT)
        b = 2 if cfg.model.dtype == "bfloat16" else 4
        packed = size.layers * size.hidden * (size.hidden + 2 * size.kv_heads * size.head_dim + 2 * size.intermediate)
        parts[Role.LEARNER] |= {"sampler kv_cache": sampling["kv_cache"], "sampler logits": sampling["logits"],
                             "sampler packed copy": packed * b,
                             **({"sampler graph pool": sampling["graph pool"]} if "graph pool" in sampling else {})}
    roles = []
    for role in (Role.LEARNER, Role.ROLLOUT, Role.REWARD, Role.DECODER):
        count = cfg.actor_counts[role]
        gpus = getattr(c, f"{role}_gpus")
        if count:
            extra = {"cuda_context": context} if gpus > 0 else {}
            roles.append(RoleMemory(role, count, gpus, {**parts[role], **extra}))
    on_gpu = [r for r in roles if r.gpus > 0]
    if c.placement in ("colocated", "hybrid"):  # bundle i: actor i of every role, on one GPU while it needs <= 1
        width = max((r.count for r in on_gpu), default=0)
        gpus = [GpuLoad([f"{r.role} {i}" for r in on_gpu if i < r.count],
                        sum(r.total for r in on_gpu if i < r.count)) for i in range(width)]
    else:  # split: an actor with g < 1 GPU shares its GPU with floor(1 / g) - 1 others of its role
        gpus = []
        for r in on_gpu:
            per_gpu = max(1, min(r.count, int(1 / r.gpus + 1e-9))) if r.gpus < 1 else 1
            gpus.append(GpuLoad([f"{r.role} x{per_gpu}"], r.total * per_gpu))
    known = int(c.gpu_memory_gb * GIB) if c.gpu_memory_gb else None
    return MemoryPlan(size, roles, gpus, known, ahead_bytes(cfg.trainer.max_staleness, cfg.batch_size, size))


def render(p: MemoryPlan) -> str:
    """The plan as a table: one column per role (bytes per actor), then one line per distinct GPU load."""
    small = max((r.total for r in p.roles), default=0) < GIB  # the built-in worlds: MiB
    unit, scale = ("MiB", 2**20) if small else ("GiB", GIB)
    gib = lambda n: f"{n / scale:8.2f}"  # noqa: E731
    names = [f"{r.role} x{r.count}" for r in p.roles]
    keys = list(dict.fromkeys(k for r in p.roles for k in r.parts))
    s = p.size
    lines = [f"model: {s.params / 1e9:.3f} B parameters ({s.layers} layers, hidden {s.hidden}, {s.kv_heads} kv heads "
             f"x {s.head_dim}, MLP {s.intermediate}), {s.image_tokens} image tokens of {s.codes} codes"
             + (f", LoRA {s.adapter / 1e6:.1f} M trainable" if s.adapter else ""),
             "", f"{unit} per actor".ljust(24) + "".join(f"{n:>16}" for n in names)]
    for k in keys:
        lines.append(k.ljust(24) + "".join(f"{gib(r.parts[k]):>16}" if k in r.parts else f"{'':>16}"
                                           for r in p.roles))
    lines.append("total".ljust(24) + "".join(f"{gib(r.total):>16}" for r in p.roles))
    lines.append("")
    have = f"{p.gpu_bytes / GIB:.1f} GiB" if p.gpu_bytes else "unknown (set cluster.gpu_memory_gb)"
    lines.append(f"per GPU (GPU memory: {have}):")
    seen = set()
    for g in p.gpus:
        label = " + ".join(h.rsplit(" ", 1)[0] if h[-1].isdigit() else h for h in g.holds)
        if (label, g.need) in seen:
            continue
        seen.add((label, g.need))
        verdict = "" if p.gpu_bytes is None else ("  fits" if g.need <= p.gpu_bytes else "  DOES NOT FIT")
        lines.append(f"  {label:<40}{gib(g.need)} {unit}{verdict}")
    if not p.gpus:
        lines.append("  no role has a GPU (cluster.*_gpus = 0): nothing to check")
    if p.host_ahead:
        lines.append(f"driver host memory for the batches drawn ahead (trainer.max_staleness): "
                     f"{p.host_ahead / 2**20:.1f} MiB")
    return "\n".join(lines)


def shortfalls(p: MemoryPlan) -> list[str]:
    """One line per GPU load that exceeds the GPU, naming the roles, what they need and the largest parts."""
    out = []
    if p.gpu_bytes is None:
        return out
    for g in p.gpus:
        if g.need <= p.gpu_bytes:
            continue
        label = " + ".join(g.holds)
        roles = {r.role: r for r in p.roles}
        biggest = max((roles[h.split(" ")[0]] for h in g.holds), key=lambda r: r.total)
        top = sorted(biggest.parts.items(), key=lambda kv: -kv[1])[:3]
        out.append(f"cluster.gpu_memory_gb: a GPU holding {label} needs {g.need / GIB:.1f} GiB but has "
                   f"{p.gpu_bytes / GIB:.1f} GiB (largest: {biggest.role} {biggest.total / GIB:.1f} GiB: "
                   + ", ".join(f"{k} {v / GIB:.1f}" for k, v in top) + "); see omnigrpo plan")
    return list(dict.fromkeys(out))
