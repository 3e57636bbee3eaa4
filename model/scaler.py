"""Visual granularity scaler (average pooling, no parameters) and spatial_unpad packing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avg_edge.model.config import pool_kernel
from avg_edge.runtime.packing import grid_hw, unpad_bounds


def pool_granularity(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """Average-pool every crop's grid down to `tokens` tokens (kernel = stride)."""
    crops, n, dim = features.shape                                 # [crops, 576, D]
    grid = int(round(n ** 0.5))
    kh, kw = pool_kernel(tokens, grid)
    x = features.view(crops, grid, grid, dim).permute(0, 3, 1, 2)  # [crops, D, 24, 24]
    x = F.avg_pool2d(x, kernel_size=(kh, kw), stride=(kh, kw))     # [crops, D, 24/kh, 24/kw]
    return x.flatten(2).transpose(1, 2)                            # [crops, tokens, D]


def scale_all(features: torch.Tensor, granularities: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Every granularity of every crop: {tokens: [crops, tokens, D]}."""
    return {g: pool_granularity(features, g) for g in granularities}


def pack_image(
    features: torch.Tensor,
    grid_tiles: tuple[int, int],
    image_size: tuple[int, int],
    newline: torch.Tensor,
) -> torch.Tensor:
    """spatial_unpad: global crop's tokens, then the stitched, unpadded local grid with a
    newline vector after each row.  `grid_tiles` = (tiles_wide, tiles_high),
    `image_size` = original (width, height)."""
    crops, tokens, dim = features.shape                       # [1 + tiles, L, D]
    tiles_w, tiles_h = grid_tiles
    if crops != 1 + tiles_w * tiles_h:
        raise ValueError(f"expected 1 + {tiles_w}x{tiles_h} crops, got {crops}")
    h, w = grid_hw(tokens)                                    # per-crop grid (24x12 at 288)
    base = features[0]                                        # [L, D]
    x = features[1:].view(tiles_h, tiles_w, h, w, dim)        # [th, tw, h, w, D]
    x = x.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [D, th*h, tw*w]
    r0, r1, c0, c1 = unpad_bounds(x.shape[1], x.shape[2], image_size)
    x = x[:, r0:r1, c0:c1]                                    # [D, H', W']
    nl = newline.to(x.dtype)[:, None, None].expand(dim, x.shape[1], 1)
    x = torch.cat([x, nl], dim=-1)                            # [D, H', W'+1]
    x = x.flatten(1, 2).transpose(0, 1)                       # [H'*(W'+1), D]
    return torch.cat([base, x], dim=0)                        # [L + H'*(W'+1), D]
