"""The image processor saved beside every model, so `pipeline("image-classification")` works on the folder, and
the one conversion of any PIL image to the RGB pixels a model is trained on."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps
from transformers import ViTImageProcessor

# Normalisation statistics of the paper's datasets (its recipe); ImageNet's serve Tiny-ImageNet.
DATASET_STATISTICS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def make_image_processor(image_size, image_mean=None, image_std=None, dataset: str | None = None) -> ViTImageProcessor:
    """A `ViTImageProcessor` that resizes (bicubic) to `image_size` and normalises with the dataset's statistics.

    `dataset` picks known statistics ("cifar10", "cifar100", "imagenet"); explicit `image_mean`/`image_std` win.
    """
    if dataset is not None:
        if dataset not in DATASET_STATISTICS:
            raise ValueError(f"Unknown dataset statistics {dataset!r}; known: {', '.join(DATASET_STATISTICS)}.")
        default_mean, default_std = DATASET_STATISTICS[dataset]
        image_mean = image_mean if image_mean is not None else default_mean
        image_std = image_std if image_std is not None else default_std
    if image_mean is None or image_std is None:
        image_mean, image_std = DATASET_STATISTICS["imagenet"]
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return ViTImageProcessor(
        do_resize=True,
        size={"height": height, "width": width},
        resample=3,  # PIL.Image.BICUBIC, as the paper's recipe resizes
        do_rescale=True,
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image a model sees for a PIL image of any mode: what training decodes, and what to hand a
    pipeline or image processor for images that are not plain 8-bit RGB, grayscale or palette.

    - EXIF orientation is applied first, as `transformers`' `load_image` (the pipeline's loader) does.
    - 16-bit and 32-bit integer images (`I;16*`, `I`) are read as 16-bit: values / 257, rounded, so 65535 is
      white; float images (`F`) as [0, 1]: values * 255, rounded; both clipped to [0, 255]. (PIL's own conversion
      clips them at 255, which turns most 16-bit images white.)
    - Transparency (`RGBA`, `LA`, `PA`, `RGBa`, `La`, a palette or `L`/`RGB` image with a transparency key) is
      composited on white, so a transparent background reads as the white of a page rather than the arbitrary colour
      stored under it. (The pipeline's `convert("RGB")` drops alpha instead.)
    - Every other mode (`1`, `L`, `P`, `CMYK`, `YCbCr`, `LAB`, `HSV`) takes PIL's `convert("RGB")`, which is what the
      pipeline does too, so for 8-bit images without transparency both give the same pixels.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        values = values * 255.0 if image.mode == "F" else values / 257.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
