"""TRL's ``GRPOTrainer`` on a built-in world: the baseline omnigrpo's own GRPO is compared to.

Why: "faster than TRL" or "learns like TRL" only means something if TRL runs the same experiment: the same starting
weights, prompts per step, group size, reward on decoded pixels, lr, k3 KL ``beta`` and temperature, with every
other TRL setting frozen in ``trl_settings.yaml`` beside this file. It must also sample the same *distribution*:
TRL knows nothing of images, so its LM head (and its reference's) gets a constant bias that leaves only the image
codes possible, and every completion is a whole image. docs/bench.md says why a bias and not a forward hook.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from transformers import PreTrainedModel, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from omnigrpo.rollout.families.builtin import WorldPolicy
from omnigrpo.rollout.policy import ImageSpace

NON_IMAGE_LOGIT = -1e4  # exp() of it (minus any realistic logit) is exactly 0 in fp32
SETTINGS_PATH = Path(__file__).with_name("trl_settings.yaml")


HARNESS_KEYS = ("torch_threads",)
"""Keys of ``trl_settings.yaml`` that set up TRL's process rather than its GRPOConfig."""


def frozen_settings() -> dict[str, object]:
    """The GRPOConfig fields the baseline does not derive from the omnigrpo config (``trl_settings.yaml``)."""
    settings = yaml.safe_load(SETTINGS_PATH.read_text(encoding="utf-8"))
    return {k: v for k, v in settings.items() if k not in HARNESS_KEYS}


def harness_settings() -> dict[str, object]:
    """How TRL's process is set up (``torch_threads``: 0 = torch's own default, as a user's process gets)."""
    settings = yaml.safe_load(SETTINGS_PATH.read_text(encoding="utf-8"))
    return {k: settings[k] for k in HARNESS_KEYS}


def grpo_args(derived: dict[str, object]) -> GRPOConfig:
    """TRL's configuration: the frozen settings plus ``derived``; a field set by both is an error, not a choice."""
    frozen = frozen_settings()
    both = sorted(set(frozen) & set(derived))
    if both:
        raise ValueError(f"{SETTINGS_PATH.name} sets {', '.join(both)}, which the benchmark derives from the config")
    return GRPOConfig(**derived, **frozen)


def held(args: GRPOConfig, names: list[str]) -> dict[str, object]:
    """The values ``args`` holds for ``names``, as plain data (TRL turns some strings into enums)."""
    return {n: (v.value if isinstance(v := getattr(args, n), Enum) else v) for n in names}


