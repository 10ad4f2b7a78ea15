"""The reward server under hostile bodies: a pixel bomb refused from its header, a memory budget and a cap on
requests in flight (503), a deadline (504), clients that leave, SIGTERM with a hung judge, and a load test
mixing good and hostile clients against a real ``omnigrpo serve-reward`` process."""

import base64
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests

from omnigrpo.rewards.admission import MB, Limits, pixel_bytes
from omnigrpo.rewards.registry import build_reward
from omnigrpo.rewards.server import RewardServer
from omnigrpo.rewards.transport import encode_image
from omnigrpo.worlds import shapes

OMNIGRPO = str(Path(sys.executable).parent / "omnigrpo")


def _png(width: int, height: int) -> bytes:
    """An all-white greyscale PNG of ``width`` x ``height`` built row by row (a 10000x10000 one is about 100 KB
    on the wire and 300 MB as RGB): a decompression bomb under PIL's own limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, packer = b"\x00" + b"\xff" * width, zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> str:
    return base64.b64encode(_png(10000, 10000)).decode()


def _good(n: int = 2):
    scenes = shapes.train_items()[:n]
    images = np.stack([shapes.render(s, np.random.default_rng(i)) for i, s in enumerate(scenes)])
    return images, [s.prompt for s in scenes], [s.metadata for s in scenes]


def _body(images, prompts) -> dict:
    return {"images": [encode_image(im) for im in images], "prompts": list(prompts)}


class Gate:
    """A reward that waits for ``open`` before scoring (a slow or stuck judge), and counts the images it scored."""

    def __init__(self):
        self.open, self.scored = threading.Event(), []

    def __call__(self, images, prompts, metadata):
        self.open.wait(30)
        self.scored.append(len(images))
        return [1.0] * len(images)


def test_a_pixel_bomb_is_refused_from_its_header_and_good_requests_go_on(bomb):
    server = RewardServer(lambda images, prompts, metadata: [1.0] * len(images), "t").start()
    try:
        reply = requests.post(f"{server.url}/score", json={"images": [bomb], "prompts": ["p"]}, timeout=30)
        assert reply.status_code == 413 and "10000x10000 pixels" in reply.json()["error"], reply.text
        admission = server.app.state.admission
        assert admission.peak < 4 * MB and admission.used == 0 and admission.pending == 0  # pixels never reserved
        assert server.batcher.calls == []
        assert requests.post(f"{server.url}/score", json=_body(*_good()[:2]), timeout=30).json() == {"scores": [1, 1]}
    finally:
        server.stop()


def test_the_memory_budget_and_the_cap_on_requests_in_flight():
    gate = Gate()
    server = RewardServer(gate, "t", max_wait_ms=0, limits=Limits(memory_mb=2, max_pending=1)).start()
    try:
        big = _body(np.zeros((2, 512, 512, 3), np.uint8), ["a", "b"])  # 2 x 512^2 pixels need 3.6 MB to decode
        reply = requests.post(f"{server.url}/score", json=big, timeout=30)
        assert reply.status_code == 413 and "whole budget of 2 MB" in reply.json()["error"], reply.text
        assert pixel_bytes([(512, 512)] * 2) > 2 * MB
        first: dict = {}
        thread = threading.Thread(target=lambda: first.update(r=requests.post(
            f"{server.url}/score", json=_body(*_good(1)[:2]), timeout=30)))
        thread.start()
        while server.app.state.admission.pending == 0:
            time.sleep(0.01)
        busy = requests.post(f"{server.url}/score", json=_body(*_good(1)[:2]), timeout=30)
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1" and "in flight" in busy.json()["error"]
        gate.open.set()
        thread.join()
        assert first["r"].json() == {"scores": [1.0]} and gate.scored == [1]
    finally:
        gate.open.set()
        server.stop()


def test_a_request_past_its_deadline_is_504_and_never_scored_later():
    gate = Gate()
    server = RewardServer(gate, "t", max_wait_ms=0, limits=Limits(request_timeout_s=1.0)).start()
    try:
        held = threading.Thread(target=requests.post, args=(f"{server.url}/score",),
                                kwargs={"json": _body(*_good(1)[:2]), "timeout": 30})
        held.start()  # its judge call holds the only replica
        while server.app.state.admission.pending == 0:
            time.sleep(0.01)
        late = requests.post(f"{server.url}/score", json=_body(*_good(2)[:2]), timeout=30)  # queued behind it
        assert late.status_code == 504 and "within 1 s" in late.json()["error"], late.text
        gate.open.set()
        held.join()
        assert requests.post(f"{server.url}/score", json=_body(*_good(3)[:2]), timeout=30).status_code == 200
        assert gate.scored == [1, 3]  # the 2 images that timed out in the queue were dropped, not scored
    finally:
        gate.open.set()
        server.stop()


def test_a_client_that_leaves_mid_body_is_one_warning_line(caplog):
    server = RewardServer(lambda images, prompts, metadata: [1.0] * len(images), "t").start()
    try:
        with caplog.at_level("WARNING"), socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n{\"images\": [")
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while not [r for r in caplog.records if "left before" in r.getMessage()] and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [r for r in caplog.records if "left before" in r.getMessage()]
        assert len(left) == 1 and "left before sending its whole body" in left[0].getMessage()
        assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]
        assert server.app.state.admission.pending == 0 and server.app.state.admission.used == 0
    finally:
        server.stop()


def _start(argv: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([OMNIGRPO, "serve-reward", *argv, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    assert " on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.split(" on ")[1].strip()


def _memory_mb(pid: int, key: str) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(key))) / 1024


def test_sigterm_ends_a_server_whose_judge_hangs(plugins, tmp_path):
    marker = tmp_path / "hung"
    proc, url = _start(["hang_reward:hangs_once", f"marker={marker}"])
    try:
        threading.Thread(target=lambda: requests.post(f"{url}/score", json=_body(*_good(1)[:2]), timeout=60),
                         daemon=True).start()
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down, then re-raises the signal it caught: the status of a process ended by SIGTERM
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM) and time.monotonic() - start < 15
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


LOAD_SECONDS = 8.0


def _hostile(url: str, kind: str, bomb: str) -> int:
    """One hostile request; returns the status it got (0 for a connection the client itself cut)."""
    if kind == "disconnect":
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n" + b"x" * 1000)
        return 0
    body = {"bomb": json.dumps({"images": [bomb] * 4, "prompts": ["p"] * 4}).encode(),
            "huge": b"x" * (3 * MB), "json": b"{not json", "base64": b'{"images": ["@@"], "prompts": ["p"]}',
            "sizes": json.dumps(_body(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"]) | {
                "images": [encode_image(np.zeros((8, 8, 3), np.uint8)), encode_image(np.zeros((9, 8, 3), np.uint8))]
            }).encode()}[kind]
    try:
        return requests.post(f"{url}/score", data=body, timeout=30).status_code
    except requests.ConnectionError:  # the server may close a connection whose body it refused unread
        return 0


def test_load_good_and_hostile_clients_together(bomb):
    """Six clients for a bounded time against a real server process: every good request is scored right,
    every hostile one refused, the server's memory stays within its budget, and its log holds no traceback."""
    proc, url = _start(["shapes", "--max-body-mb", "2", "--memory-mb", "128", "--max-pending", "8"])
    try:
        idle_mb = _memory_mb(proc.pid, "VmRSS")
        images, prompts, metadata = _good(8)
        expected = build_reward("shapes")(images, prompts, metadata)
        good, statuses, wrong = [0], {}, []
        stop = time.monotonic() + LOAD_SECONDS

        def client(k: int) -> None:
            remote = build_reward(f"url:{url}", {"batch_size": 4, "retries": 8, "backoff": 0.05})
            kinds = ["bomb", "huge", "json", "base64", "sizes", "disconnect"]
            i = 0
            while time.monotonic() < stop:
                if k % 2 == 0:  # three good clients, three hostile ones
                    if remote(images, prompts, metadata) != expected:
                        wrong.append(k)
                    good[0] += 1
                else:
                    kind = kinds[(i + k) % len(kinds)]
                    statuses.setdefault(kind, set()).add(_hostile(url, kind, bomb))
                i += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak_mb = _memory_mb(proc.pid, "VmHWM")
        assert not wrong and good[0] >= 6, (wrong, good)
        assert statuses["bomb"] <= {413, 503} and statuses["huge"] <= {413, 503, 0}, statuses
        assert statuses["json"] <= {400, 503} and statuses["base64"] <= {400, 503} and statuses["sizes"] <= {400, 503}
        # one bomb decoded would take 300 MB (RGB) + 400 MB (PIL's pixels); the budget is 128 MB
        assert peak_mb - idle_mb < 128 + 64, (idle_mb, peak_mb)
        print(f"\nload test: {good[0]} good batches of 8 scored, server RSS idle {idle_mb:.0f} MB, "
              f"peak {peak_mb:.0f} MB")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log = proc.stderr.read()
        assert "Traceback" not in log, log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
