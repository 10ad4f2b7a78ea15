"""Prompt sources: a built-in world's training prompts, or a file the user brings.

Why: real runs train on prompt sets like X-Omni's, each prompt carrying metadata that some rewards need (``text``
for the OCR judge, ``tags`` to route rewards). ``data.prompts`` names a built-in world (its held-out items
excluded), a ``.txt``, ``.jsonl`` or ``.parquet`` file, or a ``datasets`` folder (docs/rewards.md, "Prompts"; odd
files are refused by ``omnigrpo.config.inputs``). Everything is read and checked on the driver before any worker
starts; a malformed line is an error naming the file and line number, never skipped in silence.
"""

from __future__ import annotations

import json
from pathlib import Path

from omnigrpo.config.inputs import InputFileError, read_input, regular_file
from omnigrpo.worlds.registry import WORLDS, train_prompts


class PromptFileError(ValueError):
    """A prompt source that cannot be read; the message names the file and, where known, the line."""


MAX_PROMPT_CHARS = 16_384
"""Longest prompt accepted: far past any model's prompt positions here, short of a line that is a whole file
(a prompt of megabytes would be tokenised into a sequence no model holds, and allocate its attention)."""


def load_prompts(source: str, look_share: float = 0.0) -> tuple[list[str], list[dict]]:
    """Prompts and their metadata (one dict per prompt) from a world name (``look_share`` of its prompts naming
    their look: ``world.look_share``) or a file (see above)."""
    if source in WORLDS:
        return train_prompts(source, look_share)
    path = Path(source).expanduser()
    if not path.exists():
        raise PromptFileError(f"{source!r} is neither a built-in world ({', '.join(WORLDS)}) "
                              "nor an existing file or directory")
    try:
        if not path.is_dir():  # a datasets directory is read by datasets; anything else must be a regular file
            regular_file(path)
        prompts, metadata = _read(path)
    except InputFileError as err:
        raise PromptFileError(str(err)) from None
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise PromptFileError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts, metadata


def _read(path: Path) -> tuple[list[str], list[dict]]:
    if path.is_dir():
        prompts, metadata = _from_datasets(path)
    elif path.suffix == ".txt":
        prompts, metadata = _from_txt(path)
    elif path.suffix == ".jsonl":
        prompts, metadata = _from_jsonl(path)
    elif path.suffix == ".parquet":
        prompts, metadata = _from_parquet(path)
    else:
        raise PromptFileError(f"{path}: unknown prompt file type {path.suffix!r} (use .txt, .jsonl, .parquet "
                              "or a datasets directory)")
    return prompts, metadata


def _from_txt(path: Path) -> tuple[list[str], list[dict]]:
    # split on "\n" only: str.splitlines would also break prompts at U+2028, form feeds, ...
    lines = [line.strip() for line in _text(path).split("\n")]
    prompts = [_check_length(line, f"{path}:{n}") for n, line in enumerate(lines, start=1)
               if line and not line.startswith("#")]
    return prompts, [{} for _ in prompts]


def _from_jsonl(path: Path) -> tuple[list[str], list[dict]]:
    prompts, metadata = [], []
    for number, line in enumerate(_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        except (ValueError, RecursionError) as err:  # an integer of thousands of digits, nesting past Python's stack
            raise PromptFileError(f"{path}:{number}: not a JSON line omnigrpo reads ({type(err).__name__})") from None
        prompt = _check_row(row, f"{path}:{number}")
        prompts.append(prompt)
        metadata.append({k: v for k, v in row.items() if k != "prompt"})
    return prompts, metadata


def _text(path: Path) -> str:
    return read_input(path).decode("utf-8")


def _from_parquet(path: Path) -> tuple[list[str], list[dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except pa.ArrowException as err:
        raise PromptFileError(f"{path}: not a readable parquet table ({str(err).splitlines()[0]})") from None
    return _from_rows(rows, path)


def _from_datasets(path: Path) -> tuple[list[str], list[dict]]:
    try:
        from datasets import load_from_disk
    except ImportError as err:  # pragma: no cover - datasets is a dependency; this guards odd installs
        raise PromptFileError(f"{path}: reading a datasets directory needs the `datasets` package") from err
    for part in path.rglob("*"):  # each file a regular one of sane size: a FIFO among them would hang the load
        if not part.is_dir():
            try:
                regular_file(part)
            except InputFileError as err:
                raise PromptFileError(str(err)) from None
    try:
        dataset = load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - any failure here means "not a dataset directory"
        raise PromptFileError(f"{path}: not a directory written by datasets' save_to_disk ({err})") from None
    return _from_rows(list(dataset), path)


def _from_rows(rows: list[dict], path: Path) -> tuple[list[str], list[dict]]:
    prompts = [_check_row(row, f"{path} row {i}") for i, row in enumerate(rows)]
    return prompts, [{k: v for k, v in row.items() if k != "prompt"} for row in rows]


def _check_row(row: object, where: str) -> str:
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected an object with a 'prompt' field, got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(f"{where}: missing or empty 'prompt' field")
    tags = row.get("tags")
    if tags is not None and not isinstance(tags, str) and not (
            isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise PromptFileError(f"{where}: 'tags' must be a string or a list of strings, got {tags!r}")
    return _check_length(prompt, where)


def _check_length(prompt: str, where: str) -> str:
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptFileError(f"{where}: a prompt of {len(prompt)} characters, over the limit of {MAX_PROMPT_CHARS}")
    return prompt
