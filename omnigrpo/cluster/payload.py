"""What a submitted job carries from the submitting machine: exactly the files a run needs, listed before it goes.

Why: a run names files by the paths of the machine it was written on. A prompt file given by a relative path, or a
reward module that lives beside the user's config, exists only there, and the job would fail on the cluster minutes
later. So ``submit`` gathers them into the job's working directory and rewrites the config to point there, or
refuses before anything is sent, naming what the cluster could not see. What travels and what is refused:
docs/security.md, "What `omnigrpo submit` uploads".
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

import omnigrpo
from omnigrpo.config.inputs import InputFileError, regular_file
from omnigrpo.config.loader import ConfigError, to_dict
from omnigrpo.config.schema import Config
from omnigrpo.config.validation import WORLD_NAMES
from omnigrpo.rewards.registry import local_source

CONFIG_NAME = "config.yaml"
INPUTS = "inputs"
MAX_BYTES = 100 << 20  # well under the upload limit of Ray's working_dir; larger inputs belong on shared storage
PACKAGE_DIR = Path(omnigrpo.__file__).resolve().parent


@dataclass(frozen=True)
class Payload:
    """The job's files, before they are written: the resolved ``config`` (plain data, shipped paths rewritten),
    ``files`` of the working directory and omnigrpo's ``package`` sources (each: path in the upload -> local
    regular file)."""

    config: dict
    files: dict[str, Path]
    package: dict[str, Path]

    def config_text(self) -> str:
        return yaml.safe_dump(self.config, sort_keys=False)

    def listing(self) -> str:
        """Every file that would be uploaded with its size, omnigrpo's sources as one line, and the total."""
        rows = [(CONFIG_NAME, len(self.config_text().encode()))]
        rows += [(target, source.stat().st_size) for target, source in sorted(self.files.items())]
        package = sum(source.stat().st_size for source in self.package.values())
        rows.append((f"omnigrpo/ (py_modules: {len(self.package)} .py files of {PACKAGE_DIR})", package))
        total, count = sum(size for _, size in rows), len(rows) - 1 + len(self.package)
        lines = [f"{_size(size):>10}  {name}" for name, size in rows]
        return "\n".join(["upload (job working directory, then omnigrpo's source):", *lines,
                          f"{_size(total):>10}  in all, {count} files"])

    def write(self, into: Path) -> tuple[Path, Path]:
        """Write the working directory and the package copy under ``into``; returns both directories."""
        work, package = into / "work", into / "modules" / "omnigrpo"
        work.mkdir(parents=True)
        for root, files in ((work, self.files), (package.parent, self.package)):
            for target, source in files.items():
                (root / target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, root / target)  # contents only: a link inside is copied as its file
        (work / CONFIG_NAME).write_text(self.config_text())
        return work, package


def gather(cfg: Config) -> Payload:
    """The payload of a run of ``cfg``; raises ConfigError, naming the key, for what cannot travel."""
    config, files = to_dict(cfg), {}
    for key, value in (("model.path", cfg.model.path), ("decoder.path", cfg.decoder.path)):
        local = Path(value).expanduser()
        if value and not local.is_absolute() and local.exists():
            raise ConfigError(f"{key}: a submitted run needs a checkpoint the cluster sees: an absolute path on shared "
                              f"storage or a hub id (got {value!r}, a relative path on this machine only)")
    if cfg.data.prompts not in WORLD_NAMES and not Path(cfg.data.prompts).expanduser().is_absolute():
        source = Path(cfg.data.prompts).expanduser().absolute()
        _check_file(source, "data.prompts", "a submitted run ships a prompt file, nothing else; give a datasets "
                                            "directory by an absolute path on storage the cluster shares")
        files[f"{INPUTS}/{source.name}"] = source
        config["data"]["prompts"] = f"{INPUTS}/{source.name}"
    for i, spec in enumerate(cfg.rewards):
        source = local_source(spec.name)
        for target, path in ({} if source is None else module_files(source, f"rewards.{i}.name")).items():
            if files.get(target, path) != path or target.split("/")[0] in (CONFIG_NAME, INPUTS):
                raise ConfigError(f"rewards.{i}.name: the local module {source} cannot be shipped: another shipped "
                                  f"file is also named {target!r}")
            files[target] = path
    size = sum(p.stat().st_size for p in files.values())
    if size > MAX_BYTES:
        raise ConfigError(f"data.prompts/rewards: {size / 2**20:.0f} MiB of local files to ship is over "
                          f"{MAX_BYTES >> 20} MiB; put them on storage the cluster shares and give absolute paths")
    return Payload(config, files, module_files(PACKAGE_DIR, "omnigrpo"))


def module_files(source: Path, key: str) -> dict[str, Path]:
    """A module's Python sources by their path in the upload: a ``.py`` file, or a package's ``*.py`` and
    ``py.typed`` files, without dot names or ``__pycache__``. A link that leads outside the package is refused,
    naming it; a linked directory is not entered."""
    if not source.is_dir():
        if source.suffix != ".py":
            raise ConfigError(f"{key}: the local module {source} is not Python source (.py); install it on the "
                              "cluster's image instead")
        _check_file(source, key)
        return {source.name: source}
    files = {}
    for folder, dirs, names in os.walk(source):  # links to directories are listed, never followed
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if _ships(d, here / d, source, key, directory=True))
        for name in sorted(n for n in names if _ships(n, here / n, source, key)):
            _check_file(here / name, key)
            files[(here / name).relative_to(source.parent).as_posix()] = here / name
    return files


def _ships(name: str, path: Path, package: Path, key: str, directory: bool = False) -> bool:
    """Is ``name`` one of a package's sources (refusing a link out of the package among them)?"""
    if name.startswith(".") or name == "__pycache__" or not (directory or name.endswith(".py") or name == "py.typed"):
        return False
    if path.is_symlink() and not path.resolve().is_relative_to(package):
        raise ConfigError(f"{key}: {path} is a link to {path.resolve()}, outside the module's directory {package}; "
                          "only the module's own files are shipped: copy what it needs in, or remove the link")
    target = path.resolve().name
    if path.is_symlink() and not directory and (target.startswith(".") or not target.endswith((".py", "py.typed"))):
        raise ConfigError(f"{key}: {path} is a link to {path.resolve()}, which is not a Python source; only sources "
                          "are shipped: remove the link")
    return not (directory and path.is_symlink())


def _check_file(path: Path, key: str, directory_hint: str = "") -> None:
    try:
        regular_file(path, MAX_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist") from None
    except InputFileError as err:
        hint = f"; {directory_hint}" if directory_hint and path.is_dir() else ""
        raise ConfigError(f"{key}: {err}{hint}") from None


def _size(size: int) -> str:
    """Bytes, as a person reads them."""
    if size < 1024:
        return f"{size} B"
    return f"{size / 1024:.1f} KiB" if size < 1 << 20 else f"{size / 2**20:.1f} MiB"
