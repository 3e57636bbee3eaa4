"""`avg-serve`: an OpenAI-compatible HTTP server over the runtime's Scheduler.

Starlette + uvicorn (the `serve` extra) rather than a hand-written HTTP layer: they handle
HTTP parsing, keep-alive and streaming; httpx fetches remote images asynchronously.  This
module maps OpenAI's chat-completions shape onto `runtime.scheduler.Request`s.

What keeps it standing:
- admission before work: a request past `max_queue` in flight is refused (503) before its
  body is read; a body over the limit is refused from its Content-Length, else by a
  bounded read (413);
- nothing heavy runs on the event loop: JSON parsing, base64 and image decoding run in a
  small bounded pool, remote images are fetched asynchronously with a timeout and a size
  cap, inference runs on the scheduler's thread, so /health always answers at once;
- a client that disconnects (streaming or not) cancels its request at the next decode
  step and frees its slot; that is one log line, not a traceback;
- every error takes its status from the one category table (errors.CATEGORIES): client
  mistakes are 4xx, limits 422, a full queue 503; a streamed request that fails before its
  first token gets a real status, not an in-band event.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from avg_edge.errors import AvgEdgeError, Busy, Cancelled, InputError, category_of, one_line
from avg_edge.runtime.image import load_image
from avg_edge.runtime.pipeline import Pipeline, Result, check_stop
from avg_edge.runtime.sampling import SamplingParams
from avg_edge.runtime.scheduler import Job, Request, Scheduler, cache_key

log = logging.getLogger("avg_edge.server")


@dataclass(frozen=True)
class ServerOptions:
    model_id: str
    api_key: str | None = None
    max_queue: int = 4                       # requests in flight (running + waiting)
    max_request_bytes: int = 20 * 1024**2
    allow_remote_images: bool = False
    max_tokens_default: int = 256
    parallel: int = 1                        # decode slots
    image_cache: int = 4                     # images whose vision features are kept for follow-ups
    fetch_timeout: float = 10.0              # seconds for a remote image
    decode_workers: int = 2                  # threads for JSON, base64 and image decoding


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


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="usage")


class Admission:
    """Counts requests in flight (reading, waiting or decoding); refuses past the limit
    instead of queueing without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def enter(self) -> None:                 # event-loop thread only: no lock needed
        if self.in_flight >= self.limit:
            raise Busy(f"server busy: {self.in_flight} requests in flight (limit {self.limit}); retry later")
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


# -- request parsing (pure functions, unit-testable) -----------------------------------
@dataclass(frozen=True)
class ChatRequest:
    """An OpenAI chat request, checked: the conversation and the generation settings."""

    turns: tuple[str, ...]                   # user, assistant, ..., user
    system: str | None
    image_url: str | None
    image_turn: int
    granularity: int | str | None
    max_visual_tokens: int | None
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


SYSTEM_ROLES = ("system", "developer")       # "developer" is what newer OpenAI clients send


