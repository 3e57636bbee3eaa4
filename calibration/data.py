"""Calibration data: image + question (+ answer) pairs.

Sources:
  * a .jsonl file, one {"image": PATH, "question": TEXT, "answer": TEXT?} per line
    (PATH relative to the file's folder);
  * a folder holding calibration.jsonl, or images each with a same-named .txt question;
  * nothing: the demo generator's `calib` split (never used for training or testing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avg_edge.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class CalibSample:
    image: Any                  # a path, bytes or a PIL image
    question: str
    answer: str | None = None
    kind: str | None = None     # the demo's question kind, when known


def demo_samples(n: int, split: str = "calib") -> list[CalibSample]:
    """n image/question pairs from the demo generator, cycling through question kinds."""
    from avg_edge.model.demo.data import sample

    out = []
    for i in range(n):
        s = sample(split, i)
        qa = s.qas[i % len(s.qas)]
        out.append(CalibSample(s.image, qa.question, qa.answer, qa.kind))
    return out


def load_samples(path: str | Path | None, n: int) -> list[CalibSample]:
    if n < 1:
        raise UsageError(f"--calib-samples: expected a positive number, got {n}")
    if path is None:
        return demo_samples(n)
    p = Path(path)
    if p.is_dir():
        jl = p / "calibration.jsonl"
        samples = _from_jsonl(jl) if jl.is_file() else _from_folder(p)
    elif p.is_file() and p.suffix == ".jsonl":
        samples = _from_jsonl(p)
    else:
        raise UsageError(f"--calib-data: expected a .jsonl file or a folder, got {p}"
                         + (" (not found)" if not p.exists() else ""))
    if not samples:
        raise UsageError(f"--calib-data {p}: no image/question pairs found (see README: calibration data)")
    return samples[:n]


def _from_jsonl(path: Path) -> list[CalibSample]:
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            image, question = d["image"], d["question"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UsageError(f"{path}:{i}: expected {{\"image\": PATH, \"question\": TEXT}}, got {line[:80]!r}") from e
        img = Path(image) if Path(image).is_absolute() else path.parent / image
        if not img.is_file():
            raise UsageError(f"{path}:{i}: image not found: {img}")
        out.append(CalibSample(img, str(question), d.get("answer"), d.get("kind")))
    return out


def _from_folder(folder: Path) -> list[CalibSample]:
    out = []
    for img in sorted(folder.iterdir()):
        if img.suffix.lower() in IMAGE_SUFFIXES:
            q = img.with_suffix(".txt")
            if not q.is_file():
                raise UsageError(f"{img}: no question file {q.name} beside it (or give a calibration.jsonl)")
            out.append(CalibSample(img, q.read_text().strip()))
    return out
