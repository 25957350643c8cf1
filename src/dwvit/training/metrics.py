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
    """A `compute_metrics` for the Trainer: top-1 and top-5 accuracy and the loss, per image, from the logits.

    The loss is returned too (as `loss`, which the Trainer files as `eval_loss` over its own value) because the
    Trainer's is a mean of batch means, each repeated by the *first* batch's size: a smaller last batch is
    over-weighted, and under several processes a padded last batch's mean includes the images the sampler
    repeated to even the batches (accelerate's `gather_for_metrics` drops the repeats' logits, not their share
    of a batch mean). From the gathered logits, every evaluation image counts exactly once.
    """
    metric = metric or load_accuracy_metric()

    def compute_metrics(eval_prediction):
        import torch

        logits = eval_prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        logits = np.asarray(logits, dtype=np.float32)
        labels = np.asarray(eval_prediction.label_ids)
        result = metric.compute(predictions=logits, references=labels)
        if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
            # The models' own classification loss on integer labels (no smoothing at evaluation).
            loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels).long())
            result["loss"] = float(loss)
        return result

    return compute_metrics
