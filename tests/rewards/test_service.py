"""Reward services over HTTP on loopback: the uvicorn server (batching, replicas, token, bind refusal) and the
client's retries against real servers with real failures (503, 429 + Retry-After, 500, 400, down, slow, garbage)."""

import json
import math
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import refused

from omnigrpo.cli import main
from omnigrpo.config.schema import RewardSpec
from omnigrpo.rewards.admission import Limits
from omnigrpo.rewards.registry import build_reward
from omnigrpo.rewards.server import Batcher, PublicBindRefused, RewardServer, is_loopback
from omnigrpo.rewards.transport import TOKEN_ENV, ServiceRefused, ServiceUnavailable, decode_image, encode_image
from omnigrpo.rewards.worker import RewardWorker
from omnigrpo.worlds import shapes


def _batch(n=5):
    scenes = shapes.train_items()[:n]
    return np.stack([shapes.render(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]), \
        [s.prompt for s in scenes], [s.metadata for s in scenes]


def _serve(reward, name="test", **kwargs) -> RewardServer:
    return RewardServer(reward, name, **kwargs).start()


class _Scripted:
    """A plain HTTP server whose n-th POST is answered by ``script(n, body)`` -> (status, headers, JSON body);
    counts its hits."""

    def __init__(self, script):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    hit = owner.hits
                    owner.hits += 1
                    owner.times.append(time.monotonic())
                status, headers, reply = script(hit, body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.hits, self.times, self.lock = 0, [], threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _ones(body) -> dict:
    return {"scores": [1.0] * len(body["images"])}


def test_png_round_trip_is_lossless():
    image = _batch(1)[0][0]
    assert np.array_equal(decode_image(encode_image(image)), image)


def test_serve_reward_cli_scores_like_the_local_reward():
    exe = Path(sys.executable).parent / "omnigrpo"
    proc = subprocess.Popen([str(exe), "serve-reward", "shapes", "--port", "0", "--replicas", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving reward 'shapes' (2 replica(s)") and " on http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].strip()
        assert requests.get(f"{url}/health", timeout=5).json() == {"reward": "shapes", "status": "ok"}
        images, prompts, metadata = _batch()
        remote = build_reward(f"url:{url}", {"batch_size": 2})  # 3 requests, sent concurrently
        assert remote(images, prompts, metadata) == build_reward("shapes")(images, prompts, metadata)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_concurrent_requests_are_scored_in_one_judge_call(plugins, tmp_path):
    log = tmp_path / "calls.jsonl"
    server = _serve(lambda i: build_reward("call_log:CallLog", {"path": str(log)}), factory=True, max_batch=8,
                    max_wait_ms=2000)  # a loaded CI machine may take a while to send all four
    images, prompts, metadata = _batch(8)
    barrier, replies = threading.Barrier(4), [None] * 4

    def post(k):
        body = {"images": [encode_image(im) for im in images[2 * k: 2 * k + 2]], "prompts": prompts[2 * k: 2 * k + 2]}
        barrier.wait()
        replies[k] = requests.post(f"{server.url}/score", json=body, timeout=30).json()["scores"]

    threads = [threading.Thread(target=post, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        from call_log import read
        assert [c["size"] for c in read(log)] == [8] and server.batcher.calls == [8]
        assert [s for k in range(4) for s in replies[k]] == [float(len(p)) for p in prompts]  # each its own scores
        # more than max_batch at once: split into judge calls of at most 8, whole requests each
        build_reward(f"url:{server.url}", {"batch_size": 3, "max_concurrency": 4})(*_batch(12))
        assert all(size <= 8 for size in server.batcher.calls) and sum(server.batcher.calls) == 20
    finally:
        server.stop()


def test_replicas_are_built_in_their_own_threads_and_score_side_by_side(plugins, tmp_path):
    log = tmp_path / "calls.jsonl"
    factory = lambda i: build_reward("call_log:CallLog", {"path": str(log), "seconds": 1.0, "replica": str(i)})  # noqa: E731
    server = _serve(factory, factory=True, replicas=2, max_batch=2, max_wait_ms=0)
    try:
        remote = build_reward(f"url:{server.url}", {"batch_size": 2, "max_concurrency": 2})
        assert remote(*_batch(4)) == [float(len(p)) for p in _batch(4)[1]]
        from call_log import read
        calls = read(log)
        assert sorted(c["replica"] for c in calls) == ["0", "1"]
        assert all(c["built_in"] == c["called_in"] == f"reward-replica-{c['replica']}" for c in calls)
        assert max(c["start"] for c in calls) < min(c["end"] for c in calls)  # the two calls overlapped
    finally:
        server.stop()


def test_a_service_answering_503_twice_is_retried_and_scores():
    server = _Scripted(lambda hit, body: (503, {}, {"error": "warming up"}) if hit < 2 else (200, {}, _ones(body)))
    try:
        assert build_reward(f"url:{server.url}", {"retries": 3, "backoff": 0.05})(*_batch(2)) == [1.0, 1.0]
        assert server.hits == 3
        waits = np.diff(server.times)
        assert waits[0] >= 0.05 and waits[1] >= 0.1  # from `backoff` (not urllib3's 0), then twice that
    finally:
        server.close()


def test_429_with_retry_after_waits_that_long():
    server = _Scripted(lambda hit, body: (429, {"Retry-After": "1"}, {"error": "slow down"}) if hit == 0
                       else (200, {}, _ones(body)))
    try:
        start = time.monotonic()
        assert build_reward(f"url:{server.url}", {"retries": 2, "backoff": 0.01})(*_batch(1)) == [1.0]
        assert 0.9 <= time.monotonic() - start < 3.0 and server.hits == 2
    finally:
        server.close()


def test_a_400_fails_at_once_without_retrying():
    server = _Scripted(lambda hit, body: (400, {}, {"error": "no such model"}))
    try:
        with pytest.raises(ServiceRefused, match="refused the request \\(400\\).*no such model"):
            build_reward(f"url:{server.url}", {"retries": 3, "backoff": 0.01})(*_batch(2))
        assert server.hits == 1
    finally:
        server.close()


def test_a_service_that_always_500s_fails_only_its_samples():
    always = _Scripted(lambda hit, body: (500, {}, {"error": "CUDA out of memory"}))
    # a second service that fails only the requests holding a prompt of a green shape
    some = _Scripted(lambda hit, body: (500, {}, {"error": "boom"}) if any("green" in p for p in body["prompts"])
                     else (200, {}, _ones(body)))
    try:
        kwargs = {"retries": 2, "backoff": 0.01, "batch_size": 1}
        worker = RewardWorker([RewardSpec(name="shapes"), RewardSpec(name=f"url:{some.url}", kwargs=kwargs),
                               RewardSpec(name=f"url:{always.url}", kwargs=kwargs, required=False)])
        worker.setup()
        images, prompts, metadata = _batch(6)
        result = worker.score(images, prompts, metadata)
        green = np.array(["green" in p for p in prompts])
        assert 0 < green.sum() < len(prompts)
        assert (result.failed[1] == green).all() and (result.valid == ~green).all()  # only those samples
        assert result.failed[2].all() and always.hits == 3 * len(prompts)  # each request tried 1 + 2 times
        assert "HTTP 500" in result.errors[f"url:{always.url}"] and not result.failed[0].any()
        assert np.isfinite(result.scores[1][~green]).all()  # the requests that succeeded kept their scores
    finally:
        always.close()
        some.close()


def test_a_server_that_is_down_is_a_failure_not_a_zero():
    server = _serve(lambda images, prompts, metadata: [1.0] * len(images))
    url = server.url
    server.stop()
    worker = RewardWorker([RewardSpec(name=f"url:{url}", kwargs={"retries": 1, "backoff": 0.01, "timeout": 2})])
    worker.setup()
    result = worker.score(*_batch())
    assert result.failed.all() and not result.valid.any() and np.isnan(result.total).all()
    assert "failed after 2 attempts" in next(iter(result.errors.values()))


def test_a_slow_judge_times_out():
    def slow(images, prompts, metadata):
        time.sleep(2.0)
        return [1.0] * len(images)

    server = _serve(slow)
    try:
        with pytest.raises(ServiceUnavailable, match="failed after 1 attempts.*Timeout"):
            build_reward(f"url:{server.url}", {"timeout": 0.3, "retries": 0})(*_batch(2))
    finally:
        server.stop()


@pytest.mark.parametrize("reply", ["not json at all", {"scores": [1.0]}, {"nope": 1}])
def test_a_server_answering_garbage_is_a_failure(reply):
    server = _Scripted(lambda hit, body: (200, {}, reply))
    try:
        worker = RewardWorker([RewardSpec(name="shapes"),
                               RewardSpec(name=f"url:{server.url}", kwargs={"retries": 1, "backoff": 0.01})])
        worker.setup()
        result = worker.score(*_batch(3))
        assert result.failed[1].all() and not result.valid.any()
        assert result.metrics()["reward/shapes/mean"] == 1.0
        assert "unreadable reply" in next(iter(result.errors.values()))
    finally:
        server.close()


def test_a_judge_error_on_the_server_is_reported():
    def broken(images, prompts, metadata):
        raise RuntimeError("CUDA out of memory")

    server = _serve(broken)
    try:
        with pytest.raises(ServiceUnavailable, match="HTTP 500.*CUDA out of memory"):
            build_reward(f"url:{server.url}", {"retries": 0})(*_batch(1))
    finally:
        server.stop()


def test_async_rewards_are_served_and_one_replica_is_called_one_batch_at_a_time():
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

    server = _serve(judge, max_batch=2)
    try:
        fn = build_reward(f"url:{server.url}", {"batch_size": 1, "max_concurrency": 4})
        assert fn(*_batch(4)) == [0.25] * 4
        assert peak[0] == 1
    finally:
        server.stop()


def test_credentials_in_the_url_are_refused():
    with pytest.raises(ValueError, match="OMNIGRPO_REWARD_TOKEN"):
        build_reward("url:http://user:pw@127.0.0.1:9/")


def test_health_and_bad_bodies():
    server = _serve(lambda images, prompts, metadata: [1.0] * len(images), "t", limits=Limits(max_body_mb=1))
    try:
        assert requests.get(f"{server.url}/health", timeout=10).json() == {"reward": "t", "status": "ok"}
        as_json = {"Content-Type": "application/json"}
        big = requests.post(f"{server.url}/score", data=b"x" * (2 * 2**20), headers=as_json, timeout=10)
        assert big.status_code == 413
        for body in [b"{not json", b'{"images": ["not base64!"], "prompts": ["p"]}', b'{"prompts": []}',
                     json.dumps({"images": [encode_image(_batch(1)[0][0])], "prompts": ["a", "b"]}).encode()]:
            bad = requests.post(f"{server.url}/score", data=body, headers=as_json, timeout=10)
            assert bad.status_code == 400 and "bad request" in bad.json()["error"], body
        assert server.batcher.calls == []  # nothing malformed reached the judge
    finally:
        server.stop()


def test_bearer_token_from_the_environment(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    server = _serve(lambda images, prompts, metadata: [0.5] * len(images))
    try:
        assert build_reward(f"url:{server.url}")(*_batch(2)) == [0.5, 0.5]
        wrong = requests.post(f"{server.url}/score", headers={"Authorization": "Bearer guess"}, json={}, timeout=10)
        assert wrong.status_code == 401 and "s3cret" not in wrong.text
        monkeypatch.delenv(TOKEN_ENV)
        with pytest.raises(ServiceRefused, match="refused the request \\(401\\)"):
            build_reward(f"url:{server.url}", {"retries": 3})(*_batch(2))  # no retry on 401
    finally:
        server.stop()


def test_a_public_bind_needs_a_token(monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.1")
    with pytest.raises(PublicBindRefused, match=TOKEN_ENV):
        RewardServer(lambda images, prompts, metadata: [1.0] * len(images), "t", "0.0.0.0")
    refused(main, ["serve-reward", "shapes", "--host", "0.0.0.0", "--port", "0"], capsys,
            "--host: refusing to serve on 0.0.0.0", TOKEN_ENV)
    refused(main, ["serve-reward", "shapes", "--replicas", "0"], capsys, "--replicas: must be at least 1")
    refused(main, ["serve-reward", "shapes", "wieght=2"], capsys, "takes no argument 'wieght'")
    with RewardServer(lambda images, prompts, metadata: [1.0] * len(images), "t") as busy:
        refused(main, ["serve-reward", "shapes", "--port", str(busy.port)], capsys, "--host/--port: cannot listen")


def test_a_replica_that_cannot_be_built_stops_the_cli_before_serving(plugins, tmp_path, capsys):
    refused(main, ["serve-reward", "call_log:CallLog", f"path={tmp_path / 'log'}", "replica=r{replica}", "fail=r1",
                   "--replicas", "2", "--port", "0"], capsys, "could not be built", "no GPU left for replica r1")


def test_nan_and_none_cross_the_wire_as_failed_and_not_applicable():
    server = _serve(lambda images, prompts, metadata: [math.nan, None] + [0.5] * (len(images) - 2))
    try:
        worker = RewardWorker([RewardSpec(name="shapes"), RewardSpec(name=f"url:{server.url}", required=False)])
        worker.setup()
        result = worker.score(*_batch(3))
        assert result.failed[1].tolist() == [True, False, False]
        assert result.applicable[1].tolist() == [True, False, True] and result.scores[1][2] == 0.5
    finally:
        server.stop()


def test_a_served_score_that_is_not_a_real_number_is_sent_as_failed():
    batcher = Batcher(lambda replica: lambda images, prompts, metadata: [True, "0.5", 1j, None, 0.25], max_wait_ms=0)
    batcher.start()
    try:
        scores = batcher.submit(np.zeros((5, 4, 4, 3), np.uint8), ["p"] * 5, [{}] * 5).result(timeout=30)
    finally:
        batcher.stop()
    assert [math.isnan(s) if s is not None else None for s in scores[:3]] == [True, True, True]
    assert scores[3:] == [None, 0.25]  # None stays "not applicable"; a real number is sent as it is


def test_a_judge_raising_a_base_exception_fails_its_call_and_the_replica_serves_on():
    class Boom(BaseException):
        pass

    calls = []

    def reward(images, prompts, metadata):
        calls.append(len(images))
        if len(calls) == 1:
            raise Boom("judge gone")
        return [0.5] * len(images)

    batcher = Batcher(lambda replica: reward, max_wait_ms=0)
    batcher.start()
    try:
        first = batcher.submit(np.zeros((1, 4, 4, 3), np.uint8), ["p"], [{}])
        with pytest.raises(RuntimeError, match="the reward raised Boom: judge gone"):
            first.result(timeout=30)
        assert batcher.submit(np.zeros((1, 4, 4, 3), np.uint8), ["p"], [{}]).result(timeout=30) == [0.5]
    finally:
        batcher.stop()
