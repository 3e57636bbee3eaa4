"""Accuracy per question kind at every fixed granularity and with the router."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from avg_edge.model.demo.core import Answer, answer_all, encode_image, encode_qa, scaled_from_tower
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


@dataclass(frozen=True)
class RouterCheck:
    """What stage 3 must not ship: a router pinned at its LayerNorm's bound, or one whose
    picks do not depend on the question."""
    picks: dict[str, dict[int, float]]   # kind -> granularity -> share of that kind's questions
    at_bound: float                      # share of questions with a normalised vote at the bound
    max_ratio: float                     # the largest |normalised vote| / bound seen
    bound_tolerance: float = 0.99        # |normalised| >= this x sqrt(n - 1) counts as at the bound
    min_difference: float = 0.2          # two kinds' pick shares must differ by this much (total variation)

    def problems(self) -> list[str]:
        out = []
        if self.at_bound > 0.5:
            out.append(f"the router is pinned: {100 * self.at_bound:.0f}% of questions have a normalised vote at the "
                       f"LayerNorm bound (largest |vote| / bound {self.max_ratio:.4f}), where the other votes get no "
                       "gradient; train a fresh router longer or with a different seed")
        kinds = list(self.picks)
        tv = max((0.5 * sum(abs(self.picks[a].get(g, 0) - self.picks[b].get(g, 0))
                            for g in set(self.picks[a]) | set(self.picks[b]))
                  for i, a in enumerate(kinds) for b in kinds[i + 1:]), default=0.0)
        if tv < self.min_difference:
            out.append(f"the router's picks do not depend on the question: no two question kinds differ by "
                       f"{self.min_difference:.0%} of their picks (largest difference {tv:.0%}); {self.picks}")
        return out


@torch.no_grad()
def router_check(model: AvgLlavaModel, tok: Tokenizer, split: str, images: int) -> RouterCheck:
    """Every question of `images` samples of `split` through the router (no decoding)."""
    router = model.router
    if router is None:
        raise ValueError("this model has no router to check")
    n = len(model.config.granularities)
    bound = math.sqrt(n - 1)
    picks: dict[str, Counter] = defaultdict(Counter)
    ratios = []
    for i in range(images):
        s = sample(split, i)
        _, feats = encode_image(model, s.image)
        scaled = scaled_from_tower(model, feats)
        for qa in s.qas:
            p = encode_qa(tok, model.config, qa)
            votes = router.votes(scaled, model.router_text(p.before, p.after, p.question))   # [n]
            ratios.append(float(router.normalised(votes).abs().max()) / bound)
            picks[qa.kind][model.config.granularities[int(torch.argmax(router.norm(votes)))]] += 1
    shares = {k: {g: c / sum(cnt.values()) for g, c in sorted(cnt.items())} for k, cnt in picks.items()}
    tol = RouterCheck.bound_tolerance
    return RouterCheck(shares, sum(r >= tol for r in ratios) / len(ratios), max(ratios))
