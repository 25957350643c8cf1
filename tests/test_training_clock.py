"""The training clock: time summed over resumes, a time budget that stops training, evaluations stamped with it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

import dwvit.training.callbacks as callbacks
from dwvit.training.callbacks import TrainingClock

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import run_image_classification as ric  # noqa: E402
from test_run_image_classification import TINY, tiny_args  # noqa: E402


class FakeTime:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_clock_sums_time_over_a_resume_and_stops_at_the_budget(monkeypatch, tmp_path):
    fake = FakeTime()
    monkeypatch.setattr(callbacks.time, "perf_counter", fake)
    args = TrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch", save_strategy="epoch", report_to="none")
    state, control = TrainerState(), TrainerControl()
    clock = TrainingClock(budget_minutes=10)
    clock.on_train_begin(args, state, control)
    fake.now += 6 * 60
    clock.on_step_end(args, state, control)
    assert not control.should_training_stop
    # A checkpoint stores the time so far; a new process resumes from that state.
    state.stateful_callbacks = {"TrainingClock": clock.state()}
    resumed_state = TrainerState.load_from_json(_round_trip(state, tmp_path))
    resumed = TrainingClock(budget_minutes=10)
    resumed.on_train_begin(args, resumed_state, control)
    assert resumed.elapsed_minutes() == pytest.approx(6.0)
    fake.now += 3 * 60
    resumed.on_step_end(args, resumed_state, control)
    assert not control.should_training_stop
    fake.now += 1.5 * 60
    resumed.on_step_end(args, resumed_state, control)
    assert control.should_training_stop and control.should_evaluate and control.should_save
    metrics = {"eval_loss": 1.0}
    resumed_state.log_history.append(dict(metrics))
    resumed.on_evaluate(args, resumed_state, control, metrics=metrics)
    assert metrics["train_minutes"] == pytest.approx(10.5) == resumed_state.log_history[-1]["train_minutes"]


def test_training_logs_are_stamped_too(monkeypatch, tmp_path):
    fake = FakeTime()
    monkeypatch.setattr(callbacks.time, "perf_counter", fake)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = TrainerState(), TrainerControl()
    clock = TrainingClock()
    clock.on_train_begin(args, state, control)
    fake.now += 90
    state.log_history.append({"loss": 2.0, "step": 10})
    clock.on_log(args, state, control, logs={"loss": 2.0})
    state.log_history.append({"train_runtime": 95.0, "step": 10})
    clock.on_log(args, state, control, logs={"train_runtime": 95.0})
    assert state.log_history[0]["train_minutes"] == pytest.approx(1.5)
    assert "train_minutes" not in state.log_history[1]  # the final summary is not a training log


def _round_trip(state: TrainerState, folder: Path) -> str:
    path = folder / "trainer_state.json"
    state.save_to_json(str(path))
    return str(path)


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_train_minutes must be > 0"):
        TrainingClock(budget_minutes=0)


def test_script_stops_at_the_budget_and_stamps_evaluations(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    ric.main(tiny_args(
        out, "--dataset_name", str(cifar10_dir), "--max_train_samples", "64", "--max_eval_samples", "16",
        "--per_device_train_batch_size", "8", "--num_train_epochs", "4", "--eval_strategy", "epoch",
        "--max_train_minutes", "0.0001", "--do_train", "--do_eval", overrides=TINY,
    ))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1  # 32 steps were planned; the budget ran out during the first
    evaluations = [entry for entry in state["log_history"] if "eval_loss" in entry]
    assert evaluations and all(entry["train_minutes"] > 0 for entry in evaluations)
