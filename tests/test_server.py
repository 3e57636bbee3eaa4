"""avg-serve: the real server on loopback, a real HTTP client and the official openai client."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import tempfile
import threading
import http.server
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


def _url(image: bytes | str) -> str:
    return image if isinstance(image, str) else "data:image/png;base64," + base64.b64encode(image).decode()


def _messages(image: bytes | str, question: str = QUESTION):
    return [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": _url(image)}}]}]


class Server:
    """`avg-serve` in a subprocess on loopback; its stderr goes to a file (`log()`)."""

    def __init__(self, build_dir, *extra: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "from avg_edge.cli import serve_main; serve_main()", "-m", str(build_dir),
               "--port", str(self.port), *extra]
        self.err = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start: " + self.log())

    def log(self) -> str:
        self.err.flush()
        with open(self.err.name) as f:
            return f.read()

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=5).json()

    def settled(self, timeout: float = 60) -> dict:
        """/health once nothing is in flight (or the last answer after `timeout`)."""
        deadline = time.time() + timeout
        h = self.health()
        while (h["in_flight"] or h["active"] or h["waiting"]) and time.time() < deadline:
            time.sleep(0.1)
            h = self.health()
        return h

    def post(self, body, timeout: float = 120, **kw) -> httpx.Response:
        return httpx.post(self.base + "/v1/chat/completions", json=body, timeout=timeout, **kw)

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(tiny_build):
    s = Server(tiny_build[0], "--max-queue", "2", "--max-request-mb", "1", "--threads", "1")
    yield s
    s.stop()
    assert "Traceback" not in s.log(), s.log()


@pytest.fixture(scope="module")
def expected(pipe):
    return pipe.generate(_png(), QUESTION, max_new_tokens=6)


def _sse(r: httpx.Response) -> list:
    events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_health_and_models(server):
    h = server.health()
    assert h["status"] == "ok" and h["parallel"] == 1 and h["max_queue"] == 2
    data = httpx.get(server.base + "/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"] == "tiny-fp32"


def test_chat_completion_matches_the_runtime(server, expected):
    r = server.post({"model": "tiny-fp32", "max_tokens": 6, "messages": _messages(_png())})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["object"] == "chat.completion" and d["choices"][0]["message"]["content"] == expected.text
    assert d["choices"][0]["finish_reason"] == expected.finish_reason
    assert d["usage"]["completion_tokens"] == len(expected.token_ids)
    assert d["usage"]["prompt_tokens"] == expected.timings.prompt_eval_count
    assert d["avg_edge"]["granularity"] == expected.granularity and d["avg_edge"]["visual_tokens"] == expected.visual_tokens


def test_streaming_ends_with_done_and_usage_when_asked(server, expected):
    for include in (False, True):
        body = {"stream": True, "max_completion_tokens": 6, "messages": _messages(_png()),
                "stream_options": {"include_usage": include}}
        with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=120, json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            chunks = _sse(r)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text.strip() == expected.text
        finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == expected.finish_reason
        assert finish[0]["avg_edge"]["granularity"] == expected.granularity
        usage = [c for c in chunks if not c["choices"]]
        assert len(usage) == include
        if include:
            assert chunks[-1] is usage[0] and usage[0]["usage"]["completion_tokens"] == len(expected.token_ids)


def test_openai_client(server, expected):
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(model="tiny-fp32", messages=_messages(_png()), max_tokens=6)
    assert resp.choices[0].message.content == expected.text
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-fp32", messages=_messages(_png()), max_tokens=6, stream=True) if c.choices]
    assert "".join(pieces).strip() == expected.text
    assert [m.id for m in client.models.list().data] == ["tiny-fp32"]


# -- conversations as clients send them ----------------------------------------------------
def test_multi_turn_reuses_the_image_and_matches_the_runtime(server, pipe):
    first = pipe.generate(_png(seed=5), QUESTION, max_new_tokens=5)
    want = pipe.generate(_png(seed=5), "And the shape?", max_new_tokens=5, history=[QUESTION, first.text or "blue"])
    hits = server.health()["image_cache_hits"]
    r1 = server.post({"max_tokens": 5, "messages": _messages(_png(seed=5))})
    assert r1.json()["choices"][0]["message"]["content"] == first.text
    convo = _messages(_png(seed=5)) + [{"role": "assistant", "content": first.text or "blue"},
                                        {"role": "user", "content": "And the shape?"}]
    d = server.post({"max_tokens": 5, "messages": convo}).json()
    assert d["choices"][0]["message"]["content"] == want.text
    assert d["usage"]["prompt_tokens"] == want.timings.prompt_eval_count
    assert server.health()["image_cache_hits"] == hits + 1          # the follow-up skipped the vision graph


def test_text_only_system_and_image_in_a_later_turn(server, pipe):
    want = pipe.generate(None, "Say hello.", max_new_tokens=5)
    d = server.post({"max_tokens": 5, "messages": [{"role": "user", "content": "Say hello."}]}).json()
    assert d["choices"][0]["message"]["content"] == want.text and d["avg_edge"]["granularity"] is None
    assert d["avg_edge"]["visual_tokens"] == 0 and d["usage"]["prompt_tokens"] == want.timings.prompt_eval_count

    want = pipe.generate(_png(), QUESTION, max_new_tokens=5, system="Answer in one word.")
    msgs = [{"role": "system", "content": "Answer in one word."}] + _messages(_png())
    assert server.post({"max_tokens": 5, "messages": msgs}).json()["choices"][0]["message"]["content"] == want.text
    assert want.timings.prompt_eval_count < pipe.generate(_png(), QUESTION, max_new_tokens=1).timings.prompt_eval_count

    want = pipe.generate(_png(), QUESTION, max_new_tokens=5, history=["Hi.", "Hello."], image_turn=2)
    msgs = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
            *_messages(_png())]
    assert server.post({"max_tokens": 5, "messages": msgs}).json()["choices"][0]["message"]["content"] == want.text


def test_stop_sequences(server, pipe):
    full = pipe.generate(_png(), QUESTION, max_new_tokens=12).text
    k = next(i for i in range(1, len(full) - 1) if full[i].strip() and full.find(full[i:i + 2]) == i)
    stop = full[k:k + 2]
    d = server.post({"max_tokens": 12, "stop": [stop, "never-appears"], "messages": _messages(_png())}).json()
    assert d["choices"][0]["message"]["content"] == full[:k].strip()
    assert d["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=120,
                      json={"stream": True, "max_tokens": 12, "stop": stop, "messages": _messages(_png())}) as r:
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in _sse(r) if c["choices"])
    assert text.strip() == full[:k].strip() and stop not in text


# -- every client mistake is a clean 4xx ----------------------------------------------------
def _deep(n: int) -> str:
    return '{"messages": ' + "[" * n + "]" * n + "}"


BAD = [
    ("{not json", 400, "not valid JSON"),
    (_deep(100_000), 400, "nested too deeply"),
    ([1, 2], 400, "expected a JSON object"),
    ({"messages": []}, 400, "messages: expected a non-empty list"),
    ({"messages": "OK", "max_tokens": 0}, 400, "max_tokens: expected a positive integer"),
    ({"messages": "OK", "max_completion_tokens": -1}, 400, "max_completion_tokens: expected a positive integer"),
    ({"messages": "OK", "temperature": "hot"}, 400, "temperature: expected a number"),
    ({"messages": "OK", "top_p": "x"}, 400, "top_p: expected a number"),
    ({"messages": "OK", "seed": -3}, 400, "seed: expected a non-negative integer"),
    ({"messages": "OK", "stream": "yes"}, 400, "stream: expected true or false"),
    ({"messages": "OK", "stream_options": []}, 400, "stream_options: expected an object"),
    ({"messages": "OK", "n": 2}, 400, "only 1 choice"),
    ({"messages": "OK", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool calling is not supported"),
    ({"messages": "OK", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"messages": "OK", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop: expected a string or a list of up to 4"),
    ({"messages": "OK", "stop": [""]}, 400, "stop: expected"),
    ({"messages": "OK", "granularity": 100}, 400, "[36, 72, 144, 288, 576]"),
    ({"messages": "OK", "granularity": True}, 400, "granularity: expected"),
    ({"messages": "OK", "max_visual_tokens": 0}, 400, "max_visual_tokens: expected a positive integer"),
    ({"messages": "OK", "max_visual_tokens": 1}, 422, "fit no granularity"),
    ({"messages": [{"role": "user", "content": "hi"}], "granularity": 36}, 400, "this request has no image"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 42}]}]}, 400, "text: expected a string, got int"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]}, 400, "expected a string, got list"),
    ({"messages": [{"role": "user", "content": 7}]}, 400, "expected a string or a list of parts"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "expected a part of type"),
    ({"messages": [{"role": "user", "content": "\ud800 lone"}]}, 400, "not valid Unicode"),
    ({"messages": [{"role": "user"}]}, 400, "expected a string or a list of parts, got NoneType"),
    ({"messages": ["hi"]}, 400, "expected an object with 'role'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role: expected system"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "must start with a user message"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400,
     "last message to be a user message"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x", "tool_call_id": "1"}]}, 400,
     "tool calls"),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, 400, "last message to be a user"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "IMG"}}]}]}, 400,
     "has no text"),
    ({"messages": "TWOIMAGES"}, 400, "one image per conversation"),
    ({"messages": "REMOTE"}, 400, "remote URLs are refused"),
    ({"messages": "BADIMAGE"}, 400, "cannot read image bytes"),
    ({"messages": "NOTBASE64"}, 400, "invalid base64"),
    ({"messages": "FTP"}, 400, "expected a data: or http(s): URL"),
    ({"messages": "LONG"}, 422, "context holds"),
    ({"messages": "HUGE"}, 413, "limit"),
]


def _body(body):
    if isinstance(body, str):
        return body
    if isinstance(body, dict) and isinstance(body.get("messages"), str):
        img = _url(_png(64, 64))
        body = dict(body)
        body["messages"] = {
            "OK": _messages(_png(64, 64)),
            "REMOTE": _messages("https://example.invalid/cat.png"),
            "BADIMAGE": _messages(b"not an image at all"),
            "NOTBASE64": _messages("data:image/png;base64,@@@"),
            "FTP": _messages("ftp://example.invalid/cat.png"),
            "LONG": _messages(_png(64, 64), "why " * 5000),
            "HUGE": _messages(b"\0" * (2 * 1024 * 1024)),
            "TWOIMAGES": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": img}},
                                                       {"type": "image_url", "image_url": {"url": img}}]}],
        }[body["messages"]]
    return json.dumps(body).replace("IMG", _url(_png(64, 64)))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body,status,match", BAD, ids=[f"{i}-{m[:30]}" for i, (_, _, m) in enumerate(BAD)])
def test_client_mistakes_get_their_status(server, body, status, match, stream):
    content = _body(body)
    if stream and content.startswith('{"messages": ') and not content.startswith('{"messages": [['):
        content = '{"stream": true, ' + content[1:]
    r = httpx.post(server.base + "/v1/chat/completions", content=content, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text                      # a real status, streamed or not
    err = r.json()["error"]
    assert match in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert server.settled()["in_flight"] == 0                   # no admission slot leaked


def test_tiny_temperature_is_greedy(server, expected):
    d = server.post({"max_tokens": 6, "temperature": 1e-310, "messages": _messages(_png())}).json()
    assert d["choices"][0]["message"]["content"] == expected.text


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


# -- admission, cancellation, a server that stays up ----------------------------------------
def _raw(port: int, head: bytes, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head + body)
    return s


def _post_head(length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _status(sock: socket.socket) -> int:
    data = sock.recv(4096)
    return int(data.split(b" ", 2)[1])


def test_over_the_limit_is_refused_before_the_body_is_read(server):
    sock = _raw(server.port, _post_head(50 * 1024**2))             # says 50 MB, sends nothing
    try:
        assert _status(sock) == 413
    finally:
        sock.close()


def test_a_full_queue_answers_503_before_reading_the_body(server):
    """Two long streams fill the queue (one decoding, one waiting for the slot); a third
    request is refused from its headers alone, its body never sent."""
    body = {"stream": True, "max_tokens": 3000, "messages": _messages(_png())}
    release = threading.Event()

    def hold():
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=120) as r:
            release.wait(60)
            return r.status_code

    with ThreadPoolExecutor(max_workers=2) as pool:
        held = [pool.submit(hold) for _ in range(2)]
        try:
            deadline = time.time() + 30
            while server.health()["in_flight"] < 2 and time.time() < deadline:
                time.sleep(0.05)
            assert server.health()["in_flight"] == 2
            sock = _raw(server.port, _post_head(900_000))             # within the size limit, body never sent
            try:
                assert _status(sock) == 503
            finally:
                sock.close()
        finally:
            release.set()
        assert [h.result() for h in held] == [200, 200]
    h = server.settled()
    assert h["in_flight"] == 0 and h["active"] == 0


def test_client_disconnect_mid_stream_cancels_and_frees_the_slot(server):
    before = server.health()["cancelled"]
    with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=120,
                      json={"stream": True, "max_tokens": 3000, "messages": _messages(_png())}) as r:
        assert r.status_code == 200
        next(r.iter_lines())                     # read one event, then hang up
    h = server.settled()
    assert h["in_flight"] == 0 and h["active"] == 0 and h["cancelled"] == before + 1
    assert "client went away after" in server.log()


def test_a_client_that_times_out_cancels_its_request(server):
    before = server.health()["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        server.post({"max_tokens": 3000, "messages": _messages(_png())}, timeout=1.0)
    h = server.settled()
    assert h["in_flight"] == 0 and h["active"] == 0 and h["cancelled"] == before + 1


def test_clients_dropping_mid_body_are_one_line_each(server):
    for _ in range(20):
        _raw(server.port, _post_head(5000), b'{"messages": [').close()
    assert server.settled()["in_flight"] == 0
    assert "Traceback" not in server.log()


class _SlowImages(http.server.BaseHTTPRequestHandler):
    """Serves /slow.png after 3 s, /huge.png over the size limit."""

    def do_GET(self):  # noqa: N802
        if self.path == "/slow.png":
            time.sleep(3)
            data = _png(64, 64)
        else:
            data = b"\0" * (2 * 1024 * 1024)
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_remote_images_are_fetched_off_the_event_loop_with_a_timeout_and_a_cap(tiny_build):
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowImages)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{images.server_address[1]}"
    s = Server(tiny_build[0], "--allow-remote-images", "--fetch-timeout", "1", "--max-request-mb", "1")
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            slow = pool.submit(s.post, {"max_tokens": 2, "messages": _messages(base + "/slow.png")})
            time.sleep(0.3)
            assert s.health()["in_flight"] == 1          # /health answers while the fetch waits
            r = slow.result()
        assert r.status_code == 400 and "could not fetch" in r.json()["error"]["message"]
        r = s.post({"max_tokens": 2, "messages": _messages(base + "/huge.png")})
        assert r.status_code == 413, r.text
    finally:
        s.stop()
        images.shutdown()


def test_bounded_load(tiny_build, expected):
    """8 clients x 10 requests, streaming and not, some hanging up early: every request is
    answered correctly, refused with 503 or cancelled by its own client; nothing leaks, no
    500, /health stays up and memory stays bounded."""
    s = Server(tiny_build[0], "--max-queue", "4")
    try:
        rss0 = s.rss()

        def one(i: int):
            body = {"max_tokens": 6, "messages": _messages(_png()), "stream": i % 2 == 0}
            if i % 5 == 4:                               # hangs up after the first event
                with httpx.stream("POST", s.base + "/v1/chat/completions", json={**body, "stream": True,
                                  "max_tokens": 2000}, timeout=300) as r:
                    if r.status_code != 200:
                        r.read()
                        return r.json(), r.status_code
                    next(r.iter_lines())
                    return "dropped", 200
            if body["stream"]:
                with httpx.stream("POST", s.base + "/v1/chat/completions", json=body, timeout=300) as r:
                    if r.status_code != 200:
                        r.read()
                        return r.json(), r.status_code
                    text = "".join(c["choices"][0]["delta"].get("content", "") for c in _sse(r) if c["choices"])
                    return text.strip(), 200
            r = s.post(body, timeout=300)
            return (r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.json()), r.status_code

        def client(c: int):
            return [one(c * 10 + k) for k in range(10)]

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = [x for batch in pool.map(client, range(8)) for x in batch]
        codes = [code for _, code in results]
        assert 500 not in codes and set(codes) <= {200, 503}, codes
        answered = [t for t, code in results if code == 200 and t != "dropped"]
        assert answered and all(t == expected.text for t in answered)
        assert all(t["error"]["code"] == "busy" for t, code in results if code == 503)
        h = s.settled()
        assert h["status"] == "ok" and h["in_flight"] == 0 and h["active"] == 0 and h["waiting"] == 0
        assert s.rss() < rss0 + 300 * 1024**2
        assert "Traceback" not in s.log()
    finally:
        s.stop()


def test_parallel_slots_answer_like_the_runtime(tiny_build, tiny_concat_build, pipe):
    """--parallel 4: four concurrent clients with different images and questions, each
    answer equal to Pipeline.generate's alone; a concat-cache build refuses --parallel 4."""
    cases = [(_png(seed=s), q, n) for s, q, n in [(1, QUESTION, 9), (2, "What shape is it?", 5),
                                                    (3, QUESTION, 12), (4, "Is there text?", 7)]]
    want = [pipe.generate(img, q, max_new_tokens=n) for img, q, n in cases]
    s = Server(tiny_build[0], "--parallel", "4")
    try:
        assert s.health()["parallel"] == 4
        with ThreadPoolExecutor(max_workers=4) as pool:
            got = list(pool.map(lambda c: s.post({"max_tokens": c[2], "messages": _messages(c[0], c[1])}).json(),
                                cases))
        for d, w in zip(got, want):
            assert d["choices"][0]["message"]["content"] == w.text and d["usage"]["completion_tokens"] == len(w.token_ids)
            assert d["avg_edge"]["granularity"] == w.granularity
        assert s.settled()["completed"] == 4
    finally:
        s.stop()
    r = subprocess.run([sys.executable, "-c", "from avg_edge.cli import serve_main; serve_main()", "-m",
                        str(tiny_concat_build), "--parallel", "4", "--port", str(_free_port())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs a build whose decoder batches" in r.stderr and "Traceback" not in r.stderr
