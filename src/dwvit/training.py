"""Reusable pieces of `run_image_classification.py`: datasets, transforms, Mixup/CutMix, metrics.

Everything here is independent of the model family, so CaiT, Swin and ViT sizes train through the same code.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

METRIC_PATH = str(Path(__file__).resolve().parent / "metrics" / "accuracy")
"""Folder of the shipped top-1/top-5 `evaluate` metric; `evaluate.load(METRIC_PATH)` works offline."""


@dataclass(frozen=True)
class KnownDataset:
    """Where a dataset lives and how it is laid out, so it needs no column or split flags."""

    hub_id: str | None
    image_column: str
    label_column: str
    eval_split: str
    statistics: str | None  # key of `dwvit.image_processing.DATASET_STATISTICS`


KNOWN_DATASETS: dict[str, KnownDataset] = {
    "cifar10": KnownDataset("uoft-cs/cifar10", "img", "label", "test", "cifar10"),
    "cifar100": KnownDataset("uoft-cs/cifar100", "img", "fine_label", "test", "cifar100"),
    "tiny-imagenet": KnownDataset("zh-plus/tiny-imagenet", "image", "label", "valid", "imagenet"),
    # scikit-learn's bundled handwritten digits, built locally: the default of `make demo`, needs no network.
    "digits": KnownDataset(None, "image", "label", "test", None),
}

_EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
_LABEL_COLUMN_NAMES = ("label", "labels", "fine_label")
_IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values")


def known_dataset(name_or_path: str | None) -> KnownDataset | None:
    """The known layout of a short name, a Hub id or a local folder named like one (`../shared/data/cifar10`)."""
    if not name_or_path:
        return None
    key = name_or_path.rstrip("/")
    for short_name, spec in KNOWN_DATASETS.items():
        if key == short_name or key == spec.hub_id:
            return spec
    if os.path.isdir(key):
        base = os.path.basename(os.path.abspath(key)).lower().replace("_", "-")
        return KNOWN_DATASETS.get(base)
    return None


def digits_dataset(image_size: int = 32, test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's 1,797 real 8x8 handwritten digits as grayscale PIL images, split into train and test."""
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for array in digits.images:
        pixels = np.clip(array * (255.0 / 16.0), 0, 255).astype(np.uint8)
        images.append(PILImage.fromarray(pixels, mode="L").resize((image_size, image_size), PILImage.BILINEAR))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    full = datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    return full.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label")


def load_raw_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
):
    """A `DatasetDict` from a short name, a Hub id, a local dataset folder or image folders (class per folder)."""
    import datasets

    if dataset_name is None and train_dir is None:
        raise ValueError("Give --dataset_name (short name, Hub id or local folder) or --train_dir (an image folder).")
    if dataset_name is not None:
        if dataset_name == "digits":
            return digits_dataset()
        spec = known_dataset(dataset_name)
        if os.path.isdir(dataset_name):
            if os.path.exists(os.path.join(dataset_name, "dataset_dict.json")):
                return datasets.load_from_disk(dataset_name)
            return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        hub_id = spec.hub_id if spec is not None and dataset_name in KNOWN_DATASETS else dataset_name
        return datasets.load_dataset(hub_id, dataset_config_name, cache_dir=cache_dir, token=token)
    data_files = {"train": os.path.join(train_dir, "**")}
    if validation_dir is not None:
        data_files["validation"] = os.path.join(validation_dir, "**")
    return datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)


def split_train_eval(raw, train_split: str = "train", eval_split: str | None = None, spec=None,
                     train_val_split: float = 0.1, seed: int = 0):
    """Return `(train, eval, eval_split_name)`; a missing evaluation split is carved from train with `seed`."""
    if train_split not in raw:
        raise ValueError(f"Split {train_split!r} not found; the dataset has splits: {', '.join(raw)}.")
    if eval_split is not None:
        if eval_split not in raw:
            raise ValueError(f"Split {eval_split!r} not found; the dataset has splits: {', '.join(raw)}.")
        return raw[train_split], raw[eval_split], eval_split
    candidates = ([spec.eval_split] if spec is not None else []) + list(_EVAL_SPLIT_NAMES)
    for name in candidates:
        if name in raw and name != train_split:
            return raw[train_split], raw[name], name
    if not 0.0 < train_val_split < 1.0:
        raise ValueError(f"train_val_split must lie in (0, 1) to carve an evaluation split; got {train_val_split}.")
    carved = raw[train_split].train_test_split(test_size=train_val_split, seed=seed)
    logger.info("No evaluation split: carved %.0f%% of %r with seed %d.", 100 * train_val_split, train_split, seed)
    return carved["train"], carved["test"], f"{train_split} (held out {train_val_split:g}, seed {seed})"


