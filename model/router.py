"""Visual granularity router: text filter, crop-axis merger, MLP, voter, LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avg_edge.model.config import AvgLlavaConfig


def filter_text(global_tokens: torch.Tensor, text: torch.Tensor, k: int) -> torch.Tensor:
    """The k prompt embeddings most similar to the global crop, best first, zero-padded.

    global_tokens: [576, D] (global crop, full granularity); text: [T, D].
    Written without data-dependent shapes so that it exports: k zero rows scoring -inf
    are appended, sort last, and fill the rows left over when T < k.
    """
    sim = F.normalize(global_tokens, dim=-1) @ F.normalize(text, dim=-1).T  # [576, T]
    score = sim.mean(dim=0)                                                 # [T]
    cand = torch.cat([text, text.new_zeros(k, text.shape[1])])              # [T + k, D]
    cand_score = torch.cat([score, score.new_full((k,), float("-inf"))])    # [T + k]
    top = torch.topk(cand_score, k, sorted=True).indices                    # [k], best first
    return cand[top]                                                        # [k, D]


class GranularityRouter(nn.Module):
    """Reads all granularities of every crop plus the filtered prompt and scores each
    granularity.  State-dict names follow the checkpoint: merger.*, router.0/2.*, voter, norm.*"""

    def __init__(self, config: AvgLlavaConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        n = len(config.granularities)
        self.granularities = config.granularities
        self.k = config.filtered_text_num
        # batch_first=False, as in the reference: on an input [crops, 1148, D] attention
        # runs across the CROPS at each of the 1148 positions.  Kept for weight fidelity.
        self.merger = nn.TransformerEncoderLayer(
            d_model=dim, nhead=config.router_num_heads, dim_feedforward=dim, batch_first=False
        )
        self.router = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, n))
        self.voter = nn.Parameter(torch.zeros(config.router_seq_len, 1))
        self.norm = nn.LayerNorm(n)

    def forward(self, scaled: dict[int, torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """scaled: {g: [crops, g, D]}; text: [T, D] prompt embeddings -> logits [n_granularities]."""
        feats = [scaled[g] for g in self.granularities]
        crops = feats[0].shape[0]
        txt = filter_text(feats[-1][0], text, self.k)                       # [32, D]
        seq = torch.cat(feats + [txt.expand(crops, -1, -1)], dim=1)         # [crops, 1148, D]
        hidden = self.merger(seq)                                           # [crops, 1148, D]
        z = self.router(hidden)                                             # [crops, 1148, 5]
        votes = (z * self.voter).sum(dim=1)                                 # [crops, 5]
        return self.norm(votes.mean(dim=0))                                 # [5]
