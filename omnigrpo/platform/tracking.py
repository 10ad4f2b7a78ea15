"""MLflow tracking of a run: params, per-step metrics in one batched call, captioned sample grids.

Why: users watch reward curves and samples in MLflow (the peers offer wandb/TensorBoard only). By
default the store is a sqlite file inside ``run.dir`` with artifacts beside it, so a run needs no
server and everything it wrote stays in one folder; ``tracking.uri`` may name a server instead.
Metrics are logged once per step with ``log_batch`` (a few ms on sqlite). Config values whose key
looks like a credential are redacted before they become params.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch
import yaml
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from omnigrpo.platform.config import Config, to_dict

_SECRET_WORDS = ("token", "secret", "password", "passwd", "_key", "apikey", "credential", "auth", "bearer",
                 "cookie", "header")
_PARAM_MAX = 500


def store_uri(cfg: Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return f"sqlite:///{Path(cfg.run.dir).resolve() / 'mlflow.db'}"


def flatten(data: object, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"trainer.lr": "0.0002", "rewards.0.name": "shapes", ...}``."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list | tuple):
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        return {prefix: str(data)[:_PARAM_MAX]}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


class Tracker:
    """One MLflow run. Call :meth:`start` first; every other method logs into that run."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.client = MlflowClient(tracking_uri=store_uri(cfg))
        self.run_id = ""
        self.logged_until = 0

    def start(self, resume_run_id: str | None = None) -> str:
        """Create the run, or continue ``resume_run_id``: steps it already logged are not logged again."""
        self.logged_until = 0
        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            history = self.client.get_metric_history(resume_run_id, "reward/total/mean")
            self.logged_until = max((m.step for m in history), default=0)
            return resume_run_id
        name = self.cfg.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = None
            if not self.cfg.tracking.uri:  # a local store keeps its artifacts inside the run dir too
                location = (Path(self.cfg.run.dir).resolve() / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=self.cfg.tracking.run_name or None)
        self.run_id = run.info.run_id
        clean = _redact(to_dict(self.cfg))
        params = flatten(clean)
        batch = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[i : i + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(clean, sort_keys=False), "config.yaml")
        return self.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        """All of a step's metrics in one call; NaN values (e.g. a reward with no scores) are skipped, and
        so is a training step a resumed run had already logged before its interruption."""
        if 0 < step <= self.logged_until and "reward/total/mean" in metrics:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if not math.isnan(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_samples(self, images: np.ndarray, captions: list[str], step: int, key: str = "samples") -> None:
        """A grid of uint8 images ``[N, H, W, 3]``, each upscaled 4x with its caption underneath."""
        tiles = [_captioned(img, cap) for img, cap in zip(images, captions, strict=True)]
        grid = make_grid(torch.stack(tiles), nrow=min(8, len(tiles)), padding=2, pad_value=255)
        self.client.log_image(self.run_id, grid.permute(1, 2, 0).numpy(), key=key, step=step)

    def log_dict(self, data: dict, name: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2), name)

    def end(self, failed: bool = False) -> None:
        if self.run_id:
            status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
            self.client.set_terminated(self.run_id, status=status)


def _captioned(image: np.ndarray, caption: str, scale: int = 4) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> uint8 ``[3, H*scale + 24, W*scale]`` with the caption in two lines."""
    h, w = image.shape[:2]
    canvas = Image.new("RGB", (w * scale, h * scale + 24), "white")
    canvas.paste(Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST))
    draw = ImageDraw.Draw(canvas)
    words, lines = caption.split(), ["", ""]
    for word in words:
        row = 0 if len(lines[0]) + len(word) < w * scale // 6 else 1
        lines[row] = f"{lines[row]} {word}".strip()
    draw.text((2, h * scale + 1), lines[0], fill="black")
    draw.text((2, h * scale + 12), lines[1], fill="black")
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1)


def _redact(data: object) -> object:
    """Hide values under credential-like keys, and user info and query strings inside URLs."""
    if isinstance(data, dict):
        return {k: "<redacted>" if any(w in str(k).lower() for w in _SECRET_WORDS) else _redact(v)
                for k, v in data.items()}
    if isinstance(data, list):
        return [_redact(v) for v in data]
    if isinstance(data, str) and "://" in data:
        url = urlsplit(data)
        if not (url.username or url.password or url.query):
            return data
        host = url.hostname or ""
        netloc = (f"<redacted>@{host}" if url.username or url.password else host) + (
            f":{url.port}" if url.port else "")
        return urlunsplit((url.scheme, netloc, url.path, "<redacted>" if url.query else "", ""))
    return data
