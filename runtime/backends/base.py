"""One small protocol for every backend (Polygraphy-runner style): checks live here,
backend code in `_infer_impl`."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from avg_edge.errors import AvgEdgeError
from avg_edge.export.specs import GraphSpec, TensorSpec


class BackendError(AvgEdgeError):
    """A backend could not be created or could not run a graph."""


class Backend:
    """Runs one graph.  `infer` checks inputs against the graph's spec (names, dtypes,
    axis bounds), times the call and returns outputs by name."""

    name = "base"

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec
        self.last_inference_time = 0.0   # seconds spent in the last infer()
        self.total_inference_time = 0.0  # seconds spent in all infer() calls

    @property
    def input_metadata(self) -> tuple[TensorSpec, ...]:
        return self.spec.inputs

    def infer(self, feeds: dict[str, np.ndarray], check: bool = True) -> dict[str, Any]:
        if check:
            self.spec.check_inputs(feeds)
        t0 = time.perf_counter()
        out = self._infer_impl(feeds)
        self.last_inference_time = time.perf_counter() - t0
        self.total_inference_time += self.last_inference_time
        return out

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        return self.name
