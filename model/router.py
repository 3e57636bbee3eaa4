"""Visual granularity router: text filter, crop-axis merger, MLP, voter, LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avg_edge.model.config import AvgLlavaConfig
from avg_edge.model.scaler import pool_granularity


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
        return self.norm(self.votes(scaled, text))                          # [5]

    def votes(self, scaled: dict[int, torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """The votes before the final LayerNorm [n_granularities] (forward without the norm)."""
        feats = [scaled[g] for g in self.granularities]
        crops = feats[0].shape[0]
        txt = filter_text(feats[-1][0], text, self.k)                       # [32, D]
        seq = torch.cat(feats + [txt.expand(crops, -1, -1)], dim=1)         # [crops, 1148, D]
        hidden = self.merger(seq)                                           # [crops, 1148, D]
        z = self.router(hidden)                                             # [crops, 1148, 5]
        votes = (z * self.voter).sum(dim=1)                                 # [crops, 5]
        return votes.mean(dim=0)                                            # [5]

    def forward_many(self, scaled: dict[int, torch.Tensor], texts: list[torch.Tensor]) -> torch.Tensor:
        """forward for several prompts about one image in one merger call (training):
        the merger treats every position on its own, so the image rows are computed once
        and each prompt's k filtered rows are appended along the position axis.
        scaled: {g: [crops, g, D]}; texts: Q x [T_q, D] -> logits [Q, n_granularities]."""
        feats = [scaled[g] for g in self.granularities]
        crops, n_img, k = feats[0].shape[0], sum(self.granularities), self.k
        txts = [filter_text(feats[-1][0], t, k).expand(crops, -1, -1) for t in texts]   # Q x [crops, k, D]
        z = self.router(self.merger(torch.cat(feats + txts, dim=1)))        # [crops, 1116 + Q*k, 5]
        image = (z[:, :n_img] * self.voter[:n_img]).sum(dim=1)              # [crops, 5]
        text = z[:, n_img:].reshape(crops, len(texts), k, -1)               # [crops, Q, k, 5]
        text = (text * self.voter[n_img:]).sum(dim=2)                       # [crops, Q, 5]
        return self.norm((image[:, None] + text).mean(dim=0))               # [Q, 5]

    # -- the same maths split into an image part and a text part -------------------------
    # The merger attends across the crops at each position.  The 32 text rows are the same
    # row in every crop, so attention there returns that row's own value and each text
    # row's votes depend on its token alone (token_votes: a table over the vocabulary,
    # made once at build time); the image rows' votes depend on the image alone
    # (image_votes: once per image, kept for follow-up questions).  Only the filter's
    # choice of tokens needs both, through one vector (text_direction):
    # mean_i(norm(g_i) . norm(t)) = (mean_i norm(g_i)) . norm(t).
    # logits = norm(image_votes + sum_j voter[image_rows + j] * token_votes[chosen_j]),
    # with token_votes(0) for the zero rows that pad a prompt shorter than k.

    def image_votes(self, finest: torch.Tensor) -> torch.Tensor:
        """finest: [crops, 576, D], the scaler's input -> the image rows' votes, averaged
        over crops [5].  The merger's input projection is affine and every granularity is
        an average pool of the 576 tokens, so the q/k/v of all 1116 image rows are pools of
        the 576 rows' q/k/v (exact up to rounding; 21% fewer multiply-adds than projecting
        1116 rows).  Otherwise self.merger's post-norm layer, written out, with attention
        across the crops at each position."""
        m = self.merger
        if m.norm_first or m.training:
            raise ValueError("the router's merger is a post-norm layer in eval mode")
        crops, _, dim = finest.shape
        heads = m.self_attn.num_heads
        pools = lambda t: torch.cat([pool_granularity(t, g) for g in self.granularities], dim=1)  # noqa: E731
        x = pools(finest)                                                       # [crops, 1116, D]
        w, b = (t.to(finest.dtype) for t in (m.self_attn.in_proj_weight, m.self_attn.in_proj_bias))  # (fp32 references)
        qkv = pools(F.linear(finest, w, b))                                     # [crops, 1116, 3D]
        q, k, v = (t.reshape(crops, -1, heads, dim // heads).permute(1, 2, 0, 3)  # [1116, H, crops, hd]
                   for t in qkv.chunk(3, dim=-1))
        # attention written out: the exported SDPA reshapes k to 3-D before transposing it,
        # which ONNX Runtime runs as a Transpose whose innermost axis is the crops (a third
        # of the demo router's time); on the 4-D tensors the transpose fuses into the MatMul
        scores = torch.matmul(q, k.transpose(-1, -2)) * (dim // heads) ** -0.5     # [1116, H, crops, crops]
        a = torch.matmul(torch.softmax(scores, dim=-1), v)                       # [1116, H, crops, hd]
        a = m.self_attn.out_proj(a.permute(2, 0, 1, 3).reshape(crops, -1, dim))  # [crops, 1116, D]
        h = m.norm1(x + a)
        h = m.norm2(h + m.linear2(m.activation(m.linear1(h))))                  # [crops, 1116, D]
        z = self.router(h)                                                      # [crops, 1116, 5]
        return (z * self.voter[: z.shape[1]]).sum(dim=1).mean(dim=0)            # [5]

    def text_direction(self, finest: torch.Tensor) -> torch.Tensor:
        """finest: [crops, 576, D] -> the mean of the global crop's normalised tokens [D]."""
        return F.normalize(finest[0], dim=-1).mean(dim=0)

    def token_votes(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [T, D] embeddings -> each one's votes before its position's weight [T, 5].
        The merger over one crop: attention over a single row returns that row's value,
        so only the value projection is computed."""
        m = self.merger
        dim = tokens.shape[-1]
        w, b = (t[2 * dim:].to(tokens.dtype) for t in (m.self_attn.in_proj_weight, m.self_attn.in_proj_bias))
        h = m.norm1(tokens + m.self_attn.out_proj(F.linear(tokens, w, b)))      # [T, D]
        h = m.norm2(h + m.linear2(m.activation(m.linear1(h))))
        return self.router(h)                                                   # [T, 5]

    def normalised(self, votes: torch.Tensor) -> torch.Tensor:
        """The LayerNorm's normalised votes (before its affine) [..., n]: each lies within
        +-sqrt(n - 1), and a vote at that bound leaves the others no gradient."""
        return F.layer_norm(votes, votes.shape[-1:], eps=self.norm.eps)

    def combine(self, image_votes: torch.Tensor, text_direction: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The split form of forward (for tests and the runtime's numpy twin): [5] logits."""
        score = F.normalize(text, dim=-1) @ text_direction                  # [T]
        k = self.k
        cand = torch.cat([text, text.new_zeros(k, text.shape[1])])          # [T + k, D]
        cand_score = torch.cat([score, score.new_full((k,), float("-inf"))])
        top = torch.topk(cand_score, k, sorted=True).indices                # [k]
        text_weight = self.voter[-k:, 0]                                    # [k]
        votes = image_votes + (self.token_votes(cand[top]) * text_weight[:, None]).sum(dim=0)
        return self.norm(votes)                                             # [5]
