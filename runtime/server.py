"""`avg-serve`: an OpenAI-compatible HTTP server over the runtime Pipeline.

Starlette + uvicorn (the `serve` extra) rather than a hand-written HTTP layer: they
handle HTTP parsing, keep-alive and streaming correctly; this module only maps the
OpenAI chat-completions shape onto `Pipeline.generate` / `Pipeline.stream`.

One model, one inference at a time (the pipeline is not re-entrant); requests beyond
`max_queue` in flight get a clean 503.
"""

from __future__ import annotations

import base64
import binascii
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from avg_edge.errors import AvgEdgeError, Busy, category_of, one_line
from avg_edge.runtime.image import load_image
from avg_edge.runtime.pipeline import Pipeline, Result
from avg_edge.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class ServerOptions:
    model_id: str
    api_key: str | None = None
    max_queue: int = 4                       # requests in flight (running + waiting)
    max_request_bytes: int = 20 * 1024**2
    allow_remote_images: bool = False
    max_tokens_default: int = 256


class ApiError(Exception):
    """An error with its HTTP status, in OpenAI's shape.  `from_error` takes the status of
    any exception from the category table (errors.CATEGORIES); the HTTP-only conditions
    (401, 404, 405, 413) are made here directly."""

    def __init__(self, status: int, message: str, type_: str | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    @classmethod
    def from_error(cls, e: BaseException, param: str | None = None) -> "ApiError":
        if isinstance(e, ApiError):
            return e
        category = category_of(e)
        return cls(category.http_status, one_line(e), param=param, code=category.name)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Admission:
    """Counts requests in flight; refuses past the limit instead of queueing forever."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()
        self.run_lock = threading.Lock()     # one inference at a time

    def enter(self) -> None:
        with self._lock:
            if self.in_flight >= self.limit:
                raise Busy(f"server busy: {self.in_flight} requests in flight (limit {self.limit}); retry later")
            self.in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


# -- request parsing (pure functions, unit-testable) -----------------------------------
def parse_request(body: dict[str, Any], opts: ServerOptions) -> dict[str, Any]:
    """OpenAI chat request -> Pipeline arguments.  One user turn with one image."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body: expected a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list", param="messages")
    turns = [m for m in messages if isinstance(m, dict) and m.get("role") != "system"]
    if len(turns) != 1 or turns[0].get("role") != "user":
        raise ApiError(400, "messages: expected exactly one user message (system messages are ignored; "
                            "multi-turn conversations are not supported)", param="messages")
    content = turns[0].get("content")
    if isinstance(content, str):
        raise ApiError(400, "messages[].content: an image is required; send a list with a 'text' and an "
                            "'image_url' part", param="messages")
    if not isinstance(content, list):
        raise ApiError(400, "messages[].content: expected a list of parts", param="messages")
    texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    images = [p.get("image_url") for p in content if isinstance(p, dict) and p.get("type") == "image_url"]
    if len(images) != 1:
        raise ApiError(400, f"messages[].content: expected exactly one image_url part, got {len(images)}", param="messages")
    url = images[0].get("url") if isinstance(images[0], dict) else images[0]
    question = "\n".join(t for t in texts if t).strip()
    if not question:
        raise ApiError(400, "messages[].content: expected a text part with the question", param="messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", opts.max_tokens_default))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, f"max_tokens: expected a positive integer, got {max_tokens!r}", param="max_tokens")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n: only 1 is supported", param="n")
    granularity = body.get("granularity")
    if granularity is not None and granularity != "auto" and (isinstance(granularity, bool) or not isinstance(granularity, int)):
        raise ApiError(400, f"granularity: expected \"auto\" or a token count, got {granularity!r}", param="granularity")
    max_visual = body.get("max_visual_tokens")
    if max_visual is not None and (isinstance(max_visual, bool) or not isinstance(max_visual, int) or max_visual < 1):
        raise ApiError(400, f"max_visual_tokens: expected a positive integer, got {max_visual!r}",
                       param="max_visual_tokens")
    temperature = _number(body, "temperature", 0.0)
    top_p = _number(body, "top_p", None)
    top_k, seed = _integer(body, "top_k"), _integer(body, "seed")
    SamplingParams(temperature, top_k, top_p, seed)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream: expected true or false, got {stream!r}", param="stream")
    return {
        "image": load_image_url(url, opts),
        "question": question,
        "granularity": None if granularity in (None, "auto") else granularity,
        "max_new_tokens": max_tokens,
        "max_visual_tokens": max_visual,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "stream": stream,
    }


def _number(body: dict, key: str, default: float | None) -> float | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"{key}: expected a number, got {v!r}", param=key)
    return float(v)


def _integer(body: dict, key: str) -> int | None:
    v = body.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise ApiError(400, f"{key}: expected an integer, got {v!r}", param=key)
    return v


