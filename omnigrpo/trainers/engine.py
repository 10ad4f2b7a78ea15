"""What a learner rank's DeepSpeed engine is built from: its config, a dropout-free model, the gradient norm.

Why apart from ``learner``: these are pure functions of the run config and a module, testable (and doctested)
without a process group or an engine.
"""

from __future__ import annotations

import torch

from omnigrpo.config.schema import TrainerConfig


def deepspeed_config(trainer: TrainerConfig, batch_size: int, dtype: str, world_size: int) -> dict:
    """The DeepSpeed config of a learner rank (one of ``world_size``): micro-batches accumulate to the rank's
    share of a mini-batch of the step's ``batch_size`` samples; ``dtype`` is ``model.dtype``.

    >>> ds = deepspeed_config(TrainerConfig(mini_batches=2, micro_batch_size=8), 64, "float32", 2)
    >>> ds["gradient_accumulation_steps"], ds["zero_optimization"], ds["bf16"]
    (2, {'stage': 2}, {'enabled': False})
    """
    mini = batch_size // trainer.mini_batches // world_size
    return {
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": mini // trainer.micro_batch_size,
        "gradient_clipping": trainer.max_grad_norm,
        "zero_optimization": {"stage": trainer.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bfloat16"},
        "steps_per_print": 10**9,
    }


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Zero every ``nn.Dropout`` and every attention module's ``attention_dropout`` (as TRL does for RL)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def skip_shared_memory_allreduce(ops) -> None:
    """Mark DeepSpeed's CPU shared-memory all-reduce op (``deepspeed.ops``'s ``deepspeed_shm_comm``) unavailable.

    Why: its CPU communication backend compiles that op with g++ at the first process group of a machine (tens
    of seconds on two cores, BENCHMARKS.md section 8), yet only DeepSpeed's inference all-reduce uses it; a
    learner's gradients and gathers go through gloo either way. DeepSpeed keeps the probed list in one module-level
    dict for edits like this one.
    """
    ops.__compatible_ops__["deepspeed_shm_comm"] = False


def load_weights_only(engine) -> None:
    """Make a DeepSpeed ``engine`` read its checkpoints with ``weights_only=True``: its own checkpoint engine
    unpickles them with ``weights_only=False``, which runs whatever code a planted file carries."""
    from omnigrpo.trainers.checkpoint import load_state

    engine.checkpoint_engine.load = load_state  # every model and ZeRO state file DeepSpeed reads comes through here
