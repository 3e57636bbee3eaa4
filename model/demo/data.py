"""The demo task: seeded synthetic images whose questions need different visual detail.

Every image has a muted background, one large light shape (ring, square or diamond) on
the left or right, and, in the other half, clusters of four small markers.  A cluster
fills one 56 x 56 px cell of the AnyRes tiles (the cell that 4x4 pooling, i.e.
granularity 36, averages into one token): four 14 px tiles, one per marker colour, on a
2 x 2 lattice with a 28 px pitch, shuffled per cluster, each tile on an odd patch
column.  In DOTTED clusters the patch just left of the answer colour's tile holds a
white dot on the background; in DOTTED other clusters another colour's tile has a black
dot inside it (a distractor, never asked).

Coarse questions (survive pooling): the background colour, the large shape's kind, the
side it is on.  The fine question (kind "white_dot"): the colour of the marker just right
of the white dot.  That is a relation between two patches.  At 144 and 288 tokens the
marker and its dot share one token (a one-token look); at 72 and 36 the dot's token also
holds two or four marker colours, the same colours whatever the answer, so pooling
destroys the answer; at 576 the dot and its marker are neighbouring tokens (two hops:
find the dot, read its right neighbour).  A question about a single patch's own look
would not do: the projector runs before pooling and can give any per-patch look a
channel of its own, whose mean survives 4x4 pooling (runs v7a and v9a in
docs/demo-model.md read a white-centred tile at 36 tokens).

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
SHAPES = ("ring", "square", "diamond")   # a ring, not a disc: a 2-layer decoder told discs from squares 1 time in 9
SHAPE_RGB = (235, 235, 225)
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
TILE = 336          # AnyRes tile side, px
CELL = 56           # 4x4 patches: one token at granularity 36
SLOT = 14           # one patch: one token at 576
PITCH = 28          # slot lattice pitch inside a cluster (2 patches)
CURRICULUM = (0, 1, 2, 3)   # 0 = the task itself; see sample()
MIN_FILL = 0.6      # share of the marker half's whole cells that get a cluster
DOTTED = 2          # clusters whose white-dot (black-dot) colour carries the dot

COARSE = ("background", "shape", "side")
FINE = ("white_dot",)   # the colour right of the white dot (see above); black dots are drawn, never asked
KINDS = COARSE + FINE
TEMPLATES: dict[str, tuple[str, ...]] = {
    "background": ("What colour is the background?", "What is the background colour?"),
    "shape": ("What shape is the large shape?", "What kind of shape is the big shape?"),
    "side": ("Which side is the large shape on?", "Is the big shape on the left or right?"),
    "white_dot": ("What colour is the marker right of the white dot?", "Which colour is just right of the white dot?"),
    # never asked; kept because the vocabulary (model/demo/tokenizer) is built from every template
    "black_dot": ("What colour is the marker with a black dot?", "What colour is the black-dotted marker?"),
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
    clusters: tuple[tuple[float, float], ...] = ()   # top-left corner of each cluster's cell, image px


def all_questions() -> list[str]:
    """Every question text the generator can produce (for the vocabulary)."""
    return [t for temps in TEMPLATES.values() for t in temps]


def all_answers() -> list[str]:
    return sorted(set(BACKGROUNDS) | set(MARKERS) | set(SHAPES) | {"left", "right"})


def _rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {sorted(SPLITS)}, got {split!r}")
    return np.random.default_rng([20263, SPLITS[split], int(index)])


def _size(rng: np.random.Generator) -> tuple[tuple[int, int], float]:
    """Image (width, height) at 85-100% of a pinpoint per side (so AnyRes picks that
    pinpoint and upscales by at most ~1.18) and the AnyRes resize factor."""
    pw, ph = PINPOINTS[int(rng.choice(len(PINPOINTS), p=PINPOINT_P))]
    w = int(round(pw * rng.uniform(0.85, 1.0)))
    h = int(round(ph * rng.uniform(0.85, 1.0)))
    bw, bh = select_best_resolution((w, h), PINPOINTS)
    return (w, h), min(bw / w, bh / h)


def _padding(size: tuple[int, int]) -> tuple[float, float]:
    """Left/top padding (tile pixels) of AnyRes's resize-and-pad."""
    w, h = size
    pw, ph = select_best_resolution(size, PINPOINTS)
    if pw / w < ph / h:
        nw, nh = pw, min(math.ceil(h * pw / w), ph)
    else:
        nw, nh = min(math.ceil(w * ph / h), pw), ph
    return (pw - nw) // 2, (ph - nh) // 2


