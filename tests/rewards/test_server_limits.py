"""The reward server under hostile bodies and connections: a pixel bomb refused from its header, a memory budget
and a cap on requests in flight (503), a deadline (504), clients that leave, idle and slow connections closed,
connections capped per client and in all, foreign content types (415) and hosts (421), formats other than PNG,
SIGTERM with a hung judge, and a load test mixing good and hostile clients against a real ``omnigrpo
serve-reward`` process."""

import base64
import contextlib
import io
import json
import resource
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
from PIL import Image

from omnigrpo.rewards.access import served_hosts
from omnigrpo.rewards.admission import MB, Limits, pixel_bytes
from omnigrpo.rewards.connections import FD_MARGIN, connection_cap
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
            sock.sendall(_head(server.port, 100000) + b"{\"images\": [")
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

QUICK = Limits(header_timeout_s=1.0, body_timeout_s=1.0)
"""Short connection timers, so that a test waits a second for each."""


def _ones(images, prompts, metadata):
    return [1.0] * len(images)


def _head(port: int, length: int, host: str = "127.0.0.1") -> bytes:
    """The headers of a ``/score`` POST whose body of ``length`` bytes follows."""
    return (f"POST /score HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection to the server on 127.0.0.1 from the loopback address ``source`` (another client)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_after(sock: socket.socket, limit: float = 5.0, drip: bytes = b"") -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (``limit`` if it does not), sending ``drip`` a byte every 0.1 s
    meanwhile; and what the server sent before closing."""
    start, got = time.monotonic(), b""
    sock.settimeout(0.1)
    while time.monotonic() - start < limit:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            if drip:
                sock.send(drip[:1])
                drip = drip[1:] or drip
            continue
        except ConnectionResetError:
            data = b""
        if not data:
            return time.monotonic() - start, got
        got += data
    return limit, got


def _alive(sock: socket.socket) -> bool:
    """Is ``sock`` still open on the server's side (nothing to read and no end of stream within 0.1 s)?"""
    sock.settimeout(0.1)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False


def _wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_an_idle_connection_is_closed_after_the_header_timeout():
    with RewardServer(_ones, "t", limits=QUICK) as server:
        with _connect(server.port) as fresh:
            seconds, _ = _closed_after(fresh)
            assert 0.8 < seconds < 3, seconds  # never sent a byte
        with _connect(server.port) as answered:
            answered.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
            seconds, got = _closed_after(answered)
            assert got.startswith(b"HTTP/1.1 200") and 0.8 < seconds < 3, (seconds, got)  # idle after its answer
        assert _wait_for(lambda: server.connections.open == 0)


def test_headers_sent_a_byte_at_a_time_are_closed_after_the_header_timeout():
    with RewardServer(_ones, "t", limits=QUICK) as server, _connect(server.port) as slow:
        seconds, got = _closed_after(slow, drip=b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * 100)
        assert 0.8 < seconds < 3 and got == b"", (seconds, got)


def test_a_slow_body_is_408_and_never_counted_in_flight():
    with RewardServer(_ones, "t", limits=Limits(header_timeout_s=1.0, body_timeout_s=1.0, max_pending=1)) as server, \
            _connect(server.port) as slow:
        slow.sendall(_head(server.port, 1000) + b"{")
        admission = server.app.state.admission
        assert _wait_for(lambda: admission.used > 0) and admission.pending == 0  # its first byte read and reserved
        good = requests.post(f"{server.url}/score", json=_body(*_good(1)[:2]), timeout=10)
        assert good.status_code == 200, good.text  # the only place in flight was free
        seconds, got = _closed_after(slow, drip=b" ")
        assert got.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in got and seconds < 3, got
        assert admission.used == 0 and admission.pending == 0


def test_connections_are_capped_per_client_and_in_all(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (100, 4096))  # a low open-file limit lowers the cap
    assert connection_cap(512) == 100 - FD_MARGIN and connection_cap(8) == 8
    monkeypatch.undo()
    limits = Limits(header_timeout_s=30.0, max_connections=5, max_connections_per_client=2)
    with RewardServer(_ones, "t", limits=limits) as server:
        held = [_connect(server.port, "127.0.0.2") for _ in range(2)]
        try:
            extra = _connect(server.port, "127.0.0.2")
            assert _closed_after(extra, limit=2)[0] < 1 and all(_alive(s) for s in held)  # one more: closed at once
            extra.close()
            health = requests.get(f"{server.url}/health", headers={"Connection": "close"}, timeout=5)  # another address
            assert health.status_code == 200, health.text
            assert _wait_for(lambda: server.connections.open == 2)
            held += [_connect(server.port, source) for source in ("127.0.0.3", "127.0.0.3", "127.0.0.4")]
            assert all(_alive(s) for s in held) and server.connections.open == 5
            last = _connect(server.port, "127.0.0.5")  # a sixth connection in all
            assert _closed_after(last, limit=2)[0] < 1
            last.close()
            held.pop().close()
            assert _wait_for(lambda: server.connections.open == 4)
            assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
            assert server.connections.refused == 2
        finally:
            for sock in held:
                sock.close()


def test_only_json_bodies_are_scored():
    with RewardServer(_ones, "t") as server:
        body = json.dumps(_body(*_good(1)[:2]))
        for kind in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"Content-Type": kind} if kind else {}
            reply = requests.post(f"{server.url}/score", data=body, headers=headers, timeout=10)
            assert reply.status_code == 415 and "application/json" in reply.json()["error"], (kind, reply.text)
            assert reply.headers["connection"] == "close"  # a client that cannot be served holds no slot
        json_utf8 = {"Content-Type": "application/json; charset=utf-8"}
        assert requests.post(f"{server.url}/score", data=body, headers=json_utf8, timeout=10).json() == {"scores": [1]}
        assert server.batcher.calls == [1]


