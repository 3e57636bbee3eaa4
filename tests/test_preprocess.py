"""AnyRes preprocessing: parity with transformers' LLaVA-NeXT processor and the original's rules."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from avg_edge.constants import CLIP_MEAN, CLIP_STD, DEFAULT_PINPOINTS
from avg_edge.errors import InputError
from avg_edge.runtime.image import load_image
from avg_edge.runtime.preprocess import (
    PreprocessConfig,
    PreprocessedImage,
    divide_to_tiles,
    preprocess_image,
    resize_and_pad,
    select_best_resolution,
)

CROP = 336


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Seeded noise plus a gradient, so resizing and tiling mistakes show up."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pixels = (0.5 * noise + 0.5 * ramp).astype(np.uint8)
    return Image.fromarray(pixels)


def clip_normalize(image: Image.Image) -> np.ndarray:
    """Reference normalisation of one RGB crop: x/255, (x-mean)/std, HWC -> CHW."""
    x = np.asarray(image, dtype=np.float64) / 255.0
    x = (x - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    return x.transpose(2, 0, 1)


def transformers_processor(pinpoints_hw: list[list[int]]):
    transformers = pytest.importorskip("transformers", reason="parity test needs the export extra")
    # transformers 5: LlavaNextImageProcessor is the torchvision backend; the PIL one is the slow path.
    return transformers.LlavaNextImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": CROP},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": CROP, "width": CROP},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
        image_grid_pinpoints=pinpoints_hw,
    )


# (width, height) -> expected number of crops (1 global + local tiles)
PARITY_SIZES = {
    (672, 672): 5,
    (640, 480): 5,
    (300, 900): 4,  # tall: 1x3
    (1200, 300): 4,  # wide: 3x1
    (20, 30): 3,  # tiny: upscaled into 1x2
    (500, 500): 5,
    (336, 336): 3,  # both sides <= 336: 1x2, stacked vertically
    (200, 900): 4,  # 200 * 1008/900 = 224.00000000000003: both round up to 225
    (900, 200): 4,
}


@pytest.mark.parametrize("size", list(PARITY_SIZES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_pixel_values_match_transformers(size: tuple[int, int]) -> None:
    # transformers reads image_grid_pinpoints as (height, width): give it each pair swapped.
    processor = transformers_processor([[h, w] for w, h in DEFAULT_PINPOINTS])
    image = random_image(*size, seed=size[0] * 7 + size[1])

    ours = preprocess_image(image)
    # One image per call: transformers zero-pads pixel_values to the batch's largest crop count.
    out = processor(image, return_tensors="np")
    ref = np.asarray(out["pixel_values"])[0]

    assert ours.pixel_values.shape == (PARITY_SIZES[size], 3, CROP, CROP)
    assert ref.shape == ours.pixel_values.shape
    assert tuple(int(v) for v in np.asarray(out["image_sizes"])[0]) == (size[1], size[0])  # (h, w)
    np.testing.assert_allclose(ours.pixel_values, ref, rtol=0, atol=1e-5)


def test_transformers_without_swap_tiles_small_image_differently() -> None:
    """Why the swap is needed: with the list as-is, transformers puts the two tiles side by side."""
    processor = transformers_processor([list(p) for p in DEFAULT_PINPOINTS])
    image = random_image(300, 200, seed=3)
    ref = np.asarray(processor(image, return_tensors="np")["pixel_values"])[0]
    ours = preprocess_image(image)
    assert ours.grid == (1, 2)
    assert ref.shape == ours.pixel_values.shape  # same crop count ...
    assert not np.allclose(ref[1:], ours.pixel_values[1:], atol=1e-3)  # ... different tiles


def test_select_best_resolution_small_image_stacks_vertically() -> None:
    # Both sides <= 336: (336,672) and (672,336) tie fully; the first in list order wins.
    assert select_best_resolution((300, 200), DEFAULT_PINPOINTS) == (336, 672)
    assert select_best_resolution((300, 200), [(672, 336), (336, 672)]) == (672, 336)  # order decides


def test_select_best_resolution_examples() -> None:
    assert select_best_resolution((640, 480), DEFAULT_PINPOINTS) == (672, 672)
    assert preprocess_image(random_image(640, 480)).grid == (2, 2)
    assert select_best_resolution((1008, 300), DEFAULT_PINPOINTS) == (1008, 336)
    assert select_best_resolution((300, 1008), DEFAULT_PINPOINTS) == (336, 1008)


def test_select_best_resolution_prefers_less_waste_on_equal_effective() -> None:
    # A 336x336 image fits fully in both; (336,672) wastes less, even though listed second.
    assert select_best_resolution((336, 336), [(672, 672), (336, 672)]) == (336, 672)


def test_select_best_resolution_rejects_empty_size() -> None:
    with pytest.raises(InputError, match="positive"):
        select_best_resolution((0, 10), DEFAULT_PINPOINTS)


def test_resize_and_pad_centres_on_black() -> None:
    image = random_image(640, 480, seed=5)
    padded = resize_and_pad(image, (672, 672))
    assert padded.size == (672, 672) and padded.mode == "RGB"
    arr = np.asarray(padded)
    # 640x480 -> 672x504 (scale 1.05), pasted at y = (672-504)//2 = 84.
    assert not arr[:84].any() and not arr[84 + 504 :].any()
    expected = np.asarray(image.resize((672, 504), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(arr[84 : 84 + 504], expected)


@pytest.mark.parametrize("tall", [True, False], ids=["tall", "wide"])
def test_resize_and_pad_keeps_the_originals_ceil(tall: bool) -> None:
    # 200x900 into (336,1008): 200 * (1008/900) = 224.00000000000003 -> ceil 225 (as the original does).
    size, target = ((200, 900), (336, 1008)) if tall else ((900, 200), (1008, 336))
    padded = np.asarray(resize_and_pad(Image.new("RGB", size, (255, 255, 255)), target))
    line = padded[500, :, 0] if tall else padded[:, 500, 0]
    content = np.flatnonzero(line)
    assert (content[0], content[-1] + 1) == ((336 - 225) // 2, (336 - 225) // 2 + 225)


def test_divide_to_tiles_is_row_major() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR
    canvas = Image.new("RGB", (2 * CROP, 2 * CROP))
    for i, colour in enumerate(colours):
        canvas.paste(colour, ((i % 2) * CROP, (i // 2) * CROP, (i % 2 + 1) * CROP, (i // 2 + 1) * CROP))
    tiles = divide_to_tiles(canvas, CROP)
    assert [t.size for t in tiles] == [(CROP, CROP)] * 4
    assert [t.getpixel((5, 5)) for t in tiles] == colours
    assert len(divide_to_tiles(Image.new("RGB", (3 * CROP, CROP)), CROP)) == 3


@pytest.mark.parametrize(
    ("size", "grid"),
    [((700, 700), (2, 2)), ((300, 1000), (1, 3)), ((1000, 300), (3, 1))],
    ids=["square", "tall", "wide"],
)
def test_grid_crops_and_global_view(size: tuple[int, int], grid: tuple[int, int]) -> None:
    image = random_image(*size, seed=11)
    out = preprocess_image(image)
    assert isinstance(out, PreprocessedImage)
    assert out.grid == grid and out.image_size == size
    assert out.pixel_values.shape == (1 + grid[0] * grid[1], 3, CROP, CROP)
    assert out.pixel_values.dtype == np.float32 and out.pixel_values.flags.c_contiguous
    # crop 0: the whole image squashed to 336x336 (bicubic), not a tile or a centre crop
    squashed = image.resize((CROP, CROP), Image.Resampling.BICUBIC)
    np.testing.assert_allclose(out.pixel_values[0], clip_normalize(squashed), rtol=0, atol=1e-5)
    # crops 1..: the tiles of the padded canvas, in row-major order
    canvas = resize_and_pad(image, (grid[0] * CROP, grid[1] * CROP))
    tiles = np.stack([clip_normalize(t) for t in divide_to_tiles(canvas, CROP)])
    np.testing.assert_allclose(out.pixel_values[1:], tiles, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("size", "grid"),
    [((1, 1), (1, 2)), ((10, 500), (1, 2)), ((500, 10), (2, 1)), ((1000, 20), (3, 1))],
    ids=["1x1", "1:50", "50:1-short", "50:1"],
)
def test_degenerate_images_preprocess(size: tuple[int, int], grid: tuple[int, int]) -> None:
    buf = io.BytesIO()
    random_image(*size, seed=2).save(buf, format="PNG")
    out = preprocess_image(load_image(buf.getvalue()))
    assert out.grid == grid and out.image_size == size
    assert out.pixel_values.shape == (1 + grid[0] * grid[1], 3, CROP, CROP)
    assert np.isfinite(out.pixel_values).all()


def test_1x1_global_view_is_that_pixel() -> None:
    out = preprocess_image(Image.new("RGB", (1, 1), (200, 100, 50)))
    expected = (np.array([200, 100, 50]) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(out.pixel_values[0, :, 100, 100], expected, atol=1e-5)


def test_rejects_non_rgb_and_non_images() -> None:
    with pytest.raises(InputError, match="mode 'RGBA'.*load_image"):
        preprocess_image(Image.new("RGBA", (10, 10)))
    with pytest.raises(InputError, match="ndarray.*load_image"):
        preprocess_image(np.zeros((10, 10, 3), np.uint8))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="positive"):
        preprocess_image(Image.new("RGB", (0, 0)))


def test_config_validates_pinpoints() -> None:
    with pytest.raises(InputError, match="multiple of crop_size=336"):
        PreprocessConfig(pinpoints=((336, 600),))
    with pytest.raises(ValueError):  # InputError is a ValueError
        PreprocessConfig(crop_size=0)
    with pytest.raises(InputError, match="literal_eval"):
        PreprocessConfig(pinpoints="[(336, 672)]")  # type: ignore[arg-type]
    assert PreprocessConfig(crop_size=224, pinpoints=[[448, 224]]).pinpoints == ((448, 224),)  # type: ignore[arg-type]


def test_custom_config_is_used() -> None:
    config = PreprocessConfig(crop_size=224, pinpoints=((448, 224), (224, 448)), mean=(0.5,) * 3, std=(0.5,) * 3)
    out = preprocess_image(random_image(400, 150, seed=9), config)
    assert out.grid == (2, 1) and out.pixel_values.shape == (3, 3, 224, 224)
    assert out.pixel_values.min() >= -1.0 and out.pixel_values.max() <= 1.0
    assert out.pixel_values.min() < -0.9 and out.pixel_values.max() > 0.9  # mean/std 0.5 -> [-1, 1]
