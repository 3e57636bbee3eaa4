"""One small protocol for every backend (Polygraphy-runner style): checks and timing live
here, backend code in `_infer_impl` / `_infer_kv_impl`; `close()` and a context manager
end a backend's life."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from avg_edge.specs import GraphSpec, TensorSpec


class Backend:
    """Runs one graph.  `infer` checks inputs against the graph's spec (names, dtypes,
    axis bounds), times the call and returns outputs by name as numpy arrays.

    `infer_kv` is the decode loop's fast path: outputs not named in `to_host` may stay
    in the backend's own memory (an OrtValue, a device buffer) and be fed back as inputs
    of the next call without a copy; `aliases` (output -> input) asks for an output to be
    written into its input's buffer (an in-place KV cache; buffers from `allocate`).  A
    backend without such memory returns numpy (then an aliased output is a new array)."""

    name = "base"

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec
        self.last_inference_time = 0.0   # seconds spent in the last call
        self.total_inference_time = 0.0  # seconds spent in all calls since the last reset
        self.closed = False

    @property
    def input_metadata(self) -> tuple[TensorSpec, ...]:
        return self.spec.inputs

    def infer(self, feeds: dict[str, np.ndarray], check: bool = True) -> dict[str, np.ndarray]:
        if check:
            self.spec.check_inputs(feeds)
        return self._timed(self._infer_impl, feeds)

    def infer_kv(self, feeds: dict[str, Any], to_host: tuple[str, ...],
                 aliases: dict[str, str] | None = None) -> dict[str, Any]:
        return self._timed(self._infer_kv_impl, feeds, to_host, aliases or {})

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A zeroed buffer in this backend's memory for an in-place cache."""
        return np.zeros(shape, dtype)

    def rows(self, buffer: Any, start: int, stop: int) -> Any:
        """Rows start..stop-1 (first axis) of a buffer from `allocate`, sharing its memory:
        fed as an input with an alias, the call writes into those rows of `buffer` (several
        requests' caches in one buffer; a decode step binds the rows of its batch)."""
        return buffer[start:stop]

    def _timed(self, fn, *args: Any) -> dict[str, Any]:
        if self.closed:
            from avg_edge.errors import BackendError

            raise BackendError(f"{self.spec.name}: this backend was closed")
        t0 = time.perf_counter()
        out = fn(*args)
        self.last_inference_time = time.perf_counter() - t0
        self.total_inference_time += self.last_inference_time
        return out

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def _infer_kv_impl(self, feeds: dict[str, Any], to_host: tuple[str, ...], aliases: dict[str, str]) -> dict[str, Any]:
        return self._infer_impl(feeds)

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        """Release sessions and device memory; later calls raise BackendError."""
        self.closed = True

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
