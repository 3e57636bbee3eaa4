"""Geometry of `spatial_unpad` packing, shared by the PyTorch reference and the runtime.

Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import math


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
