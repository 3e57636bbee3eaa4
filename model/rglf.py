"""RGLF: the router's loss from the LMM's own preferences (AVG_LLAVA_SPEC.md, "RGLF").

For each sample, l_g (the answer's mean NLL at granularity g, computed without gradient)
ranks the granularities, best (lowest) first.  With s = log_softmax(logits) reordered by
that ranking:

    L_rank = sum_{j=1..G-1} mean_i max(0, s_{i+j} - s_i + m * j * (l_{i+j} - l_i))
    L_ce   = cross_entropy(logits, argmin_g l_g)
    L      = L_rank + 0.1 * L_ce

The mean over i runs over the pairs at offset j (i + j < G) and over the batch.

Cost-aware RGLF (an option; token_cost = 0 is the paper's): the preference is
l_g = NLL_g + token_cost * g / g_max, so a coarser granularity wins whenever its answer
costs less than token_cost nats more per token of answer, in units of the finest
granularity's visual tokens.  A deployer picks token_cost for their own accuracy/latency
trade (`avg-export realign --token-cost`); the raw NLLs of an easy question are nearly
equal at every granularity, and without a cost their ranking is noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference(nll: torch.Tensor, granularities: tuple[int, ...] | list[int], token_cost: float = 0.0) -> torch.Tensor:
    """nll: [B, G] -> the values RGLF ranks, lowest best: NLL + token_cost * g / g_max."""
    if not token_cost >= 0:
        raise ValueError(f"token_cost: expected a number >= 0, got {token_cost!r}")
    if nll.shape[-1] != len(granularities):
        raise ValueError(f"nll has {nll.shape[-1]} granularities, expected {len(granularities)}")
    rel = torch.tensor([g / max(granularities) for g in granularities], dtype=nll.dtype)
    return nll + token_cost * rel


def rglf_loss(logits: torch.Tensor, nll: torch.Tensor, margin: float = 1.0, ce_weight: float = 0.1) -> torch.Tensor:
    """logits: [B, G] router outputs; nll: [B, G] answer NLL per granularity (or the
    cost-aware preference(...)) -> scalar loss."""
    if logits.shape != nll.shape or logits.dim() != 2:
        raise ValueError(f"logits and nll must both be [B, G], got {tuple(logits.shape)} and {tuple(nll.shape)}")
    nll = nll.detach().to(logits.dtype)
    order = torch.argsort(nll, dim=1, stable=True)            # [B, G] best first
    l = torch.gather(nll, 1, order)                           # [B, G] ascending
    s = torch.gather(F.log_softmax(logits, dim=1), 1, order)  # [B, G] in preference order
    n = logits.shape[1]
    rank = logits.new_zeros(())
    for j in range(1, n):
        hinge = s[:, j:] - s[:, :-j] + margin * j * (l[:, j:] - l[:, :-j])  # [B, G-j]
        rank = rank + F.relu(hinge).mean()
    ce = F.cross_entropy(logits, order[:, 0])
    return rank + ce_weight * ce


__all__ = ["preference", "rglf_loss"]