def detect_columns(features, image_column: str | None = None, label_column: str | None = None, spec=None):
    """Image and label column names: the user's, then the known layout's, then by feature type and usual names."""
    import datasets

    columns = list(features)

    def pick(given, kind, known, names, feature_type):
        if given is not None:
            if given not in features:
                raise ValueError(f"The {kind} column {given!r} is not in the dataset; its columns are: {columns}.")
            return given
        if known is not None and known in features:
            return known
        typed = [name for name in columns if isinstance(features[name], feature_type)]
        for name in names:
            if name in features and (name in typed or not typed):
                return name
        if typed:
            return typed[0]
        raise ValueError(
            f"Could not find the {kind} column; the dataset's columns are: {columns}. "
            f"Name it with --{kind}_column_name."
        )

    image = pick(image_column, "image", spec.image_column if spec else None, _IMAGE_COLUMN_NAMES, datasets.Image)
    label = pick(label_column, "label", spec.label_column if spec else None, _LABEL_COLUMN_NAMES, datasets.ClassLabel)
    return image, label


def label_names(dataset, label_column: str) -> list[str]:
    import datasets

    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    raise ValueError(
        f"The label column {label_column!r} is {feature}; a ClassLabel is needed (use "
        f"`dataset.class_encode_column({label_column!r})`)."
    )


def decode_image(value, index: int | None = None) -> PILImage.Image:
    """A PIL RGB image from a `datasets` image cell (`{"bytes", "path"}` or PIL); grayscale, RGBA and palette
    images become RGB. A file that cannot be read raises a ValueError naming its index and path."""
    path = None
    try:
        if isinstance(value, PILImage.Image):
            image = value
        elif isinstance(value, dict):
            path = value.get("path")
            data = value.get("bytes")
            image = PILImage.open(io.BytesIO(data)) if data is not None else PILImage.open(path)
        elif isinstance(value, (str, os.PathLike)):
            path = str(value)
            image = PILImage.open(path)
        else:
            raise TypeError(f"unsupported image cell of type {type(value).__name__}")
        image.load()
    except Exception as error:
        where = f"image {index}" if index is not None else "image"
        if path:
            where += f" ({path})"
        raise ValueError(f"Unreadable {where}: {type(error).__name__}: {error}") from error
    if image.mode != "RGB":
        # RGBA is composited on white rather than having its alpha dropped, so transparent pixels stay background.
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = PILImage.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            image = background
        else:
            image = image.convert("RGB")
    return image


