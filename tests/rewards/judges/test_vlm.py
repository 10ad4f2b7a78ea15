"""VLM judges on a tiny random Qwen2-VL (processor built offline), in-process and behind a real
OpenAI-compatible server on loopback backed by the same model."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from omnigrpo.config.schema import RewardSpec
from omnigrpo.rewards.judges.vlm import TransformersVLM, parse_score, yes_probability
from omnigrpo.rewards.registry import build_reward
from omnigrpo.rewards.transport import ServiceRefused, decode_image
from omnigrpo.rewards.worker import RewardWorker
from omnigrpo.worlds import shapes


@pytest.fixture(scope="module")
def vlm_dir(tiny_vlm_dir):
    return tiny_vlm_dir


def _batch(n=3):
    scenes = shapes.train_items()[:n]
    return np.stack([shapes.render(s) for s in scenes]), [s.prompt for s in scenes], [{} for _ in scenes]


class _OpenAIServer:
    """A minimal OpenAI-compatible /v1/chat/completions server backed by an in-process VLM."""

    def __init__(self, vlm: TransformersVLM, api_key: str = "", delay: float = 0.0, garbage: bool = False,
                 canned: str | None = None, first: tuple[int, ...] = ()):
        """``first``: the statuses of the first answers (429 with ``Retry-After: 1``), before real ones."""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests += 1
                if owner.requests <= len(first):
                    status = first[owner.requests - 1]
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "1")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    return self.wfile.write(b"{}")
                if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                    return self._send(401, b'{"error": "bad key"}')
                time.sleep(delay)
                if garbage:
                    return self._send(200, b"<html>502 bad gateway</html>")
                content = body["messages"][0]["content"]
                url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
                image = decode_image(url.split(",", 1)[1])
                question = next(c["text"] for c in content if c["type"] == "text")
                if body.get("logprobs"):
                    top = vlm.first_token_logprobs(image, question)
                    entry = {"token": max(top, key=top.get), "logprob": max(top.values()),
                             "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()]}
                    choice = {"message": {"role": "assistant", "content": entry["token"]},
                              "logprobs": {"content": [entry]}}
                else:
                    answer = canned if canned is not None else vlm.generate(image, question)
                    choice = {"message": {"role": "assistant", "content": answer}}
                return self._send(200, json.dumps({"choices": [choice]}).encode())

            def _send(self, code, data):
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.requests = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_in_process_judge_gives_p_yes(vlm_dir):
    fn = build_reward("vlm_judge", {"model": str(vlm_dir), "top_logprobs": 64})
    scores = fn(*_batch())
    assert len(scores) == 3 and all(0.0 < s < 1.0 for s in scores)
    assert len(set(np.round(scores, 7))) > 1  # depends on image and prompt


def test_http_judge_matches_the_in_process_one_and_sends_the_key(vlm_dir, monkeypatch):
    vlm = TransformersVLM(str(vlm_dir), top_logprobs=64)
    server = _OpenAIServer(vlm, api_key="test-key")
    monkeypatch.setenv("MY_VLM_KEY", "test-key")
    try:
        remote = build_reward("vlm_judge", {"model": "tiny", "backend": "openai", "base_url": server.base_url,
                                            "api_key_env": "MY_VLM_KEY", "top_logprobs": 64, "max_concurrency": 2})
        local = build_reward("vlm_judge", {"model": str(vlm_dir), "top_logprobs": 64})
        batch = _batch()
        assert remote(*batch) == pytest.approx(local(*batch), abs=1e-6)
        monkeypatch.delenv("MY_VLM_KEY")
        keyless = build_reward("vlm_judge", {"model": "tiny", "backend": "openai", "base_url": server.base_url,
                                             "api_key_env": "MY_VLM_KEY", "retries": 2})
        before = server.requests
        with pytest.raises(ServiceRefused, match="401"):  # fails the batch, and so the driver's dry run
            keyless(*batch)
        assert server.requests - before <= 3  # one request per sample at most: a 401 is not retried
    finally:
        server.close()


def test_http_judge_retries_503_and_honours_retry_after(vlm_dir):
    vlm = TransformersVLM(str(vlm_dir), top_logprobs=64)
    server = _OpenAIServer(vlm, first=(503, 429))
    try:
        remote = build_reward("vlm_judge", {"model": "tiny", "backend": "openai", "base_url": server.base_url,
                                            "top_logprobs": 64, "max_concurrency": 1, "retries": 3, "backoff": 0.01})
        local = build_reward("vlm_judge", {"model": str(vlm_dir), "top_logprobs": 64})
        start = time.monotonic()
        assert remote(*_batch(2)) == pytest.approx(local(*_batch(2)), abs=1e-6)  # no NaN: the retries scored
        assert time.monotonic() - start >= 0.9 and server.requests == 4  # waited the 429's Retry-After
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["timeout", "garbage", "down"])
def test_http_judge_failures_are_failures(vlm_dir, kind):
    vlm = TransformersVLM(str(vlm_dir), top_logprobs=64)
    server = _OpenAIServer(vlm, delay=1.5 if kind == "timeout" else 0.0, garbage=kind == "garbage")
    if kind == "down":
        server.close()
    try:
        spec = RewardSpec(name="vlm_judge", kwargs={"model": "tiny", "backend": "openai", "base_url": server.base_url,
                                                    "timeout": 0.3, "retries": 1, "backoff": 0.01})
        worker = RewardWorker([RewardSpec(name="shapes"), spec])
        worker.setup()
        result = worker.score(*_batch())
        assert result.failed[1].all() and not result.valid.any()
        assert result.metrics()["reward/vlm_judge/failed"] == 3
    finally:
        if kind != "down":
            server.close()


def test_score_mode_parses_the_answer_end_to_end(vlm_dir):
    vlm = TransformersVLM(str(vlm_dir))
    server = _OpenAIServer(vlm, canned="Sharp, faithful to the caption. Final Score: 4")
    try:
        fn = build_reward("vlm_judge", {"model": "tiny", "backend": "openai", "base_url": server.base_url,
                                        "mode": "score", "template": "unifiedreward"})
        assert fn(*_batch(2)) == pytest.approx([0.8, 0.8])
    finally:
        server.close()
    local = build_reward("vlm_judge", {"model": str(vlm_dir), "mode": "score", "max_new_tokens": 4})
    # the random tiny model does not write "Final Score: X": NaN, i.e. a failure, never a 0
    assert all(math.isnan(s) for s in local(*_batch(2)))


def test_bad_settings_are_refused(vlm_dir):
    with pytest.raises(ValueError, match="template must be"):
        build_reward("vlm_judge", {"model": str(vlm_dir), "template": "rate this"})
    with pytest.raises(ValueError, match="mode must be"):
        build_reward("vlm_judge", {"model": str(vlm_dir), "mode": "stars"})
    with pytest.raises(ValueError, match="not in base_url"):
        build_reward("vlm_judge", {"model": "m", "backend": "openai", "base_url": "http://u:pw@127.0.0.1:1/v1"})


def test_parsers_by_hand():
    assert parse_score("Final Score: 5") == 1.0 and parse_score("final score:2.5 ok") == 0.5
    assert math.isnan(parse_score("Final Score: 10")) and math.isnan(parse_score("Final Score: 5.5"))
    assert math.isnan(parse_score("I would give it a 4")) and math.isnan(parse_score("Final Score: 9"))
    assert yes_probability({"Yes": math.log(0.3), " yes": math.log(0.3), "No": math.log(0.2)}) == pytest.approx(0.75)
    assert math.isnan(yes_probability({"maybe": 0.0}))


