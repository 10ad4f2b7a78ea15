"""Reward services over HTTP on loopback: real servers, real failures (down, slow, garbage, unauthorised)."""

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests

from omnigrpo.config.schema import RewardSpec
from omnigrpo.rewards.registry import build_reward
from omnigrpo.rewards.service import TOKEN_ENV, decode_image, encode_image, make_server
from omnigrpo.rewards.worker import RewardWorker
from omnigrpo.worlds import shapes


def _batch(n=5):
    scenes = shapes.train_items()[:n]
    return np.stack([shapes.render(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]), \
        [s.prompt for s in scenes], [s.metadata for s in scenes]


def _serve(handler_or_reward, name="test"):
    server = handler_or_reward if isinstance(handler_or_reward, ThreadingHTTPServer) else \
        make_server(handler_or_reward, name)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_png_round_trip_is_lossless():
    image = _batch(1)[0][0]
    assert np.array_equal(decode_image(encode_image(image)), image)


def test_serve_reward_cli_scores_like_the_local_reward(tmp_path):
    exe = Path(sys.executable).parent / "omnigrpo"
    proc = subprocess.Popen([str(exe), "serve-reward", "shapes", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving reward 'shapes' on http://127.0.0.1:"), line
        url = line.split(" on ")[1].strip()
        assert requests.get(f"{url}/health", timeout=5).json() == {"reward": "shapes", "status": "ok"}
        images, prompts, metadata = _batch()
        remote = build_reward(f"url:{url}", {"batch_size": 2})  # 3 requests, sent concurrently
        assert remote(images, prompts, metadata) == build_reward("shapes")(images, prompts, metadata)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_server_that_is_down_is_a_failure_not_a_zero():
    server, url = _serve(lambda images, prompts, metadata: [1.0] * len(images))
    server.shutdown()
    server.server_close()
    worker = RewardWorker([RewardSpec(name=f"url:{url}", kwargs={"retries": 1, "backoff": 0.01, "timeout": 2})])
    worker.setup()
    result = worker.score(*_batch())
    assert result.failed.all() and not result.valid.any() and np.isnan(result.total).all()
    assert "failed after 2 attempts" in next(iter(result.errors.values()))


def test_a_slow_judge_times_out():
    def slow(images, prompts, metadata):
        time.sleep(2.0)
        return [1.0] * len(images)

    server, url = _serve(slow)
    try:
        fn = build_reward(f"url:{url}", {"timeout": 0.3, "retries": 0})
        with pytest.raises(RuntimeError, match="failed after 1 attempts"):
            fn(*_batch(2))
    finally:
        server.shutdown()


@pytest.mark.parametrize("body", [b"not json at all", json.dumps({"scores": [1.0]}).encode(),
                                  json.dumps({"nope": 1}).encode()])
def test_a_server_answering_garbage_is_a_failure(body):
    class Garbage(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server, url = _serve(ThreadingHTTPServer(("127.0.0.1", 0), Garbage))
    try:
        worker = RewardWorker([RewardSpec(name="shapes"),
                               RewardSpec(name=f"url:{url}", kwargs={"retries": 1, "backoff": 0.01})])
        worker.setup()
        result = worker.score(*_batch(3))
        assert result.failed[1].all() and not result.valid.any()
        assert result.metrics()["reward/shapes/mean"] == 1.0
    finally:
        server.shutdown()


def test_a_judge_error_on_the_server_is_reported(monkeypatch):
    def broken(images, prompts, metadata):
        raise RuntimeError("CUDA out of memory")

    server, url = _serve(broken)
    try:
        with pytest.raises(RuntimeError, match="HTTP 500.*CUDA out of memory"):
            build_reward(f"url:{url}", {"retries": 0})(*_batch(1))
    finally:
        server.shutdown()


def test_async_rewards_are_served_and_judges_are_called_one_at_a_time():
    inside, peak = [0], [0]
    guard = threading.Lock()

    async def judge(images, prompts, metadata):
        with guard:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        time.sleep(0.05)  # a non-thread-safe judge (a tokenizer, a GPU) would break if entered twice
        with guard:
            inside[0] -= 1
        return [0.25] * len(images)

    server, url = _serve(judge)
    try:
        fn = build_reward(f"url:{url}", {"batch_size": 1, "max_concurrency": 4})
        assert fn(*_batch(4)) == [0.25] * 4
        assert peak[0] == 1
    finally:
        server.shutdown()


def test_credentials_in_the_url_are_refused():
    with pytest.raises(ValueError, match="OMNIGRPO_REWARD_TOKEN"):
        build_reward("url:http://user:pw@127.0.0.1:9/")


def test_oversized_or_undecodable_bodies_are_refused():
    server = make_server(lambda images, prompts, metadata: [1.0] * len(images), "t", max_body_mb=1)
    _, url = _serve(server)
    try:
        big = requests.post(f"{url}/score", data=b"x" * (2 * 2**20), timeout=10)
        assert big.status_code == 413
        bad = requests.post(f"{url}/score", json={"images": ["not base64!"], "prompts": ["p"]}, timeout=10)
        assert bad.status_code == 400 and "bad request" in bad.json()["error"]
    finally:
        server.shutdown()


def test_bearer_token_from_the_environment(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    server, url = _serve(lambda images, prompts, metadata: [0.5] * len(images))
    try:
        assert build_reward(f"url:{url}")(*_batch(2)) == [0.5, 0.5]
        monkeypatch.delenv(TOKEN_ENV)
        with pytest.raises(RuntimeError, match="refused the request \\(401\\)"):
            build_reward(f"url:{url}", {"retries": 3})(*_batch(2))  # no retry on 401
    finally:
        server.shutdown()
