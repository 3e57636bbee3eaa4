"""Many requests over one Pipeline: a worker thread that owns the backends, admits
requests into decode slots between steps, decodes all active slots together and stops a
request at the next step once its client has gone.

The server is its consumer (llama-server's slots); the Pipeline stays a plain, single-
caller object.  The slots are `runtime.slots.DecodeSlots`: one works with any build, more
need a decoder that batches.  A new request's vision, router and prefill run between two
decode steps of the others (no chunked prefill).  Follow-up questions about the same
image reuse its vision features (and the router's image part) through a small cache
keyed by the image's content.

Events reach a request's `on_event` from the worker thread, in order:
("piece", str)* then exactly one of ("done", Result) / ("error", exception).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Any, Callable

from avg_edge.errors import Busy, Cancelled, InputError
from avg_edge.runtime.pipeline import EncodedImage, Pipeline, Prepared
from avg_edge.runtime.sampling import SamplingParams
from avg_edge.runtime.slots import DecodeSlots, SlotEvent
from avg_edge.runtime.text import StopText, TextStream

@dataclass(frozen=True)
class Request:
    """One chat request for the scheduler.  `image`: None (text only), raw bytes or a
    decoded image; `image_key` (its content hash) finds it in the vision cache."""

    question: str
    image: Any = None
    image_key: str | None = None
    history: tuple[str, ...] = ()
    system: str | None = None
    image_turn: int = 0
    granularity: int | None = None
    max_visual_tokens: int | None = None
    max_new_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    pieces: bool = True                  # send ("piece", text) events (a stream); False: only the end


class Job:
    """A submitted request: `cancel()` from any thread stops it at the next decode step."""

    def __init__(self, request: Request, on_event: Callable[[str, Any], None]) -> None:
        self.request, self.on_event = request, on_event
        self.t_start = time.perf_counter()
        self.cancelled = threading.Event()
        self.tokens = 0

    def cancel(self) -> None:
        self.cancelled.set()


class _Active:
    """A job in a slot: its text so far.  Text is decoded token by token only when someone
    reads it: a stream, or stop sequences to find; otherwise the answer's text is decoded
    once at the end (Result)."""

    def __init__(self, job: Job, prepared: Prepared, pipe: Pipeline) -> None:
        self.job, self.prepared = job, prepared
        self.text, self.stops = TextStream(pipe.tokenizer), StopText(job.request.stop)
        self.incremental = job.request.pieces or bool(job.request.stop)
        self.ids: list[int] = []
        self.said: list[str] = []

    def push(self, token: int) -> None:
        self.ids.append(token)
        self.job.tokens = len(self.ids)
        if self.incremental:
            self._say(self.stops.push(self.text.push(token)))

    def flush(self) -> None:
        if self.incremental:
            self._say(self.stops.push(self.text.flush()) + self.stops.flush())

    def _say(self, piece: str) -> None:
        if piece:
            self.said.append(piece)
            if self.job.request.pieces:
                self.job.on_event("piece", piece)


class Scheduler:
    """The worker thread.  `submit` never blocks on inference; `waiting` and `active`
    say how full it is (the server's /health)."""

    def __init__(self, pipe: Pipeline, parallel: int = 1, image_cache: int = 4) -> None:
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            raise InputError(f"parallel: expected a positive integer (decode slots), got {parallel!r}")
        if isinstance(image_cache, bool) or not isinstance(image_cache, int) or image_cache < 0:
            raise InputError(f"image cache: expected a non-negative number of images, got {image_cache!r}")
        self.pipe, self.parallel, self.image_cache_size = pipe, parallel, image_cache
        self.slots = DecodeSlots(pipe, parallel)
        self._images: OrderedDict[str, EncodedImage] = OrderedDict()
        self._pending: deque[Job] = deque()
        self._active: dict[int, _Active] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.image_cache_hits = 0
        self.completed = 0                    # requests answered
        self.cancelled = 0                    # requests stopped because their client went away
        self._thread = threading.Thread(target=self._loop, name="avg-edge-scheduler", daemon=True)
        self._thread.start()

    # -- callers' side -------------------------------------------------------------------------
    def submit(self, request: Request, on_event: Callable[[str, Any], None]) -> Job:
        job = Job(request, on_event)
        with self._cond:
            if self._closed:
                raise Busy("the server is shutting down")
            self._pending.append(job)
            self._cond.notify()
        return job

    def has_image(self, key: str) -> bool:
        with self._cond:
            return key in self._images

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._active)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)
        self.slots.close()

    # -- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._pending and not self._active:
                    self._cond.wait()
                if self._closed:
                    break
                admit = [self._pending.popleft() for _ in range(min(len(self._pending), len(self.slots.free)))]
            for job in admit:
                self._admit(job)
            self._drop_cancelled()
            if self._active:
                try:
                    events = self.slots.step()
                except Exception as e:  # noqa: BLE001 - a failed step fails the requests in it
                    for slot in list(self._active):
                        self._fail(slot, e)
                    continue
                for ev in events:
                    self._deliver(ev)
        for slot in list(self._active):
            self._fail(slot, Busy("the server is shutting down"))
        for job in self._pending:
            job.on_event("error", Busy("the server is shutting down"))

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            self.cancelled += 1
            job.on_event("error", Cancelled("the client went away before its request started"))
            return
        r = job.request
        try:
            image = self._encoded(r) if r.image is not None else None
            prepared = self.pipe.prepare(image, r.question, r.granularity, r.max_visual_tokens, history=r.history,
                                         system=r.system, image_turn=r.image_turn)
            first = self.slots.admit(prepared, r.max_new_tokens, r.sampling, t_start=job.t_start)
        except Exception as e:  # noqa: BLE001 - reported to the request's client
            job.on_event("error", e)
            return
        self._active[first.slot] = _Active(job, prepared, self.pipe)
        self._deliver(first)

    def _encoded(self, r: Request) -> EncodedImage:
        key = r.image_key
        with self._cond:
            hit = self._images.get(key) if key is not None else None
            if hit is not None:
                self._images.move_to_end(key)
                self.image_cache_hits += 1
                hit.preprocess_seconds = hit.vision_seconds = 0.0     # this request ran neither
                return hit
        enc = self.pipe.encode_image(r.image)
        if key is not None and self.image_cache_size:
            with self._cond:
                self._images[key] = enc
                while len(self._images) > self.image_cache_size:
                    self._images.popitem(last=False)
        return enc

    def _drop_cancelled(self) -> None:
        for slot, a in list(self._active.items()):
            if a.job.cancelled.is_set():
                self.slots.release(slot)
                del self._active[slot]
                self.cancelled += 1
                a.job.on_event("error", Cancelled(f"cancelled after {len(a.ids)} tokens: the client went away"))

    def _deliver(self, ev: SlotEvent) -> None:
        a = self._active.get(ev.slot)
        if a is None:
            return
        if ev.token is not None:
            a.push(ev.token)
        if not ev.finished and not a.stops.stopped:
            return
        a.flush()
        if not ev.finished:                  # a stop sequence in the text: end it here
            ev = self.slots.stop(ev.slot)
        del self._active[ev.slot]
        result = ev.result
        if a.stops.stopped:
            result = replace(result, text="".join(a.said).strip(), finish_reason="stop")
        self.completed += 1
        a.job.on_event("done", result)

    def _fail(self, slot: int, e: BaseException) -> None:
        a = self._active.pop(slot)
        self.slots.release(slot)
        a.job.on_event("error", e)


def cache_key(data: bytes) -> str:
    """The vision cache's key for an image: a hash of its bytes."""
    import hashlib

    return hashlib.blake2b(data, digest_size=16).hexdigest()


__all__ = ["Scheduler", "Request", "Job", "cache_key"]