def test_a_foreign_host_is_421_and_the_allowed_ones_are_served():
    with RewardServer(_ones, "t", allowed_hosts=["reward.example"]) as server:
        for host in ("evil.example", f"evil.example:{server.port}", f"127.0.0.1:{server.port + 1}", ""):
            for path in ("/health", "/score"):
                reply = requests.request("GET" if path == "/health" else "POST", f"{server.url}{path}",
                                         json=_body(*_good(1)[:2]), headers={"Host": host}, timeout=10)
                assert reply.status_code == 421 and "does not answer Host" in reply.json()["error"], (host, reply.text)
        for host in (f"127.0.0.1:{server.port}", f"LOCALHOST:{server.port}", f"[::1]:{server.port}",
                     "reward.example", f"reward.example:{server.port}"):
            reply = requests.post(f"{server.url}/score", json=_body(*_good(1)[:2]), headers={"Host": host}, timeout=10)
            assert reply.json() == {"scores": [1.0]}, (host, reply.text)
        assert build_reward(f"url:{server.url}")(*_good(2)) == [1.0, 1.0]  # the project's client, its own Host
    assert served_hosts("0.0.0.0", 80) is None and served_hosts("::", 80, ["a"]) == {"a", "a:80"}
    assert served_hosts("10.0.0.5", 8) == {"10.0.0.5:8"}


@pytest.mark.parametrize("kind", ["GIF", "JPEG", "BMP", "TIFF"])
def test_only_png_images_are_decoded(kind):
    with RewardServer(_ones, "t") as server:
        foreign = io.BytesIO()
        Image.new("RGB", (32, 32), "white").save(foreign, format=kind)
        body = _body(*_good(2)[:2])
        body["images"][1] = base64.b64encode(foreign.getvalue()).decode()
        reply = requests.post(f"{server.url}/score", json=body, timeout=10)
        assert reply.status_code == 400 and "image 1 is not a readable PNG" in reply.json()["error"], reply.text
        assert server.batcher.calls == []


