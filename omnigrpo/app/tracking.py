"""MLflow tracking of a run: params, per-step metrics in one batched call, captioned sample grids.

Why: users watch reward curves and samples in MLflow (the peers offer wandb/TensorBoard only). By
default the store is a sqlite file inside ``run.dir`` with artifacts beside it, so a run needs no
server and everything it wrote stays in one folder; ``tracking.uri`` may name a server instead.
Metrics are logged once per step with ``log_batch`` (a few ms on sqlite). Config values whose key
looks like a credential are redacted before they become params.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
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

from omnigrpo.config.loader import to_dict
from omnigrpo.config.schema import Config, TrackingConfig
from omnigrpo.config.validation import SECRET_WORDS
from omnigrpo.worlds import registry as worlds

_PARAM_MAX = 500
log = logging.getLogger(__name__)


def store_uri(tracking: TrackingConfig, run_dir: str) -> str:
    """``tracking.uri``, else the sqlite store inside ``run_dir`` (``run.dir``)."""
    if tracking.uri:
        return tracking.uri
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


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
    """One MLflow run, in the store of ``tracking`` and ``run_dir`` (:func:`store_uri`); ``config``: the run's whole
    config as plain data (:func:`~omnigrpo.config.loader.to_dict`), logged as its params. Call :meth:`start`
    first; every other method logs into that run."""

    def __init__(self, tracking: TrackingConfig, run_dir: str, config: dict):
        # MLflow's HTTP client retries for minutes by default; fail fast instead and let the buffer
        # below carry metrics over an outage (a user's explicit setting wins)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        # a local store that fails (a full disk) is reported here, once; MLflow's own report is a traceback a call
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self.tracking, self.run_dir, self.config = tracking, run_dir, config
        self.client = MlflowClient(tracking_uri=store_uri(tracking, run_dir))
        self.run_id = ""
        self.logged_until = 0
        self.pending: list[list[Metric]] = []  # metric batches not yet accepted by the store, oldest first
        self.failed_flushes = 0

    @classmethod
    def from_config(cls, cfg: Config) -> Tracker:
        """The tracker of a run of ``cfg``."""
        return cls(cfg.tracking, cfg.run.dir, to_dict(cfg))

    def start(self, resume_run_id: str | None = None) -> str:
        """Create the run, or continue ``resume_run_id``: steps it already logged are not logged again."""
        self.logged_until = 0
        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            history = self.client.get_metric_history(resume_run_id, "reward/total/mean")
            self.logged_until = max((m.step for m in history), default=0)
            return resume_run_id
        name = self.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = None
            if not self.tracking.uri:  # a local store keeps its artifacts inside the run dir too
                location = (Path(self.run_dir).resolve() / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=self.tracking.run_name or None)
        self.run_id = run.info.run_id
        clean = _redact(self.config)
        params = flatten(clean)
        batch = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[i : i + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(clean, sort_keys=False), "config.yaml")
        return self.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        """All of a step's metrics in one call; NaN values (e.g. a reward with no scores) are skipped, and
        so is a training step a resumed run had already logged before its interruption.

        If the tracking server cannot be reached the metrics are kept in order and sent with the next
        call that gets through (training goes on meanwhile); the outage is logged as the metric
        ``fault/tracking_unreachable`` (how many calls failed) at the first step of the flushed ones.
        """
        if 0 < step <= self.logged_until and "reward/total/mean" in metrics:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if not math.isnan(float(v))]
        if batch:
            self.pending.append(batch)
        self.flush()

    def flush(self) -> bool:
        """Send buffered metrics, oldest first; False (and nothing lost) while the server is unreachable."""
        sent: list[Metric] = []
        try:
            while self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[0])
                sent = self.pending.pop(0)
        except Exception as err:  # noqa: BLE001 - any transport/server error: keep the metrics, retry later
            if not self.failed_flushes:
                log.warning("MLflow unreachable (%s: %s); buffering metrics", type(err).__name__, str(err)[:200])
            self.failed_flushes += 1
            return False
        if self.failed_flushes and sent:
            log.warning("MLflow reachable again after %d failed call(s); buffered metrics sent", self.failed_flushes)
            event = Metric("fault/tracking_unreachable", float(self.failed_flushes), int(time.time() * 1000),
                           sent[0].step)
            self.failed_flushes = 0
            self.client.log_batch(self.run_id, metrics=[event])
        return True

    def log_samples(self, images: np.ndarray, captions: list[str], step: int, key: str = "samples") -> None:
        """A grid of uint8 images ``[N, H, W, 3]``, each upscaled 4x with its caption underneath; skipped
        (with a warning) while the server is unreachable: a missed grid is not worth stalling training."""
        if self.failed_flushes:
            log.warning("MLflow unreachable: sample grid %r of step %d not logged", key, step)
            return
        tiles = [_captioned(img, cap) for img, cap in zip(images, captions, strict=True)]
        grid = make_grid(torch.stack(tiles), nrow=min(8, len(tiles)), padding=2, pad_value=255)
        try:
            self.client.log_image(self.run_id, grid.permute(1, 2, 0).numpy(), key=key, step=step)
        except Exception as err:  # noqa: BLE001
            log.warning("sample grid %r of step %d not logged: %s", key, step, str(err)[:200])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Run tags (shown beside the run in MLflow), e.g. where each role's actors were placed."""
        try:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
        except Exception as err:  # noqa: BLE001 - tags are informative: an outage must not end the run
            log.warning("run tags not logged: %s", str(err)[:200])

    def log_dict(self, data: dict, name: str, wait_s: float = 120.0) -> None:
        """A JSON artifact; waits up to ``wait_s`` for an unreachable server (buffered metrics go first), then
        writes it beside the run instead."""
        text = json.dumps(data, indent=2)
        try:
            if self._drain(wait_s):
                self.client.log_text(self.run_id, text, name)
                return
        except Exception as err:  # noqa: BLE001 - the store is gone: the artifact goes beside the run
            log.warning("MLflow refused artifact %s: %s", name, str(err)[:200])
        self.write_beside(name, text, f"artifact {name}")

    def _drain(self, wait_s: float) -> bool:
        """Flush, retrying every 2 s for up to ``wait_s``; True once nothing is buffered."""
        deadline = time.monotonic() + wait_s
        while not self.flush():
            if time.monotonic() >= deadline:
                return False
            time.sleep(2.0)
        return True

    def end(self, failed: bool = False, wait_s: float = 120.0, stopped: bool = False) -> None:
        """Flush what is buffered (retrying for up to ``wait_s``), then mark the run finished, failed or (a run
        stopped on request, resumable) killed.
        Metrics the store never accepted are written to ``<run.dir>/unsent_metrics.jsonl``."""
        if not self.run_id:
            return
        if not self._drain(wait_s):
            self.write_beside("unsent_metrics.jsonl", "".join(
                json.dumps([{"key": m.key, "value": m.value, "step": m.step} for m in batch]) + "\n"
                for batch in self.pending), f"{len(self.pending)} step(s) of metrics")
            return
        status = RunStatus.FAILED if failed else RunStatus.KILLED if stopped else RunStatus.FINISHED
        try:
            self.client.set_terminated(self.run_id, status=RunStatus.to_string(status))
        except Exception as err:  # noqa: BLE001 - the store went away between the drain and this call
            log.error("MLflow run %s not marked %s: %s", self.run_id, RunStatus.to_string(status), str(err)[:200])

    def write_beside(self, name: str, text: str, what: str) -> None:
        """What the store did not take, appended to ``<run.dir>/name`` (one error line; never raises: a full
        disk must not hide the fault that ended the run)."""
        path = Path(self.run_dir) / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(text)
        except OSError as err:
            log.error("MLflow unreachable and %s cannot be written (%s): %s lost", path, err.strerror, what)
            return
        log.error("MLflow unreachable: %s written to %s", what, path)


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
        return {k: "<redacted>" if any(w in str(k).lower() for w in SECRET_WORDS) else _redact(v)
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


def existing_store(tracking: TrackingConfig, run_dir: str) -> str:
    """:func:`store_uri`, refusing (FileNotFoundError) a run directory that holds no MLflow store yet (reading
    would create an empty one)."""
    db = Path(run_dir).resolve() / "mlflow.db"
    if not tracking.uri and not db.exists():
        raise FileNotFoundError(f"run.dir: no MLflow store at {db} (has a run written there yet?)")
    return store_uri(tracking, run_dir)


def latest_run_id(tracking: TrackingConfig, run_dir: str) -> str:
    """The newest run of ``tracking.experiment`` in the store (:func:`existing_store`); raises if there is none."""
    client = MlflowClient(tracking_uri=existing_store(tracking, run_dir))
    exp = client.get_experiment_by_name(tracking.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name != ''",
                              order_by=["attributes.start_time DESC"], max_results=50) if exp else []
    runs = [r for r in runs if not (r.info.run_name or "").startswith(("eval:", "bench-"))]
    if not runs:
        raise FileNotFoundError(f"no training run of experiment {tracking.experiment!r} in "
                                f"{store_uri(tracking, run_dir)}")
    return runs[0].info.run_id


def history(client: MlflowClient, run_id: str, key: str) -> list:
    """A run's logged values of metric ``key``, in step order (MLflow ``Metric`` objects: ``.step``, ``.value``)."""
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def default_curve_keys(world_name: str) -> list[str]:
    """The panels ``omnigrpo curves`` draws unless told (``--keys``): the training reward, the world's held-out
    headline, the style entropy of each free attribute in one panel (a world that reads its styles back), the KL
    and the diversity within a prompt's group; every alarm is marked on each."""
    world = worlds.get(world_name)
    keys = ["reward/total/mean", f"eval/{next(iter(world.EVAL))}"]
    if hasattr(world, "Style"):
        keys.append("+".join(f"eval/style_entropy_{f.name}" for f in dataclasses.fields(world.Style)))
    return [*keys, "learner/kl", "diversity/group"]


def _mark_alarms(ax, alarms: dict[str, list[int]]) -> None:
    """A dashed vertical line at each step an alarm was raised, one colour and legend entry per alarm kind."""
    for colour, (kind, steps) in zip(("tab:red", "tab:purple", "tab:brown", "tab:olive"), alarms.items(),
                                     strict=False):
        for i, step in enumerate(steps):
            ax.axvline(step, color=colour, linestyle="--", linewidth=0.9, label=kind if i == 0 else None)


def plot_curves(tracking: TrackingConfig, run_dir: str, run_id: str, keys: list[str], out: str | Path) -> Path:
    """Export metric histories of an MLflow run as one PNG, a panel per key (read back from the store,
    so the figure shows exactly what was logged). A key ``a+b+c`` overlays those metrics in one panel (say the
    style entropy of each attribute); every alarm the run raised (``alarm/<kind>``) is a dashed vertical line
    at its step on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    client = MlflowClient(tracking_uri=existing_store(tracking, run_dir))
    run = client.get_run(run_id)
    alarms = {key: [m.step for m in history(client, run_id, key) if m.value]
              for key in sorted(run.data.metrics) if key.startswith("alarm/")}
    cols = len(keys) if len(keys) <= 5 else 4
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, keys, strict=False):
        for key in panel.split("+"):
            logged = history(client, run_id, key)
            if not logged:
                raise KeyError(f"run {run_id} logged no metric {key!r}")
            ax.plot([m.step for m in logged], [m.value for m in logged], marker="o" if len(logged) < 20 else None,
                    markersize=3, linewidth=1.2, label=key.rsplit("/", 1)[-1])
        _mark_alarms(ax, alarms)
        if "+" in panel or alarms:
            ax.legend(fontsize=7)
        ax.set_title(panel if "+" not in panel else panel.split("+")[0].rsplit("_", 1)[0] + "_*", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{tracking.experiment} / {run.info.run_name} ({run_id[:8]})", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
