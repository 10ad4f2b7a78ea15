"""What a reward is: a function ``(images, prompts, metadata) -> list[float | None]``, maybe ``async``.

Why: the registry, the reward worker, the reward service and the evaluator all call rewards;
they share this one definition of the call, of telling a reward function from a factory, and of what
counts as a score (:func:`is_score`), so the modules that use it need not import each other.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

RewardFn = Callable[[Any, list[str], list[dict]], Any]
FLOAT32_MAX = 3.4028234663852886e38
"""``numpy.finfo(numpy.float32).max``: the learner computes in float32."""


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
    """Call a reward function, running it to completion if it is ``async``. A judge that calls ``sys.exit`` (or
    raises any other BaseException but KeyboardInterrupt) raises RuntimeError instead: its failure is the
    reward's, not the end of the process, or the server thread, that called it."""
    try:
        out = fn(images, prompts, metadata)
        if inspect.isawaitable(out):
            out = asyncio.run(_await(out))
    except SystemExit as err:
        raise RuntimeError(f"the reward called exit({err.code!r})") from None
    except (KeyboardInterrupt, Exception):
        raise
    except BaseException as err:  # GeneratorExit or a class of the judge's own: a failure, not the caller's end
        raise RuntimeError(f"the reward raised {type(err).__name__}: {err}") from None
    return out


def is_score(value: object) -> bool:
    """Is ``value`` a real number that stays finite in float32, where the learner computes with it? A bool
    (Python's or NumPy's), a complex number or a string is not a score and is never coerced into one; 1e39 is
    finite in float64 but infinite after ``.float()``, and would stop learning without failing anything.

    >>> [is_score(v) for v in (0.5, 3, True, 1j, "1", float("nan"), 1e39)]
    [True, True, False, False, False, False, False]
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):  # numpy.bool_ is not a numbers.Real
        return False
    try:
        as_float = float(value)
    except Exception:  # noqa: BLE001 - a Python int past float64, a number whose __float__ raises
        return False
    return math.isfinite(as_float) and abs(as_float) <= FLOAT32_MAX


async def _await(awaitable):
    return await awaitable


def judge_device(device: str) -> str:
    """``auto``: the GPU this process was given (a reward actor with ``cluster.reward_gpus`` sees its own as
    device 0; one without sees none), else the CPU; any other value as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
