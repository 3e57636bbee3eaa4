"""Accuracy per question kind at every fixed granularity and with the router."""

from __future__ import annotations

from collections import defaultdict

from avg_edge.model.demo.core import Answer, answer_all
from avg_edge.model.demo.data import COARSE, FINE, KINDS, sample
from avg_edge.model.llava import AvgLlavaModel
from avg_edge.runtime.tokenizer import Tokenizer


def collect(model: AvgLlavaModel, tok: Tokenizer, split: str, images: int, start: int = 0) -> list[Answer]:
    out: list[Answer] = []
    for i in range(start, start + images):
        out.extend(answer_all(model, tok, sample(split, i), with_router=model.router is not None))
    return out


def summarize(answers: list[Answer]) -> dict[str, dict[str, float]]:
    """{setting: {kind: accuracy %, 'coarse', 'fine', 'all', 'tokens', 'seconds'}}."""
    groups: dict[str, list[Answer]] = defaultdict(list)
    for a in answers:
        groups[a.setting].append(a)
    table: dict[str, dict[str, float]] = {}
    for setting, rows in groups.items():
        acc = lambda rs: 100.0 * sum(r.correct for r in rs) / max(1, len(rs))  # noqa: E731
        d = {k: acc([r for r in rows if r.kind == k]) for k in KINDS}
        d["coarse"] = acc([r for r in rows if r.kind in COARSE])
        d["fine"] = acc([r for r in rows if r.kind in FINE])
        d["all"] = acc(rows)
        d["tokens"] = sum(r.visual_tokens for r in rows) / len(rows)
        d["seconds"] = sum(r.seconds for r in rows) / len(rows)
        d["n"] = float(len(rows))
        if setting == "router":
            for g in sorted({r.granularity for r in rows}):
                d[f"picked_{g}"] = 100.0 * sum(r.granularity == g for r in rows) / len(rows)
        table[setting] = d
    return table


def evaluate(model: AvgLlavaModel, tok: Tokenizer, split: str, images: int) -> dict[str, dict[str, float]]:
    return {s: {k: round(v, 1) if k != "seconds" else round(v, 4) for k, v in d.items()}
            for s, d in summarize(collect(model, tok, split, images)).items()}