def test_too_many_images_in_one_request_is_413():
    with RewardServer(_ones, "t", limits=Limits(max_images=2)) as server:
        images, prompts, _ = _good(3)
        reply = requests.post(f"{server.url}/score", json=_body(images, prompts), timeout=10)
        assert reply.status_code == 413 and "3 images, over this server's limit of 2" in reply.json()["error"]
        assert requests.post(f"{server.url}/score", json=_body(images[:2], prompts[:2]), timeout=10).status_code == 200
        assert server.batcher.calls == [2]


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
ATTACK_SOCKETS = 8
"""Connections each of the three connection attackers keeps open, all from one address (capped at 16 there)."""


def _hostile(url: str, kind: str, bomb: str) -> int:
    """One hostile request; returns the status it got (0 for a connection the client itself cut)."""
    if kind == "disconnect":
        port = int(url.rsplit(":", 1)[1])
        with _connect(port, "127.0.0.2") as sock:
            sock.sendall(_head(port, 5000000) + b"x" * 1000)
        return 0
    body = {"bomb": json.dumps({"images": [bomb] * 4, "prompts": ["p"] * 4}).encode(),
            "huge": b"x" * (3 * MB), "json": b"{not json", "base64": b'{"images": ["@@"], "prompts": ["p"]}',
            "sizes": json.dumps(_body(np.zeros((2, 8, 8, 3), np.uint8), ["a", "b"]) | {
                "images": [encode_image(np.zeros((8, 8, 3), np.uint8)), encode_image(np.zeros((9, 8, 3), np.uint8))]
            }).encode()}[kind]
    try:
        return requests.post(f"{url}/score", data=body, headers={"Content-Type": "application/json"},
                             timeout=30).status_code
    except requests.ConnectionError:  # the server may close a connection whose body it refused unread
        return 0


def _poke(sock: socket.socket, kind: str) -> bytes | None:
    """What the server sent on an attacker's ``sock`` (b"" once it closed it), or None while it waits; a slow
    body sends one more byte."""
    try:
        return sock.recv(4096, socket.MSG_DONTWAIT)
    except BlockingIOError:
        pass
    except OSError:
        return b""
    try:
        if kind == "slow-body":
            sock.send(b" ")
    except OSError:
        return b""
    return None


def _attack(port: int, kind: str, stop: float, seen: dict) -> None:
    """Keep ATTACK_SOCKETS connections of ``kind`` open from 127.0.0.3 until ``stop``: ``idle`` ones send nothing,
    ``half-open`` ones half their headers, ``slow-body`` ones their headers, then a body byte every 0.2 s. Records in
    ``seen[kind]`` each connection the server closed (``closed``) and each status line it sent."""
    first = {"idle": b"", "half-open": f"POST /score HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Le".encode(),
             "slow-body": _head(port, 100_000) + b"{"}[kind]
    socks: list[socket.socket] = []
    try:
        while time.monotonic() < stop:
            while len(socks) < ATTACK_SOCKETS:
                socks.append(_connect(port, "127.0.0.3"))
                with contextlib.suppress(OSError):  # a connection over the cap may be closed already
                    socks[-1].sendall(first)
            for sock in list(socks):
                data = _poke(sock, kind)
                if data:
                    seen[kind].append(data.split(b"\r\n")[0].decode())
                elif data == b"":
                    seen[kind].append("closed")
                    socks.remove(sock)
                    sock.close()
            time.sleep(0.2)
    finally:
        for sock in socks:
            sock.close()