def parse_request(body: Any, opts: ServerOptions) -> ChatRequest:
    """OpenAI chat request -> a ChatRequest, or ApiError(400) naming the field."""
    if not isinstance(body, dict):
        raise bad(f"request body: expected a JSON object, got {type(body).__name__}")
    system, turns, image_url, image_turn = parse_messages(body.get("messages"))
    for key in ("tools", "functions"):
        if body.get(key):
            raise bad(f"{key}: tool calling is not supported by this server; send plain messages", key)
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise bad(f"n: only 1 choice per request is supported, got {n!r:.40}", "n")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("response_format: only {\"type\": \"text\"} is supported", "response_format")
    if body.get("logprobs"):
        raise bad("logprobs: not supported by this server", "logprobs")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    max_tokens = opts.max_tokens_default if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise bad(f"{key}: expected a positive integer, got {max_tokens!r:.40}", key)
    granularity = body.get("granularity")
    if granularity is not None and granularity != "auto" and (isinstance(granularity, bool) or not isinstance(granularity, int)):
        raise bad(f"granularity: expected \"auto\" or a token count, got {granularity!r:.40}", "granularity")
    max_visual = body.get("max_visual_tokens")
    if max_visual is not None and (isinstance(max_visual, bool) or not isinstance(max_visual, int) or max_visual < 1):
        raise bad(f"max_visual_tokens: expected a positive integer, got {max_visual!r:.40}", "max_visual_tokens")
    try:
        sampling = SamplingParams(_number(body, "temperature", 0.0), _integer(body, "top_k"),
                                  _number(body, "top_p", None), _integer(body, "seed"))
        stop = check_stop(body.get("stop"))
    except InputError as e:
        raise bad(str(e)) from e
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad(f"stream: expected true or false, got {stream!r:.40}", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad(f"stream_options: expected an object, got {options!r:.40}", "stream_options")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad(f"stream_options.include_usage: expected true or false, got {include_usage!r:.40}", "stream_options")
    if image_url is None and (granularity not in (None, "auto") or max_visual is not None):
        raise bad("granularity and max_visual_tokens choose visual tokens: this request has no image", "granularity")
    return ChatRequest(turns, system, image_url, image_turn, granularity, max_visual, max_tokens, sampling, stop,
                       stream, include_usage)


def parse_messages(messages: Any) -> tuple[str | None, tuple[str, ...], str | None, int]:
    """messages -> (system prompt, turns, image URL, index of the turn with the image).
    System (and developer) messages replace the template's system prompt; consecutive
    messages of one role are joined; at most one image in the whole conversation."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages: expected a non-empty list of {role, content} objects", "messages")
    system: list[str] = []
    turns: list[tuple[str, list[str]]] = []
    image_url, image_turn = None, 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where}: expected an object with 'role' and 'content', got {type(m).__name__}", "messages")
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise bad(f"{where}: tool calls and tool results are not supported by this server", "messages")
        if role not in (*SYSTEM_ROLES, "user", "assistant"):
            raise bad(f"{where}.role: expected system, developer, user or assistant, got {role!r:.40}", "messages")
        texts, urls = _content(m.get("content"), where, allow_image=role == "user")
        if role in SYSTEM_ROLES:
            system.extend(texts)
            continue
        if not turns and role == "assistant":
            raise bad(f"{where}: the conversation must start with a user message, not an assistant one", "messages")
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(texts)
        else:
            turns.append((role, list(texts)))
        for url in urls:
            if image_url is not None:
                raise bad(f"{where}: one image per conversation is supported; this is another image_url", "messages")
            image_url, image_turn = url, len(turns) - 1
    if not turns or turns[-1][0] != "user":
        raise bad("messages: expected the last message to be a user message (the question to answer)", "messages")
    joined = tuple("\n".join(t for t in parts if t).strip() for _, parts in turns)
    for k, text in enumerate(joined):
        if not text:
            what = "user" if k % 2 == 0 else "assistant"
            raise bad(f"messages: a {what} message has no text" + (" (send the question as a text part next to the "
                      "image_url part)" if k % 2 == 0 else ""), "messages")
    return ("\n".join(system) if system else None), joined, image_url, image_turn


def _content(content: Any, where: str, allow_image: bool) -> tuple[list[str], list[str]]:
    """A message's content -> (texts, image URLs): a string, or a list of parts."""
    if isinstance(content, str):
        return [_text(content, f"{where}.content")], []
    if not isinstance(content, list):
        raise bad(f"{where}.content: expected a string or a list of parts, got {type(content).__name__}", "messages")
    texts, urls = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(_text(part.get("text"), f"{at}.text"))
        elif kind == "image_url" and allow_image:
            img = part.get("image_url")
            url = img.get("url") if isinstance(img, dict) else img
            if not isinstance(url, str) or not url:
                raise bad(f"{at}.image_url.url: expected a data: or http(s): URL string", "messages")
            urls.append(url)
        elif kind == "image_url":
            raise bad(f"{at}: images belong in user messages", "messages")
        else:
            raise bad(f"{at}: expected a part of type 'text' or 'image_url', got {part!r:.60}", "messages")
    return texts, urls


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise bad(f"{where}: expected a string, got {type(value).__name__}", "messages")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"{where}: not valid Unicode text ({e.reason} at character {e.start}: a lone surrogate?)",
                  "messages") from e
    return value


def _number(body: dict, key: str, default: float | None) -> float | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"{key}: expected a number, got {v!r:.40}", key)
    return float(v)


def _integer(body: dict, key: str) -> int | None:
    v = body.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise bad(f"{key}: expected an integer, got {v!r:.40}", key)
    return v


def decode_data_url(url: str) -> bytes:
    header, _, data = url.partition(",")
    if ";base64" not in header:
        raise bad("image_url.url: expected a base64 data: URL (data:image/png;base64,...)", "image_url")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"image_url.url: invalid base64 ({e})", "image_url") from e


