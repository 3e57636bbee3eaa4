"""Backends behind one protocol (`base.Backend`), and the one place that decides which
backend runs a build's graph.

auto: a graph's TensorRT engine when the build has one and TensorRT runs here, else
ONNX Runtime (which itself prefers a GPU provider), with a warning per graph that falls
back; ort: ONNX Runtime only; trt: engines or an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

from avg_edge.errors import BackendError, BackendUnavailable, InputError
from avg_edge.manifest import Manifest, inside
from avg_edge.runtime.backends.base import Backend

log = logging.getLogger("avg_edge")
BACKENDS = ("auto", "ort", "trt")


def check_backend(name: str, what: str = "backend") -> str:
    if name not in BACKENDS:
        raise InputError(f"{what}: expected one of {list(BACKENDS)}, got {name!r}")
    return name


def is_quantized(manifest: Manifest, graph: str) -> bool:
    """Does the build hold this graph with int8/int4 weights (manifest.quantization)?"""
    method = ((manifest.quantization or {}).get("graphs", {}).get(graph) or {}).get("method", "")
    return method.startswith("int")


def open_backends(folder: Path, manifest: Manifest, backend: str = "auto", threads: int = 0,
                  skip: tuple[str, ...] = ()) -> dict[str, Backend]:
    """One backend per graph of the build (but those in `skip`), chosen by the policy above."""
    from avg_edge.runtime.backends import trt_backend

    check_backend(backend)
    use_trt = backend == "trt" or (backend == "auto" and bool(manifest.engines) and trt_backend.usable())
    opened: dict[str, Backend] = {}
    try:
        for name in manifest.graphs:
            if name in skip:
                continue
            spec = manifest.spec(name)
            if use_trt:
                try:
                    if name == "decoder" and manifest.in_place_op == "gqa":
                        raise BackendUnavailable(f"{folder}: the decoder updates its cache in place with ONNX Runtime's "
                                                 "GroupQueryAttention, which TensorRT cannot run")
                    if name not in manifest.engines:
                        raise BackendError(f"{folder}: no TensorRT engine for {name}; "
                                           f"make them with: avg-export engines {folder}")
                    opened[name] = trt_backend.TrtBackend(spec, inside(folder, manifest.engines[name], "engine"),
                                                          manifest.tensorrt)
                    continue
                except (BackendError, BackendUnavailable) as e:
                    if backend == "trt":
                        raise
                    log.warning("%s; using ONNX Runtime for %s", e, name)   # auto: never fail for want of an engine
            from avg_edge.runtime.backends.ort_backend import OrtBackend

            opened[name] = OrtBackend(spec, inside(folder, spec.file, "graph file"), threads=threads,
                                      quantized=is_quantized(manifest, name), spin=name == "decoder")
    except BaseException:
        for b in opened.values():
            b.close()
        raise
    return opened


__all__ = ["BACKENDS", "Backend", "check_backend", "open_backends"]
