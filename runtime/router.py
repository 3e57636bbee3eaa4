"""The router's text part on the host: the per-token table a build stores, combined with
the router graph's image votes (numpy twin of GranularityRouter.combine; torch-free).

The router graph runs once per image and returns the image rows' votes and the filter's
direction; a question then costs a dot product per prompt token, a top-k and a table
lookup (the maths, and why it is exact: model/router.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avg_edge.errors import BuildFolderError

_REBUILD = "rebuild with avg-export build"


@dataclass(frozen=True)
class RouterText:
    token_votes: np.ndarray        # [vocab, n] float32
    pad_votes: np.ndarray          # [n]: a zero row's votes (prompts shorter than k)
    text_weight: np.ndarray        # [k]: the voter's weights of the text rows
    norm_weight: np.ndarray        # [n]
    norm_bias: np.ndarray          # [n]
    norm_eps: float

    @property
    def k(self) -> int:
        return int(self.text_weight.shape[0])

    @classmethod
    def load(cls, path: Path, granularities: int, vocab: int, k: int) -> "RouterText":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise BuildFolderError(f"{path}: not a readable router table ({e}); {_REBUILD}") from e
        want = {"token_votes": (vocab, granularities), "pad_votes": (granularities,), "text_weight": (k,),
                "norm_weight": (granularities,), "norm_bias": (granularities,), "norm_eps": ()}
        for name, shape in want.items():
            a = arrays.get(name)
            if a is None or a.shape != shape or a.dtype != np.float32:
                got = "missing" if a is None else f"{a.dtype} {list(a.shape)}"
                raise BuildFolderError(f"{path}: '{name}' should be float32 {list(shape)}, got {got}; {_REBUILD}")
        return cls(arrays["token_votes"], arrays["pad_votes"], arrays["text_weight"], arrays["norm_weight"],
                   arrays["norm_bias"], float(arrays["norm_eps"]))

    def logits(self, image_votes: np.ndarray, text_direction: np.ndarray, token_ids: np.ndarray,
               text_embeds: np.ndarray) -> np.ndarray:
        """image_votes [n], text_direction [D] (the router graph's outputs), the prompt's
        token ids [T] and embeddings [T, D] -> the router's logits [n] (float64)."""
        e = np.asarray(text_embeds, np.float32)
        norms = np.maximum(np.linalg.norm(e, axis=-1), 1e-12)                  # F.normalize's eps
        score = (e @ np.asarray(text_direction, np.float32)) / norms           # [T]
        # The k best prompt tokens, best first; zero rows (score -inf) fill the rest.
        # Equal scores are equal tokens (equal rows), so their order changes nothing.
        order = np.argsort(-score, kind="stable")[: self.k]
        rows = np.concatenate([self.token_votes[np.asarray(token_ids)[order]],
                               np.repeat(self.pad_votes[None], self.k - order.size, axis=0)])  # [k, n]
        votes = np.asarray(image_votes, np.float64) + (rows.astype(np.float64) * self.text_weight[:, None]).sum(axis=0)
        centred = votes - votes.mean()
        return centred / np.sqrt((centred**2).mean() + self.norm_eps) * self.norm_weight + self.norm_bias
