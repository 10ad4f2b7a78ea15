"""LoRA for the learner (peft), and the merged weights the rollouts receive.

Why: RL-tuning a 7B policy with full AdamW state needs ~16 bytes per parameter on the learners; a LoRA adapter
trains a fraction of a percent of them. The rollouts still sample from one plain model: after every update the
learner sends **merged** weights (``W + B A * alpha / r`` under the plain model's names), so rollout actors need no
peft, and sync, checksums and checkpoints work as without LoRA; the price is that each sync moves the whole model.
Checkpoints hold the merged policy and the adapter under ``adapter/`` (docs/families.md).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

ADAPTER = "default"


def wrap(model: torch.nn.Module, body: torch.nn.Module, rank: int, alpha: float, targets: list[str]) -> (
        torch.nn.Module):
    """``model`` with LoRA adapters of ``rank`` on the modules *of its image-generating body* whose name ends
    in one of ``targets`` (not, e.g., Janus's understanding-side SigLIP encoder, which has ``q_proj`` too);
    only the adapters are trainable. No dropout: the learner's log-probs must be the sampled distribution."""
    prefix = next(name for name, module in model.named_modules() if module is body)
    names = [n for n, _ in model.named_modules() if n.startswith(f"{prefix}.") and n.rsplit(".", 1)[-1] in targets]
    if not names:
        raise ValueError(f"trainer.lora_targets {targets} match no module of the policy's body ({prefix})")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none")
    return get_peft_model(model, config)


def is_adapted(module: torch.nn.Module) -> bool:
    return hasattr(module, "peft_config")


def base(module: torch.nn.Module) -> torch.nn.Module:
    """The family model inside a peft wrapper (its submodules carry the adapters), or ``module`` itself."""
    return module.base_model.model if is_adapted(module) else module


def base_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict of a peft ``module`` with its adapters left out (the base weights, views of
    the live ones), in the plain model's key order and names."""
    return {k.replace(".base_layer", ""): v for k, v in base(module).state_dict().items() if ".lora_" not in k}


def _adapted(module: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    """``(name, layer)`` of every layer of ``module`` that carries the adapter."""
    return [(name, layer) for name, layer in base(module).named_modules()
            if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A]


def merged_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter merged in (new tensors for adapted weights, views
    of the live ones elsewhere), in the plain model's key order."""
    if not is_adapted(module):
        return module.state_dict()
    out = base_state_dict(module)
    with torch.no_grad():
        for name, layer in _adapted(module):
            key = f"{name}.weight"
            out[key] = out[key] + layer.get_delta_weight(ADAPTER).to(out[key].dtype)
    return out


@torch.no_grad()
def merge_and_restart(module: torch.nn.Module, optimizer) -> None:
    """Fold every adapter of ``module`` into its base weight (``W += B A * alpha / r``, as :func:`merged_state_dict`
    computes it) and restart it at zero: ``B = 0``, ``A`` kept, the ``optimizer``'s state reset.

    Why: the adapted model computes what it did (its adapters now add exactly 0), while "adapters off" is that
    model, not the start policy: the KL reference refreshed without a second copy of the weights. ``B`` is zeroed
    in the module and in the optimiser's fp32 master copy (DeepSpeed's ZeRO and bf16 optimisers keep one, which
    would write the old ``B`` back at the next step); the optimiser trains the adapters only, so all of its state
    is theirs, and it restarts as a fresh AdamW does (zero moments, step 0)."""
    from deepspeed.utils import safe_set_full_fp32_param

    for _, layer in _adapted(module):
        weight = layer.base_layer.weight
        weight += layer.get_delta_weight(ADAPTER).to(weight.dtype)
        restarted = layer.lora_B[ADAPTER].weight
        restarted.zero_()
        safe_set_full_fp32_param(restarted, torch.zeros_like(restarted, dtype=torch.float32))
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO / bf16 wrappers hold torch's AdamW
    for state in inner.state.values():
        for key, value in state.items():  # in place: DeepSpeed holds views of these tensors
            if torch.is_tensor(value):
                value.zero_()
            else:
                state[key] = type(value)(0)
