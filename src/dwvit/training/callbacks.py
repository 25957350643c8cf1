"""Trainer callbacks of the training script: the epoch for per-sample augmentation seeds, and a training clock
that survives resumes, stamps every evaluation with the training time and can stop at a time budget."""

from __future__ import annotations

import math
import time

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .distributed import rank_zero_decides


class SetEpochCallback(TrainerCallback):
    """Tells the training dataset the epoch, for its per-sample augmentation seeds.

    (Accelerate forwards `set_epoch` to the sampler only, not to a map-style dataset.)
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))


class TrainingClock(TrainerCallback, ExportableState):
    """Wall-clock time of the training loop (evaluations included), summed over interruptions and resumes.

    The time so far is saved in every checkpoint (`trainer_state.json`, `stateful_callbacks`) and picked up on
    resume, so a run killed and resumed still stops at its budget. Each evaluation's and training-loss log entry
    gets `train_minutes`, which is what accuracy-against-time curves are drawn from. With `budget_minutes` set,
    training stops (with an evaluation and a checkpoint where the run has them) at the first step past it; with
    several processes, at the first step past it on rank 0's clock, on every rank.
    """

    def __init__(self, budget_minutes: float | None = None):
        if budget_minutes is not None and not budget_minutes > 0:
            raise ValueError(f"max_train_minutes must be > 0; got {budget_minutes}.")
        self.budget_minutes = budget_minutes
        self.previous_seconds = 0.0
        self.started: float | None = None

    def elapsed_minutes(self) -> float:
        running = time.perf_counter() - self.started if self.started is not None else 0.0
        return (self.previous_seconds + running) / 60.0

    def state(self) -> dict:
        return {"args": {"budget_minutes": self.budget_minutes},
                "attributes": {"previous_seconds": self.elapsed_minutes() * 60.0}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        self.previous_seconds = float(saved["attributes"]["previous_seconds"]) if saved else 0.0
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        # Under data parallelism rank 0's clock decides for all: a rank stopping alone would leave the others
        # waiting forever in the next step's gradient all-reduce.
        if self.budget_minutes is not None and rank_zero_decides(
            self.elapsed_minutes() >= self.budget_minutes, args.device
        ):
            control.should_training_stop = True
            control.should_evaluate = args.eval_strategy != "no"
            control.should_save = args.save_strategy != "no"

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Training-loss entries get the time too: loss-against-time curves, and steady-state step times for budgets.
        if state.log_history and "loss" in state.log_history[-1]:
            state.log_history[-1]["train_minutes"] = round(self.elapsed_minutes(), 4)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        minutes = round(self.elapsed_minutes(), 4)
        if metrics is not None:
            metrics["train_minutes"] = minutes
        if state.log_history and any(key.endswith("_loss") and key.startswith("eval") for key in state.log_history[-1]):
            state.log_history[-1]["train_minutes"] = minutes

    def on_train_end(self, args, state, control, **kwargs):
        state.stateful_callbacks[type(self).__name__] = self.state()
