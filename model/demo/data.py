"""The demo task: seeded synthetic images whose questions need different visual detail.

Every image has a muted background, one large light shape (circle, square or triangle)
on the left or right, and, in the other half, a horizontal row of identical marker
pairs: small coloured squares (12 px), the same two colours in the same vertical order,
28 px apart (centre to centre), repeated every 24 px across that half.  Positions are
chosen in AnyRes tile pixels (each pair lies inside one tile row), so many visual
tokens carry the answer instead of the 2-4 of a single pair.

Coarse questions (survive 4x4 pooling, i.e. granularity 36): the background colour, the
large shape's kind, the side it is on.  Fine questions: the colour of the upper / lower
marker and whether a named marker is on top or bottom.  Average pooling keeps how much
of each colour a cell holds but not where inside the cell: 2-row cells (28 px; 144 and
72 tokens) always separate the two rows of markers; for half the images (MERGED_P) the
pair sits inside one 4-row cell (56 px; 36 tokens) so the vertical order is lost there,
for the other half the two rows fall into neighbouring 4-row cells.

`sample(split, index)` is a pure function of (split, index): the same arguments give the
same image bytes and the same questions.  Splits differ by their seed stream.
"""

from __future__ import annotations

import math
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
MARKER_PX = 14      # marker side in tile pixels
MARKER_GAP = 28     # centre-to-centre vertical distance in tile pixels
PAIR_SPACING = 18   # horizontal period of the repeated pairs, tile pixels
ROW_PERIOD = 112    # vertical period of the rows of pairs (two 4x4-pooled cells: same phase)
MAX_ROWS = 3
MERGED_P = 0.5      # share of images whose pair sits inside one 56-px (4x4-pooled) cell
TILE = 336

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


def _padding(size: tuple[int, int], scale: float) -> tuple[float, float, int]:
    """Left/top padding (tile pixels) of AnyRes's resize-and-pad, and the tile rows."""
    w, h = size
    pw, ph = select_best_resolution(size, PINPOINTS)
    if pw / w < ph / h:
        nw, nh = pw, min(math.ceil(h * pw / w), ph)
    else:
        nw, nh = min(math.ceil(w * ph / h), pw), ph
    return (pw - nw) // 2, (ph - nh) // 2, ph // TILE


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
    # markers: a row of identical pairs in the other half, placed in AnyRes tile pixels
    # (tile = scale * image + pad) and mapped back to image pixels
    pad_x, pad_y, tiles_high = _padding((w, h), scale)
    m = MARKER_PX
    merged = bool(rng.random() < MERGED_P)
    o = int(rng.integers(1, 16)) if merged else int(rng.integers(29, 44))   # top edge within a 56-px cell
    top, bottom = pad_y + 8, pad_y + h * scale - 8                            # image rows, in tile pixels
    slots = [56 * k + o for k in range(6 * tiles_high)
             if (56 * k + o) // TILE == (56 * k + o + MARKER_GAP + m) // TILE    # pair inside one tile row
             and top <= 56 * k + o and 56 * k + o + MARKER_GAP + m <= bottom]
    first = int(rng.integers(2))                                              # rows every 112 px (2 cells)
    rows = [y for y in slots if (y - slots[0]) % ROW_PERIOD == 56 * first % ROW_PERIOD] or slots[:1]
    rows = rows[:MAX_ROWS]
    hx0 = (half if side == "left" else 0.0) * scale + pad_x                   # marker half, tile px
    hx1 = hx0 + half * scale
    n = max(1, int((0.84 * (hx1 - hx0) - m) // PAIR_SPACING) + 1)
    x_first = hx0 + rng.uniform(0.06, 0.16) * (hx1 - hx0)
    for y_t in rows:                                                          # upper marker's top, tile px
        for i in range(n):
            x_t = x_first + i * PAIR_SPACING
            for colour, yy in ((up, y_t), (low, y_t + MARKER_GAP)):
                box = ((x_t - pad_x) / scale, (yy - pad_y) / scale, (x_t + m - pad_x) / scale, (yy + m - pad_y) / scale)
                d.rectangle(tuple(round(v) for v in box), fill=MARKERS[colour])
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
