"""Scaler = explicit average pools; packing = the spec's token counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avg_edge.model.scaler import pack_image, pool_granularity
from avg_edge.runtime.packing import grid_hw, visual_token_count
from avg_edge.runtime.preprocess import preprocess_image
from avg_edge.model.tiny import textured_image

KERNELS = {576: (1, 1), 288: (1, 2), 144: (2, 2), 72: (2, 4), 36: (4, 4)}
SPEC_COUNTS = {
    (672, 672): {576: 2928, 288: 888, 144: 744, 72: 228, 36: 192},
    (640, 480): {576: 2340, 288: 738, 144: 594, 72: 202, 36: 166},
}


@pytest.mark.parametrize("tokens", sorted(KERNELS))
def test_each_granularity_is_an_explicit_average_pool(tokens):
    rng = np.random.default_rng(tokens)
    feats = rng.standard_normal((3, 576, 8)).astype(np.float32)
    kh, kw = KERNELS[tokens]
    grid = feats.reshape(3, 24, 24, 8)
    expected = []
    for r in range(0, 24, kh):           # row-major over the pooled grid
        for c in range(0, 24, kw):
            expected.append(grid[:, r:r + kh, c:c + kw].mean(axis=(1, 2)))
    expected = np.stack(expected, axis=1)                       # [3, tokens, 8]
    got = pool_granularity(torch.from_numpy(feats), tokens).numpy()
    assert got.shape == (3, tokens, 8)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_grid_recovered_from_token_count_as_the_reference_does():
    assert [grid_hw(g) for g in (576, 288, 144, 72, 36)] == [(24, 24), (24, 12), (12, 12), (12, 6), (6, 6)]


@pytest.mark.parametrize("size", sorted(SPEC_COUNTS))
@pytest.mark.parametrize("tokens", sorted(KERNELS))
def test_visual_token_counts_equal_the_spec_table(size, tokens):
    pre = preprocess_image(textured_image(*size))
    assert pre.grid == (2, 2)
    feats = torch.randn(1 + 4, tokens, 4)
    packed = pack_image(feats, pre.grid, pre.image_size, torch.full((4,), 7.0))
    assert packed.shape[0] == SPEC_COUNTS[size][tokens]
    assert visual_token_count(tokens, pre.grid, pre.image_size) == SPEC_COUNTS[size][tokens]


def test_quirk_672_square_at_288_keeps_24_of_48_rows():
    feats = torch.arange(5 * 288, dtype=torch.float32).repeat_interleave(2).view(5, 288, 2)
    packed = pack_image(feats, (2, 2), (672, 672), torch.tensor([-1.0, -1.0]))
    rows = packed[288:].view(-1, 25, 2)                  # 24 cols + newline per row
    assert rows.shape[0] == 24
    assert torch.all(rows[:, -1] == -1.0)                # newline closes every row
    assert torch.all(packed[:288] == feats[0])           # global crop first, no newlines


def test_packing_layout_puts_tiles_row_major():
    # 2x2 tiles of a 36-token (6x6) grid, a square image: nothing is cut.
    feats = torch.zeros(5, 36, 1)
    for t in range(1, 5):
        feats[t] = t
    packed = pack_image(feats, (2, 2), (672, 672), torch.tensor([0.0]))[36:].view(12, 13)
    assert torch.all(packed[:6, :6] == 1) and torch.all(packed[:6, 6:12] == 2)
    assert torch.all(packed[6:, :6] == 3) and torch.all(packed[6:, 6:12] == 4)
