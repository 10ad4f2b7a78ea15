"""What a reward is: a function ``(images, prompts, metadata) -> list[float | None]``, maybe ``async``.

Why: the registry, the reward worker, the reward service and the evaluator all call rewards;
they share this one definition of the call (and of telling a reward function from a factory), so
the modules that use it need not import each other.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

RewardFn = Callable[[Any, list[str], list[dict]], Any]

def is_reward_function(obj: Any) -> bool:
    """True for ``(images, prompts, metadata)`` callables, False for factories and classes."""
    if inspect.isclass(obj) or not callable(obj):
        return False
    try:
        params = list(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "images"


def call_reward(fn, images, prompts, metadata):
    """Call a reward function, running it to completion if it is ``async``."""
    out = fn(images, prompts, metadata)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    return out


async def _await(awaitable):
    return await awaitable


def judge_device(device: str) -> str:
    """``auto``: the GPU this process was given (a reward actor with ``cluster.reward_gpus`` sees its own as
    device 0; one without sees none), else the CPU; any other value as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
