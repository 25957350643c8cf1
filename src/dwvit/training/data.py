"""Datasets for image classification: finding and loading them, decoding images once, and serving samples.

Decoding a JPEG costs more than a CPU training step spends on the image, so every image is decoded once, in
the same pass that finds unreadable files, and the result is cached by the dataset's fingerprint: a dataset
whose images share one size is kept as a memory-mapped uint8 array (the OS pages it, so it need not fit in
memory); otherwise only the list of unreadable images is kept and samples are decoded as they are read.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from ..models.image_processing import to_rgb
from .distributed import unique_suffix

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownDataset:
    """Where a dataset lives and how it is laid out, so it needs no column or split flags."""

    hub_id: str | None
    image_column: str
    label_column: str
    eval_split: str
    statistics: str | None  # key of `dwvit.models.image_processing.DATASET_STATISTICS`


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
    check_image_folder(train_dir, "--train_dir", min_classes=2)
    if validation_dir is not None:
        check_image_folder(validation_dir, "--validation_dir", min_classes=1)
    data_files = {"train": os.path.join(train_dir, "**")}
    if validation_dir is not None:
        data_files["validation"] = os.path.join(validation_dir, "**")
    return datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)


def check_image_folder(folder: str, option: str, min_classes: int) -> None:
    """Refuse an image folder that is missing, holds no images, or (for training) has fewer than `min_classes`
    class sub-folders, naming the option and what `datasets`' imagefolder expects."""
    from PIL import Image

    layout = "one sub-folder per class, each holding that class's images (folder/cat/1.png, folder/dog/2.png)"
    if not os.path.exists(folder):
        raise ValueError(f"{option} {folder} does not exist; expected an image folder: {layout}.")
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {folder} is a file, not a folder; expected an image folder: {layout}.")
    extensions = {extension.lower() for extension in Image.registered_extensions()}
    classes = set()
    for root, _, files in os.walk(folder):
        if any(os.path.splitext(name)[1].lower() in extensions for name in files):
            classes.add(os.path.relpath(root, folder))
            if len(classes) >= min_classes:  # enough to train: a large folder is not listed twice
                break
    if not classes:
        raise ValueError(f"{option} {folder} holds no image files; expected {layout}.")
    if len(classes) < min_classes:
        found = ", ".join("images directly in the folder" if name == "." else repr(name) for name in sorted(classes))
        raise ValueError(
            f"{option} {folder} has images of {len(classes)} class only ({found}); classification needs at least "
            f"{min_classes}: {layout}."
        )


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
    """A PIL RGB image from a `datasets` image cell (`{"bytes", "path"}` or PIL), converted by
    `dwvit.models.image_processing.to_rgb` (every PIL mode, EXIF orientation). A file that cannot be read raises a
    ValueError naming its index and path."""
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
    return to_rgb(image)


def without_decoding(dataset, image_column: str):
    """The dataset with its image column left encoded, so decoding happens (and fails) where we can report it."""
    import datasets

    if isinstance(dataset.features[image_column], datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


SCAN_FORMAT_VERSION = 1
DEFAULT_MAX_DECODED_BYTES = 8 * 2**30


class DecodedImages:
    """Every image of a split as uint8 `(N, H, W, C)` in memory or in a memory-mapped file, served as `(C, H, W)`
    tensors. A file is opened on first use, so each DataLoader worker maps it itself."""

    def __init__(self, shape: tuple[int, int, int, int], path: str | None = None, array: np.ndarray | None = None):
        self.shape = tuple(shape)
        self.path = path
        self._array = array

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)
        return self._array

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[index])).permute(2, 0, 1)

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.path is not None:
            state["_array"] = None  # workers re-map the file instead of receiving a pickled copy
        return state


@dataclass
class ImageScan:
    """What one decoding pass over a split found: its unreadable images and, if kept, the decoded images."""

    unreadable: list[tuple[int, str | None, str]] = field(default_factory=list)
    images: DecodedImages | None = None
    from_cache: bool = False

    def readable_indices(self, num_rows: int) -> list[int]:
        bad = {index for index, _, _ in self.unreadable}
        return [index for index in range(num_rows) if index not in bad]


def default_scan_cache_dir() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "dwvit-decoded"