def without_decoding(dataset, image_column: str):
    """The dataset with its image column left encoded, so decoding happens (and fails) where we can report it."""
    import datasets

    if isinstance(dataset.features[image_column], datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def find_unreadable_images(dataset, image_column: str, num_proc: int | None = None) -> list[tuple[int, str | None, str]]:
    """`(index, path, error)` of every image that PIL cannot decode (the column must be undecoded)."""

    def check(batch, indices):
        errors = []
        for value, index in zip(batch[image_column], indices):
            try:
                decode_image(value, index)
                errors.append("")
            except ValueError as error:
                errors.append(str(error))
        return {"__image_error": errors}

    checked = dataset.map(
        check, batched=True, with_indices=True, input_columns=None, remove_columns=dataset.column_names,
        num_proc=num_proc, desc="Checking images",
    )
    bad = []
    for index, error in enumerate(checked["__image_error"]):
        if error:
            value = dataset[index][image_column]
            path = value.get("path") if isinstance(value, dict) else None
            bad.append((index, path, error))
    return bad


def drop_unreadable_images(dataset, image_column: str, split: str, policy: str, num_proc: int | None = None):
    """Apply the corrupt-image policy: `"skip"` removes and counts them, `"error"` stops with a list of them."""
    if policy not in ("skip", "error"):
        raise ValueError(f"corrupt_images must be 'skip' or 'error'; got {policy!r}.")
    bad = find_unreadable_images(dataset, image_column, num_proc)
    if not bad:
        return dataset, 0
    listing = "; ".join(error for _, _, error in bad[:20]) + (f"; ... and {len(bad) - 20} more" if len(bad) > 20 else "")
    if policy == "error":
        raise ValueError(
            f"{len(bad)} unreadable image(s) in the {split} split: {listing}. "
            f"Pass --corrupt_images skip to leave them out and count them."
        )
    logger.warning("Skipping %d unreadable image(s) in the %s split: %s", len(bad), split, listing)
    bad_indices = {index for index, _, _ in bad}
    keep = [index for index in range(len(dataset)) if index not in bad_indices]
    return dataset.select(keep), len(bad)


def parse_config_overrides(text: str | None) -> dict:
    """`"use_dw_shortcut=false,dw_kernel_sizes=[3,5]"` -> `{"use_dw_shortcut": False, "dw_kernel_sizes": [3, 5]}`.

    Values are JSON (also `True`/`False`/`None`); anything else stays a string. Commas inside brackets belong
    to the value.
    """
    if not text:
        return {}
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{(" and 1 or 0
        depth -= char in "]})" and 1 or 0
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    overrides = {}
    for item in (item.strip() for item in items):
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"config_overrides entries must look like key=value; got {item!r} in {text!r}.")
        key, raw = (part.strip() for part in item.split("=", 1))
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"config_overrides key {key!r} is not a valid field name.")
        literal = {"True": "true", "False": "false", "None": "null"}.get(raw, raw)
        try:
            value = json.loads(literal.replace("(", "[").replace(")", "]"))
        except json.JSONDecodeError:
            value = raw
        overrides[key] = value
    return overrides


def parse_floats(text: str | None, count: int = 3, name: str = "value"):
    if text is None:
        return None
    values = [float(part) for part in str(text).replace("[", "").replace("]", "").split(",") if part.strip()]
    if len(values) != count:
        raise ValueError(f"{name} needs {count} comma-separated numbers; got {text!r}.")
    return tuple(values)


@dataclass
class AugmentationConfig:
    """The paper's training augmentation (its defaults); each part can be turned off."""

    crop_scale_min: float = 0.08
    horizontal_flip_prob: float = 0.5
    rand_augment: bool = True
    rand_augment_num_ops: int = 2
    rand_augment_magnitude: int = 9
    color_jitter: float = 0.4
    random_erasing_prob: float = 0.25


def build_train_transform(image_size, image_mean, image_std, augmentation: AugmentationConfig | None = None):
    """RandomResizedCrop, flip, RandAugment, color jitter, normalise, random erasing (torchvision.transforms.v2)."""
    from torchvision.transforms import InterpolationMode, v2

    augmentation = augmentation or AugmentationConfig()
    size = _size_pair(image_size)
    steps = [v2.ToImage()]
    if augmentation.crop_scale_min < 1.0:
        steps.append(
            v2.RandomResizedCrop(
                size, scale=(augmentation.crop_scale_min, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
            )
        )
    else:
        steps.append(v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True))
    if augmentation.horizontal_flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(augmentation.horizontal_flip_prob))
    if augmentation.rand_augment:
        steps.append(
            v2.RandAugment(num_ops=augmentation.rand_augment_num_ops, magnitude=augmentation.rand_augment_magnitude)
        )
    if augmentation.color_jitter > 0:
        strength = augmentation.color_jitter
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(image_mean), list(image_std))]
    if augmentation.random_erasing_prob > 0:
        steps.append(v2.RandomErasing(p=augmentation.random_erasing_prob, value=0))
    return v2.Compose(steps)


def build_eval_transform(image_size, image_mean, image_std, crop_ratio: float = 0.875):
    """Resize to `size / crop_ratio` (bicubic) and center-crop `size` (the paper's 256 -> 224), then normalise."""
    from torchvision.transforms import InterpolationMode, v2

    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"eval_crop_ratio must lie in (0, 1]; got {crop_ratio}.")
    size = _size_pair(image_size)
    resized = tuple(int(math.floor(side / crop_ratio + 0.5)) for side in size)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resized, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(image_mean), list(image_std)),
        ]
    )


