"""Several requests decoded together: `avg-serve --parallel N` (llama-server's "slots").

Each request has its own KV cache: row `slot` of one buffer per cache tensor, shaped
[slots, KV, ctx, hd] and allocated once by the decoder's backend.  Vision, router and
prefill run per request (`Pipeline.prepare`, then `admit` prefills into the slot's row);
the decode steps of all active requests run as ONE decoder call (`step`), each row at its
own length, sampled on the host with each request's own settings and random generator.
A request gets exactly the tokens `Pipeline.decode` gives it alone (the decoder's batch
rows are independent: avg-export validates this, see validation.check_rows).

Prompt prefixes are kept (llama-server's prompt cache): a slot remembers the text tokens
before the image (all of a text-only prompt) of its last request, whose keys and values
stay at the start of its row, and the next request admitted there prefills only from
the first token that differs (in-place cache only; at least one token is always
prefilled).  Every request starts with the template's system prompt, so this skips
about a third of a short text prompt.

A step runs rows 0..hi-1, hi being one past the highest active slot, with the cache bound
in place (no copy, no compaction).  Free rows below hi ride along as a dummy token
written just after the slot's kept prefix (which the next prefill overwrites);
`admit` takes the lowest free slot, so active rows stay packed at the bottom and holes
appear only when a low slot finishes while higher ones continue.  Compacting instead
would move whole caches between rows.

Not thread-safe: one scheduler drives a DecodeSlots (admit / step / release in turn).
Torch-free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from avg_edge import specs as S
from avg_edge.errors import Busy, InputError, UsageError
from avg_edge.runtime.pipeline import Pipeline, Prepared, Result, _check_max_new_tokens, result_of
from avg_edge.runtime.sampling import SamplingParams, next_token, next_tokens


@dataclass(frozen=True)
class SlotEvent:
    """What one call did for one request: the token it gave (None when the request ended
    with </s>, which is never emitted), and, once finished, why and the whole Result."""

    slot: int
    token: int | None
    finished: bool = False
    finish_reason: str | None = None       # "stop" (</s>) or "length" (max_new_tokens or context), once finished
    result: Result | None = None           # once finished: as Pipeline.generate's, timings included


@dataclass
class _Request:
    """A request in a slot (internal, mutable)."""

    prepared: Prepared
    sampling: SamplingParams
    rng: np.random.Generator
    room: int                              # most tokens: min(max_new_tokens, context - prompt), as TokenStream
    t_start: float                         # perf_counter() when the request started (time to first token, total)
    position: int                          # where the next fed token goes (= tokens in its cache)
    prefill_seconds: float
    first_token_at: float
    kept: int                              # prompt tokens whose cache entries were kept from the slot's last request
    backend_seconds: float                 # vision + router + its prefill + every step it took part in
    ids: list[int] = field(default_factory=list)
    cache: dict[str, Any] | None = None    # concat cache only: this request's pasts


class DecodeSlots:
    """`slots` requests decoded together over one Pipeline's decoder.

        slots = DecodeSlots(pipe, 4)
        event = slots.admit(pipe.prepare(image, question), max_new_tokens=64)   # prefill + first token
        while slots.active:
            for event in slots.step():          # one decoder call for every active request
                ...                             # event.token; event.finished -> event.result

    A finished request frees its slot at once; `release` frees one early (a cancelled
    request).  Memory: one whole-context cache per slot (7B fp16 at 4096 tokens: 2 GiB).
    One slot works with any build (the concat cache too); more need a decoder with a batch
    axis (avg-export build --kv-cache inplace --max-batch N)."""

    def __init__(self, pipe: Pipeline, slots: int) -> None:
        roles = pipe.decoder_roles
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise UsageError(f"--parallel: expected a positive number of slots, got {slots!r}")
        if slots > 1 and roles.max_batch == 1:
            why = ("its KV cache is concat, as TensorRT and quantized builds have" if roles.kind == "concat" else
                   f"its in-place decoder has no batch axis: manifest format {pipe.manifest.format_version}, or --max-batch 1")
            raise UsageError(f"--parallel {slots} needs a build whose decoder batches (avg-export build --kv-cache "
                             f"inplace ...); this build's decoder takes one request per call ({why})")
        if slots > roles.max_batch:
            raise UsageError(f"--parallel {slots}: this build's decoder batches at most {roles.max_batch} requests "
                             f"per step; use --parallel {roles.max_batch} or rebuild with avg-export build "
                             f"--kv-cache inplace --max-batch {slots}")
        self.pipe = pipe
        self.roles = roles
        self.slots = slots
        self.decoder = pipe.backends[S.DECODER]
        self._logits = roles.name(S.LOGITS)
        self._aliases = roles.aliases()
        self._inplace = roles.kind == "inplace"
        self._eos = pipe.manifest.eos_token_id
        # In place: one buffer per cache tensor with a row per slot; each slot's prefill
        # binds its own row, a step binds rows 0..hi-1 (views, no copies).
        self._buffers = roles.new_cache(self.decoder.allocate, batch=slots) if self._inplace else {}
        self._rows: dict[tuple[int, int], dict[str, Any]] = {}
        self._requests: dict[int, _Request] = {}
        self._kept: dict[int, tuple[int, ...]] = {}   # slot -> token ids whose cache entries start its row
        self.closed = False

    # -- state ---------------------------------------------------------------------------
    @property
    def free(self) -> tuple[int, ...]:
        """Slots without a request, lowest first (the next `admit` takes the first)."""
        return tuple(s for s in range(self.slots) if s not in self._requests)

    @property
    def active(self) -> tuple[int, ...]:
        """Slots with a request being decoded, lowest first."""
        return tuple(sorted(self._requests))

    # -- admit, step, release -----------------------------------------------------------
    def admit(self, prepared: Prepared, max_new_tokens: int = 256, sampling: SamplingParams | None = None,
              t_start: float | None = None) -> SlotEvent:
        """Prefill a prepared request into the lowest free slot and sample its first token:
        the returned event names the slot (its first token, or finished at once).  Raises
        Busy when every slot is taken.  `t_start`: perf_counter() when the request arrived
        (for its time to first token and total; default: now)."""
        self._check_open()
        _check_max_new_tokens(max_new_tokens)
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise InputError(f"sampling: expected SamplingParams, got {type(sampling).__name__}")
        free = self.free
        if not free:
            raise Busy(f"all {self.slots} decode slots are busy; wait for a request to finish or release one")
        slot = free[0]
        t0 = time.perf_counter()
        roles, n = self.roles, prepared.embeds.shape[1]
        cache = self._views(slot, slot + 1) if self._inplace else roles.new_cache()
        kept = min(_common_prefix(self._kept.pop(slot, ()), prepared.ids_before), n - 1) if self._inplace else 0
        feeds = roles.prefill_feeds(prepared.embeds[:, kept:], cache=cache, past=kept)
        self.decoder.spec.check_inputs(feeds, trusted=frozenset(cache) if self._inplace else frozenset())
        out = self._call(feeds)
        if self._inplace:
            self._kept[slot] = tuple(prepared.ids_before)
        first_at = time.perf_counter()
        tm = prepared.timings
        req = _Request(prepared, sampling, np.random.default_rng(sampling.seed),
                       room=min(max_new_tokens, self.pipe.manifest.context_length - n),
                       t_start=t0 if t_start is None else t_start, position=n, prefill_seconds=first_at - t0,
                       first_token_at=first_at, kept=kept, backend_seconds=tm.vision + tm.router + self.decoder.last_inference_time,
                       cache=None if self._inplace else roles.next_past(out))
        self._requests[slot] = req
        return self._advance(slot, req, next_token(np.asarray(out[self._logits])[0, -1], sampling, req.rng))

    def step(self) -> list[SlotEvent]:
        """One decoder call for every active request (rows 0..hi-1, see the module's
        notes): one event per active slot, lowest first; [] when none is active."""
        self._check_open()
        active = self.active
        if not active:
            return []
        hi = active[-1] + 1
        pipe = self.pipe
        rows, reqs = list(active), [self._requests[s] for s in active]
        embeds = np.zeros((hi, 1, pipe.embed_table.shape[1]), pipe.dtype)
        embeds[rows, 0] = pipe.embed_table[[req.ids[-1] for req in reqs]]
        positions = np.zeros(hi, np.int64)
        if hi > len(active):                            # free rows: a zero token after the kept prefix
            for s in range(hi):
                if s not in self._requests:
                    positions[s] = len(self._kept.get(s, ()))
        positions[rows] = [req.position for req in reqs]
        cache = self._views(0, hi) if self._inplace else reqs[0].cache
        out = self._call(self.roles.batch_step_feeds(embeds, positions, cache))
        seconds = self.decoder.last_inference_time
        logits = np.asarray(out[self._logits])[rows, -1]     # [active, vocab]
        tokens = next_tokens(logits, [req.sampling for req in reqs], [req.rng for req in reqs])
        events = []
        for s, req, token in zip(active, reqs, tokens):
            req.position += 1
            req.backend_seconds += seconds
            if not self._inplace:
                req.cache = self.roles.next_past(out)
            events.append(self._advance(s, req, token))
        return events

    def stop(self, slot: int) -> SlotEvent:
        """End `slot`'s request now as finished with reason "stop" (the caller found a stop
        sequence in its text), with its Result; between calls."""
        req = self._requests.get(int(slot)) if isinstance(slot, (int, np.integer)) and not isinstance(slot, bool) else None
        if req is None:
            raise InputError(f"slot: expected an active slot {list(self.active)}, got {slot!r}")
        return self._finish(int(slot), req, None, "stop")

    def release(self, slot: int) -> None:
        """Free `slot` now (a cancelled request; between calls).  Releasing a free slot
        does nothing (a request may finish as its client goes away)."""
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.slots:
            raise InputError(f"slot: expected 0..{self.slots - 1}, got {slot!r}")
        self._requests.pop(int(slot), None)

    def close(self) -> None:
        """Drop every request and the cache buffers (the pipeline stays open)."""
        self._requests.clear()
        self._kept.clear()
        self._rows.clear()
        self._buffers = {}
        self.closed = True

    def __enter__(self) -> "DecodeSlots":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- inside ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise UsageError("these decode slots were closed")

    def _views(self, start: int, stop: int) -> dict[str, Any]:
        """Rows start..stop-1 of every cache buffer, by past name (made once per range)."""
        key = (start, stop)
        if key not in self._rows:
            self._rows[key] = {name: self.decoder.rows(buf, start, stop) for name, buf in self._buffers.items()}
        return self._rows[key]

    def _call(self, feeds: dict[str, Any]) -> dict[str, Any]:
        out = self.decoder.infer_kv(feeds, (self._logits,), self._aliases)
        for p in self.roles.kv if self._inplace else ():
            if out[p.present] is not feeds[p.past]:     # a backend that returns new arrays: keep them in the rows
                feeds[p.past][...] = np.asarray(out[p.present])
        return out

    def _advance(self, slot: int, req: _Request, token: int) -> SlotEvent:
        """The request's next token, with TokenStream's rules: </s> ends it (not emitted);
        reaching its room ends it after the token."""
        if token == self._eos:
            return self._finish(slot, req, None, "stop")
        req.ids.append(token)
        if len(req.ids) >= req.room:
            return self._finish(slot, req, token, "length")
        return SlotEvent(slot, token)

    def _finish(self, slot: int, req: _Request, token: int | None, reason: str) -> SlotEvent:
        now = time.perf_counter()
        p = req.prepared
        tm = replace(p.timings, load=self.pipe.load_seconds, prompt_eval=req.prefill_seconds, prompt_cached_count=req.kept,
                     prompt_eval_count=p.embeds.shape[1], eval=now - req.first_token_at if req.ids else 0.0,
                     eval_count=len(req.ids), time_to_first_token=req.first_token_at - req.t_start,
                     total=now - req.t_start, backend=req.backend_seconds)
        del self._requests[slot]
        return SlotEvent(slot, token, True, reason, result_of(self.pipe, p, req.ids, reason, tm))


def _common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    """How many leading token ids a and b share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


__all__ = ["DecodeSlots", "SlotEvent"]
