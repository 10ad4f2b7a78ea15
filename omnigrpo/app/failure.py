"""How a run that ends on a fault tells its user: one line, with what it saved, and the traceback in a file.

Why: a fault deep in a cluster (a full disk, an actor dead past ``cluster.max_restarts``) surfaces as a chain
of remote errors whose tracebacks say little to someone who only needs to know what broke, what was saved and
how to continue. :class:`RunFailed` carries that one line; the CLI prints it as ``omnigrpo:`` and exits 1,
and the whole traceback goes to ``<run.dir>/failure.log``.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """A run ended by a fault after writing what it could; ``str()`` is the line its user reads."""


class CheckpointFailed(RuntimeError):
    """A checkpoint could not be written (the disk is full, a quota, a lost mount); the newest whole one stands."""


def cause(err: BaseException) -> BaseException:
    """The error an actor raised, rather than Ray's wrapper around it."""
    return getattr(err, "cause", None) or err


def describe(err: BaseException) -> str:
    """One line for ``err``: an OSError's path and reason, another error's type and first line."""
    err = cause(err)
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror} (errno {err.errno})"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, RunFailed | CheckpointFailed) or type(err).__name__ == "RoleLost":
        return first  # written for the user already
    return f"{type(err).__name__}: {first[:300]}" if first else type(err).__name__


def reason(err: BaseException) -> str:
    """``err`` in a few words: an OSError's reason alone (its path is said elsewhere), else :func:`describe`."""
    return getattr(cause(err), "strerror", None) or describe(err)


def failure_log(run_dir: Path, err: BaseException) -> str:
    """Write ``err``'s whole traceback to ``run_dir/failure.log``; returns where it went (or why it did not)."""
    path = run_dir / "failure.log"
    try:
        path.write_text("".join(traceback.format_exception(err)))
    except OSError as failed:
        return f"the traceback could not be written ({reason(failed)})"
    log.debug("run failed", exc_info=err)
    return f"traceback in {path}"


def failed(err: BaseException, step: int, stage: str, saved: str, run_dir: Path) -> RunFailed:
    """The :class:`RunFailed` for ``err`` raised at ``step`` (while ``stage`` ran), after ``saved`` was written."""
    return RunFailed(f"the run failed at step {step} ({stage}): {describe(err)}; {saved}; "
                     f"{failure_log(run_dir, err)}")


def starting_failed(err: BaseException, run_dir: Path) -> str:
    """The line for ``err`` raised while a run started (before its first step: nothing was saved)."""
    return f"the run failed while starting: {describe(err)}; nothing was saved; {failure_log(run_dir, err)}"
