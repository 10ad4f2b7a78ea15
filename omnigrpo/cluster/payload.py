"""What a submitted job carries from the submitting machine, besides omnigrpo's own source.

Why: a run names files by the paths of the machine it was written on. A prompt file given by a relative path,
or a reward module that lives next to the user's config rather than in an installed package, exists only there;
submitted as is, the job fails on the cluster minutes later with an import or file error. So ``submit``
gathers them into the job's working directory (Ray uploads it and puts it on every worker's import path) and
rewrites the config to point there, or refuses before anything is sent, naming what the cluster could not see:

- ``data.prompts`` given by a relative path: shipped to ``inputs/<name>``. An absolute path is left alone: it
  names storage the cluster shares, as ``run.dir`` must.
- a reward ``module:attr`` whose module is local source (not installed, not the standard library): its file or
  top-level package is shipped beside the config. Installed modules and entry points are expected on the
  cluster's image, as omnigrpo's dependencies are.
- ``model.path`` / ``decoder.path`` given as a relative local directory: refused (checkpoints are too large to
  upload with a job; give an absolute path on shared storage or a hub id).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from omnigrpo.config.loader import ConfigError, to_dict
from omnigrpo.config.schema import Config
from omnigrpo.config.validation import WORLD_NAMES
from omnigrpo.rewards.registry import local_source

CONFIG_NAME = "config.yaml"
INPUTS = "inputs"
MAX_BYTES = 100 << 20  # well under the upload limit of Ray's working_dir; larger inputs belong on shared storage


@dataclass(frozen=True)
class Payload:
    """The job's working directory, before it is written: the resolved ``config`` (as a plain dict, shipped paths
    rewritten) and ``files`` (path inside the directory -> local file or directory)."""

    config: dict
    files: dict[str, Path] = field(default_factory=dict)

    def write(self, into: Path) -> None:
        (into / CONFIG_NAME).write_text(yaml.safe_dump(self.config, sort_keys=False))
        for target, source in self.files.items():
            dest = into / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, dest)


def gather(cfg: Config) -> Payload:
    """The payload of a run of ``cfg``; raises ConfigError, naming the key, for what cannot travel."""
    config, files = to_dict(cfg), {}
    for key, value in (("model.path", cfg.model.path), ("decoder.path", cfg.decoder.path)):
        local = Path(value).expanduser()
        if value and not local.is_absolute() and local.exists():
            raise ConfigError(f"{key}: a submitted run needs a checkpoint the cluster sees: an absolute path on shared "
                              f"storage or a hub id (got {value!r}, a relative path on this machine only)")
    if cfg.data.prompts not in WORLD_NAMES and not Path(cfg.data.prompts).expanduser().is_absolute():
        source = Path(cfg.data.prompts).expanduser().resolve()
        files[f"{INPUTS}/{source.name}"] = source
        config["data"]["prompts"] = f"{INPUTS}/{source.name}"
    for i, spec in enumerate(cfg.rewards):
        source = local_source(spec.name)
        if source is None:
            continue
        if files.get(source.name, source) != source or source.name in (CONFIG_NAME, INPUTS):
            raise ConfigError(f"rewards.{i}.name: the local module {source} cannot be shipped: another shipped file "
                              f"is also named {source.name!r}")
        files[source.name] = source
    size = sum(_size(p) for p in files.values())
    if size > MAX_BYTES:
        names = ", ".join(str(p) for p in files.values())
        raise ConfigError(f"data.prompts/rewards: {size / 2**20:.0f} MiB of local files to ship ({names}) is over "
                          f"{MAX_BYTES >> 20} MiB; put them on storage the cluster shares and give absolute paths")
    return Payload(config, files)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
