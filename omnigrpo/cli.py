"""The ``omnigrpo`` command: one function per sub-command, on a YAML config plus ``key=value`` overrides.

Why: one entry point that validates everything before starting anything. Bad input (a config, an
override, a reward, a prompt file, a checkpoint) ends in lines that start with ``omnigrpo:`` and name
the key, file or line, with exit status 2 and no traceback, before SFT runs or a Ray cluster starts.
This is the top of the package: it may import every layer, and none imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path

from omnigrpo.config.runtime import quiet_thread_waits

quiet_thread_waits()  # before anything imports torch: this process and the workers it starts
from omnigrpo import __version__  # noqa: E402
from omnigrpo.cluster.placement import ClusterShortfall  # noqa: E402
from omnigrpo.config import options  # noqa: E402
from omnigrpo.config.loader import ConfigError, load_config, to_dict  # noqa: E402
from omnigrpo.config.schema import Config  # noqa: E402
from omnigrpo.rewards.admission import Limits  # noqa: E402

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


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="omnigrpo",
        description="GRPO fine-tuning of discrete autoregressive image generators (Ray, DeepSpeed, MLflow).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"omnigrpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [("train", "run GRPO on a config"), ("sft", "train or reuse the SFT start checkpoint")]:
        p = sub.add_parser(name, help=text, description=text)
        _config_arguments(p, "YAML config file")
        p.add_argument("--check", action="store_true", help="validate, print the resolved config, exit")
        if name == "sft":
            p.add_argument("--force", action="store_true", help="train again and replace a cached SFT checkpoint")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="same as run.resume=true")
    text = "score a checkpoint on held-out prompts, a prompt file or a benchmark (GenEval, LongText-Bench)"
    p = sub.add_parser("eval", help=text, description=text)
    _config_arguments(p, "YAML config file (world, rewards, sampling settings)")
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
    text = "benchmarks side by side: sampler vs HF generate, GRPO (in each mode) vs TRL, weight sync, rewards"
    p = sub.add_parser("bench", help=text, description=text)
    _config_arguments(p, "YAML config file (the model, prompts and rewards benchmarked)")
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
    _config_arguments(p, "YAML config file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--prompt-tokens", type=options.count(1), default=64,
                   help="prompt tokens assumed per sample (default 64)")
    text = "export a run's metric curves from its MLflow store as a PNG"
    p = sub.add_parser("curves", help=text, description=text)
    _config_arguments(p, "YAML config file of the run (locates its MLflow store and experiment)")
    p.add_argument("--run-id", default="", help="MLflow run id (default: the experiment's newest training run)")
    p.add_argument("--keys", default=None,
                   help="comma-separated metric keys, one panel each; a+b overlays a and b in one panel (default: "
                        "reward, the held-out headline, style entropy per attribute where the world reads styles, "
                        "KL, group diversity)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--force", action="store_true", help="write over an existing file")
    address_help = "Ray dashboard address (default $RAY_ADDRESS, else http://127.0.0.1:8265)"
    timeout_help = "seconds to wait for each answer of the Ray Jobs API (default 30)"
    text = "submit a run to a Ray cluster through its Jobs API; lists what it uploads, then prints the job id"
    p = sub.add_parser("submit", help=text, description=text)
    _config_arguments(p, "YAML config file (validated here, then shipped with the package source)")
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
    return parser


def _config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """The positional ``config`` and ``overrides`` every config-driven command takes."""
    parser.add_argument("config", help=config_help)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.lr=1e-5")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may follow options such as --check
    # force: bind to the stderr of this call (an embedding process, or a test, may have replaced it since)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # INFO is for omnigrpo's progress; matplotlib reports building its font cache (first use on a machine) at INFO
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    command = COMMANDS[args.command]
    if args.command in CONFIG_COMMANDS:
        unknown = [e for e in extra if e.startswith("-")]  # anything else is an override, checked as one
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *extra, *(["run.resume=true"] if getattr(args, "resume", False) else [])]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command not in CONFIG_COMMANDS:
            return command(args)
        cfg = load_config(args.config, args.overrides, unique=True)  # a key typed twice is refused
        if getattr(args, "check", False):
            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        return command(cfg, args)
    except (ConfigError, ClusterShortfall) as err:
        return refuse(err)


def refuse(err: BaseException) -> int:
    """Print ``err`` as ``omnigrpo:`` lines on stderr; the exit status of bad input."""
    for line in str(err).splitlines() or [type(err).__name__]:
        if line.strip():
            print(f"omnigrpo: {line.strip()}", file=sys.stderr)
    return 2


def cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    from omnigrpo.app.preflight import check_run
    from omnigrpo.cluster.environment import prepare_local_ray_env

    plan = check_run(cfg)  # bad input is refused before Ray, MLflow and the model libraries are even imported
    prepare_local_ray_env(cfg.cluster.address)  # before the driver imports Ray
    from omnigrpo.app.driver import train
    from omnigrpo.app.failure import RunFailed, starting_failed
    from omnigrpo.app.tracking import store_uri

    try:
        summary = train(cfg, stop_on_sigterm=True, plan=plan)  # `omnigrpo stop` / `ray job stop` send SIGTERM
    except RunFailed as err:  # a fault after start-up: what broke, what was saved, where the traceback is
        print(f"omnigrpo: {err}", file=sys.stderr)
        return 1
    except (ConfigError, ClusterShortfall):
        raise
    except Exception as err:  # a fault while starting (SFT, an actor's set-up, the tracking store): nothing to save
        print(f"omnigrpo: {starting_failed(err, Path(cfg.run.dir))}", file=sys.stderr)
        return 1
    if "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']}: {summary['checkpoint']}; continue with "
              "omnigrpo train CONFIG --resume (same run.dir)")
        if summary["reason"]:
            print(f"omnigrpo: {summary['reason']}", file=sys.stderr)
        return 1 if summary["reason"] else 0
    for key in summary["before"]:
        before, after = summary["before"][key], summary["after"][key]
        print(f"held-out {key[5:]:<12} before RL {before:.3f}, after RL {after:.3f} ({after - before:+.3f})")
    print(f"final checkpoint: {summary['checkpoint']}")
    store = store_uri(cfg.tracking, cfg.run.dir)
    print(f"MLflow run {summary['run_id']}: mlflow ui --backend-store-uri {store} --host 127.0.0.1")
    return 0


def cmd_sft(cfg: Config, args: argparse.Namespace) -> int:
    from omnigrpo.trainers.sft import sft_checkpoint

    print(sft_checkpoint(cfg.sft, cfg.model, cfg.world, cfg.run, replace=args.force))
    return 0


def cmd_eval(cfg: Config, args: argparse.Namespace) -> int:
    if args.benchmark:
        return cmd_benchmark(cfg, args)
    if not args.checkpoint:
        raise ConfigError("--checkpoint: required (or --benchmark, which defaults to model.path)")
    if args.limit or args.held_out:
        raise ConfigError(f"--{'limit' if args.limit else 'held-out'}: only with --benchmark")
    from omnigrpo.app.evaluator import evaluate_checkpoint

    report = evaluate_checkpoint(cfg, args.checkpoint, args.prompts, args.samples, args.out, args.force)
    for key, value in report["metrics"].items():
        print(f"{key:<32} {value:.4f}")
    print(f"report: {report['report_path']} (MLflow run {report['run_id']})")
    return 0


def cmd_benchmark(cfg: Config, args: argparse.Namespace) -> int:
    if args.prompts:
        raise ConfigError("--prompts: a benchmark brings its own prompts; drop --prompts or --benchmark")
    from omnigrpo.app.benchmark import evaluate_benchmark

    report = evaluate_benchmark(cfg, args.benchmark, args.checkpoint, args.limit, args.samples, args.out, args.force,
                                args.held_out)
    for key, value in report["metrics"].items():
        print(f"{key:<32} {value:.4f}")
    print(f"report: {report['report_path']} (MLflow run {report['run_id']})")
    return 0


def cmd_bench(cfg: Config, args: argparse.Namespace) -> int:
    from omnigrpo.cluster.environment import prepare_local_ray_env

    prepare_local_ray_env(cfg.cluster.address)  # the GRPO side of the TRL comparison starts Ray
    from omnigrpo.bench.harness import PARTS, run_bench

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ConfigError(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(PARTS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] or None
    if args.out:  # a report is a measurement, rewritten by each run of the same command; never a directory
        options.writable(Path(args.out), "--out", force=True)
    run_bench(cfg, parts, steps=args.steps, repeats=args.repeats, out=args.out, rounds=args.rounds, modes=modes)
    return 0


def cmd_plan(cfg: Config, args: argparse.Namespace) -> int:
    from omnigrpo.app import planner
    from omnigrpo.app.preflight import memory_plan

    plan = memory_plan(cfg, args.prompt_tokens)
    print(json.dumps(plan.to_json(), indent=2) if args.json else planner.render(plan))
    return 0 if plan.fits is not False else 1


def cmd_curves(cfg: Config, args: argparse.Namespace) -> int:
    from omnigrpo.app.tracking import default_curve_keys, latest_run_id, plot_curves

    keys = default_curve_keys(cfg.world.name) if args.keys is None else \
        [k.strip() for k in args.keys.split(",") if k.strip()]
    if not keys:
        raise ConfigError(f"--keys: {args.keys!r} names no metric (comma-separated keys, e.g. reward/total/mean)")
    options.writable(Path(args.out), "--out", args.force)
    from mlflow.exceptions import MlflowException

    try:
        run_id = args.run_id or latest_run_id(cfg.tracking, cfg.run.dir)
        print(plot_curves(cfg.tracking, cfg.run.dir, run_id, keys, args.out))
    except KeyError as err:  # a metric the run never logged
        raise ConfigError(f"--keys: {err.args[0]}") from None
    except FileNotFoundError as err:  # no training run in the store
        raise ConfigError(str(err)) from None
    except MlflowException as err:  # e.g. a --run-id the store does not hold
        raise ConfigError(f"--run-id {args.run_id!r}: {err.message.splitlines()[0]}") from None
    return 0


def cmd_submit(cfg: Config, args: argparse.Namespace) -> int:
    from omnigrpo.app.preflight import check_submit
    from omnigrpo.cluster import jobs

    payload = check_submit(cfg)  # what `train` checks that needs no cluster, then the files that would travel
    print(payload.listing(), flush=True)
    with job_errors(args):  # a dry run sends nothing and needs no address
        print("dry run: nothing sent" if args.dry_run else jobs.submit(
            payload, Path(args.config).name, _address(args), cfg.cluster.stop_grace_s, submission_id=args.job_id,
            timeout=args.timeout))
    return 0


@contextlib.contextmanager
def job_errors(args: argparse.Namespace):
    """An unknown job id, or a dashboard that is unreachable or does not answer, becomes an ``omnigrpo:`` error
    naming both."""
    try:
        yield
    except (RuntimeError, ConnectionError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        job = f"job {args.job_id!r}" if args.job_id else "the submission"
        raise ConfigError(f"{job} at {_address(args)}: {first}") from None


def cmd_status(args: argparse.Namespace) -> int:
    from omnigrpo.cluster import jobs

    with job_errors(args):
        print(jobs.status(_address(args), args.job_id, args.timeout))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from omnigrpo.cluster import jobs

    with job_errors(args):
        if not args.follow:
            print(jobs.logs(_address(args), args.job_id, args.timeout), end="")
            return 0
        try:
            for chunk in jobs.follow(_address(args), args.job_id, args.timeout):
                print(chunk, end="", flush=True)
        except KeyboardInterrupt:  # the job goes on; only the following stops
            return 130
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from omnigrpo.cluster import jobs

    with job_errors(args):
        print("stop requested" if jobs.stop(_address(args), args.job_id, args.timeout) else "job had already finished")
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from omnigrpo.rollout.families import tiny

    directory = Path(args.directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory}: exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not args.force:
        raise ConfigError(f"{directory}: not empty; refusing to write a checkpoint over what it holds "
                          "(add --force to write into it)")
    try:
        made = tiny.build(args.family, args.directory, args.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(f"wrote {made}: {', '.join(sorted(str(f.relative_to(made)) for f in made.rglob('*') if f.is_file()))}")
    return 0


def cmd_serve_reward(args: argparse.Namespace) -> int:
    from omnigrpo.app.preflight import build_checked, check_reward, reward_arguments
    from omnigrpo.rewards.server import PublicBindRefused, RewardServer, per_replica

    kwargs = reward_arguments(args.kwargs)
    check_reward(args.name, kwargs, "serve-reward")  # before binding or loading any judge
    try:
        server = RewardServer(lambda index: build_checked(args.name, per_replica(kwargs, index), "serve-reward"),
                              args.name, args.host, args.port, factory=True, replicas=args.replicas,
                              max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                              limits=Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)}),
                              allowed_hosts=args.allowed_host)
    except PublicBindRefused as err:
        raise ConfigError(f"--host: {err}") from None
    except OSError as err:
        raise ConfigError(f"--host/--port: cannot listen on {args.host}:{args.port}: {err.strerror or err}") from None
    try:
        server.batcher.start()  # every replica built (and its arguments checked) before serving
    except BaseException:
        server.stop()
        raise
    print(f"serving reward {args.name!r} ({args.replicas} replica(s), judge calls of up to {args.max_batch} "
          f"images) on {server.url}", flush=True)
    try:
        server.serve_forever(started=True)
    except KeyboardInterrupt:
        pass
    return 0


def _address(args: argparse.Namespace) -> str:
    address = args.address or os.environ.get("RAY_ADDRESS", "") or "http://127.0.0.1:8265"
    return address if "://" in address else f"http://{address}"


CONFIG_COMMANDS = ("train", "sft", "eval", "bench", "plan", "curves", "submit")
"""Sub-commands that take a config and overrides (their functions receive the loaded Config)."""
COMMANDS = {"train": cmd_train, "sft": cmd_sft, "eval": cmd_eval, "bench": cmd_bench, "plan": cmd_plan,
            "curves": cmd_curves,
            "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop, "tiny": cmd_tiny,
            "serve-reward": cmd_serve_reward}


if __name__ == "__main__":
    sys.exit(main())