async def bounded(chunks: Any, too_large: str, limit: int) -> bytes:
    """Read an async byte stream, refusing (413) as soon as it passes `limit` bytes."""
    got, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_large, code="too_large")
        got.append(chunk)
    return b"".join(got)


INLINE_JSON_BYTES = 16 * 1024   # bodies up to this size are parsed on the event loop


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"request body: not valid JSON ({e})") from e
    except RecursionError as e:
        raise bad("request body: JSON nested too deeply") from e


def completion_body(r: Result, opts: ServerOptions, cid: str, created: int) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": opts.model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}],
        "usage": usage(r), "avg_edge": extras(r),
    }


def usage(r: Result) -> dict[str, Any]:
    p, c = r.timings.prompt_eval_count, r.timings.eval_count
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": r.timings.prompt_cached_count}}


def extras(r: Result) -> dict[str, Any]:
    return {"granularity": r.granularity, "visual_tokens": r.visual_tokens, "visual_tokens_full": r.visual_tokens_full,
            "router_probs": r.router_probs, "timings": r.timings.to_dict()}


# -- the app -------------------------------------------------------------------------------
def create_app(pipe: Pipeline, opts: ServerOptions):
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request as HttpRequest
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    gate = Admission(opts.max_queue)
    scheduler = Scheduler(pipe, opts.parallel, opts.image_cache)
    pool = ThreadPoolExecutor(max_workers=opts.decode_workers, thread_name_prefix="avg-serve-decode")

    def error(e: BaseException) -> JSONResponse:
        api = ApiError.from_error(e)
        if api.status >= 500 and not isinstance(e, (ApiError, AvgEdgeError)):
            log.exception("internal error: %s", one_line(e))
        return JSONResponse(api.body(), status_code=api.status)

    def check_key(request: HttpRequest) -> None:
        if opts.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {opts.api_key}":
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           "invalid_request_error", code="invalid_api_key")

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def read_body(request: HttpRequest) -> bytes:
        limit = opts.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", code="too_large")
        return await bounded(request.stream(), f"request body exceeds the limit of {limit} bytes", limit)

    async def fetch(url: str) -> bytes:
        import httpx

        limit = opts.max_request_bytes
        try:
            async with httpx.AsyncClient(timeout=opts.fetch_timeout, follow_redirects=True) as client:
                async with client.stream("GET", url) as r:
                    if r.status_code != 200:
                        raise bad(f"image_url.url: fetching it answered HTTP {r.status_code}", "image_url")
                    return await bounded(r.aiter_bytes(), f"remote image larger than {limit} bytes", limit)
        except httpx.HTTPError as e:
            raise bad(f"image_url.url: could not fetch ({type(e).__name__}: {e})", "image_url") from e

    async def image_for(chat: ChatRequest) -> tuple[Any, str | None]:
        """The request's image (bytes, or decoded when the vision cache lacks it) and its key."""
        url = chat.image_url
        if url is None:
            return None, None
        if url.startswith("data:"):
            data = await off_loop(decode_data_url, url)
        elif url.startswith(("http://", "https://")):
            if not opts.allow_remote_images:
                raise bad("image_url.url: remote URLs are refused by this server (start it with "
                          "--allow-remote-images to allow them); send a data: URL", "image_url")
            data = await fetch(url)
        else:
            raise bad(f"image_url.url: expected a data: or http(s): URL, got {url[:40]!r}", "image_url")
        key = await off_loop(cache_key, data)
        if scheduler.has_image(key):
            return data, key
        return await off_loop(load_image, data), key          # decoded here, in the bounded pool

    def to_request(chat: ChatRequest, image: Any, key: str | None) -> Request:
        granularity = pipe.check_granularity(chat.granularity)
        return Request(question=chat.turns[-1], image=image, image_key=key, history=chat.turns[:-1],
                       system=chat.system, image_turn=chat.image_turn, granularity=granularity,
                       max_visual_tokens=chat.max_visual_tokens, max_new_tokens=chat.max_tokens,
                       sampling=chat.sampling, stop=chat.stop, pieces=chat.stream)

    async def health(request: HttpRequest) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": opts.model_id, "in_flight": gate.in_flight,
                             "max_queue": gate.limit, "parallel": opts.parallel, "active": scheduler.active,
                             "waiting": scheduler.waiting, "completed": scheduler.completed,
                             "cancelled": scheduler.cancelled, "image_cache_hits": scheduler.image_cache_hits})

    async def models(request: HttpRequest) -> JSONResponse:
        try:
            check_key(request)
        except ApiError as e:
            return error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": opts.model_id, "object": "model", "created": 0, "owned_by": "avg-edge"}]})

    async def until_disconnect(request: HttpRequest) -> None:
        """Returns when the client hangs up (the body has been read by then)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    def submit(req: Request) -> tuple[Job, "asyncio.Queue[tuple[str, Any]]"]:
        """Hand a request to the scheduler; its admission slot is freed by its last event
        (done, error, or the cancellation a disconnect causes), whoever listens.  Text
        pieces are made and cross to the event loop only for a stream (req.pieces)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def on_event(kind: str, value: Any) -> None:          # worker thread
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            if kind != "piece":
                loop.call_soon_threadsafe(gate.leave)

        return scheduler.submit(req, on_event), events

    async def chat(request: HttpRequest) -> Response:
        try:
            check_key(request)
            gate.enter()                      # before the body is read or anything decoded
        except (ApiError, AvgEdgeError) as e:
            return error(e)
        submitted = False
        try:
            raw = await read_body(request)
            # A small body parses faster than a hop to the pool and back (the hop also
            # takes the GIL from the scheduler thread twice); a large one (base64 images,
            # deep nesting) is parsed off the event loop.
            body = parse_json(raw) if len(raw) <= INLINE_JSON_BYTES else await off_loop(parse_json, raw)
            parsed = parse_request(body, opts)
            image, key = await image_for(parsed)
            req = to_request(parsed, image, key)
            job, events = submit(req)
            submitted = True
            cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            watcher = asyncio.ensure_future(until_disconnect(request))
            first = asyncio.ensure_future(events.get())
            await asyncio.wait({first, watcher}, return_when=asyncio.FIRST_COMPLETED)
            watcher_done = not first.done()
            watcher.cancel()
            if watcher_done:                  # gone before the answer (or a stream's first token)
                first.cancel()
                job.cancel()
                log.info("client went away after %d tokens; request cancelled", job.tokens)
                return Response(status_code=499)
            kind, value = first.result()
            if kind == "error" or not parsed.stream:     # an error gets its real status
                return final((kind, value), cid, created)
            # A stream's first event: Starlette ends the stream when the client goes.
            return StreamingResponse(sse((kind, value), events, job, parsed, cid, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        except ClientDisconnect:
            log.info("client went away while sending its request")
            return Response(status_code=499)
        except (ApiError, AvgEdgeError) as e:
            return error(e)
        except Exception as e:  # noqa: BLE001 - a bug: 500 with the message, logged once
            return error(e)
        finally:
            if not submitted:
                gate.leave()

    def final(event: tuple[str, Any], cid: str, created: int) -> Response:
        kind, value = event
        if kind == "error":
            return Response(status_code=499) if isinstance(value, Cancelled) else error(value)
        return JSONResponse(completion_body(value, opts, cid, created))

    async def sse(first, events, job: Job, chat_req: ChatRequest, cid: str, created: int):
        def chunk(delta: dict | None, finish: str | None = None, **more: Any) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": opts.model_id,
                    "choices": choices, **more}
            return f"data: {json.dumps(body)}\n\n"

        done = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            kind, value = first
            while True:
                if kind == "piece":
                    yield chunk({"content": value})
                elif kind == "done":
                    yield chunk({}, value.finish_reason, avg_edge=extras(value))
                    if chat_req.include_usage:
                        yield chunk(None, usage=usage(value))
                    break
                else:                         # after the first token the status is sent: in-band
                    yield f"data: {json.dumps(ApiError.from_error(value).body())}\n\n"
                    break
                kind, value = await events.get()
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:
                job.cancel()
                log.info("client went away after %d tokens; stream cancelled", job.tokens)

    async def not_found(request: HttpRequest, exc: Exception) -> JSONResponse:
        return error(ApiError(404, f"no route {request.method} {request.url.path}; try POST /v1/chat/completions",
                              code="not_found"))

    async def bad_method(request: HttpRequest, exc: Exception) -> JSONResponse:
        return error(ApiError(405, f"method {request.method} not allowed on {request.url.path}", code="method_not_allowed"))

    @asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()
        pool.shutdown(wait=False, cancel_futures=True)

    routes = [Route("/health", health), Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method}, lifespan=lifespan)
    app.state.scheduler = scheduler
    return app


__all__ = ["ServerOptions", "ApiError", "ChatRequest", "parse_request", "parse_messages", "create_app"]
