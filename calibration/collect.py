"""Record what each graph really sees while the fp32 pipeline answers calibration
questions: the decoder gets the packed embeddings of the granularity the router chose."""

from __future__ import annotations

from typing import Any

import numpy as np

from avg_edge.calibration.data import CalibSample
from avg_edge.runtime.backends.base import Backend


class RecordingBackend(Backend):
    """Wraps a backend and keeps a copy of the first `limit` feeds it receives (always on
    the host: the wrapped backend's device fast path is not used while recording)."""

    def __init__(self, inner: Backend, limit: int) -> None:
        super().__init__(inner.spec)
        self.inner = inner
        self.limit = limit
        self.feeds: list[dict[str, np.ndarray]] = []

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        if len(self.feeds) < self.limit:
            self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.inner.infer(feeds, check=False)

    def describe(self) -> str:
        return self.inner.describe()

    def close(self) -> None:
        super().close()          # the wrapped backend belongs to its own pipeline


def record_inputs(pipe, samples: list[CalibSample], decode_steps: int = 4, limit_per_graph: int = 10_000,
                  ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Run the pipeline (router decides) on each sample; keep every graph's inputs.
    The decoder keeps its prefill and the first `decode_steps` decode steps."""
    recorders = {name: RecordingBackend(b, limit_per_graph) for name, b in pipe.backends.items()}
    recording = pipe.with_backends(recorders)
    for s in samples:
        recording.generate(s.image, s.question, max_new_tokens=1 + decode_steps)
    return {name: r.feeds for name, r in recorders.items()}
