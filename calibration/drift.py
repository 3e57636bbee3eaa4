"""What a lower precision cost: graph outputs, router decisions, greedy tokens, accuracy,
size and speed, each against the fp32 build on the same inputs."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from avg_edge.calibration.data import CalibSample
from avg_edge.runtime.text import Accuracy


@dataclass
class OutputDrift:
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float            # mean over feeds of the cosine similarity of the flattened outputs


@dataclass
class DriftReport:
    precision: str
    samples: int
    graphs: dict[str, dict[str, Any]]               # graph -> {"method", "outputs": OutputDrift}
    router_agreement: float | None                  # share of samples where both builds chose the same granularity
    token_agreement: float                          # share of samples whose first `tokens` greedy tokens are equal
    tokens: int
    accuracy: dict[str, Any] | None                 # {"fp32", "quantized", "drop_points", "questions"} when answers are known
    answer_nll: dict[str, float] | None             # mean teacher-forced NLL of the known answers: {"fp32", "quantized"}
    sizes: dict[str, int]                           # bytes of the graphs: fp32 and quantized
    speed: dict[str, float]                         # median seconds per answer on ONNX Runtime CPU
    threshold: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        lines = []
        for g, d in self.graphs.items():
            o = d["outputs"]
            lines.append(f"{g:8s} {d['method']:34s} max {o['max_abs_diff']:.2e}  mean {o['mean_abs_diff']:.2e}  cos {o['cosine']:.5f}")
        if self.router_agreement is not None:
            lines.append(f"router decision agreement {100 * self.router_agreement:.1f}% over {self.samples} samples")
        lines.append(f"first {self.tokens} greedy tokens identical for {100 * self.token_agreement:.1f}% of samples")
        if self.accuracy:
            a = self.accuracy
            lines.append(f"accuracy fp32 {a['fp32']:.1f}% -> {self.precision} {a['quantized']:.1f}% "
                         f"(drop {a['drop_points']:+.1f} points, {a['questions']} questions)")
        if self.answer_nll:
            lines.append(f"answer NLL fp32 {self.answer_nll['fp32']:.4f} -> {self.precision} {self.answer_nll['quantized']:.4f}")
        s, v = self.sizes, self.speed
        lines.append(f"size {s['fp32'] / 2**20:.1f} MB -> {s['quantized'] / 2**20:.1f} MB ({s['quantized'] / s['fp32']:.2f}x); "
                     f"ORT CPU time per answer {v['fp32'] * 1000:.0f} ms -> {v['quantized'] * 1000:.0f} ms "
                     f"({v['fp32'] / v['quantized']:.2f}x speed)")
        return lines


def output_drift(ref, quantized, feeds: list[dict[str, np.ndarray]], outputs: list[str] | None) -> OutputDrift:
    """Two backends of the same graph on the same recorded feeds (`outputs`: all if None)."""
    maxd, means, cos = 0.0, [], []
    names = outputs or ref.spec.output_names
    for f in feeds:
        a, b = ref.infer(f, check=False), quantized.infer(f, check=False)
        x = np.concatenate([a[n].astype(np.float64).ravel() for n in names])
        y = np.concatenate([b[n].astype(np.float64).ravel() for n in names])
        d = np.abs(x - y)
        maxd = max(maxd, float(d.max()) if d.size else 0.0)
        means.append(float(d.mean()) if d.size else 0.0)
        denom = np.linalg.norm(x) * np.linalg.norm(y)
        cos.append(float(x @ y / denom) if denom else 1.0)
    return OutputDrift(maxd, float(np.mean(means)), float(np.mean(cos)))


def answer_drift(ref_pipe, q_pipe, samples: list[CalibSample], tokens: int = 32) -> dict[str, Any]:
    """Run both pipelines greedily on the same samples; where answers are known, also
    score them (teacher-forced NLL) at the fp32 pipeline's granularity in both."""
    same_route, same_tokens = 0, 0
    right: dict[str, Accuracy] = {"fp32": Accuracy(), "quantized": Accuracy()}
    nll: dict[str, list[float]] = {"fp32": [], "quantized": []}
    t_ref, t_q = [], []
    for s in samples:
        t0 = time.perf_counter()
        a = ref_pipe.generate(s.image, s.question, max_new_tokens=tokens)
        t_ref.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = q_pipe.generate(s.image, s.question, max_new_tokens=tokens)
        t_q.append(time.perf_counter() - t0)
        same_route += a.granularity == b.granularity
        same_tokens += a.token_ids[:tokens] == b.token_ids[:tokens]
        if s.answer is not None:
            right["fp32"].add(a.text, s.answer)
            right["quantized"].add(b.text, s.answer)
            for key, pipe in (("fp32", ref_pipe), ("quantized", q_pipe)):
                answer = [*pipe.tokenizer.encode(s.answer), pipe.manifest.eos_token_id]
                nll[key].append(pipe.score(pipe.prepare(s.image, s.question, a.granularity), answer))
    n = len(samples)
    accuracy = answer_nll = None
    if right["fp32"].total:
        acc_ref, acc_q = right["fp32"].percent, right["quantized"].percent
        accuracy = {"fp32": acc_ref, "quantized": acc_q, "drop_points": acc_ref - acc_q, "questions": right["fp32"].total}
        answer_nll = {k: float(np.mean(v)) for k, v in nll.items()}
    return {
        "router_agreement": same_route / n if ref_pipe.manifest.has_router else None,
        "token_agreement": same_tokens / n,
        "accuracy": accuracy,
        "answer_nll": answer_nll,
        "speed": {"fp32": statistics.median(t_ref), "quantized": statistics.median(t_q)},
    }
