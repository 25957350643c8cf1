"""The study runner end to end on a tiny real-data study: calibration plans the epochs for a time budget, results
JSONs hold every evaluation with its training time, a finished run is not run again, and the curves are drawn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "studies"))

import run_study  # noqa: E402

TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,pooling=mean"


def test_plan_fits_the_budget():
    calibration = {"seconds_per_step": 0.5, "seconds_per_evaluation": 10.0, "train_samples": 50000}
    # 391 steps * 0.5 s + 10 s = 205.5 s per epoch; 0.97 * 3600 s / 205.5 s = 16.99 -> 16.9 epochs.
    assert run_study.plan_epochs(calibration, 128, 60) == pytest.approx(16.9)


def test_reference_minutes_become_minutes_here():
    from reference_speed import REFERENCE_IMAGES_PER_SECOND, minutes_here

    assert REFERENCE_IMAGES_PER_SECOND == 205.0  # the hour study's machine (issue 21)
    assert minutes_here(60, 410.0) == pytest.approx(30.0)  # twice as fast: half the minutes
    assert minutes_here(60, 102.5) == pytest.approx(120.0)
    with pytest.raises(ValueError, match="positive"):
        minutes_here(60, 0.0)


def test_a_study_file_can_keep_its_runs_outside_the_checkout(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": "far", "runs_root": str(tmp_path / "elsewhere"),
                                     "runs": [{"name": "dw", "recipe": "recipes/cpu/cifar10_long.yaml"}]}))
    command = [sys.executable, str(REPO_ROOT / "studies" / "run_study.py"), str(study), "--dry_run"]
    shown = subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True, text=True).stdout
    assert f"--output_dir {tmp_path / 'elsewhere' / 'far' / 'dw'}" in shown
    overridden = subprocess.run(command + ["--runs_root", str(tmp_path / "given")], check=True, cwd=REPO_ROOT,
                                capture_output=True, text=True).stdout
    assert f"--output_dir {tmp_path / 'given' / 'far' / 'dw'}" in overridden


def test_step_time_is_the_steady_state_one():
    # Logged at steps 10, 20, 30, 40; the first 10 steps took 0.5 min (start-up), then 0.1 min per 10 steps.
    log_history = [
        {"loss": 2.3, "step": 10, "train_minutes": 0.5}, {"loss": 2.2, "step": 20, "train_minutes": 0.6},
        {"loss": 2.1, "step": 30, "train_minutes": 0.7}, {"eval_loss": 2.0, "step": 30, "train_minutes": 0.9},
        {"loss": 2.0, "step": 40, "train_minutes": 0.8},
    ]
    assert run_study.steady_seconds_per_step(log_history, train_runtime=48.0, steps=40) == pytest.approx(0.6)
    # Without two timed training logs, the whole piece's mean.
    assert run_study.steady_seconds_per_step(log_history[:1], train_runtime=48.0, steps=40) == pytest.approx(1.2)


def test_tiny_study_runs_resumes_and_plots(cifar10_dir, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "model_name": "vit-tiny-cifar", "config_overrides": TINY, "do_train": True, "do_eval": True,
        "max_train_samples": 64, "max_eval_samples": 32, "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32, "eval_strategy": "epoch", "save_strategy": "epoch", "report_to": "none",
        "disable_tqdm": True, "dataloader_pin_memory": False, "rand_augment": False,
    }))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "study": "tiny", "data": {"dataset_name": str(cifar10_dir)}, "calibration_steps": 2, "reference_steps": 2,
        "runs": [
            {"name": "dw", "recipe": str(recipe), "budget_reference_minutes": 0.15},
            {"name": "plain", "recipe": str(recipe), "epochs_from": "dw",
             "args": ["--config_overrides", TINY + ",use_dw_shortcut=false"]},
        ],
    }))
    roots = ["--results_root", str(tmp_path / "results"), "--runs_root", str(tmp_path / "runs")]
    command = [sys.executable, str(REPO_ROOT / "studies" / "run_study.py"), str(study), *roots]
    subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True, text=True)

    dw = json.loads((tmp_path / "results" / "tiny" / "dw.json").read_text())
    plain = json.loads((tmp_path / "results" / "tiny" / "plain.json").read_text())
    assert dw["plan"]["calibration"]["steps"] == 2 and dw["plan"]["num_train_epochs"] >= 1
    # The budget in reference minutes became minutes here through the speed measured before calibration.
    from reference_speed import minutes_here

    speed = dw["plan"]["reference"]["reference_images_per_second"]
    assert speed > 0 and dw["plan"]["budget_reference_minutes"] == 0.15
    assert dw["plan"]["budget_minutes"] == pytest.approx(minutes_here(0.15, speed), abs=0.01)
    assert f"--max_train_minutes {dw['plan']['budget_minutes']}" in dw["command"]
    # Every segment records the machine's reference speed (one segment each here: nothing was resumed).
    for result in (dw, plain):
        assert [segment["resumed"] for segment in result["segments"]] == [False]
        assert result["segments"][0]["reference_images_per_second"] > 0
    assert plain["plan"]["num_train_epochs"] == dw["plan"]["num_train_epochs"]
    for result in (dw, plain):
        assert result["evaluations"] and all(0 < e["train_minutes"] for e in result["evaluations"])
        assert 0.0 <= result["final"]["eval_accuracy"] <= 1.0
        assert result["versions"]["torch"] and result["machine"]["cores"]
        assert "--max_train_minutes" in dw["command"]
    assert dw["num_parameters"] > plain["num_parameters"]  # the shortcut's BatchNorm and conv

    again = subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True, text=True)
    assert again.stdout.count("done (") == 2  # finished runs are not run again

    import plot_curves

    image = plot_curves.plot_study("tiny", tmp_path / "curves.png", tmp_path / "results")
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