def scan_images(dataset, image_column: str, cache_dir: str | os.PathLike | None = None,
                max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES, keep_images: bool = True) -> ImageScan:
    """Decode every image of `dataset` (its image column undecoded) once.

    Returns the unreadable images and, when all readable images share one size and `keep_images` is set, the
    decoded images. For a dataset stored on disk the result is cached under `cache_dir` by the dataset's
    fingerprint, so a later run with the same data reads it back without decoding anything; the cache entry is
    written aside and renamed into place, so a killed run never leaves one half-written.
    """
    num_rows = len(dataset)
    on_disk = bool(getattr(dataset, "cache_files", None))
    cache_path = None
    if on_disk:
        cache_root = Path(cache_dir) if cache_dir is not None else default_scan_cache_dir()
        cache_path = cache_root / f"{dataset._fingerprint}-{image_column}-v{SCAN_FORMAT_VERSION}"
        cached = _read_scan(cache_path, num_rows, keep_images)
        if cached is not None:
            return cached
        cache_root.mkdir(parents=True, exist_ok=True)

    unreadable: list[tuple[int, str | None, str]] = []
    shape = None
    store = None
    staging = None
    index = 0
    for batch in dataset.select_columns([image_column]).iter(batch_size=512):
        for value in batch[image_column]:
            try:
                pixels = np.asarray(decode_image(value, index))
            except ValueError as error:
                path = value.get("path") if isinstance(value, dict) else None
                unreadable.append((index, path, str(error)))
                index += 1
                continue
            if keep_images and shape is None:
                shape = (num_rows, *pixels.shape)
                if int(np.prod(shape)) > max_decoded_bytes:
                    keep_images = False
                elif cache_path is not None:
                    staging = f"{cache_path}.u8.tmp-{unique_suffix()}"
                    store = np.memmap(staging, dtype=np.uint8, mode="w+", shape=shape)
                else:
                    store = np.zeros(shape, dtype=np.uint8)
            if keep_images:
                if pixels.shape != shape[1:]:
                    keep_images, store = False, None  # mixed sizes: crop per sample instead
                else:
                    store[index] = pixels
            index += 1

    images = None
    if keep_images and store is not None:
        if staging is not None:
            store.flush()
            del store
            os.replace(staging, f"{cache_path}.u8")
            images = DecodedImages(shape, path=f"{cache_path}.u8")
        else:
            images = DecodedImages(shape, array=store)
    elif staging is not None and os.path.exists(staging):
        os.remove(staging)
    if cache_path is not None:
        meta = {"num_rows": num_rows, "unreadable": unreadable, "shape": list(shape) if images is not None else None}
        temporary = f"{cache_path}.json.tmp-{unique_suffix()}"
        with open(temporary, "w") as handle:
            json.dump(meta, handle)
        os.replace(temporary, f"{cache_path}.json")
    return ImageScan(unreadable=unreadable, images=images)


def _read_scan(cache_path: Path, num_rows: int, keep_images: bool) -> ImageScan | None:
    try:
        meta = json.loads(Path(f"{cache_path}.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("num_rows") != num_rows:
        return None
    unreadable = [tuple(entry) for entry in meta["unreadable"]]
    images = None
    if keep_images:
        if meta.get("shape") is None:
            # Mixed sizes (or too large): nothing more to keep than the unreadable list.
            return ImageScan(unreadable=unreadable, from_cache=True)
        shape = tuple(meta["shape"])
        path = f"{cache_path}.u8"
        if not os.path.exists(path) or os.path.getsize(path) != int(np.prod(shape)):
            return None
        images = DecodedImages(shape, path=path)
    return ImageScan(unreadable=unreadable, images=images, from_cache=True)


def apply_unreadable_policy(scan: ImageScan, num_rows: int, split: str, policy: str) -> list[int]:
    """The indices to keep: `"skip"` leaves the unreadable images out (with a warning), `"error"` stops."""
    if policy not in ("skip", "error"):
        raise ValueError(f"corrupt_images must be 'skip' or 'error'; got {policy!r}.")
    bad = scan.unreadable
    if bad:
        listing = "; ".join(error for _, _, error in bad[:20])
        if len(bad) > 20:
            listing += f"; ... and {len(bad) - 20} more"
        if policy == "error":
            raise ValueError(
                f"{len(bad)} unreadable image(s) in the {split} split: {listing}. "
                f"Pass --corrupt_images skip to leave them out and count them."
            )
        if len(bad) >= num_rows:
            raise ValueError(
                f"Every image of the {split} split ({num_rows}) is unreadable: {listing}. Check that the files are "
                "images PIL can open (PNG, JPEG, ...), not truncated or of another format."
            )
        logger.warning("Skipping %d unreadable image(s) in the %s split: %s", len(bad), split, listing)
    return scan.readable_indices(num_rows)


def find_unreadable_images(dataset, image_column: str, cache_dir=None) -> list[tuple[int, str | None, str]]:
    """`(index, path, error)` of every image that PIL cannot decode (the column must be undecoded)."""
    return scan_images(dataset, image_column, cache_dir, keep_images=False).unreadable


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one sample's augmentation, fixed by (run seed, epoch, index) and nothing else."""
    return (((seed * 1_000_003) + epoch) * 2_147_483_659 + index) % (2**63 - 1)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Rows of a `datasets.Dataset` as uint8 `pixel_values` `(C, H, W)`, integer `labels` and a sample seed.

    Images come from `images` (decoded once, see `scan_images`) or are decoded per sample; `transform` is the
    per-sample part of the pipeline (cropping images of mixed sizes, or the evaluation resize), the rest runs on
    whole batches in the collator. `indices` selects rows (readable ones, a subset). With `seed` set, each
    sample carries a seed fixed by (seed, epoch, index), from which its batch's augmentation is drawn, so the
    images a run sees depend neither on prefetching and workers nor on an interruption and resume (the
    Trainer resumes mid-epoch by skipping sampler indices).
    """

    def __init__(self, dataset, image_column: str, label_column: str, transform=None, seed: int | None = None,
                 images: DecodedImages | None = None, indices: list[int] | None = None):
        self.dataset = dataset
        self.image_column = image_column
        self.transform = transform
        self.seed = seed
        self.images = images
        self.indices = list(indices) if indices is not None else list(range(len(dataset)))
        # One column read instead of a row fetch per sample (a row holds the encoded image too).
        self.labels = np.asarray(dataset[label_column], dtype=np.int64)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        row = self.indices[index]
        if self.images is not None:
            pixels = self.images[row]
        else:
            image = decode_image(self.dataset[row][self.image_column], row)
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        sample = {"labels": int(self.labels[row])}
        seed = None if self.seed is None else sample_seed(self.seed, self.epoch, index)
        if self.transform is not None:
            if seed is None:
                pixels = self.transform(pixels)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.random.default_generator.manual_seed(seed)
                    pixels = self.transform(pixels)
        sample["pixel_values"] = torch.as_tensor(pixels).contiguous()
        if seed is not None:
            sample["sample_seed"] = seed
        return sample
