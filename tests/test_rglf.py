"""RGLF loss against a hand-computed example, and its preference for agreeing routers."""

from __future__ import annotations

import math

import pytest
import torch

from avg_edge.model.rglf import rglf_loss


def test_rglf_matches_hand_computed_example():
    # Sample A: logits [0, ln 2, 0] -> softmax [1/4, 1/2, 1/4]; nll [0.2, 1.0, 0.5].
    #   Preference (ascending nll): g0, g2, g1 -> l = [0.2, 0.5, 1.0], s = [ln 1/4, ln 1/4, ln 1/2].
    #   j=1: (1,2) s-diff 0 + 1*0.3 = 0.3;  (2,3) ln2 + 1*0.5 = 1.19315
    #   j=2: (1,3) ln2 + 2*0.8 = 2.29315;   CE target g0: -ln 1/4 = 1.38629
    # Sample B: logits [4, 0, 2]; nll [0.1, 0.3, 0.2] -> preference g0, g2, g1, l = [.1, .2, .3],
    #   s = [4, 2, 0] - lse, lse = 4 + ln(1 + e^-2 + e^-4) = 4.14293.
    #   j=1: -2 + 0.1 < 0 twice -> 0;  j=2: -4 + 2*0.2 < 0 -> 0;  CE: lse - 4 = 0.14293
    # Batch: j=1 mean of 4 pairs = (0.3 + 1.19315) / 4 = 0.37329; j=2 mean of 2 = 2.29315 / 2 = 1.14657
    #   L_rank = 1.51986;  L_ce = (1.38629 + 0.14293) / 2 = 0.76461;  L = 1.51986 + 0.076461 = 1.59632
    ln2 = math.log(2)
    logits = torch.tensor([[0.0, ln2, 0.0], [4.0, 0.0, 2.0]])
    nll = torch.tensor([[0.2, 1.0, 0.5], [0.1, 0.3, 0.2]])
    lse_b = 4 + math.log(1 + math.exp(-2) + math.exp(-4))
    expected = (0.3 + (ln2 + 0.5)) / 4 + (ln2 + 1.6) / 2 + 0.1 * (math.log(4) + (lse_b - 4)) / 2
    assert expected == pytest.approx(1.59632, abs=1e-4)
    assert float(rglf_loss(logits, nll)) == pytest.approx(expected, abs=1e-5)


def test_uniform_router_pays_the_full_margin():
    # Equal logits: every hinge is m * j * (l_{i+j} - l_i); l = 0.1..0.5 -> sum_j j * 0.1 j = 3.0, CE = ln 5.
    nll = torch.tensor([[0.5, 0.1, 0.3, 0.2, 0.4]])
    loss = rglf_loss(torch.zeros(1, 5), nll)
    assert float(loss) == pytest.approx(3.0 + 0.1 * math.log(5), abs=1e-5)


def test_loss_prefers_a_router_that_agrees_with_the_lmm():
    g = torch.Generator().manual_seed(0)
    nll = torch.rand(8, 5, generator=g) * 3                       # [8, 5]
    agree = -4.0 * nll                                            # best granularity scores highest
    disagree = 4.0 * nll
    assert float(rglf_loss(agree, nll)) < float(rglf_loss(torch.zeros(8, 5), nll)) < float(rglf_loss(disagree, nll))
    assert float(rglf_loss(agree, nll, margin=0.0)) < 0.1        # only the CE term is left


def test_gradient_reaches_the_logits_only():
    logits = torch.zeros(2, 5, requires_grad=True)
    nll = torch.tensor([[0.3, 0.1, 0.2, 0.5, 0.4], [1.0, 2.0, 3.0, 4.0, 5.0]], requires_grad=True)
    rglf_loss(logits, nll).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert nll.grad is None
    # the best granularity of each row is pushed up
    assert int(torch.argmin(logits.grad[0])) == 1 and int(torch.argmin(logits.grad[1])) == 0


def test_shapes_are_checked():
    with pytest.raises(ValueError):
        rglf_loss(torch.zeros(2, 5), torch.zeros(2, 4))
