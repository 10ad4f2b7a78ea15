"""The ``omnigrpo`` command: ``train`` and ``sft`` on a YAML config plus ``key.sub=value`` overrides.

Why: one entry point that validates everything before starting anything. A bad config, an unknown
reward or a missing checkpoint exits with status 2 and a message naming what is wrong, before SFT
runs or a Ray cluster starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from omnigrpo import __version__
from omnigrpo.platform.config import Config, ConfigError, load_config, to_dict
from omnigrpo.platform.prompts import PromptFileError
from omnigrpo.platform.registry import RewardNotFound

EPILOG = """examples:
  omnigrpo train configs/shapes.yaml
  omnigrpo train configs/shapes.yaml trainer.steps=10 rollout.group_size=4 run.dir=runs/try
  omnigrpo train configs/shapes.yaml --check      # validate and print the resolved config
  omnigrpo sft configs/shapes.yaml                # only build (or find) the SFT start checkpoint
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
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.lr=1e-5")
        p.add_argument("--check", action="store_true", help="validate, print the resolved config, exit")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="same as run.resume=true")
    serve = sub.add_parser("serve-reward", help="serve one reward over HTTP (PNG + JSON, never pickle)",
                           description="Serve one reward over HTTP; a run uses it as {name: 'url:http://HOST:PORT'}. "
                                       "Set OMNIGRPO_REWARD_TOKEN to require a bearer token.")
    serve.add_argument("name", help="reward name, entry point or module:attr")
    serve.add_argument("kwargs", nargs="*", help="key=value arguments for the reward's factory (YAML values)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8765, help="port (0 picks a free one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may follow options such as --check
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve-reward":
        return _serve(args, parser, extra)
    unknown = [e for e in extra if "=" not in e or e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra, *(["run.resume=true"] if getattr(args, "resume", False) else [])]
    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:
            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        if args.command == "sft":
            from omnigrpo.trainers.sft import sft_checkpoint

            print(sft_checkpoint(cfg))
            return 0
        return _train(cfg)
    except (ConfigError, RewardNotFound, PromptFileError, FileNotFoundError) as err:
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


def _train(cfg: Config) -> int:
    from omnigrpo.cluster.environment import prepare_local_ray_env

    prepare_local_ray_env(cfg.cluster.address)  # before the driver imports Ray
    from omnigrpo.platform.driver import train

    summary = train(cfg)
    before, after = summary["before"]["eval/strict_acc"], summary["after"]["eval/strict_acc"]
    print(f"held-out strict accuracy: before RL {before:.3f}, after RL {after:.3f} ({after - before:+.3f})")
    print(f"held-out mean reward:     before RL {summary['before']['eval/reward_mean']:.3f}, "
          f"after RL {summary['after']['eval/reward_mean']:.3f}")
    print(f"final checkpoint: {summary['checkpoint']}")
    print(f"MLflow run {summary['run_id']}: mlflow ui --backend-store-uri {_store(cfg)} --host 127.0.0.1")
    return 0


def _store(cfg: Config) -> str:
    from omnigrpo.platform.tracking import store_uri

    return store_uri(cfg)


if __name__ == "__main__":
    sys.exit(main())
