"""Regenerate tests/golden/demo_greedy.json from the PyTorch reference on the demo model.

    .venv/bin/python tests/golden/make_golden.py

The same greedy tokens are then required of the ONNX Runtime and TensorRT paths
(tests/test_golden.py).  Regenerate only when the shipped demo weights change.
"""

from __future__ import annotations

import json
from pathlib import Path

CASES = [(0, "background", None), (0, "white_dot", None), (1, "shape", 36), (1, "white_dot", 144), (2, "white_dot", 576),
         (2, "side", 72), (3, "white_dot", 288), (3, "background", None), (4, "white_dot", None), (5, "shape", None)]


def main() -> None:
    from avg_edge.model import load_model
    from avg_edge.model.demo import CHECKPOINT
    from avg_edge.model.demo.data import sample

    model = load_model(CHECKPOINT)
    out = []
    for index, kind, g in CASES:
        qa = next(q for q in sample("test", index).qas if q.kind == kind)
        r = model.generate(sample("test", index).image, qa.question, granularity=g, max_new_tokens=8)
        out.append({"index": index, "kind": kind, "question": qa.question, "granularity": g,
                    "chosen": r.granularity, "token_ids": r.token_ids, "text": r.text, "answer": qa.answer})
    path = Path(__file__).with_name("demo_greedy.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {len(out)} cases to {path}")


if __name__ == "__main__":
    main()
