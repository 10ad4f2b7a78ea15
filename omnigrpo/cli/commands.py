"""The ``omnigrpo`` sub-commands: one function each, on a loaded config or on their own arguments.

Why: one entry point that validates everything before starting anything. Bad input (a config, an
override, a reward, a prompt file, a checkpoint) ends in lines that start with ``omnigrpo:`` and name
the key, file or line, with exit status 2 and no traceback, before SFT runs or a Ray cluster starts.
Heavy layers are imported inside the command that needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from omnigrpo.cli.parser import build_parser
from omnigrpo.cluster.placement import ClusterShortfall
from omnigrpo.config import options
from omnigrpo.config.loader import ConfigError, load_config, to_dict
from omnigrpo.config.schema import Config
from omnigrpo.rewards.admission import Limits


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
