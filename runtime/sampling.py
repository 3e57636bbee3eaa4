"""Next-token choice: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from avg_edge.errors import BackendError, InputError

# Temperatures below this are greedy: the softmax of logits / T is then one-hot for any
# logits a decoder gives, and dividing by a subnormal T would only overflow.
GREEDY_BELOW = 1e-5


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0      # 0 (or below GREEDY_BELOW) = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (_number(self.temperature) and 0 <= self.temperature <= 100):
            raise InputError(f"temperature: expected a finite number 0..100 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise InputError(f"top_k: expected a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not (_number(self.top_p) and 0 < self.top_p <= 1):
            raise InputError(f"top_p: expected a number with 0 < top_p <= 1, got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise InputError(f"seed: expected a non-negative integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _nan_error(x: np.ndarray) -> BackendError:
    return BackendError(f"the decoder's logits contain {int(np.isnan(x).sum())} NaN value(s): expected numbers "
                        "(a damaged build, or fp16 overflow: try the fp32 build)")


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits: [vocab] for the last position.  The softmax is taken in float64 after
    subtracting the largest logit, so no temperature or logit gives NaN probabilities
    (+inf logits share all the probability, -inf ones get none)."""
    if params.greedy:                  # one pass: argmax finds a NaN first when there is one
        best = int(np.argmax(logits))
        if np.isnan(logits[best]):
            raise _nan_error(logits)
        return best
    x = np.asarray(logits, dtype=np.float64)
    if np.isnan(x).any():
        raise _nan_error(x)
    top = x.max()
    if top == -np.inf:
        return int(np.argmax(x))
    if top == np.inf:
        x, top = np.where(x == np.inf, 0.0, -np.inf), 0.0
    with np.errstate(over="ignore", under="ignore"):      # -> -inf and 0: what those logits mean
        x = (x - top) / params.temperature                # <= 0, the largest is 0
        if params.top_k is not None and params.top_k < x.size:
            kth = np.partition(x, -params.top_k)[-params.top_k]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x)                                     # the largest is 1: the sum is >= 1
    p /= p.sum()
    if params.top_p is not None and params.top_p < 1:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, params.top_p) + 1)]
        mask = np.zeros_like(p, dtype=bool)
        mask[keep] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def next_tokens(logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]) -> list[int]:
    """One token per row of logits [rows, vocab] (a batched decode step), row i with
    params[i] and rngs[i]: each row gets what next_token gives it, the greedy rows from
    one argmax over all rows (a NaN in a greedy row still fails the call)."""
    best = np.argmax(logits, axis=-1)                                 # [rows]
    nan = np.isnan(logits[np.arange(len(best)), best])
    tokens = best.tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = next_token(logits[i], p, rngs[i])
        elif nan[i]:
            raise _nan_error(logits[i])
    return tokens
