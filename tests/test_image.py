"""load_image: sources, error messages, orientation, frames and mode conversion."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avg_edge.errors import ImageError, InputError
from avg_edge.runtime.image import load_image


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# --- sources ------------------------------------------------------------------


def test_path_str_pathlike_and_bytes_give_the_same_pixels(tmp_path: Path) -> None:
    pixels = noise(31, 17, seed=1)
    data = encode(Image.fromarray(pixels))
    path = tmp_path / "img.png"
    path.write_bytes(data)
    for source in (path, str(path), data, bytearray(data)):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (31, 17)
        np.testing.assert_array_equal(np.asarray(image), pixels)


def test_pil_input_returns_rgb_copy() -> None:
    original = Image.fromarray(noise(8, 6, seed=2)).convert("RGBA")
    image = load_image(original)
    assert image.mode == "RGB" and image is not original and original.mode == "RGBA"


def test_result_is_loaded_and_detached_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    path.write_bytes(encode(Image.fromarray(noise(9, 9, seed=3))))
    image = load_image(path)
    assert getattr(image, "fp", None) is None  # no open file behind it
    path.unlink()
    assert np.asarray(image).shape == (9, 9, 3)


def test_wrong_type_is_input_error() -> None:
    with pytest.raises(InputError, match="got int"):
        load_image(42)  # type: ignore[arg-type]


# --- errors -------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match=f"^image file not found: {re.escape(str(missing))}$"):
        load_image(missing)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)


def test_empty_file_and_empty_bytes(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png is empty \(0 bytes\)"):
        load_image(empty)
    with pytest.raises(ImageError, match=r"^image bytes input is empty \(0 bytes\)$"):
        load_image(b"")


def test_text_file_names_source_reason_and_formats(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("definitely not an image\n")
    with pytest.raises(ImageError) as info:
        load_image(text)
    message = str(info.value)
    assert str(text) in message
    assert "cannot identify image file" in message  # Pillow's reason
    assert "PNG" in message and "JPEG" in message  # format hint
    assert not isinstance(info.value, OSError)


def test_truncated_png_bytes() -> None:
    data = encode(Image.fromarray(noise(64, 64, seed=4)))
    with pytest.raises(ImageError, match=r"image bytes \(\d+ bytes\).*truncated") as info:
        load_image(data[: len(data) // 2])
    assert not isinstance(info.value, OSError)


def test_garbage_after_png_signature() -> None:
    data = b"\x89PNG\r\n\x1a\n" + bytes(np.random.default_rng(5).integers(0, 256, 200, dtype=np.uint8))
    with pytest.raises(ImageError, match="cannot read image bytes"):
        load_image(data)


@pytest.mark.parametrize(("side", "pixels"), [(12, 144), (20, 400)], ids=["over-limit", "over-twice-limit"])
def test_decompression_bomb(monkeypatch: pytest.MonkeyPatch, side: int, pixels: int) -> None:
    # 144 > 100 is Pillow's warning; 400 > 2*100 is Pillow's error: both must become ImageError.
    data = encode(Image.new("RGB", (side, side)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match=rf"has {pixels} pixels, over .*limit of 100 pixels"):
        load_image(data)


def test_image_under_the_bomb_limit_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(Image.new("RGB", (10, 10)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert load_image(data).size == (10, 10)


# --- orientation and frames -----------------------------------------------------


def test_exif_orientation_6_is_applied() -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high
    pixels[:, :20] = (255, 0, 0)  # left half red
    pixels[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif, quality=95)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    image = load_image(data)
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 3)), image.getpixel((10, 36))
    assert top[0] > 200 and top[2] < 60  # the left edge turned clockwise to the top
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    source = Image.open(io.BytesIO(data))
    assert source.n_frames == 3
    source.seek(2)  # a caller left it on the last frame
    assert load_image(source).getpixel((4, 4)) == (255, 0, 0)
    assert load_image(data).getpixel((4, 4)) == (255, 0, 0)


# --- modes ----------------------------------------------------------------------


def test_rgba_drops_alpha_without_compositing() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent
    image = load_image(encode(rgba))
    assert image.mode == "RGB" and image.getpixel((1, 1)) == (10, 20, 30)


def test_cmyk() -> None:
    cmyk = Image.new("CMYK", (4, 4), (255, 0, 0, 0))  # pure cyan
    image = load_image(encode(cmyk, "JPEG", quality=100))
    assert image.mode == "RGB"
    r, g, b = image.getpixel((2, 2))
    assert r < 10 and g > 245 and b > 245


def test_palette_with_transparency() -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 40, 10] + [0, 0, 0] * 254)
    pal.info["transparency"] = 0
    image = load_image(encode(pal))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (200, 40, 10)


def test_grayscale_l() -> None:
    image = load_image(Image.new("L", (3, 3), 77))
    assert image.mode == "RGB" and image.getpixel((1, 1)) == (77, 77, 77)


def test_16_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = load_image(data)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    assert image.getpixel((3, 0)) == (255, 255, 255)


def test_16_bit_big_endian_and_int32_modes() -> None:
    values = np.array([[1000, 32768, 65535]], dtype=np.uint16)
    big = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    assert [load_image(big).getpixel((x, 0))[0] for x in range(3)] == [3, 128, 255]
    as_int32 = Image.fromarray(values.astype(np.int32))
    assert as_int32.mode == "I"
    assert [load_image(as_int32).getpixel((x, 0))[0] for x in range(3)] == [3, 128, 255]  # convert("L") gives 255


def test_float_mode_is_clipped() -> None:
    values = np.array([[-5.0, 12.4, 127.6, 300.0]], dtype=np.float32)
    image = load_image(Image.fromarray(values))
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 12, 128, 255]
