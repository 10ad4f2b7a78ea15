"""The benchmark prompt sets shipped with omnigrpo, and a seeded train / held-out split by prompt.

Why: GenEval and LongText-Bench are the yardsticks papers report, so their prompt files travel inside the
package (``omnigrpo/data/benchmarks/``, unchanged, with their licences; ``SOURCES.md`` there cites them) and
load like any JSONL prompt file: each row's fields other than ``prompt`` are its metadata. A run that trains
on part of a prompt set keeps the rest out with :func:`split`, which depends on the prompts and a seed only,
so every process and every run with that seed holds out the same prompts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omnigrpo.data.prompts import load_prompts

FOLDER = Path(__file__).parent / "benchmarks"
BENCHMARKS: dict[str, str] = {
    "geneval": "geneval/evaluation_metadata.jsonl",
    "longtext": "longtext/text_prompts.jsonl",
    "longtext-zh": "longtext/text_prompts_zh.jsonl",
}
"""Benchmark name -> its prompt file under :data:`FOLDER`."""

Prompts = tuple[list[str], list[dict]]
"""Prompts and their metadata (one dict per prompt), the form every prompt source gives."""


def benchmark_file(name: str) -> Path:
    """The shipped prompt file of a benchmark (a path ``data.prompts`` may name)."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return FOLDER / BENCHMARKS[name]


def load_benchmark(name: str) -> Prompts:
    """A benchmark's prompts and metadata (each JSON row without its ``prompt``), in file order.

    >>> prompts, metadata = load_benchmark("longtext")
    >>> len(prompts), sorted(metadata[0])
    (160, ['category', 'length', 'prompt_id', 'text', 'text_length'])
    """
    return load_prompts(str(benchmark_file(name)))


def split(prompts: list[str], metadata: list[dict], held_out_share: float, seed: int) -> tuple[Prompts, Prompts]:
    """``(train, held_out)``: ``round(held_out_share * U)`` of the U distinct prompts held out, each side in
    the input's order.

    Each distinct prompt is ranked by a hash of the seed and its text (not Python's salted ``hash``), so the
    split is the same in every process, and repeats of a prompt always land on the same side.
    """
    if not 0.0 <= held_out_share < 1.0:
        raise ValueError(f"held_out_share must be in [0, 1), got {held_out_share}")
    if len(prompts) != len(metadata):
        raise ValueError(f"{len(prompts)} prompts but {len(metadata)} metadata rows")
    distinct = list(dict.fromkeys(prompts))
    ranked = sorted(distinct, key=lambda p: hashlib.blake2b(f"{seed}\0{p}".encode(), digest_size=16).digest())
    held = set(ranked[: round(held_out_share * len(distinct))])
    if distinct and len(held) == len(distinct):
        raise ValueError(f"held_out_share {held_out_share} of {len(distinct)} prompts leaves none to train on")
    train: Prompts = ([], [])
    held_out: Prompts = ([], [])
    for prompt, meta in zip(prompts, metadata, strict=True):
        side = held_out if prompt in held else train
        side[0].append(prompt)
        side[1].append(meta)
    return train, held_out
