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


def merged_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter merged in (new tensors for adapted weights, views
    of the live ones elsewhere), in the plain model's key order."""
    if not is_adapted(module):
        return module.state_dict()
    inner = base(module)
    out = {k.replace(".base_layer", ""): v for k, v in inner.state_dict().items() if ".lora_" not in k}
    with torch.no_grad():
        for name, layer in inner.named_modules():
            if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
                key = f"{name}.weight"
                out[key] = out[key] + layer.get_delta_weight(ADAPTER).to(out[key].dtype)
    return out
