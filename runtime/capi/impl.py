"""Python side of libavg_edge.so: each `avg_edge_*` C function, defined with cffi's
def_extern inside the embedded interpreter.  No exception ever crosses into C: every
call returns a code and leaves a message for avg_edge_last_error()."""

from __future__ import annotations

import itertools
import json
import threading
from typing import Any

from avg_edge import __version__
from avg_edge.errors import C_OK, Busy, Cancelled, InputError, category_of, one_line


def code_for(e: BaseException) -> int:
    """The C return code of any exception, from the one category table."""
    return category_of(e).c_code


INTERNAL = code_for(Exception())


class Context:
    """An open context: its pipeline, the lock that serialises runs on it, and the thread
    running one now.  That thread is the only one that can call in while the lock is held
    (from the token callback); waiting for the lock there would wait forever."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.lock = threading.Lock()
        self.running_in: int | None = None

    def refuse_reentry(self, call: str) -> None:
        if self.running_in == threading.get_ident():
            raise Busy(f"{call}: expected a context that is not running, got the one this token callback is "
                       "answering for; call it after avg_edge_run returns (return non-zero from the callback "
                       "to stop the answer)")


def install(ffi: Any, lib: Any) -> None:
    contexts: dict[int, Context] = {}
    ids = itertools.count(1)
    registry_lock = threading.Lock()
    tls = threading.local()
    version = ffi.new("char[]", __version__.encode())
    empty = ffi.new("char[]", b"")

    def fail(e: BaseException) -> int:
        tls.error = ffi.new("char[]", one_line(e).encode("utf-8", "replace"))
        return code_for(e)

    def text(ptr: Any, what: str) -> str:
        if ptr == ffi.NULL:
            raise InputError(f"{what}: expected a string, got NULL")
        try:
            return ffi.string(ptr).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{what}: expected UTF-8 text ({e})") from e

    def options(ptr: Any, what: str) -> dict:
        if ptr == ffi.NULL:
            return {}
        raw = text(ptr, what)
        try:
            value = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            raise InputError(f"{what}: expected a JSON object, got {raw[:80]!r} ({e})") from e
        if not isinstance(value, dict):
            raise InputError(f"{what}: expected a JSON object, got {type(value).__name__}")
        return value

    def lookup(ctx: Any) -> Context:
        if ctx == ffi.NULL:
            raise InputError("ctx: expected a context from avg_edge_open, got NULL")
        key = int(ffi.cast("uintptr_t", ctx))
        with registry_lock:
            if key not in contexts:
                raise InputError("ctx: not an open context (already closed?)")
            return contexts[key]

    @ffi.def_extern(error=INTERNAL)
    def avg_edge_open(build_dir, options_json, out_ctx):  # noqa: ANN001
        tls.error = None
        try:
            if out_ctx == ffi.NULL:
                raise InputError("out_ctx: expected a pointer to receive the context, got NULL")
            out_ctx[0] = ffi.NULL
            folder = text(build_dir, "build_dir")
            opts = options(options_json, "options_json")
            unknown = set(opts) - {"backend", "verify", "threads"}
            if unknown:
                raise InputError(f"options_json: unknown keys {sorted(unknown)}; valid: backend, verify, threads")
            if not isinstance(opts.get("verify", False), bool):
                raise InputError(f"options_json.verify: expected true or false, got {opts['verify']!r}")
            if isinstance(opts.get("threads", 0), bool) or not isinstance(opts.get("threads", 0), int):
                raise InputError(f"options_json.threads: expected an integer, got {opts['threads']!r}")
            from avg_edge.runtime.pipeline import Pipeline

            pipe = Pipeline.load(folder, backend=opts.get("backend", "auto"), verify=bool(opts.get("verify", False)),
                                 threads=int(opts.get("threads", 0)))
            with registry_lock:
                key = next(ids)
                contexts[key] = Context(pipe)
            out_ctx[0] = ffi.cast("avg_edge_ctx *", key)
            return C_OK
        except BaseException as e:  # noqa: BLE001 - nothing may cross into C
            return fail(e)

    @ffi.def_extern(error=INTERNAL)
    def avg_edge_run(ctx, image, image_len, question, params_json, on_token, user_data, result_json):  # noqa: ANN001
        tls.error = None
        try:
            if result_json != ffi.NULL:
                result_json[0] = ffi.NULL
            context = lookup(ctx)
            context.refuse_reentry("avg_edge_run")
            if image == ffi.NULL:
                raise InputError("image: expected image bytes, got NULL")
            data = bytes(ffi.buffer(image, image_len))
            q = text(question, "question")
            p = options(params_json, "params_json")
            valid = {"granularity", "max_new_tokens", "max_visual_tokens", "temperature", "top_k", "top_p", "seed"}
            if set(p) - valid:
                raise InputError(f"params_json: unknown keys {sorted(set(p) - valid)}; valid: {sorted(valid)}")

            def on_text(piece: str) -> None:
                if on_token != ffi.NULL and on_token(ffi.new("char[]", piece.encode("utf-8")), user_data) != 0:
                    raise Cancelled("cancelled by the token callback")

            from avg_edge.runtime.sampling import SamplingParams

            try:
                SamplingParams(p.get("temperature", 0.0), p.get("top_k"), p.get("top_p"), p.get("seed"))
            except TypeError as e:
                raise InputError(f"params_json: {e}") from e
            with context.lock:
                lookup(ctx)   # closed while this call waited for the lock?
                context.running_in = threading.get_ident()
                try:
                    r = context.pipe.generate(data, q, on_text=on_text, **p)
                finally:
                    context.running_in = None
            if result_json != ffi.NULL:
                d = {"answer": r.text, **r.to_dict()}
                del d["text"]
                raw = json.dumps(d).encode("utf-8") + b"\0"
                buf = lib.malloc(len(raw))
                if buf == ffi.NULL:
                    raise MemoryError("malloc failed for the result")
                ffi.memmove(buf, raw, len(raw))
                result_json[0] = ffi.cast("char *", buf)
            tls.error = None          # not the message of a call the token callback made
            return C_OK
        except BaseException as e:  # noqa: BLE001
            return fail(e)

    @ffi.def_extern()
    def avg_edge_free_string(s):  # noqa: ANN001
        if s != ffi.NULL:
            lib.free(s)

    @ffi.def_extern()
    def avg_edge_last_error():
        err = getattr(tls, "error", None)
        return err if err is not None else empty

    @ffi.def_extern()
    def avg_edge_version():
        return version

    @ffi.def_extern(error=INTERNAL)
    def avg_edge_close(ctx):  # noqa: ANN001
        tls.error = None
        if ctx == ffi.NULL:
            return C_OK
        try:
            key = int(ffi.cast("uintptr_t", ctx))
            with registry_lock:
                context = contexts.get(key)
                if context is None:
                    raise InputError("ctx: not an open context (already closed?)")
                context.refuse_reentry("avg_edge_close")    # the context stays open
                del contexts[key]
            with context.lock:  # wait for a run in progress on another thread
                context.pipe.close()
            return C_OK
        except BaseException as e:  # noqa: BLE001
            return fail(e)
