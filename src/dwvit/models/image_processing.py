"""The image processor saved beside every model, so `pipeline("image-classification")` works on the folder."""

from __future__ import annotations

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
