"""What a lower precision cost: graph outputs, router decisions, greedy tokens, accuracy,
size and speed, each against the float build it was quantized from (fp32 for int8, fp16
for int4), on the same inputs.  The two builds run one after the other, never together."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from avg_edge import specs as S
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
    reference: str                                  # the float precision compared against (fp32, fp16)
    samples: int
    graphs: dict[str, dict[str, Any]]               # graph -> {"method", "outputs": OutputDrift}
    router_agreement: float | None                  # share of samples where both builds chose the same granularity
    token_agreement: float                          # share of samples whose first `tokens` greedy tokens are equal
    tokens: int
    accuracy: dict[str, Any] | None                 # {"reference", "quantized", "drop_points", "questions"} when answers are known
    answer_nll: dict[str, float] | None             # mean teacher-forced NLL of the known answers: {"reference", "quantized"}
    sizes: dict[str, int]                           # bytes of the graphs: {"reference", "quantized"}
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
            lines.append(f"accuracy {self.reference} {a['reference']:.1f}% -> {self.precision} {a['quantized']:.1f}% "
                         f"(drop {a['drop_points']:+.1f} points, {a['questions']} questions)")
        if self.answer_nll:
            lines.append(f"answer NLL {self.reference} {self.answer_nll['reference']:.4f} -> {self.precision} "
                         f"{self.answer_nll['quantized']:.4f}")
        s, v = self.sizes, self.speed
        lines.append(f"size {s['reference'] / 2**20:.1f} MB -> {s['quantized'] / 2**20:.1f} MB "
                     f"({s['quantized'] / s['reference']:.2f}x); ORT CPU time per answer {v['reference'] * 1000:.0f} ms -> "
                     f"{v['quantized'] * 1000:.0f} ms ({v['reference'] / v['quantized']:.2f}x speed)")
        return lines


def graph_outputs(pipe, feeds: dict[str, list[dict[str, np.ndarray]]]) -> dict[str, list[np.ndarray]]:
    """Every graph of `pipe` on its recorded feeds, outputs flattened to one fp64 vector
    per feed (the decoder: its logits only)."""
    out: dict[str, list[np.ndarray]] = {}
    for name, backend in pipe.backends.items():
        names = [S.DecoderRoles(backend.spec).name(S.LOGITS)] if name == S.DECODER else backend.spec.output_names
        out[name] = []
        for f in feeds[name]:
            o = backend.infer(f, check=False)
            out[name].append(np.concatenate([o[n].astype(np.float64).ravel() for n in names]))
    return out


def output_drift(ref: list[np.ndarray], quantized: list[np.ndarray]) -> OutputDrift:
    maxd, means, cos = 0.0, [], []
    for x, y in zip(ref, quantized):
        d = np.abs(x - y)
        maxd = max(maxd, float(d.max()) if d.size else 0.0)
        means.append(float(d.mean()) if d.size else 0.0)
        denom = np.linalg.norm(x) * np.linalg.norm(y)
        cos.append(float(x @ y / denom) if denom else 1.0)
    return OutputDrift(maxd, float(np.mean(means)), float(np.mean(cos)))


@dataclass
class AnswerRecord:
    granularity: int
    token_ids: list[int]
    text: str
    seconds: float
    nll: float | None          # teacher-forced NLL of the known answer


def answer_pass(pipe, samples: list[CalibSample], tokens: int = 32,
                nll_at: list[int] | None = None) -> list[AnswerRecord]:
    """Greedy answers of one pipeline; where answers are known, their NLL at `nll_at`
    (the reference's granularities, so both builds are scored on the same prompt)."""
    out = []
    for i, s in enumerate(samples):
        t0 = time.perf_counter()
        r = pipe.generate(s.image, s.question, max_new_tokens=tokens)
        seconds = time.perf_counter() - t0
        nll = None
        if s.answer is not None:
            answer = [*pipe.tokenizer.encode(s.answer), pipe.manifest.eos_token_id]
            g = nll_at[i] if nll_at is not None else r.granularity
            nll = pipe.score(pipe.prepare(s.image, s.question, g), answer)
        out.append(AnswerRecord(r.granularity, r.token_ids, r.text, seconds, nll))
    return out


def answer_drift(ref: list[AnswerRecord], q: list[AnswerRecord], samples: list[CalibSample], has_router: bool,
                 tokens: int = 32) -> dict[str, Any]:
    """Router agreement, greedy-token agreement, accuracy, answer NLL and speed of two passes."""
    right = {"reference": Accuracy(), "quantized": Accuracy()}
    for s, a, b in zip(samples, ref, q):
        if s.answer is not None:
            right["reference"].add(a.text, s.answer)
            right["quantized"].add(b.text, s.answer)
    n = len(samples)
    accuracy = answer_nll = None
    if right["reference"].total:
        acc_ref, acc_q = right["reference"].percent, right["quantized"].percent
        accuracy = {"reference": acc_ref, "quantized": acc_q, "drop_points": acc_ref - acc_q,
                    "questions": right["reference"].total}
        answer_nll = {k: float(np.mean([r.nll for r in rs if r.nll is not None])) for k, rs in (("reference", ref), ("quantized", q))}
    return {
        "router_agreement": sum(a.granularity == b.granularity for a, b in zip(ref, q)) / n if has_router else None,
        "token_agreement": sum(a.token_ids[:tokens] == b.token_ids[:tokens] for a, b in zip(ref, q)) / n,
        "accuracy": accuracy,
        "answer_nll": answer_nll,
        "speed": {"reference": statistics.median(r.seconds for r in ref), "quantized": statistics.median(r.seconds for r in q)},
    }
