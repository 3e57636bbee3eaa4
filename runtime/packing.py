"""Geometry of `spatial_unpad` packing, shared by the PyTorch reference and the runtime.

No torch; numpy only inside `gather_indices`.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def grid_hw(tokens: int) -> tuple[int, int]:
    """(rows, cols) of one crop's pooled grid, recovered from its token count as the
    reference does: square counts are sqrt x sqrt; the others h = 2*floor(sqrt(L/2)), w = L/h
    (288 -> 24x12, 72 -> 12x6)."""
    side = math.isqrt(tokens)
    if side * side == tokens:
        return side, side
    h = 2 * math.isqrt(tokens // 2)
    if h == 0 or tokens % h:
        raise ValueError(f"{tokens} tokens do not form a grid the reference can recover")
    return h, tokens // h


def unpad_bounds(height: int, width: int, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows [r0, r1) and columns [c0, c1) that `unpad_image` keeps of a (height x width)
    stitched grid, for an original image of `image_size` = (width, height).

    Exactly the original's arithmetic, `int()` truncation included; on the anisotropic
    288/72 grids it compares aspect ratios of the token grid, which cuts too many rows
    (the reference's quirk, kept for checkpoint fidelity)."""
    orig_w, orig_h = image_size
    if orig_w / orig_h > width / height:
        new_h = int(orig_h * (width / orig_w))
        pad = (height - new_h) // 2
        return pad, height - pad, 0, width
    new_w = int(orig_w * (height / orig_h))
    pad = (width - new_w) // 2
    return 0, height, pad, width - pad


def visual_token_count(tokens: int, grid_tiles: tuple[int, int], image_size: tuple[int, int]) -> int:
    """Tokens fed to the LM for one image: global crop + unpadded rows with a newline each."""
    h, w = grid_hw(tokens)
    tiles_w, tiles_h = grid_tiles
    r0, r1, c0, c1 = unpad_bounds(tiles_h * h, tiles_w * w, image_size)
    return tokens + (r1 - r0) * (c1 - c0 + 1)


@functools.lru_cache(maxsize=256)
def gather_indices(tokens: int, grid_tiles: tuple[int, int], image_size: tuple[int, int]) -> "np.ndarray":
    """Row indices that pack one granularity with a single gather.

    The source is the granularity's features flattened to [crops * tokens, D] with the
    newline vector appended as row crops * tokens.  Same order as the reference's
    permute/flatten/unpad/cat: global crop, then each kept row of the stitched tile grid
    followed by the newline."""
    import numpy as np

    h, w = grid_hw(tokens)
    tiles_w, tiles_h = grid_tiles
    newline = (1 + tiles_w * tiles_h) * tokens
    r0, r1, c0, c1 = unpad_bounds(tiles_h * h, tiles_w * w, image_size)
    rows = np.arange(r0, r1)[:, None]                               # stitched-grid rows [H', 1]
    cols = np.arange(c0, c1)[None, :]                               # stitched-grid cols [1, W']
    tile = (rows // h) * tiles_w + (cols // w)                      # which tile        [H', W']
    local = (1 + tile) * tokens + (rows % h) * w + (cols % w)       # row in the source [H', W']
    local = np.concatenate([local, np.full((local.shape[0], 1), newline)], axis=1)  # [H', W'+1]
    idx = np.concatenate([np.arange(tokens), local.reshape(-1)]).astype(np.int64)
    idx.setflags(write=False)
    return idx