def test_load_good_and_hostile_clients_together(bomb):
    """Good clients beside hostile bodies and hostile connections (idle, half-sent headers, slow bodies) for a
    bounded time against a real server process: every good request is answered 200 with the right scores and
    ``/health`` stays up, every hostile request is refused and every hostile connection closed, the server's
    memory stays within its budget, and its log holds no traceback."""
    proc, url = _start(["shapes", "--max-body-mb", "2", "--memory-mb", "128", "--max-pending", "8",
                        "--header-timeout-s", "1", "--body-timeout-s", "1", "--max-connections-per-client", "16"])
    try:
        idle_mb = _memory_mb(proc.pid, "VmRSS")
        images, prompts, metadata = _good(8)
        body = _body(images, prompts) | {"metadata": metadata}
        expected = {"scores": build_reward("shapes")(images, prompts, metadata)}
        latencies, wrong, health, statuses = [], [], set(), {}
        seen: dict[str, list[str]] = {"idle": [], "half-open": [], "slow-body": []}
        stop = time.monotonic() + LOAD_SECONDS

        def client(k: int) -> None:
            kinds = ["bomb", "huge", "json", "base64", "sizes", "disconnect"]
            i = 0
            while time.monotonic() < stop:
                if k % 2 == 0:  # three good clients, three hostile ones
                    start = time.monotonic()
                    reply = requests.post(f"{url}/score", json=body, timeout=30)
                    latencies.append(time.monotonic() - start)
                    if reply.status_code != 200 or reply.json() != expected:
                        wrong.append((reply.status_code, reply.text[:200]))
                    if k == 0:
                        health.add(requests.get(f"{url}/health", timeout=30).status_code)
                else:
                    kind = kinds[(i + k) % len(kinds)]
                    statuses.setdefault(kind, set()).add(_hostile(url, kind, bomb))
                i += 1

        port = int(url.rsplit(":", 1)[1])
        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        threads += [threading.Thread(target=_attack, args=(port, kind, stop, seen)) for kind in seen]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak_mb = _memory_mb(proc.pid, "VmHWM")
        p99 = float(np.percentile(latencies, 99))
        assert not wrong and len(latencies) >= 6 and health == {200}, (wrong[:3], len(latencies), health)
        assert statuses["bomb"] <= {413, 503} and statuses["huge"] <= {413, 503, 0}, statuses
        assert statuses["json"] <= {400, 503} and statuses["base64"] <= {400, 503} and statuses["sizes"] <= {400, 503}
        assert all("closed" in seen[kind] for kind in seen), {kind: set(v) for kind, v in seen.items()}
        assert "HTTP/1.1 408 Request Timeout" in seen["slow-body"], set(seen["slow-body"])
        # one bomb decoded would take 300 MB (RGB) + 400 MB (PIL's pixels); the budget is 128 MB
        assert peak_mb - idle_mb < 128 + 64, (idle_mb, peak_mb)
        assert p99 < 5.0, p99
        print(f"\nload test: {len(latencies)} good requests of 8 images answered 200, p99 latency {p99 * 1e3:.0f} ms; "
              f"hostile connections closed: " + ", ".join(f"{k} {v.count('closed')}" for k, v in seen.items()) +
              f"; server RSS idle {idle_mb:.0f} MB, peak {peak_mb:.0f} MB")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log = proc.stderr.read()
        assert "Traceback" not in log, log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_body_of_nested_objects_reserves_what_parsing_it_costs():
    """``{"junk": [{}, {}, ...]}`` is 3 bytes per object on the wire and about 75 once parsed: reserved as such, a
    body whose objects could never fit the budget is refused (413) before it is parsed."""
    with RewardServer(_ones, "t", limits=Limits(memory_mb=16)) as server:
        body = json.dumps({**_body(*_good(1)[:2]), "junk": [{}] * 300_000})  # about 2 MB
        reply = requests.post(f"{server.url}/score", data=body, headers={"Content-Type": "application/json"},
                              timeout=30)
        assert reply.status_code == 413, reply.text
        assert server.app.state.admission.used == 0 and server.batcher.calls == []
        assert requests.post(f"{server.url}/score", json=_body(*_good(1)[:2]), timeout=10).json() == {"scores": [1]}
