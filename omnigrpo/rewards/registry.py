"""Where reward functions are found: the built-in registry, entry points, or ``module:attr``.

Why: users plug their own judges in without editing omnigrpo, and a run must fail on the driver, before any worker
starts, when a reward cannot be found. A name resolves, in order, to a built-in (:func:`register_reward` refuses
duplicates), an entry point of the group ``omnigrpo.rewards``, a ``package.module:attr`` (imported; a file path is
never executed) or ``url:http://host:port``, a reward service; its kwargs are checked against its signature before
it is built. Built-in judges are imported only when their name is resolved (docs/rewards.md; docs/design.md,
"Layers").
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import site
import sys
import sysconfig
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from omnigrpo.rewards.protocol import RewardFn, is_reward_function

ENTRY_POINT_GROUP = "omnigrpo.rewards"
BUILTIN_JUDGES = {"shapes": "shapes", "shapes_strict": "shapes", "ocr": "ocr", "clip": "clip", "hps": "clip",
                  "aesthetic": "clip", "pickscore": "clip", "vlm_judge": "vlm", "geneval": "geneval",
                  "longtext": "longtext", "glyphs_look": "glyphs_look"}
"""Built-in reward name -> its module under ``omnigrpo.rewards.judges`` (a test holds it to what they register)."""


class RewardNotFound(LookupError):
    """A reward name that no registry, entry point or module resolves."""


class RewardArgumentError(TypeError):
    """Config kwargs that the reward (function or factory) does not take, or required ones missing."""


class Registry:
    """Name -> object, refusing duplicates so two plugins cannot silently shadow each other."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def add(obj: Any) -> Any:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            self._items[name] = obj
            return obj

        return add

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> Any:
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)


REWARDS = Registry("reward")
register_reward = REWARDS.register


def builtin_rewards() -> list[str]:
    """Every built-in reward name, as the judge modules register them (imports them all)."""
    for module in sorted(set(BUILTIN_JUDGES.values())):
        importlib.import_module(f"omnigrpo.rewards.judges.{module}")
    return REWARDS.names()


def resolve_reward(name: str) -> Any:
    """The object a reward name stands for (a reward function or a factory)."""
    if name.startswith("url:"):  # a reward service (omnigrpo serve-reward, or any compatible server)
        from omnigrpo.rewards.service import RemoteReward

        return functools.partial(RemoteReward, name.removeprefix("url:"))
    if name in BUILTIN_JUDGES:
        importlib.import_module(f"omnigrpo.rewards.judges.{BUILTIN_JUDGES[name]}")
        return REWARDS[name]
    if name in REWARDS:  # registered by a plugin module already imported
        return REWARDS[name]
    plugins = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name in plugins:
        return _callable(name, _importing(name, plugins[name].value, plugins[name].load))
    if ":" in name:
        module_name, attr = name.split(":", 1)
        if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
            raise RewardNotFound(
                f"reward {name!r}: file paths are never executed; install the module or put it on "
                f"PYTHONPATH and name it as 'package.module:{attr}'"
            )
        obj: Any = _importing(name, module_name, functools.partial(importlib.import_module, module_name))
        # the lookup runs the module's code too (a module __getattr__, a property): guarded like the import
        return _callable(name, _importing(name, module_name, functools.partial(_attribute, obj, attr, name)))
    builtins = sorted(BUILTIN_JUDGES)
    known = builtins + sorted(plugins)
    near = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    raise RewardNotFound(
        f"unknown reward {name!r}.{hint} Built-ins: {', '.join(builtins)}; entry points "
        f"({ENTRY_POINT_GROUP}): {', '.join(sorted(plugins)) or 'none'}; or a 'package.module:function' string."
    )


def _attribute(obj: Any, attr: str, name: str) -> Any:
    """``obj.a.b`` for ``attr`` ``"a.b"``; RewardNotFound where a part is missing."""
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardNotFound(f"reward {name!r}: module {name.split(':')[0]!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _importing(name: str, module: str, load: Callable[[], Any]) -> Any:
    """``load()``, a plugin's import: whatever it raises at import, ``SystemExit`` included (a plugin that exits
    must not end the run with its status), becomes RewardNotFound naming the module; only an interrupt passes."""
    try:
        return load()
    except RewardNotFound:
        raise
    except ImportError as err:
        raise RewardNotFound(f"reward {name!r}: cannot import module {module!r}: {err}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - a plugin's own failure at import, reported as one line
        raise RewardNotFound(f"reward {name!r}: importing {module!r} failed: {type(err).__name__}: {err}") from None


def _callable(name: str, obj: Any) -> Any:
    """A plugin's object, which must be a reward function or a factory (a ``module:CONSTANT`` is not)."""
    if not callable(obj):
        raise RewardNotFound(f"reward {name!r} resolved to {type(obj).__name__} {obj!r:.80}, which is not callable "
                             "(name a reward function, a factory or a class)")
    return obj


def build_reward(name: str, kwargs: dict[str, Any] | None = None) -> RewardFn:
    """Resolve ``name`` and turn it into a ready reward function (a factory is called here, once).

    The kwargs are checked against the reward's signature first, so a misspelt argument is an error
    naming it, not a ``TypeError`` from deep inside the judge."""
    obj = resolve_reward(name)
    kwargs = dict(kwargs or {})
    if is_reward_function(obj):
        check_arguments(name, obj, kwargs, skip=3)
        return functools.partial(obj, **kwargs) if kwargs else obj
    check_arguments(name, obj, kwargs)
    fn = obj(**kwargs)
    if not callable(fn):
        raise TypeError(f"reward {name!r}: its factory returned {type(fn).__name__}, not a callable")
    return fn


def check_arguments(name: str, obj: Any, kwargs: dict[str, Any], skip: int = 0) -> None:
    """Raise RewardArgumentError unless ``obj`` accepts ``kwargs`` as keywords after its first ``skip``
    positional parameters (the images, prompts and metadata of a reward function)."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    params = list(signature.parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    takes = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(takes))
    if unknown:
        near = difflib.get_close_matches(unknown[0], takes, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise RewardArgumentError(f"reward {name!r} takes no argument {unknown[0]!r}{hint}; it takes: "
                                  f"{', '.join(takes) or 'no arguments'}")
    missing = [p.name for p in params if p.default is p.empty and p.kind is not p.VAR_POSITIONAL
               and p.name not in kwargs]
    if missing:
        raise RewardArgumentError(f"reward {name!r} needs the argument(s) {', '.join(missing)} in its kwargs")


def local_source(name: str) -> Path | None:
    """The ``.py`` file or package directory of a ``module:attr`` reward's top-level module when it is source on
    this machine outside the installed environment (so ``omnigrpo submit`` ships it); None for built-ins, entry
    points, ``url:`` rewards, omnigrpo itself and installed or standard-library modules."""
    if name.startswith("url:") or ":" not in name:
        return None
    top = name.split(":", 1)[0].split(".")[0]
    spec = importlib.util.find_spec(top) if top != "omnigrpo" else None
    if spec is None or not spec.origin or not Path(spec.origin).exists():
        return None  # missing (the preflight reports it), built-in, frozen or a namespace package
    origin = Path(spec.origin).resolve()
    source = origin.parent if spec.submodule_search_locations else origin
    paths = sysconfig.get_paths()
    installed = [*site.getsitepackages(), site.getusersitepackages(), paths["stdlib"], paths["platstdlib"],
                 sys.prefix, sys.base_prefix]
    if any(source.is_relative_to(Path(root).resolve()) for root in installed):
        return None
    return source
