"""`DWTrainer`: the `transformers.Trainer` that run_image_classification.py uses."""

from __future__ import annotations

from transformers import Trainer

from .checkpointing import AtomicCheckpointMixin
from .optim import decay_parameter_names


class DWTrainer(AtomicCheckpointMixin, Trainer):
    """A `Trainer` whose checkpoints appear complete or not at all (see `dwvit.checkpointing`).

    `train(resume_from_checkpoint=True)` resumes from the newest *complete* checkpoint, warning about each newer
    one it skips. Its weight-decay groups follow timm (`get_decay_parameter_names`); everything else is the stock
    `Trainer`.
    """

    def get_decay_parameter_names(self, model) -> list[str]:
        """Decay parameters with 2+ dimensions outside `model.no_weight_decay()`, as timm and the original code do.

        No weight decay on biases, LayerNorm/BatchNorm scales, LayerScale factors, position embeddings, class tokens
        and relative-position bias tables (see `dwvit.optim`). The stock rule, by names, decays the last four.
        """
        return decay_parameter_names(model)