def _size_pair(image_size) -> tuple[int, int]:
    if isinstance(image_size, (list, tuple)):
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one sample's augmentation, fixed by (run seed, epoch, index) and nothing else."""
    return (((seed * 1_000_003) + epoch) * 2_147_483_659 + index) % (2**63 - 1)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` seen through a transform, yielding `pixel_values`, `labels` (and a sample seed).

    With `seed` set, each sample's augmentation is drawn from a generator seeded by (seed, epoch, index): the
    images a run sees do not depend on how many batches were prefetched, on the number of dataloader workers,
    or on whether the run was interrupted and resumed. The Trainer resumes mid-epoch by skipping sampler
    indices and restores the global RNG only after the next batch was loaded, so augmentation drawn from the
    global RNG would differ after a resume.
    """

    def __init__(self, dataset, image_column: str, label_column: str, transform, seed: int | None = None):
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        row = self.dataset[index]
        image = decode_image(row[self.image_column], index)
        sample = {"labels": int(row[self.label_column])}
        if self.seed is None:
            sample["pixel_values"] = self.transform(image)
            return sample
        seed = sample_seed(self.seed, self.epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            sample["pixel_values"] = self.transform(image)
        sample["sample_seed"] = seed
        return sample


class SetEpochCallback(TrainerCallback):
    """Tells the training dataset the epoch, for its per-sample augmentation seeds.

    (Accelerate forwards `set_epoch` to the sampler only, not to a map-style dataset.)
    """

    def __init__(self, dataset: ImageClassificationDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))


class MixupCutmixCollator:
    """Stack samples; for training batches apply Mixup or CutMix and label smoothing, giving soft labels.

    Training batches are recognised by their per-sample seeds (see `ImageClassificationDataset`), from which
    the batch's own mixing seed is made, so mixing is as reproducible as the augmentation. Evaluation batches
    keep integer labels.
    """

    def __init__(self, num_labels: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1):
        from torchvision.transforms import v2

        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns it off); got {value}.")
        for name, value in (("mixup_prob", prob), ("mixup_switch_prob", switch_prob), ("label_smoothing", label_smoothing)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]; got {value}.")
        self.num_labels = num_labels
        self.prob = prob
        self.label_smoothing = label_smoothing
        mixers, weights = [], []
        if mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_labels))
            weights.append(1.0 - switch_prob if cutmix_alpha > 0 else 1.0)
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_labels))
            weights.append(switch_prob if mixup_alpha > 0 else 1.0)
        self.mixer = v2.RandomChoice(mixers, p=weights) if mixers and prob > 0 else None

    @property
    def mixes(self) -> bool:
        return self.mixer is not None

    def __call__(self, samples: list[dict]) -> dict:
        pixel_values = torch.stack([sample["pixel_values"] for sample in samples])
        labels = torch.tensor([sample["labels"] for sample in samples], dtype=torch.long)
        if "sample_seed" not in samples[0] or (self.mixer is None and self.label_smoothing == 0):
            return {"pixel_values": pixel_values, "labels": labels}
        batch_seed = hash(tuple(sample["sample_seed"] for sample in samples)) % (2**63 - 1)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(batch_seed)
            if self.mixer is not None and torch.rand(()).item() < self.prob:
                pixel_values, soft = self.mixer(pixel_values, labels)
            else:
                soft = torch.nn.functional.one_hot(labels, self.num_labels).float()
        soft = soft * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_labels
        return {"pixel_values": pixel_values, "labels": soft}


def load_accuracy_metric():
    """The shipped top-1/top-5 accuracy metric, loaded by path (no network)."""
    import evaluate

    return evaluate.load(METRIC_PATH)


def make_compute_metrics(metric=None):
    """A `compute_metrics` for the Trainer: top-1 and top-5 accuracy from logits."""
    metric = metric or load_accuracy_metric()

    def compute_metrics(eval_prediction):
        logits = eval_prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return metric.compute(predictions=np.asarray(logits, dtype=np.float32), references=eval_prediction.label_ids)

    return compute_metrics


__all__ = [
    "KNOWN_DATASETS",
    "METRIC_PATH",
    "AugmentationConfig",
    "ImageClassificationDataset",
    "MixupCutmixCollator",
    "SetEpochCallback",
    "build_eval_transform",
    "build_train_transform",
    "decode_image",
    "detect_columns",
    "digits_dataset",
    "drop_unreadable_images",
    "find_unreadable_images",
    "known_dataset",
    "label_names",
    "load_accuracy_metric",
    "load_raw_datasets",
    "make_compute_metrics",
    "parse_config_overrides",
    "split_train_eval",
    "without_decoding",
]