def load_image_url(url: Any, opts: ServerOptions) -> bytes:
    if not isinstance(url, str) or not url:
        raise ApiError(400, "image_url.url: expected a data: URL", param="image_url")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise ApiError(400, "image_url.url: expected a base64 data: URL (data:image/png;base64,...)", param="image_url")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"image_url.url: invalid base64 ({e})", param="image_url") from e
    if url.startswith(("http://", "https://")):
        if not opts.allow_remote_images:
            raise ApiError(400, "image_url.url: remote URLs are refused by this server (start it with "
                                "--allow-remote-images to allow them); send a data: URL", param="image_url")
        return _fetch(url, opts.max_request_bytes)
    raise ApiError(400, f"image_url.url: expected data: or http(s): URL, got {url[:40]!r}", param="image_url")


def _fetch(url: str, limit: int) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - only when the operator allowed it
            data = r.read(limit + 1)
    except OSError as e:
        raise ApiError(400, f"image_url.url: could not fetch ({e})", param="image_url") from e
    if len(data) > limit:
        raise ApiError(413, f"remote image larger than {limit} bytes", code="too_large")
    return data


def completion_body(r: Result, opts: ServerOptions, cid: str, created: int) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": opts.model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}],
        "usage": usage(r), "avg_edge": extras(r),
    }


def usage(r: Result) -> dict[str, int]:
    p, c = r.timings.prompt_eval_count, r.timings.eval_count
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def extras(r: Result) -> dict[str, Any]:
    return {"granularity": r.granularity, "visual_tokens": r.visual_tokens, "visual_tokens_full": r.visual_tokens_full,
            "router_probs": r.router_probs, "timings": r.timings.to_dict()}


# -- the app -------------------------------------------------------------------------------
def create_app(pipe: Pipeline, opts: ServerOptions):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    gate = Admission(opts.max_queue)

    def error(e: BaseException) -> JSONResponse:
        api = ApiError.from_error(e)
        return JSONResponse(api.body(), status_code=api.status)

    def check_key(request: Request) -> None:
        if opts.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {opts.api_key}":
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           "invalid_request_error", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > opts.max_request_bytes:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {opts.max_request_bytes}", code="too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > opts.max_request_bytes:
                raise ApiError(413, f"request body exceeds the limit of {opts.max_request_bytes} bytes", code="too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body: not valid JSON ({e})") from e

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": opts.model_id, "in_flight": gate.in_flight, "max_queue": gate.limit})

    async def models(request: Request) -> JSONResponse:
        try:
            check_key(request)
        except ApiError as e:
            return error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": opts.model_id, "object": "model", "created": 0, "owned_by": "avg-edge"}]})

    def run(args: dict[str, Any]) -> Result:
        with gate.run_lock:
            return pipe.generate(**args)

    def produce(args: dict[str, Any], q: "queue.Queue[tuple[str, Any]]") -> None:
        """Worker thread: generate into the queue; always frees the admission slot.  The
        network never holds the inference lock (a slow reader only fills the queue)."""
        try:
            with gate.run_lock:
                gen = pipe.stream(**args)
                for piece in gen:
                    q.put(("piece", piece))
                q.put(("done", gen.result))
        except BaseException as e:  # noqa: BLE001 - reported in-band to the client
            q.put(("error", e))
        finally:
            gate.leave()

    async def sse(q: "queue.Queue[tuple[str, Any]]", cid: str, created: int):
        def chunk(delta: dict, finish: str | None = None, **more: Any) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": opts.model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more}
            return f"data: {json.dumps(body)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await run_in_threadpool(q.get)
            if kind == "piece":
                yield chunk({"content": value})
            elif kind == "done":
                yield chunk({}, value.finish_reason, usage=usage(value), avg_edge=extras(value))
                break
            else:
                yield f"data: {json.dumps(ApiError.from_error(value).body())}\n\n"
                break
        yield "data: [DONE]\n\n"

    async def chat(request: Request):
        try:
            check_key(request)
            body = await read_json(request)
            args = parse_request(body, opts)
            stream = args.pop("stream")
            pipe.check_granularity(args["granularity"])
            args["image"] = await run_in_threadpool(load_image, args["image"])   # decoded once, here
            gate.enter()
        except (ApiError, AvgEdgeError) as e:
            return error(e)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if stream:
            q: queue.Queue[tuple[str, Any]] = queue.Queue()
            threading.Thread(target=produce, args=(args, q), daemon=True, name="avg-serve-stream").start()
            return StreamingResponse(sse(q, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            r = await run_in_threadpool(run, args)
            return JSONResponse(completion_body(r, opts, cid, created))
        except Exception as e:  # noqa: BLE001 - every error gets its category's status
            return error(e)
        finally:
            gate.leave()

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return error(ApiError(404, f"no route {request.method} {request.url.path}; try POST /v1/chat/completions",
                              code="not_found"))

    async def bad_method(request: Request, exc: Exception) -> JSONResponse:
        return error(ApiError(405, f"method {request.method} not allowed on {request.url.path}", code="method_not_allowed"))

    routes = [Route("/health", health), Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})
