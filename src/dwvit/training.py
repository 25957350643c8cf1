"""Pieces of `run_image_classification.py` that are neither data nor augmentation: metrics, argument parsing and
the epoch callback. The data (`dwvit.data`) and augmentation (`dwvit.augmentation`) names are re-exported here,
so `from dwvit.training import ...` keeps working.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .augmentation import (
    AugmentationConfig,
    BatchAugmentation,
    ImageBatchCollator,
    build_eval_transform,
    build_train_transform,
    sample_crop_steps,
)
from .callbacks import SetEpochCallback, TrainingClock
from .data import (
    KNOWN_DATASETS,
    DecodedImages,
    ImageClassificationDataset,
    ImageScan,
    apply_unreadable_policy,
    decode_image,
    detect_columns,
    digits_dataset,
    find_unreadable_images,
    known_dataset,
    label_names,
    load_raw_datasets,
    scan_images,
    split_train_eval,
    without_decoding,
)

METRIC_PATH = str(Path(__file__).resolve().parent / "metrics" / "accuracy")
"""Folder of the shipped top-1/top-5 `evaluate` metric; `evaluate.load(METRIC_PATH)` works offline."""


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
    "BatchAugmentation",
    "DecodedImages",
    "ImageBatchCollator",
    "ImageClassificationDataset",
    "ImageScan",
    "SetEpochCallback",
    "TrainingClock",
    "apply_unreadable_policy",
    "build_eval_transform",
    "build_train_transform",
    "decode_image",
    "detect_columns",
    "digits_dataset",
    "find_unreadable_images",
    "known_dataset",
    "label_names",
    "load_accuracy_metric",
    "load_raw_datasets",
    "make_compute_metrics",
    "parse_config_overrides",
    "parse_floats",
    "sample_crop_steps",
    "scan_images",
    "split_train_eval",
    "without_decoding",
]
