"""Validation points and the reference outputs stored with a build (reference.npz).

A build is validated in two halves that never overlap in memory: PyTorch computes the
reference outputs at each validation point and they are stored (a seeded sample of each
output, so the file stays small); later any backend (ONNX Runtime during the build,
TensorRT engines on the device with `avg-export engines`) is checked against them
without torch.  Inputs are regenerated from each point's seed.  Part of the
build-folder contract; torch-free.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from avg_edge import constants as C
from avg_edge import specs as S
from avg_edge.errors import BuildFolderError

SAMPLE = 8192                        # values kept per output and point (all of them when fewer)
SCORES_BUDGET = 64 * 1024**2         # bytes of fp32 attention scores one prefill point may need


@dataclass(frozen=True)
class Point:
    name: str                        # "prefill:max"
    sizes: dict[str, int]            # axis -> size (derived axes included)
    seed: int
    note: str = ""                   # e.g. "seq_len capped at 1024 (memory budget)"

    def feeds(self, spec: S.GraphSpec) -> dict[str, np.ndarray]:
        return S.make_feeds(spec, self.sizes, np.random.default_rng(self.seed))


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:4], "little")


def validation_points(spec: S.GraphSpec, attention_heads: int | None = None,
                      scores_budget: int = SCORES_BUDGET) -> list[Point]:
    """Each profile at min, opt and max.  A prefill longer than what `scores_budget` of
    [heads, seq, seq] fp32 attention scores allows is checked at that bounded length
    (decode points keep their full past: one query row costs little)."""
    cap = None
    if attention_heads:
        cap = max(1, math.isqrt(scores_budget // (4 * attention_heads)))
    points = []
    for name, sizes in S.iter_points(spec):
        note = ""
        seq, past = sizes.get(C.AXIS_SEQ), sizes.get(C.AXIS_PAST, 0)
        if cap is not None and seq is not None and past == 0 and seq > cap:
            note = f"{C.AXIS_SEQ} {seq} checked at {cap} (memory budget of the attention scores)"
            sizes = S.with_derived({**{k: v for k, v in sizes.items() if k not in S.DERIVED_AXES}, C.AXIS_SEQ: cap,
                                    **({C.AXIS_LOGITS: min(sizes[C.AXIS_LOGITS], cap)} if C.AXIS_LOGITS in sizes else {})})
        points.append(Point(name, sizes, _seed(spec.name, name), note))
    return points


def compared(spec: S.GraphSpec, point: Point, outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The part of each output that validation compares, flattened to fp32: presents only
    at the new positions (the past part is a copy of an input; each row of a batch at its
    own past, specs.row_pasts), and a seeded sample of at most SAMPLE values.  Outputs may
    be numpy arrays or anything sliceable that numpy converts (torch tensors): only the
    compared region is converted."""
    pasts = S.row_pasts(point.sizes)
    seq = point.sizes.get(C.AXIS_SEQ, 0)
    out = {}
    for t in spec.outputs:
        a = outputs[t.name]
        if t.role in (S.PRESENT_KEY, S.PRESENT_VALUE):
            flat = np.concatenate([np.asarray(a[r:r + 1, :, p:p + seq, :]).reshape(-1) for r, p in enumerate(pasts)])
        else:
            flat = np.asarray(a).reshape(-1)
        if flat.size > SAMPLE:
            idx = np.sort(np.random.default_rng(_seed(spec.name, point.name, t.name)).choice(flat.size, SAMPLE, replace=False))
            flat = flat[idx]
        out[t.name] = flat.astype(np.float32)
    return out


def key(graph: str, point: str, output: str) -> str:
    return f"{graph}|{point}|{output}"


def save_references(path: Path, refs: dict[str, np.ndarray]) -> None:
    np.savez(path, **refs)


