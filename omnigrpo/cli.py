"""The ``omnigrpo`` command: ``train``, ``sft``, ``eval`` and ``bench`` on a YAML config plus overrides.

Why: one entry point that validates everything before starting anything. A bad config, an unknown
reward or a missing checkpoint exits with status 2 and a message naming what is wrong, before SFT
runs or a Ray cluster starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from omnigrpo import __version__
from omnigrpo.cluster.placement import ClusterShortfall
from omnigrpo.platform.config import Config, ConfigError, load_config, to_dict
from omnigrpo.platform.prompts import PromptFileError
from omnigrpo.platform.registry import RewardNotFound

EPILOG = """examples:
  omnigrpo train configs/shapes.yaml
  omnigrpo train configs/shapes.yaml trainer.steps=10 rollout.group_size=4 run.dir=runs/try
  omnigrpo train configs/shapes.yaml --check      # validate and print the resolved config
  omnigrpo sft configs/shapes.yaml                # only build (or find) the SFT start checkpoint
  omnigrpo eval configs/glyphs.yaml --checkpoint runs/glyphs/checkpoints/RUN/step-300
  omnigrpo eval configs/glyphs.yaml --checkpoint CKPT --prompts longtext.txt   # + OCR word recall
  omnigrpo bench configs/shapes.yaml --parts rollout,rewards,sync,trl
  omnigrpo submit configs/shapes.yaml --address http://HEAD:8265 run.dir=/shared/runs/a  # then status/logs/stop
  omnigrpo curves configs/glyphs.yaml --keys reward/total/mean,eval/exact_match --out docs/glyphs.png
  omnigrpo tiny janus /tmp/janus-tiny && omnigrpo train configs/janus_pro_1b.yaml model.path=/tmp/janus-tiny ...
  omnigrpo serve-reward ocr score=recall --port 8765   # then rewards: [{name: "url:http://127.0.0.1:8765"}]
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        if name == "train":
            p.add_argument("--resume", action="store_true", help="same as run.resume=true")
    text = "score a checkpoint on held-out prompts (or a prompt file) with the configured judges"
    p = sub.add_parser("eval", help=text, description=text)
    _config_arguments(p, "YAML config file (world, rewards, sampling settings)")
    p.add_argument("--checkpoint", required=True, help="policy directory (SFT or a run's checkpoints/...)")
    p.add_argument("--prompts", default="", help="prompt file instead of the world's held-out prompts")
    p.add_argument("--samples", type=int, default=0, help="images per prompt (default eval.samples_per_prompt)")
    p.add_argument("--out", default="", help="report path (default <run.dir>/eval/<checkpoint name>.json)")
    text = "benchmarks side by side: sampler vs HF generate, GRPO vs TRL, weight sync, rewards"
    p = sub.add_parser("bench", help=text, description=text)
    _config_arguments(p, "YAML config file (the model, prompts and rewards benchmarked)")
    p.add_argument("--parts", default="rollout,rewards,sync,trl", help="comma-separated subset to run")
    p.add_argument("--steps", type=int, default=20, help="GRPO steps of each trainer in the TRL comparison")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    p.add_argument("--out", default="", help="JSON path (default <run.dir>/bench.json)")
    text = "export a run's metric curves from its MLflow store as a PNG"
    p = sub.add_parser("curves", help=text, description=text)
    _config_arguments(p, "YAML config file of the run (locates its MLflow store and experiment)")
    p.add_argument("--run-id", default="", help="MLflow run id (default: the experiment's newest training run)")
    p.add_argument("--keys", default="reward/total/mean,kl,guard/blank_frac",
                   help="comma-separated metric keys, one panel each")
    p.add_argument("--out", required=True, help="PNG path")
    address_help = "Ray dashboard address (default $RAY_ADDRESS, else http://127.0.0.1:8265)"
    text = "submit a run to a Ray cluster through its Jobs API; prints the job id"
    p = sub.add_parser("submit", help=text, description=text)
    _config_arguments(p, "YAML config file (validated here, then shipped with the package source)")
    p.add_argument("--address", default="", help=address_help)
    p.add_argument("--job-id", default=None, help="submission id to use (default: Ray picks one)")
    for name, text in [("status", "print a submitted run's status"), ("logs", "print a submitted run's logs"),
                       ("stop", "stop a submitted run (it writes a crash checkpoint on the way out)")]:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("job_id", help="job id printed by submit")
        p.add_argument("--address", default="", help=address_help)
    text = "write a tiny random checkpoint of a model family (the real classes) to debug a config offline"
    p = sub.add_parser("tiny", help=text, description=text)
    p.add_argument("family", help="janus, emu3, xomni, or decoder (an X-Omni diffusion-decoder directory)")
    p.add_argument("directory", help="output directory (usable as model.path / decoder.path)")
    p.add_argument("--seed", type=int, default=0)
    serve = sub.add_parser("serve-reward", help="serve one reward over HTTP (PNG + JSON, never pickle)",
                           description="Serve one reward over HTTP; a run uses it as {name: 'url:http://HOST:PORT'}. "
                                       "Set OMNIGRPO_REWARD_TOKEN to require a bearer token.")
    serve.add_argument("name", help="reward name, entry point or module:attr")
    serve.add_argument("kwargs", nargs="*", help="key=value arguments for the reward's factory (YAML values)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8765, help="port (0 picks a free one)")
    return parser


def _config_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """The positional ``config`` and ``overrides`` every config-driven command takes."""
    parser.add_argument("config", help=config_help)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.lr=1e-5")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may follow options such as --check
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve-reward":
        return _serve(args, parser, extra)
    if args.command in ("status", "logs", "stop"):
        return _job(args, parser, extra)
    if args.command == "tiny":
        from omnigrpo.rollout import tiny

        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        try:
            made = (tiny.diffusion_decoder(args.directory, seed=args.seed) if args.family == "decoder"
                    else tiny.build(args.family, args.directory, args.seed))
        except ValueError as err:
            print(f"omnigrpo: {err}", file=sys.stderr)
            return 2
        print(made)
        return 0
    unknown = [e for e in extra if "=" not in e or e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra, *(["run.resume=true"] if getattr(args, "resume", False) else [])]
    try:
        cfg = load_config(args.config, args.overrides)
        if getattr(args, "check", False):
            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        if args.command == "sft":
            from omnigrpo.trainers.sft import sft_checkpoint

            print(sft_checkpoint(cfg))
            return 0
        if args.command == "submit":
            from omnigrpo.cluster import jobs

            print(jobs.submit(args.config, _address(args), args.overrides, submission_id=args.job_id))
            return 0
        if args.command == "eval":
            return _eval(cfg, args)
        if args.command == "bench":
            return _bench(cfg, args)
        if args.command == "curves":
            from omnigrpo.platform.tracking import latest_run_id, plot_curves

            keys = [k.strip() for k in args.keys.split(",") if k.strip()]
            try:
                print(plot_curves(cfg, args.run_id or latest_run_id(cfg), keys, args.out))
            except KeyError as err:  # a metric the run never logged
                print(f"omnigrpo: {err.args[0]}", file=sys.stderr)
                return 2
            return 0
        return _train(cfg)
    except (ConfigError, RewardNotFound, PromptFileError, FileNotFoundError, ClusterShortfall) as err:
        print(f"omnigrpo: {err}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser, extra: list[str]) -> int:
    import yaml

    from omnigrpo.platform.registry import build_reward
    from omnigrpo.rewards.service import make_server

    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    kwargs = {}
    for item in args.kwargs:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"reward argument {item!r} is not key=value")
        kwargs[key] = yaml.safe_load(value)
    try:
        reward = build_reward(args.name, kwargs)
    except (RewardNotFound, TypeError, ValueError) as err:
        print(f"omnigrpo: {err}", file=sys.stderr)
        return 2
    server = make_server(reward, args.name, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving reward {args.name!r} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the driver, which writes a crash checkpoint


def _train(cfg: Config) -> int:
    from omnigrpo.cluster.environment import prepare_local_ray_env

    signal.signal(signal.SIGTERM, _terminate)  # `omnigrpo stop` / `ray job stop` send SIGTERM
    prepare_local_ray_env(cfg.cluster.address)  # before the driver imports Ray
    from omnigrpo.platform.driver import train

    summary = train(cfg)
    for key in summary["before"]:
        before, after = summary["before"][key], summary["after"][key]
        print(f"held-out {key[5:]:<12} before RL {before:.3f}, after RL {after:.3f} ({after - before:+.3f})")
    print(f"final checkpoint: {summary['checkpoint']}")
    print(f"MLflow run {summary['run_id']}: mlflow ui --backend-store-uri {_store(cfg)} --host 127.0.0.1")
    return 0


def _address(args: argparse.Namespace) -> str:
    address = args.address or os.environ.get("RAY_ADDRESS", "") or "http://127.0.0.1:8265"
    return address if "://" in address else f"http://{address}"


def _job(args: argparse.Namespace, parser: argparse.ArgumentParser, extra: list[str]) -> int:
    from omnigrpo.cluster import jobs

    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "status":
        print(jobs.status(_address(args), args.job_id))
    elif args.command == "logs":
        print(jobs.logs(_address(args), args.job_id), end="")
    else:
        print("stop requested" if jobs.stop(_address(args), args.job_id) else "job had already finished")
    return 0


def _eval(cfg: Config, args: argparse.Namespace) -> int:
    from omnigrpo.platform.evaluator import evaluate_checkpoint

    report = evaluate_checkpoint(cfg, args.checkpoint, args.prompts, args.samples, args.out)
    for key, value in report["metrics"].items():
        print(f"{key:<32} {value:.4f}")
    print(f"report: {report['report_path']} (MLflow run {report['run_id']})")
    return 0


def _bench(cfg: Config, args: argparse.Namespace) -> int:
    from omnigrpo.cluster.environment import prepare_local_ray_env

    prepare_local_ray_env(cfg.cluster.address)  # the GRPO side of the TRL comparison starts Ray
    from omnigrpo.platform.bench import run_bench

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    run_bench(cfg, parts, steps=args.steps, repeats=args.repeats, out=args.out)
    return 0


def _store(cfg: Config) -> str:
    from omnigrpo.platform.tracking import store_uri

    return store_uri(cfg)


if __name__ == "__main__":
    sys.exit(main())
