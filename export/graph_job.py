"""One graph's export and reference outputs, in a process of its own that loads only the
weights that graph needs.

Why a process: what a graph needed is then really gone when it ends (torch's ONNX
exporter leaves the last exported graph, weights included, reachable from onnxscript's
module-level rewrite rules), and the build's peak memory is its largest graph, not the
whole model.  The child dies with its parent (PR_SET_PDEATHSIG), so a killed build
leaves no exporter running.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avg_edge import specs as S
from avg_edge import validation as V
from avg_edge.errors import AvgEdgeError, CATEGORIES, category_of, one_line
from avg_edge.manifest import signals_wait

# Module-name prefixes of the weights each graph reads.
GRAPH_WEIGHTS = {
    S.VISION: ("vision_tower.", "mm_projector."),
    S.ROUTER: ("router.", "language_model.model.embed_tokens."),       # the embeddings: router_text_table
    S.DECODER: ("language_model.model.layers.", "language_model.model.norm.", "language_model.lm_head."),
}
TABLE_WEIGHTS = ("language_model.model.embed_tokens.", "image_newline")


@dataclass(frozen=True)
class GraphJob:
    model: str                       # checkpoint folder
    graph: str
    spec: dict[str, Any]             # GraphSpec.to_dict()
    folder: str                      # where the .onnx (and the references) go
    opset: int
    dtype: str                       # "float32" / "float16"
    points: list[dict[str, Any]] = field(default_factory=list)   # validation points; none: no references
    cache_op: str = "gqa"            # the in-place cache's operators (specs.CACHE_OPS)

    @property
    def references_file(self) -> Path:
        return Path(self.folder) / f".{self.graph}.references.npz"


@dataclass
class JobResult:
    peak_rss_bytes: int
    graph_bytes: int
    wrapper_diff: float | None = None


class GraphJobError(AvgEdgeError):
    """The child's own error, re-raised in the parent with the child's category."""

    def __init__(self, message: str, category: str) -> None:
        super().__init__(message)
        self.category = category if category in CATEGORIES else "failed"


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)        # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _large_allocations_from_the_os() -> None:
    """glibc serves allocations under its mmap threshold from heaps it keeps when they are
    freed, and raises that threshold (up to 32 MiB) as large blocks come and go; a 7B
    graph's activations and per-module fp32 casts then leave gigabytes of freed heap
    resident between the references, the wrapper check and the export.  A fixed 1 MiB
    threshold maps each larger block on its own and returns it when freed."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)            # M_MMAP_THRESHOLD
    except (OSError, AttributeError):                            # not glibc
        pass


def _run(job: GraphJob, conn) -> None:
    _die_with_parent()
    _large_allocations_from_the_os()
    try:
        import numpy as np
        import torch

        from avg_edge.export.exporter import graph_bytes
        from avg_edge import constants as C
        from avg_edge.export.graphs import graph_module, router_text_table
        from avg_edge.export.onnx_export import export_graph
        from avg_edge.export.validate import reference_outputs, validate_wrapper
        from avg_edge.model import load_model
        from avg_edge.runtime.phases import peak_rss, release_memory

        spec = S.GraphSpec.from_dict(job.spec)
        model = load_model(job.model, dtype=getattr(torch, job.dtype), only=GRAPH_WEIGHTS[job.graph])
        folder = Path(job.folder)
        wrapper = None
        if job.points:      # before the export: the exporter keeps the weights it saw reachable
            points = [V.Point(p["name"], p["sizes"], p["seed"], p.get("note", "")) for p in job.points]
            refs = reference_outputs(graph_module(job.graph, model, spec), spec, points)
            np.savez(job.references_file, **refs)
            del refs
            release_memory()
            if job.graph == S.DECODER:
                wrapper = validate_wrapper(model, spec)
                release_memory()
        if job.graph == S.ROUTER:
            np.savez(folder / C.ROUTER_TEXT_FILE, **router_text_table(model))
        export_graph(graph_module(job.graph, model, spec), spec, folder, job.opset, job.cache_op)
        conn.send(("ok", JobResult(peak_rss(), graph_bytes(folder, spec.file), wrapper)))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", (category_of(e).name, one_line(e), traceback.format_exc())))
    finally:
        conn.close()


def run_in_child(job: GraphJob) -> JobResult:
    """Run `job` in a fresh process; its error, or its death, becomes an exception here."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run, args=(job, send), name=f"avg-export-{job.graph}")
    try:
        with signals_wait():    # Ctrl-C or SIGTERM mid-spawn: a child reading half its arguments
            proc.start()
        send.close()
        kind, payload = recv.recv()
    except EOFError:
        proc.join()
        hint = " (killed: out of memory?)" if proc.exitcode in (-signal.SIGKILL, 137) else ""
        raise GraphJobError(f"exporting {job.graph} stopped with exit code {proc.exitcode}{hint}", "failed") from None
    except BaseException:
        if proc.pid is not None:
            proc.kill()
            proc.join()
        raise
    proc.join()
    if kind == "ok":
        return payload
    category, message, trace = payload
    if category == "internal":
        message = f"{message}\n{trace}"
    raise GraphJobError(message, category)