def _draw_shape(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, hole: tuple = (0, 0, 0)) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "ring":    # a disc with a hole of half its radius, in the background colour
        d.ellipse(box, fill=SHAPE_RGB)
        d.ellipse((cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2), fill=hole)
    elif kind == "square":
        d.rectangle(box, fill=SHAPE_RGB)
    else:  # diamond: the square turned by 45 degrees (edges at 45 degrees, not 0 or 90)
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=SHAPE_RGB)


def _fill(d: ImageDraw.ImageDraw, rgb: tuple, sx: float, sy: float, box: tuple[int, int, int, int],
          pad_x: float, pad_y: float, scale: float) -> None:
    """Fill `box` (x0, y0, x1, y1 in tile px, relative to the slot whose top-left is
    (sx, sy)) in image pixels."""
    a, b, c, e = box
    xy = ((sx + a - pad_x) / scale, (sy + b - pad_y) / scale, (sx + c - pad_x) / scale - 1, (sy + e - pad_y) / scale - 1)
    d.rectangle(tuple(round(v) for v in xy), fill=rgb)


CENTRE = (3, 3, 11, 11)   # a slot's 8x8 centre, tile px


def _draw_marker(d: ImageDraw.ImageDraw, style: str, colour: str, bg: str, sx: float, sy: float,
                 pad_x: float, pad_y: float, scale: float) -> None:
    """One marker whose slot's top-left is (sx, sy) in tile pixels, drawn in image pixels:
    a 14x14 tile of the colour (one whole patch when AnyRes puts it back at tile scale)
    with an 8x8 centre that is black ("black_dot") or the background ("plain": a hole).
    Every marker holds 132 px of its colour."""
    _fill(d, MARKERS[colour], sx, sy, (0, 0, SLOT, SLOT), pad_x, pad_y, scale)
    _fill(d, BLACK if style == "black_dot" else BACKGROUNDS[bg], sx, sy, CENTRE, pad_x, pad_y, scale)


def _draw_dot(d: ImageDraw.ImageDraw, rgb: tuple, sx: float, sy: float, pad_x: float, pad_y: float,
              scale: float) -> None:
    """A dot on the background: the 8x8 centre of the slot whose top-left is (sx, sy)."""
    _fill(d, rgb, sx, sy, CENTRE, pad_x, pad_y, scale)


