"""The ``omnigrpo`` command line: every sub-command's arguments, help and examples.

Why apart from the commands: the whole surface a user types reads in one place, and building the parser (for
``--help`` or a usage error) imports nothing heavy.
"""

from __future__ import annotations

import argparse
import sys
import typing

from omnigrpo import __version__
from omnigrpo.config import options
from omnigrpo.rewards.admission import Limits

EPILOG = """examples:
  omnigrpo train configs/shapes.yaml
  omnigrpo train configs/shapes.yaml trainer.steps=10 rollout.group_size=4 run.dir=runs/try
  omnigrpo train configs/shapes.yaml --check      # validate and print the resolved config
  omnigrpo sft configs/shapes.yaml                # only build (or find) the SFT start checkpoint
  omnigrpo eval configs/glyphs.yaml --checkpoint runs/glyphs/checkpoints/RUN/step-300
  omnigrpo eval configs/glyphs.yaml --checkpoint CKPT --prompts longtext.txt   # + OCR word recall
  omnigrpo bench configs/shapes.yaml --parts rollout,rewards,sync,trl
  omnigrpo bench configs/shapes.yaml --parts trl --modes colocated,hybrid --rounds 3   # vs TRL, alternating
  omnigrpo submit configs/shapes.yaml --address http://HEAD:8265 run.dir=/shared/runs/a  # then status/logs/stop
  omnigrpo plan configs/janus_pro_7b.yaml cluster.gpu_memory_gb=80   # GPU memory per role and per GPU
  omnigrpo curves configs/glyphs.yaml --out docs/glyphs.png        # reward, exact match, styles, KL, diversity
  omnigrpo tiny janus /tmp/janus-tiny && omnigrpo train configs/janus_pro_1b.yaml model.path=/tmp/janus-tiny ...
  omnigrpo serve-reward ocr score=recall --port 8765   # then rewards: [{name: "url:http://127.0.0.1:8765"}]
"""


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in the same ``omnigrpo:`` form as every other bad input."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"omnigrpo: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The ``omnigrpo`` parser: each group of sub-commands added by its own function below."""
    parser = Parser(
        prog="omnigrpo",
        description="GRPO fine-tuning of discrete autoregressive image generators (Ray, DeepSpeed, MLflow).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"omnigrpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_run_commands, _eval_command, _measure_commands, _job_commands, _tool_commands):
        add(sub)
    return parser


def _run_commands(sub: argparse._SubParsersAction) -> None:
    """``train`` and ``sft``."""
    for name, text in [("train", "run GRPO on a config"), ("sft", "train or reuse the SFT start checkpoint")]:
        p = sub.add_parser(name, help=text, description=text)
        config_arguments(p, "YAML config file")
        p.add_argument("--check", action="store_true", help="validate, print the resolved config, exit")
        if name == "sft":
            p.add_argument("--force", action="store_true", help="train again and replace a cached SFT checkpoint")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="same as run.resume=true")


def _eval_command(sub: argparse._SubParsersAction) -> None:
    text = "score a checkpoint on held-out prompts, a prompt file or a benchmark (GenEval, LongText-Bench)"
    p = sub.add_parser("eval", help=text, description=text)
    config_arguments(p, "YAML config file (world, rewards, sampling settings)")
    p.add_argument("--checkpoint", default="",
                   help="policy directory (SFT or a run's checkpoints/...); default model.path with --benchmark")
    p.add_argument("--prompts", default="", help="prompt file instead of the world's held-out prompts")
    p.add_argument("--benchmark", default="", choices=["", "geneval", "longtext", "longtext-zh"],
                   help="run a benchmark's published protocol with its judge (docs/evaluation.md)")
    p.add_argument("--limit", type=options.count(0), default=0,
                   help="with --benchmark: this many prompts, taken in turn from every tag or category (0 = all)")
    p.add_argument("--held-out", action="store_true",
                   help="with --benchmark: only the prompts the config's data.held_out_share keeps out of training")
    p.add_argument("--samples", type=options.count(0), default=0,
                   help="images per prompt, the N of the pass@k metrics (default eval.samples_per_prompt; "
                        "with --benchmark the protocol's: 4 for GenEval, 1 for LongText-Bench)")
    p.add_argument("--out", default="", help="report path (default <run.dir>/eval/<checkpoint name>.json)")
    p.add_argument("--force", action="store_true", help="write over an existing report")


def _measure_commands(sub: argparse._SubParsersAction) -> None:
    """``bench``, ``plan`` and ``curves``: what a config costs and what a run logged."""
    text = "benchmarks side by side: sampler vs HF generate, GRPO (in each mode) vs TRL, weight sync, rewards"
    p = sub.add_parser("bench", help=text, description=text)
    config_arguments(p, "YAML config file (the model, prompts and rewards benchmarked)")
    p.add_argument("--parts", default="rollout,rewards,sync,trl", help="comma-separated subset to run")
    p.add_argument("--steps", type=options.count(1), default=20, help="GRPO steps of each run in the TRL comparison")
    p.add_argument("--rounds", type=options.count(1), default=3,
                   help="TRL comparison: rounds, each running omnigrpo in every mode and then TRL (median reported)")
    p.add_argument("--modes", default="", help="TRL comparison: comma-separated omnigrpo modes, e.g. colocated,hybrid "
                                               "(default: the config's cluster.placement; an unknown one lists all)")
    p.add_argument("--repeats", type=options.count(1), default=3,
                   help="timed repeats per measurement of the other parts (median)")
    p.add_argument("--out", default="", help="JSON path (default <run.dir>/bench.json); rewritten by each run")
    text = "print the GPU memory a config needs per role and per GPU (from the checkpoint's config.json only)"
    p = sub.add_parser("plan", help=text, description=text)
    config_arguments(p, "YAML config file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--prompt-tokens", type=options.count(1), default=64,
                   help="prompt tokens assumed per sample (default 64)")
    text = "export a run's metric curves from its MLflow store as a PNG"
    p = sub.add_parser("curves", help=text, description=text)
    config_arguments(p, "YAML config file of the run (locates its MLflow store and experiment)")
    p.add_argument("--run-id", default="", help="MLflow run id (default: the experiment's newest training run)")
    p.add_argument("--keys", default=None,
                   help="comma-separated metric keys, one panel each; a+b overlays a and b in one panel (default: "
                        "reward, the held-out headline, style entropy per attribute where the world reads styles, "
                        "KL, group diversity)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--force", action="store_true", help="write over an existing file")


def _job_commands(sub: argparse._SubParsersAction) -> None:
    """``submit`` and the commands that follow a submitted job (``status``, ``logs``, ``stop``)."""
    address_help = "Ray dashboard address (default $RAY_ADDRESS, else http://127.0.0.1:8265)"
    timeout_help = "seconds to wait for each answer of the Ray Jobs API (default 30)"
    text = "submit a run to a Ray cluster through its Jobs API; lists what it uploads, then prints the job id"
    p = sub.add_parser("submit", help=text, description=text)
    config_arguments(p, "YAML config file (validated here, then shipped with the package source)")
    p.add_argument("--dry-run", action="store_true", help="check and list what would be uploaded; send nothing")
    p.add_argument("--address", default="", help=address_help)
    p.add_argument("--job-id", default=None, help="submission id to use (default: Ray picks one)")
    p.add_argument("--timeout", type=options.finite(0, above=True), default=30.0, help=timeout_help)
    for name, text in [("status", "print a submitted run's status"), ("logs", "print a submitted run's logs"),
                       ("stop", "stop a submitted run (it finishes its step and writes a resumable checkpoint)")]:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("job_id", help="job id printed by submit")
        p.add_argument("--address", default="", help=address_help)
        p.add_argument("--timeout", type=options.finite(0, above=True), default=30.0, help=timeout_help)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream the output until the job ends")


def _tool_commands(sub: argparse._SubParsersAction) -> None:
    """``tiny`` and ``serve-reward``."""
    text = "write a tiny random checkpoint of a model family (the real classes) to debug a config offline"
    p = sub.add_parser("tiny", help=text, description=text)
    p.add_argument("family", help="builtin, janus, emu3, xomni, or decoder (an X-Omni diffusion-decoder directory)")
    p.add_argument("directory", help="output directory (usable as model.path / decoder.path)")
    p.add_argument("--seed", type=options.count(0), default=0)
    p.add_argument("--force", action="store_true", help="write into a directory that is not empty")
    serve = sub.add_parser("serve-reward", help="serve one reward over HTTP (PNG + JSON, never pickle)",
                           description="Serve one reward over HTTP; a run uses it as {name: 'url:http://HOST:PORT'}. "
                                       "Concurrent requests are scored together in batches. Set OMNIGRPO_REWARD_TOKEN "
                                       "to require a bearer token (needed to bind anything but loopback).")
    serve.add_argument("name", help="reward name, entry point or module:attr")
    serve.add_argument("kwargs", nargs="*", help="key=value arguments for the reward's factory (YAML values)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    serve.add_argument("--port", type=options.port, default=8765, help="port (0 picks a free one)")
    serve.add_argument("--replicas", type=options.count(1), default=1,
                       help="judge instances, each built in its own thread ('{replica}' in an argument: its index)")
    serve.add_argument("--max-batch", type=options.count(1), default=64, help="most images scored in one judge call")
    serve.add_argument("--max-wait-ms", type=options.finite(0), default=20.0,
                       help="longest wait for more requests to join a judge call")
    for flag, kind, text in [
        ("--max-body-mb", options.count(1), "largest request body, MB (413 over it)"),
        ("--max-pixels", options.count(1), "most pixels one image may declare in its PNG header (413 over it)"),
        ("--memory-mb", options.count(1), "memory all requests in flight share, MB (503 when full)"),
        ("--max-pending", options.count(1), "requests in flight at most (503 past it)"),
        ("--request-timeout-s", options.finite(0, above=True), "deadline of one request (504 past it)"),
        ("--max-images", options.count(1), "most images in one request (413 over it)"),
        ("--header-timeout-s", options.finite(0, above=True), "seconds to send request headers, then closed"),
        ("--body-timeout-s", options.finite(0, above=True), "seconds to send a body after its headers (408 past it)"),
        ("--max-connections", options.count(1), "open connections at most (kept below the open-file limit)"),
        ("--max-connections-per-client", options.count(1), "open connections at most from one address")]:
        default = getattr(Limits, flag[2:].replace("-", "_"))
        serve.add_argument(flag, type=kind, default=default, help=f"{text}; default {default}")
    serve.add_argument("--allowed-host", action="append", default=[], type=options.host_header,
                       help="a Host header value served besides the bound address (NAME or NAME:PORT); repeatable")


def config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """The positional ``config`` and ``overrides`` every config-driven command takes."""
    parser.add_argument("config", help=config_help)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.lr=1e-5")