def restrict_to_image_codes(model: PreTrainedModel, space: ImageSpace) -> None:
    """Give ``model``'s LM head a fixed bias that leaves only image codes possible (in place)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("the policy's LM head already has a bias")
    bias = torch.full((head.weight.shape[0],), NON_IMAGE_LOGIT, dtype=head.weight.dtype, device=head.weight.device)
    bias[space.offset : space.offset + space.num_codes] = 0.0
    del head.bias  # nn.Linear(bias=False) registers ``bias`` as a None parameter
    head.register_buffer("bias", bias, persistent=False)


class _Recorder(TrainerCallback):
    """Per-step mean reward from TRL's logs, and wall-clock marks of training."""

    def __init__(self):
        self.rewards: list[float] = []
        self.logs: list[dict] = []
        self.marks: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks["begin"] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.setdefault("first_step", time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        self.marks["end"] = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.rewards.append(float(logs["reward"]))
            self.logs.append({k: v for k, v in logs.items() if isinstance(v, int | float)})


Reward = Callable[[object, list[str], list[dict]], list[float | None]]


def _image_reward(policy: WorldPolicy, judge: Reward, audit: dict[str, int]):
    """TRL reward function: completion ids -> codes -> images -> ``judge`` on the raw prompts."""
    space = policy.space
    lo, hi = space.offset, space.offset + space.num_codes

    def image_reward(prompts, completions, completion_ids, raw_prompt, metadata, **kwargs):
        bad = [sum(not lo <= t < hi for t in ids) + abs(len(ids) - space.tokens_per_image) for ids in completion_ids]
        audit["max_non_image_tokens"] = max(audit["max_non_image_tokens"], *bad)
        audit["completions"] += len(completion_ids)
        out: list[float | None] = [None] * len(completion_ids)
        ok = [i for i, b in enumerate(bad) if b == 0]  # a malformed image is unscorable, as in omnigrpo
        if ok:
            codes = torch.tensor([completion_ids[i] for i in ok]) - lo
            images = policy.decode(codes)
            scores = judge(images, [raw_prompt[i] for i in ok], [json.loads(metadata[i]) for i in ok])
            for i, s in zip(ok, scores, strict=True):
                out[i] = s
        return out

    return image_reward


def run_trl_grpo(policy_dir: str, prompts: list[str], metadata: list[dict], judge: Reward, steps: int,
                 prompts_per_step: int, group_size: int, lr: float, beta: float, temperature: float, seed: int,
                 out_dir: str, threads: int | None = None, micro_batch_size: int | None = None) -> dict:
    """Run TRL GRPO from ``policy_dir`` for ``steps`` optimiser steps; write and return its summary.

    Args:
        prompts, metadata: the training prompts and what rewards receive with them.
        judge: ``judge(images, prompts, metadata) -> scores`` on uint8 images ``[N, H, W, 3]`` (None: unscored).
        micro_batch_size: completions per forward/backward pass (gradient accumulation fills the step);
            default: the whole step's ``prompts_per_step * group_size`` at once.

    Returns:
        ``steps``, ``samples``, ``wall_s`` (training only, no loading), ``first_step_s``, ``samples_per_s``,
        ``reward_first``, ``reward_last``, ``reward_curve`` (mean reward of each step's batch, drawn before its
        update), ``param_delta`` (L2 norm of the weight change), ``max_non_image_tokens`` (0: every
        completion was exactly one image's codes), ``logs`` (TRL's per-step metrics), ``args`` (every
        GRPOConfig field set, as the trainer held it after training) and the settings.
    """
    if threads:
        torch.set_num_threads(threads)
    batch = prompts_per_step * group_size
    micro = micro_batch_size or batch
    if batch % micro:
        raise ValueError(f"micro_batch_size {micro} does not divide the step's {batch} completions")
    if prompts_per_step > len(prompts):
        raise ValueError(f"prompts_per_step {prompts_per_step} > {len(prompts)} training prompts")

    policy = WorldPolicy.from_pretrained(policy_dir)
    restrict_to_image_codes(policy.model, policy.space)
    start = [p.detach().clone() for p in policy.model.parameters()]
    dataset = Dataset.from_dict({
        "prompt": [policy.prompt_text(p) for p in prompts],  # the text WorldPolicy.prompt_batch tokenises
        "raw_prompt": prompts,
        "metadata": [json.dumps(m) for m in metadata],
    })
    derived = {  # one optimiser step = one generation batch of prompts_per_step groups, consumed once
        "output_dir": out_dir, "max_steps": steps, "seed": seed, "data_seed": seed, "learning_rate": lr, "beta": beta,
        "temperature": temperature, "num_generations": group_size, "generation_batch_size": batch,
        "per_device_train_batch_size": micro, "gradient_accumulation_steps": batch // micro,
        "max_completion_length": policy.space.tokens_per_image,
    }
    args = grpo_args(derived)
    audit = {"max_non_image_tokens": 0, "completions": 0}
    recorder = _Recorder()
    trainer = GRPOTrainer(model=policy.model, reward_funcs=_image_reward(policy, judge, audit), args=args,
                          train_dataset=dataset, processing_class=policy.tokenizer, callbacks=[recorder])
    if trainer.ref_model is not None:  # TRL reloads the reference from the checkpoint directory
        restrict_to_image_codes(trainer.ref_model, policy.space)
    trainer.train()

    wall = recorder.marks["end"] - recorder.marks["begin"]
    samples = steps * batch
    with torch.no_grad():
        delta = sum(float((p.detach() - s).pow(2).sum()) for p, s in zip(policy.model.parameters(), start, strict=True))
    result = {
        "trainer": "trl", "policy_dir": str(policy_dir), "prompts_per_step": prompts_per_step,
        "group_size": group_size, "micro_batch_size": micro, "lr": lr, "beta": beta, "temperature": temperature,
        "seed": seed, "threads": torch.get_num_threads(), "steps": steps, "samples": samples, "wall_s": wall,
        "first_step_s": recorder.marks["first_step"] - recorder.marks["begin"], "samples_per_s": samples / wall,
        "reward_first": recorder.rewards[0], "reward_last": recorder.rewards[-1],
        "reward_curve": recorder.rewards, "param_delta": delta**0.5, **audit, "logs": recorder.logs,
        "args": held(trainer.args, sorted({*derived, *frozen_settings()} - {"output_dir"})),
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "trl_grpo.json").write_text(json.dumps(result, indent=2))
    return result
