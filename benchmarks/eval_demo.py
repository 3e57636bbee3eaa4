"""Evaluate the demo model on the TEST split: accuracy per question kind at each fixed
granularity and with the router, mean visual tokens, mean time per answer.

    python benchmarks/eval_demo.py [--checkpoint DIR] [--n 1000] [--out benchmarks/results/]

Writes demo_eval.md (the table) and demo_eval.png (accuracy against visual tokens, drawn
with Pillow).  Each image is encoded once and all six settings answer from it; a
setting's time per answer = that image's vision time + its own router/decoding time.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from avg_edge.model.checkpoint import load_model
from avg_edge.model.demo.data import KINDS
from avg_edge.model.demo.evaluate import collect, summarize

DEFAULT_CKPT = Path(__file__).resolve().parents[1] / "model" / "demo" / "checkpoint"
COLUMNS = (*KINDS, "coarse", "fine", "all")


def router_targets(answers) -> dict[str, float]:
    """The demo issue's router figures: coarse questions' visual tokens with the router as a
    share of fixed 576's, and the share of fine questions routed to a granularity whose
    fixed accuracy on that kind is within 2 points of 576's (or above)."""
    from avg_edge.model.demo.data import COARSE, FINE

    def acc(setting, kind):
        rows = [a for a in answers if a.setting == setting and a.kind == kind]
        return 100.0 * sum(a.correct for a in rows) / max(1, len(rows))

    tokens = lambda setting: sum(a.visual_tokens for a in answers if a.setting == setting and a.kind in COARSE)  # noqa: E731
    fine = [a for a in answers if a.setting == "router" and a.kind in FINE]
    good = sum(acc(str(a.granularity), a.kind) >= acc("576", a.kind) - 2.0 for a in fine)
    return {"coarse_tokens_share": 100.0 * tokens("router") / max(1, tokens("576")),
            "fine_well_routed": 100.0 * good / max(1, len(fine))}


def markdown(table: dict[str, dict[str, float]], n_questions: int, checkpoint: str, split: str = "test",
             targets: dict[str, float] | None = None) -> str:
    settings = [s for s in ("36", "72", "144", "288", "576", "router") if s in table]
    full = table["576"]["tokens"]
    lines = [
        f"# Demo model on the {split} split ({n_questions} questions, {n_questions // len(KINDS)} images)",
        "",
        f"Checkpoint: `{checkpoint}`. Accuracy (%) = exact match of the greedy answer.",
        "",
        "| setting | " + " | ".join(COLUMNS) + " | visual tokens | % of 576 | ms / answer |",
        "|---|" + "---:|" * (len(COLUMNS) + 3),
    ]
    for s in settings:
        d = table[s]
        cells = [f"{d[c]:.1f}" for c in COLUMNS]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {d['tokens']:.0f} | {100 * d['tokens'] / full:.0f}% | {1000 * d['seconds']:.1f} |")
    if "router" in table:
        picks = {k[7:]: v for k, v in table["router"].items() if k.startswith("picked_")}
        lines += ["", "Router's choices: " + ", ".join(f"{g}: {v:.1f}%" for g, v in picks.items())]
    if targets:
        lines += ["", f"Router on coarse questions: {targets['coarse_tokens_share']:.1f}% of fixed 576's visual tokens. "
                      f"Fine questions routed to a granularity within 2 points of 576's accuracy on their kind (or "
                      f"above): {targets['fine_well_routed']:.1f}%."]
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[str, float]], path: Path, split: str = "test") -> None:
    """Accuracy (overall, coarse, fine) against mean visual tokens, log-x axis."""
    W, H, L, R, T, B = 720, 460, 70, 30, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    fixed = [s for s in ("36", "72", "144", "288", "576") if s in table]
    xs = [table[s]["tokens"] for s in table]
    lo, hi = math.log10(min(xs) * 0.8), math.log10(max(xs) * 1.25)
    ymin = max(0.0, 10 * math.floor(min(table[s][k] for s in table for k in ("all", "fine", "coarse")) / 10) - 10)
    px = lambda x: L + (math.log10(x) - lo) / (hi - lo) * (W - L - R)  # noqa: E731
    py = lambda y: T + (100 - y) / (100 - ymin) * (H - T - B)  # noqa: E731
    d.rectangle((L, T, W - R, H - B), outline="black")
    for y in range(int(ymin), 101, 10):
        d.line((L, py(y), W - R, py(y)), fill=(225, 225, 225))
        d.text((L - 30, py(y) - 6), f"{y}", fill="black")
    for x in (100, 200, 500, 1000, 2000, 5000):
        if lo <= math.log10(x) <= hi:
            d.line((px(x), T, px(x), H - B), fill=(225, 225, 225))
            d.text((px(x) - 12, H - B + 6), str(x), fill="black")
    d.text((W // 2 - 80, H - 22), "mean visual tokens (log scale)", fill="black")
    d.text((L, 12), f"Demo model, {split} split: accuracy (%) vs mean visual tokens per image", fill="black")
    series = (("all", (30, 30, 30)), ("fine", (200, 40, 40)), ("coarse", (40, 90, 200)))
    for i, (key, colour) in enumerate(series):
        pts = [(px(table[s]["tokens"]), py(table[s][key])) for s in fixed]
        d.line(pts, fill=colour, width=2)
        for (x, y), s in zip(pts, fixed):
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
            if key == "all":
                d.text((x + 5, y + 4), s, fill=colour)
        if "router" in table:
            x, y = px(table["router"]["tokens"]), py(table["router"][key])
            d.regular_polygon((x, y, 8), 4, rotation=45, fill=None, outline=colour, width=2)
        d.text((W - R - 190, T + 8 + 16 * i), f"-- {key} (fixed)", fill=colour)
    d.text((W - R - 190, T + 8 + 48), "<> router", fill="black")
    img.save(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    ap.add_argument("--n", type=int, default=1000, help="questions (one of each kind per image; rounded up to whole images)")
    ap.add_argument("--split", default="test", choices=("test", "val"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    images = math.ceil(args.n / len(KINDS))
    t0 = time.perf_counter()
    answers = collect(model, model.tokenizer, args.split, images)
    table = summarize(answers)
    n_questions = images * len(KINDS)
    shown = Path(args.checkpoint).resolve()
    root = DEFAULT_CKPT.parents[2]
    targets = router_targets(answers) if "router" in table else None
    text = markdown(table, n_questions, str(shown.relative_to(root)) if shown.is_relative_to(root) else args.checkpoint,
                    args.split, targets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_eval.md").write_text(text)
    (out / "demo_eval.json").write_text(json.dumps({**table, **({"router_targets": targets} if targets else {})}, indent=2))
    plot(table, out / "demo_eval.png", args.split)
    print(text)
    print(f"{n_questions} questions in {time.perf_counter() - t0:.0f} s; wrote {out / 'demo_eval.md'} and demo_eval.png")


if __name__ == "__main__":
    main()
