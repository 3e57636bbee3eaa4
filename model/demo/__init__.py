"""The demo model: a small AVG-LLaVA trained here with RGLF on a synthetic task.

`data` is the seeded task generator, `tokenizer` builds the word-level tokenizer.json,
`core` holds the shared training/evaluation pieces, `train` reproduces the shipped
weights in `checkpoint/` (python -m avg_edge.model.demo.train --out runs/demo).
"""

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