def load_references(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise BuildFolderError(f"{path}: not a readable reference file ({e}); rebuild with avg-export build") from e


@dataclass
class PointResult:
    point: str
    sizes: dict[str, int]
    seed: int
    max_abs_diff: float
    ref_max_abs: float
    tolerance: float
    ok: bool
    note: str = ""


@dataclass
class GraphValidation:
    graph: str
    against: str                 # "PyTorch" or what made the references
    runner: str                  # "onnxruntime CPU", "tensorrt 10.3", ...
    status: str                  # "passed", "failed" or "skipped"
    reason: str
    points: list[PointResult] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((p.max_abs_diff for p in self.points), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_abs_diff": self.max_abs_diff}


def check(spec: S.GraphSpec, points: list[Point], refs: dict[str, np.ndarray], run: Callable[[dict], dict],
          tolerance: tuple[float, float], runner: str, against: str = "PyTorch") -> GraphValidation:
    """Run `run` (feeds -> outputs by name) at every point and compare with the stored
    references: max |got - ref| <= atol + rtol * max |ref| over each point's outputs."""
    atol, rtol = tolerance
    results = []
    for p in points:
        got = compared(spec, p, run(p.feeds(spec)))
        diff, scale = 0.0, 0.0
        for name, g in got.items():
            k = key(spec.name, p.name, name)
            if k not in refs:
                raise BuildFolderError(f"no reference for {k}; rebuild with avg-export build")
            r = refs[k]
            if r.shape != g.shape:
                raise BuildFolderError(f"reference {k} has {r.shape[0]} values, the run gave {g.shape[0]}")
            if r.size:
                diff = max(diff, float(np.abs(g - r).max()))
                scale = max(scale, float(np.abs(r).max()))
        tol = atol + rtol * scale
        results.append(PointResult(p.name, p.sizes, p.seed, diff, scale, tol, bool(diff <= tol), p.note))
    status = "passed" if all(r.ok for r in results) else "failed"
    return GraphValidation(spec.name, against, runner, status, "", results)


def row_feeds(spec: S.GraphSpec, feeds: dict[str, np.ndarray], row: int) -> dict[str, np.ndarray]:
    """Row `row` of a batch's feeds, as the one-request call it stands for (inputs without
    the batch axis, such as logit_positions, are shared)."""
    return {t.name: feeds[t.name][row:row + 1] if t.shape[:1] == (C.AXIS_BATCH,) else feeds[t.name] for t in spec.inputs}


def check_rows(spec: S.GraphSpec, points: list[Point], run: Callable[[dict], dict], tolerance: tuple[float, float],
               runner: str) -> GraphValidation:
    """Each batched point (more than one row) against its rows run one at a time through
    the same `run`: every row's logits and new cache rows must be what that request gives
    alone (a batch must not mix its requests; rows are at different lengths)."""
    atol, rtol = tolerance
    results = []
    for p in points:
        pasts = S.row_pasts(p.sizes)
        if len(pasts) < 2:
            continue
        seq = p.sizes.get(C.AXIS_SEQ, 0)
        feeds = p.feeds(spec)
        together = run(feeds)
        diff, scale = 0.0, 0.0
        for r, past in enumerate(pasts):
            alone = run(row_feeds(spec, feeds, r))
            for t in spec.outputs:
                got, want = np.asarray(together[t.name][r:r + 1]), np.asarray(alone[t.name])
                if t.role in (S.PRESENT_KEY, S.PRESENT_VALUE):
                    got, want = got[:, :, past:past + seq], want[:, :, past:past + seq]
                if want.size:
                    diff = max(diff, float(np.abs(got.astype(np.float32) - want.astype(np.float32)).max()))
                    scale = max(scale, float(np.abs(want.astype(np.float32)).max()))
        tol = atol + rtol * scale
        results.append(PointResult(f"{p.name}:rows", p.sizes, p.seed, diff, scale, tol, bool(diff <= tol),
                                   f"{len(pasts)} rows at pasts {pasts.tolist()}, each against itself alone"))
    status = "passed" if all(r.ok for r in results) else "failed"
    return GraphValidation(spec.name, "each row run alone", runner, status if results else "skipped",
                           "" if results else "no batched point", results)


def points_from_manifest(validation: dict[str, Any]) -> list[Point]:
    """The points a build was validated at, as recorded in its manifest."""
    return [Point(p["point"], dict(p["sizes"]), int(p["seed"]), p.get("note", "")) for p in validation.get("points", [])]
