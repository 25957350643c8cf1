"""Top-1/top-5 accuracy for the Trainer, from the `evaluate` metric shipped in `accuracy/` (loaded by path, so
evaluation never needs the network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

METRIC_PATH = str(Path(__file__).resolve().parent / "accuracy")
"""Folder of the shipped top-1/top-5 `evaluate` metric; `evaluate.load(METRIC_PATH)` works offline."""


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
