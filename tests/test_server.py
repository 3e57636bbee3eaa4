"""avg-serve: the real server on loopback, a real HTTP client and the official openai client."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from avg_edge.runtime.pipeline import Pipeline
from avg_edge.model.tiny import textured_image

QUESTION = "What colour is the background?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(w=300, h=200, seed=2) -> bytes:
    buf = io.BytesIO()
    textured_image(w, h, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def _messages(image: bytes | str, question: str = QUESTION):
    url = image if isinstance(image, str) else "data:image/png;base64," + base64.b64encode(image).decode()
    return [{"role": "system", "content": "ignored"},
            {"role": "user", "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]}]


class Server:
    def __init__(self, build_dir, *extra: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "from avg_edge.cli import serve_main; serve_main()", "-m", str(build_dir),
               "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start: " + (self.proc.stderr.read() if self.proc.stderr else ""))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(tiny_build):
    s = Server(tiny_build[0], "--max-queue", "2", "--max-request-mb", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def expected(tiny_build):
    return Pipeline.load(tiny_build[0]).generate(_png(), QUESTION, max_new_tokens=6)


def test_health_and_models(server):
    assert httpx.get(server.base + "/health").json()["status"] == "ok"
    data = httpx.get(server.base + "/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"] == "tiny-fp32"


def test_chat_completion_matches_the_runtime(server, expected):
    r = httpx.post(server.base + "/v1/chat/completions", json={"model": "tiny-fp32", "max_tokens": 6, "messages": _messages(_png())}, timeout=120)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["object"] == "chat.completion" and d["choices"][0]["message"]["content"] == expected.text
    assert d["choices"][0]["finish_reason"] == expected.finish_reason
    assert d["usage"]["completion_tokens"] == len(expected.token_ids)
    assert d["usage"]["prompt_tokens"] == expected.timings.prompt_eval_count
    assert d["avg_edge"]["granularity"] == expected.granularity and d["avg_edge"]["visual_tokens"] == expected.visual_tokens


def test_streaming_ends_with_done(server, expected):
    with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=120,
                      json={"stream": True, "max_tokens": 6, "messages": _messages(_png())}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip() == expected.text
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == expected.finish_reason
    assert last["usage"]["completion_tokens"] == len(expected.token_ids) and last["avg_edge"]["granularity"] == expected.granularity


def test_openai_client(server, expected):
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(model="tiny-fp32", messages=_messages(_png()), max_tokens=6)
    assert resp.choices[0].message.content == expected.text
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-fp32", messages=_messages(_png()), max_tokens=6, stream=True) if c.choices]
    assert "".join(pieces).strip() == expected.text
    assert [m.id for m in client.models.list().data] == ["tiny-fp32"]


@pytest.mark.parametrize("body,status,match", [
    ("{not json", 400, "not valid JSON"),
    ({"messages": []}, 400, "messages: expected a non-empty list"),
    ({"messages": [{"role": "user", "content": "no image here"}]}, 400, "an image is required"),
    ({"messages": "REMOTE"}, 400, "remote URLs are refused"),
    ({"messages": "BADIMAGE"}, 400, "cannot read image bytes"),
    ({"messages": "OK", "granularity": 100}, 400, "[36, 72, 144, 288, 576]"),
    ({"messages": "OK", "max_tokens": 0}, 400, "max_tokens: expected a positive integer"),
    ({"messages": "HUGE"}, 413, "limit"),
    ({"messages": "OK", "temperature": "hot"}, 400, "temperature: expected a number"),
    ({"messages": "OK", "top_p": "x"}, 400, "top_p: expected a number"),
    ({"messages": "OK", "seed": -3}, 400, "seed: expected a non-negative integer"),
    ({"messages": "OK", "stream": "yes"}, 400, "stream: expected true or false"),
])
def test_errors_have_openai_shape(server, body, status, match):
    if isinstance(body, dict) and isinstance(body.get("messages"), str):
        kind = body["messages"]
        body = dict(body)
        body["messages"] = {
            "REMOTE": _messages("https://example.invalid/cat.png"),
            "BADIMAGE": _messages(b"not an image at all"),
            "OK": _messages(_png(64, 64)),
            "HUGE": _messages(b"\0" * (2 * 1024 * 1024)),
        }[kind]
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.base + "/v1/chat/completions", content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert match in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert httpx.get(server.base + "/health").json()["in_flight"] == 0     # no admission slot leaked


def test_client_disconnect_mid_stream_frees_the_slot(server):
    with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=120,
                      json={"stream": True, "max_tokens": 6, "messages": _messages(_png())}) as r:
        assert r.status_code == 200
        next(r.iter_lines())                     # read one event, then hang up
    deadline = time.time() + 60
    while httpx.get(server.base + "/health").json()["in_flight"] and time.time() < deadline:
        time.sleep(0.2)
    assert httpx.get(server.base + "/health").json()["in_flight"] == 0


def test_unknown_route_and_method(server):
    r = httpx.get(server.base + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.base + "/v1/chat/completions")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]


def test_api_key(tiny_build):
    s = Server(tiny_build[0], "--api-key", "s3cret")
    try:
        r = httpx.get(s.base + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(s.base + "/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
    finally:
        s.stop()


def test_bounded_load(server, expected):
    """12 requests from 6 concurrent clients against a queue of 2: every request is either
    answered correctly or refused cleanly with 503, and the server stays healthy."""
    body = {"max_tokens": 6, "messages": _messages(_png())}

    def one(_):
        r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=300)
        return r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(one, range(12)))
    ok = [d for code, d in results if code == 200]
    refused = [d for code, d in results if code == 503]
    assert len(ok) + len(refused) == 12, [c for c, _ in results]
    assert ok and all(d["choices"][0]["message"]["content"] == expected.text for d in ok)
    assert all(d["error"]["code"] == "busy" for d in refused)
    h = httpx.get(server.base + "/health").json()
    assert h["status"] == "ok" and h["in_flight"] == 0
