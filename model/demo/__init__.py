"""The demo model: a small AVG-LLaVA trained here with RGLF on a synthetic task.

`data` is the seeded task generator, `tokenizer` builds the word-level tokenizer.json,
`core` holds the shared training/evaluation pieces, `evaluate` the accuracy table, `train` reproduces the shipped
weights in `checkpoint/` (python -m avg_edge.model.demo.train --out runs/demo).
"""

from importlib.resources import files
from pathlib import Path

# Shipped inside the package (the wheel carries it); a regular install has it on disk.
CHECKPOINT = Path(str(files(__name__).joinpath("checkpoint")))
