"""Check exported graphs against PyTorch at the spec's min/opt/max points."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from avg_edge.export.onnx_export import torch_inputs
from avg_edge.precision import Precision
from avg_edge.specs import DecoderRoles, GraphSpec, iter_points, make_feeds


@dataclass
class PointResult:
    point: str
    sizes: dict[str, int]
    max_abs_diff: float
    ref_max_abs: float
    tolerance: float
    ok: bool


@dataclass
class GraphValidation:
    graph: str
    precision: str
    status: str                  # "passed", "failed" or "skipped"
    reason: str
    points: list[PointResult]

    @property
    def max_abs_diff(self) -> float:
        return max((p.max_abs_diff for p in self.points), default=float("nan"))

    def to_dict(self) -> dict:
        return {**asdict(self), "max_abs_diff": self.max_abs_diff}


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def validate_graph(reference: nn.Module, spec: GraphSpec, onnx_path: Path, p: Precision, seed: int = 0,
                   runner: Callable[[dict[str, np.ndarray]], list[np.ndarray]] | None = None) -> GraphValidation:
    """The exported graph vs the fp32 PyTorch module, at every point: ONNX Runtime (CPU) on
    the file, or `runner` (e.g. a TensorRT engine) returning the outputs in spec order."""
    atol, rtol = p.tolerance
    precision = p.name
    if runner is None:
        try:
            session = ort_session(onnx_path)
        except Exception as e:  # onnxruntime raises its own exception types
            msg = str(e).splitlines()[0][:200]
            if precision == "fp16" and "NOT_IMPLEMENTED" in str(e):
                return GraphValidation(spec.name, precision, "skipped", f"ONNX Runtime CPU cannot run this fp16 graph ({msg})", [])
            raise
        runner = lambda feeds: session.run(spec.output_names, feeds)  # noqa: E731
    points = []
    rng = np.random.default_rng(seed)
    for name, sizes in iter_points(spec):
        feeds32 = make_feeds(spec, sizes, rng, dtype=None)
        feeds32 = {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in feeds32.items()}
        with torch.no_grad():
            ref = reference(*torch_inputs(feeds32, spec))
        ref = [r.float().numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
        feeds = {t.name: feeds32[t.name].astype(t.dtype) for t in spec.inputs}
        got = runner(feeds)
        diff = max(float(np.abs(g.astype(np.float32) - r).max()) if r.size else 0.0 for g, r in zip(got, ref))
        scale = max(float(np.abs(r).max()) if r.size else 0.0 for r in ref)
        tol = atol + rtol * scale
        points.append(PointResult(name, sizes, diff, scale, tol, bool(diff <= tol)))
    status = "passed" if all(p.ok for p in points) else "failed"
    return GraphValidation(spec.name, precision, status, "", points)


def validate_wrapper(model, spec: GraphSpec, seq: int = 37, seed: int = 1) -> float:
    """Max |logits| difference between the exported decoder's PyTorch code and transformers'
    own Llama forward on the same embeddings (the wrapper must not drift from the reference)."""
    from avg_edge.export.graphs import DecoderGraph, reference_logits

    roles = DecoderRoles(spec)
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, seq, model.config.hidden_size, generator=g)
    feeds = roles.prefill_feeds(emb.numpy(), np.arange(seq))
    feeds = {t.name: feeds[t.name].astype(np.float32) if feeds[t.name].dtype == np.float16 else feeds[t.name]
             for t in spec.inputs}
    with torch.no_grad():
        ours = DecoderGraph(model, spec)(*torch_inputs(feeds, spec))[spec.output_names.index(roles.name("logits"))]
    return float((ours - reference_logits(model, emb)).abs().max())
