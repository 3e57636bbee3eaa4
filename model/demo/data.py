"""The demo task: seeded synthetic images whose questions need different visual detail.

Every image has a muted background, one large light shape (circle, square or triangle)
on the left or right, and, in the other half, a pair of tiny coloured markers stacked
vertically, 28 px apart (centre to centre) in the AnyRes tile space.

Coarse questions (survive 4x4 pooling, i.e. granularity 36): the background colour, the
large shape's kind, the side it is on.  Fine questions: the colour of the upper / lower
marker and whether a named marker is on top or bottom.  Average pooling keeps how much
of each colour a cell holds but not where inside the cell: 2-row cells (28 px; 144
tokens) always separate the two markers, 4-row cells (56 px; 36 tokens) merge them about
half the time, so the vertical order is lost there.

`sample(split, index)` is a pure function of (split, index): the same arguments give the
same image bytes and the same questions.  Splits differ by their seed stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from avg_edge.runtime.preprocess import select_best_resolution

SPLITS = {"train": 0, "val": 1, "test": 2, "calib": 3}   # calib: quantization only, never training
PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # (width, height)
PINPOINT_P = (0.3, 0.3, 0.1, 0.15, 0.15)
BACKGROUNDS = {"gray": (110, 110, 110), "brown": (120, 72, 40), "purple": (90, 50, 120),
               "teal": (30, 110, 110), "navy": (25, 35, 95), "olive": (100, 100, 30)}
MARKERS = {"red": (235, 20, 20), "green": (20, 220, 40), "blue": (40, 90, 255), "yellow": (245, 235, 20)}
SHAPES = ("circle", "square", "triangle")
SHAPE_RGB = (235, 235, 225)
MARKER_PX = 10      # marker side in tile pixels
MARKER_GAP = 28     # centre-to-centre vertical distance in tile pixels

COARSE = ("background", "shape", "side")
FINE = ("upper", "lower", "where")
KINDS = COARSE + FINE
TEMPLATES: dict[str, tuple[str, ...]] = {
    "background": ("What colour is the background?", "What is the background colour?"),
    "shape": ("What shape is the large shape?", "What kind of shape is the big shape?"),
    "side": ("Which side is the large shape on?", "Is the big shape on the left or right?"),
    "upper": ("What colour is the upper small marker?", "What colour is the top marker?"),
    "lower": ("What colour is the lower small marker?", "What colour is the bottom marker?"),
    "where": ("Is the {c} marker on top or bottom?", "Where is the small {c} marker?"),
}


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str

    @property
    def coarse(self) -> bool:
        return self.kind in COARSE


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    qas: tuple[QA, ...]          # one per kind, in KINDS order
    facts: dict[str, str]


def all_questions() -> list[str]:
    """Every question text the generator can produce (for the vocabulary)."""
    out: list[str] = []
    for kind, temps in TEMPLATES.items():
        for t in temps:
            out.extend({t.format(c=c) for c in MARKERS} if "{c}" in t else [t])
    return out


def all_answers() -> list[str]:
    return sorted(set(BACKGROUNDS) | set(MARKERS) | set(SHAPES) | {"left", "right", "top", "bottom"})


def _rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {sorted(SPLITS)}, got {split!r}")
    return np.random.default_rng([20260, SPLITS[split], int(index)])


def _size(rng: np.random.Generator) -> tuple[tuple[int, int], float]:
    """Image (width, height) at 85-100% of a pinpoint per side (so AnyRes picks that
    pinpoint and upscales by at most ~1.18) and the AnyRes resize factor."""
    pw, ph = PINPOINTS[int(rng.choice(len(PINPOINTS), p=PINPOINT_P))]
    w = int(round(pw * rng.uniform(0.85, 1.0)))
    h = int(round(ph * rng.uniform(0.85, 1.0)))
    bw, bh = select_best_resolution((w, h), PINPOINTS)
    return (w, h), min(bw / w, bh / h)


def _draw_shape(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        d.ellipse(box, fill=SHAPE_RGB)
    elif kind == "square":
        d.rectangle(box, fill=SHAPE_RGB)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=SHAPE_RGB)


def sample(split: str, index: int) -> Sample:
    """The index-th image of a split with one question per kind (deterministic)."""
    rng = _rng(split, index)
    (w, h), scale = _size(rng)
    bg = str(rng.choice(list(BACKGROUNDS)))
    shape = str(rng.choice(SHAPES))
    side = str(rng.choice(["left", "right"]))
    up, low = (str(c) for c in rng.choice(list(MARKERS), size=2, replace=False))
    img = Image.new("RGB", (w, h), BACKGROUNDS[bg])
    d = ImageDraw.Draw(img)
    half = w / 2
    r = min(0.28 * min(w, h), 0.2 * w)
    x0 = 0.0 if side == "left" else half                      # the shape's half
    cx = x0 + rng.uniform(r + 0.05 * half, half - r - 0.05 * half) if half > 2.1 * r else x0 + half / 2
    cy = rng.uniform(r + 0.05 * h, h - r - 0.05 * h)
    _draw_shape(d, shape, cx, cy, r)
    # markers: in the other half, away from the edges; sizes in tile pixels / scale
    m, gap = MARKER_PX / scale, MARKER_GAP / scale
    mx0 = half if side == "left" else 0.0
    mx = rng.uniform(mx0 + 0.2 * half, mx0 + 0.8 * half)
    my = rng.uniform(0.12 * h, 0.88 * h - gap)                 # upper marker centre
    for colour, y in ((up, my), (low, my + gap)):
        d.rectangle((mx - m / 2, y - m / 2, mx + m / 2, y + m / 2), fill=MARKERS[colour])
    named = str(rng.choice([up, low]))
    t = [int(rng.integers(2)) for _ in KINDS]
    answers = {"background": bg, "shape": shape, "side": side, "upper": up, "lower": low,
               "where": "top" if named == up else "bottom"}
    qas = tuple(QA(k, TEMPLATES[k][t[i]].format(c=named), answers[k]) for i, k in enumerate(KINDS))
    facts = dict(answers, named=named, size=f"{w}x{h}")
    return Sample(img, qas, facts)


def training_qas(s: Sample) -> list[QA]:
    """Every phrasing of every question about a sample (more supervision per image)."""
    f = s.facts
    out = []
    for kind in KINDS:
        for t in TEMPLATES[kind]:
            if kind == "where":
                for c in (f["upper"], f["lower"]):
                    out.append(QA(kind, t.format(c=c), "top" if c == f["upper"] else "bottom"))
            else:
                out.append(QA(kind, t, f[kind]))
    return out


def normalize(text: str) -> str:
    return " ".join(text.lower().split())