def sample(split: str, index: int, curriculum: int = 0) -> Sample:
    """The index-th image of a split with one question per kind (deterministic).

    `curriculum` > 0 swaps the marker half for an easier training variant (background,
    shape and colours stay): 1, a carpet of pairs, a marker of the answer's colour and a
    white dot left of it; 2, a checkerboard of those pairs and pairs of the black-dot
    colour with a black dot left of it (the colour right of a white dot is then the
    answer, not the most common colour); 3, the clusters with a dot in every cluster.
    The carpets make the marker colours as easy to see as the background (a gradient to
    start from); with four balanced colours in sparse clusters a uniform look says
    nothing."""
    if curriculum not in CURRICULUM:
        raise ValueError(f"curriculum: expected one of {CURRICULUM}, got {curriculum!r}")
    rng = _rng(split, index)
    (w, h), scale = _size(rng)
    bg = str(rng.choice(list(BACKGROUNDS)))
    shape = str(rng.choice(SHAPES))
    side = str(rng.choice(["left", "right"]))
    colours = [str(c) for c in rng.permutation(list(MARKERS))]   # white dot, black dot, plain, plain
    img = Image.new("RGB", (w, h), BACKGROUNDS[bg])
    d = ImageDraw.Draw(img)
    half = w / 2
    r = min(0.28 * min(w, h), 0.2 * w)
    x0 = 0.0 if side == "left" else half                      # the shape's half
    cx = x0 + rng.uniform(r + 0.05 * half, half - r - 0.05 * half) if half > 2.1 * r else x0 + half / 2
    cy = rng.uniform(r + 0.05 * h, h - r - 0.05 * h)
    _draw_shape(d, shape, cx, cy, r, BACKGROUNDS[bg])
    # clusters: whole 56-px cells of the tile grid (tile px = scale * image px + padding)
    # inside the other half, mapped back to image pixels
    pad_x, pad_y = _padding((w, h))
    hx0 = (half if side == "left" else 0.0) * scale + pad_x + 4                # marker half, tile px
    hx1 = hx0 + half * scale - 8
    y_lo, y_hi = pad_y + 4, pad_y + h * scale - 4
    cells = [(cx_, cy_) for cy_ in range(0, 3 * TILE + 1, CELL) for cx_ in range(0, 3 * TILE + 1, CELL)
             if hx0 <= cx_ and cx_ + CELL <= hx1 and y_lo <= cy_ and cy_ + CELL <= y_hi]
    n = max(1, int(round(len(cells) * rng.uniform(MIN_FILL, 1.0))))
    chosen = sorted(int(i) for i in rng.choice(len(cells), size=n, replace=False))
    white_at = {int(i) for i in rng.choice(n, size=min(DOTTED, n), replace=False)}   # clusters with a dot
    black_at = {int(i) for i in rng.choice(n, size=min(DOTTED, n), replace=False)}
    corners = []
    for k, ci in enumerate(chosen):
        cx_t, cy_t = cells[ci]
        oy, _ = (int(v) for v in rng.integers(0, 2, size=2))                  # lattice row offset: patches 0/1
        ox = 1   # markers on odd patch columns, so a marker and the dot left of it share a 2x2 (and 1x2) pool;
        #          the column offset is still drawn above so that every split keeps its seed stream
        slots = rng.permutation(4)
        if curriculum in (1, 2):
            continue
        styles = ("plain", "black_dot" if k in black_at or curriculum == 3 else "plain", "plain", "plain")
        for i, (style, colour, slot) in enumerate(zip(styles, colours, slots)):
            sx = cx_t + ox * SLOT + slot % 2 * PITCH                            # slot's top-left, tile px
            sy = cy_t + oy * SLOT + slot // 2 * PITCH
            _draw_marker(d, style, colour, bg, sx, sy, pad_x, pad_y, scale)
            if i == 0 and (k in white_at or curriculum == 3):
                _draw_dot(d, WHITE, sx - SLOT, sy, pad_x, pad_y, scale)         # the patch left of it
        corners.append(((cx_t - pad_x) / scale, (cy_t - pad_y) / scale))
    if curriculum in (1, 2):   # carpet: every whole pair of patches of the marker half
        for sy in range(0, 3 * TILE, SLOT):
            for sx in range(0, 3 * TILE, 2 * SLOT):
                if hx0 <= sx and sx + 2 * SLOT <= hx1 and y_lo <= sy and sy + SLOT <= y_hi:
                    first = curriculum == 1 or (sx // (2 * SLOT) + sy // SLOT) % 2 == 0
                    _draw_dot(d, WHITE if first else BLACK, sx, sy, pad_x, pad_y, scale)   # a dot, then its marker
                    _draw_marker(d, "plain", colours[0] if first else colours[1], bg, sx + SLOT, sy, pad_x, pad_y, scale)
    t = [int(rng.integers(2)) for _ in KINDS]
    answers = {"background": bg, "shape": shape, "side": side, "white_dot": colours[0], "black_dot": colours[1]}
    if curriculum == 1:   # one carpet: the white dot's neighbours only
        del answers["black_dot"]
    qas = tuple(QA(k, TEMPLATES[k][t[i]], answers[k]) for i, k in enumerate(KINDS) if k in answers)
    facts = dict(answers, size=f"{w}x{h}", clusters=str(n))
    return Sample(img, qas, facts, tuple(corners))


def training_qas(s: Sample) -> list[QA]:
    """Every phrasing of every question about a sample (more supervision per image)."""
    return [QA(kind, t, s.facts[kind]) for kind in KINDS if kind in s.facts for t in TEMPLATES[kind]]
