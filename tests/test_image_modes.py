"""One conversion of every PIL mode to the RGB pixels a model is trained on (`dwvit.to_rgb`), used by the training
decode, and what serving gives for the same files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import load_image

from dwvit import to_rgb
from dwvit.training.data import decode_image


def png_cell(image: Image.Image) -> dict:
    """A `datasets` image cell of the image saved as PNG (what a Hub dataset stores)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_16_bit_grayscale_is_scaled_not_clipped_in_training():
    """A 16-bit ramp: PIL's convert("RGB") clips every value above 255 to white (the old decode did)."""
    ramp = np.linspace(0, 65535, 64 * 4).reshape(4, 64).astype(np.uint16)
    image = Image.fromarray(ramp)  # mode I;16
    assert image.mode.startswith("I;16")
    decoded = decode_image(png_cell(image))
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(pixels(decoded), np.repeat(expected[..., None], 3, axis=2))
    assert (pixels(decoded) == 255).mean() < 0.05


def test_float_images_are_read_as_zero_to_one():
    values = np.array([[0.0, 0.25, 0.5, 1.0, 1.5, -0.1]], dtype=np.float32)
    got = pixels(to_rgb(Image.fromarray(values, mode="F")))[..., 0]
    assert got.tolist() == [[0, 64, 128, 255, 255, 0]]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P-transparency"])
def test_transparency_is_composited_on_white(mode):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 10, 255)  # opaque red
    rgba[0, 1] = (200, 10, 10, 0)  # fully transparent: white, whatever colour is stored
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black over white
    rgba[1, 1] = (0, 0, 0, 0)
    image = Image.fromarray(rgba, mode="RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "PA":
        image = image.convert("PA")
    elif mode == "P-transparency":
        image = Image.fromarray(np.array([[1, 0], [1, 0]], dtype=np.uint8), mode="P")
        image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
        image.info["transparency"] = 0
    got = pixels(decode_image(image if mode == "PA" else png_cell(image)))  # PNG cannot store PA
    assert got[0, 1].tolist() == [255, 255, 255] and got[1, 1].tolist() == [255, 255, 255]
    if mode == "RGBA":
        assert got[0, 0].tolist() == [200, 10, 10]
        assert all(abs(int(v) - 127) <= 1 for v in got[1, 0])


def test_cmyk_and_the_other_modes_take_pils_conversion():
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))
    assert pixels(to_rgb(cmyk)).tolist() == pixels(cmyk.convert("RGB")).tolist()
    assert pixels(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "1", "CMYK", "YCbCr"])
def test_plain_8_bit_images_get_the_pixels_the_pipeline_gives(mode):
    """For images without transparency or high bit depth the pipeline's loader (`load_image`: EXIF orientation,
    then convert("RGB")) and training agree pixel for pixel, so the saved image processor sees the training pixels."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).convert(mode)
    assert np.array_equal(pixels(to_rgb(image)), pixels(load_image(image)))


def test_exif_orientation_is_applied_as_the_pipeline_applies_it():
    image = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif.tobytes())
    decoded = decode_image({"bytes": buffer.getvalue(), "path": None})
    assert decoded.size == (6, 4)  # width and height swapped
    assert np.array_equal(pixels(decoded), pixels(load_image(Image.open(io.BytesIO(buffer.getvalue())))))


def test_serving_with_to_rgb_gives_the_training_pixels_where_the_pipeline_alone_would_not():
    """The pipeline drops alpha (a transparent pixel becomes the colour stored under it); passing `to_rgb(image)`
    gives it the composited image training decoded."""
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)  # transparent black
    image = Image.fromarray(rgba, mode="RGBA")
    assert pixels(load_image(image)).max() == 0
    assert np.array_equal(pixels(load_image(to_rgb(image))), pixels(decode_image(png_cell(image))))
    assert pixels(decode_image(png_cell(image))).min() == 255
