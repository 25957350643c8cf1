#!/usr/bin/env python
"""Run a study: several training runs from recipe files, one at a time, resumable, one results JSON per run.

    python studies/run_study.py studies/cifar10_hour.yaml            # every run not finished yet, in order
    python studies/run_study.py studies/variants.yaml --only k3 plain  # some runs
    python studies/run_study.py studies/cifar10_hour.yaml --dry_run  # print the commands

A study file names its runs; each run is a recipe (`recipes/cpu/*.yaml`) plus extra arguments:

    study: cifar10-hour
    data: {dataset_name: ../shared/data/cifar10}       # arguments added to every run
    runs:
      - name: dw
        recipe: recipes/cpu/cifar10_hour.yaml
        budget_minutes: 60            # plan the schedule to end within this training time, and stop there
      - name: dw-anywhere
        recipe: recipes/cpu/cifar10_hour.yaml
        budget_reference_minutes: 60  # the same in reference minutes: 60 x 205 / (reference images/s here) minutes
      - name: plain-equal-epochs
        recipe: recipes/cpu/cifar10_hour.yaml
        args: [--config_overrides, "...,use_dw_shortcut=false"]
        epochs_from: dw               # as many epochs as the dw run was planned for

A run with `budget_minutes` is calibrated first: a short timed piece of the same command (40 optimizer steps and
one evaluation) measures the steady-state step time (after the piece's first quarter) and the evaluation time,
and the number of epochs is set so that training with its evaluations fits in the budget; `--max_train_minutes`
then stops it at the budget in any case. The plan is saved beside the run's checkpoints, so a resumed run keeps it.
A `budget_reference_minutes` budget is converted to minutes on this machine from its reference speed, measured
first (`reference_speed.py`); the plan records both. Every segment of a run (its start and each resume) measures
the reference speed too, so a results JSON says how fast each machine that ran it was.
Runs live in `runs/<study>/<name>` (checkpoints, never committed; the job resumes from the newest complete one; a
study file's `runs_root` puts them elsewhere, e.g. outside the checkout for a study that outlives a session) and
results in `studies/results/<study>/<name>.json` (written whole or not at all).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

from dwvit.training.argument_files import read_argument_file  # noqa: E402
from dwvit.training.redaction import redact_argv  # noqa: E402
from reference_speed import measure_reference_speed, minutes_here  # noqa: E402

CALIBRATION_STEPS = 40
SAFETY = 0.97  # leave a little of the budget for the last checkpoint and the slack of the estimate


def write_json(path: Path, payload: dict) -> None:
    """Whole or not at all (the job's own atomic write), into a folder made if missing."""
    from dwvit.training.run_control import write_json_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, payload)


def job_command(recipe: str, arguments: list[str]) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "run_image_classification.py"), recipe, *arguments]


def common_arguments(study: dict) -> list[str]:
    arguments = []
    for key, value in (study.get("data") or {}).items():
        arguments += [f"--{key}", str(value)]
    return arguments


def calibrate(recipe: str, arguments: list[str], steps: int = CALIBRATION_STEPS) -> dict:
    """Seconds per optimizer step and per evaluation of this command, from a short timed piece."""
    with tempfile.TemporaryDirectory() as folder:
        piece = arguments + [
            "--output_dir", folder, "--max_steps", str(steps), "--eval_strategy", "no",
            "--save_strategy", "no", "--report_to", "none", "--auto_resume", "false", "--do_train", "--do_eval",
            "--max_train_minutes", "1000", "--logging_steps", str(max(1, steps // 4)),
        ]
        subprocess.run(job_command(recipe, piece), check=True, cwd=REPO_ROOT)
        results = json.loads((Path(folder) / "all_results.json").read_text())
        log_history = json.loads((Path(folder) / "trainer_state.json").read_text())["log_history"]
    return {
        "steps": steps,
        "seconds_per_step": steady_seconds_per_step(log_history, results["train_runtime"], steps),
        "seconds_per_evaluation": results["eval_runtime"],
        "train_samples": results["train_samples"],
    }


def steady_seconds_per_step(log_history: list[dict], train_runtime: float, steps: int) -> float:
    """Seconds per step between the first and the last timed training log, so the piece's first steps (data
    loader start, first allocations) do not count; the whole piece's mean when fewer than two logs are timed."""
    timed = [(entry["step"], entry["train_minutes"]) for entry in log_history if "loss" in entry and "train_minutes" in entry]
    if len(timed) < 2 or timed[-1][0] == timed[0][0]:
        return train_runtime / steps
    (first_step, first_minutes), (last_step, last_minutes) = timed[0], timed[-1]
    return 60.0 * (last_minutes - first_minutes) / (last_step - first_step)


def plan_epochs(calibration: dict, batch_size: int, budget_minutes: float, evaluations_per_epoch: float = 1.0) -> float:
    steps_per_epoch = math.ceil(calibration["train_samples"] / batch_size)
    epoch_seconds = steps_per_epoch * calibration["seconds_per_step"]
    epoch_seconds += evaluations_per_epoch * calibration["seconds_per_evaluation"]
    return max(1.0, math.floor(10 * SAFETY * budget_minutes * 60 / epoch_seconds) / 10)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def versions() -> dict:
    import torch
    import transformers

    import dwvit

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "dwvit": dwvit.__version__,
            "git_commit": commit or None}


def collect(output_dir: Path) -> dict:
    """Evaluations (accuracy with training time and epoch) and final metrics from a finished run's folder."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    evaluations = [
        {key: entry[key] for key in ("step", "epoch", "train_minutes", "eval_accuracy", "eval_top5_accuracy", "eval_loss")
         if key in entry}
        for entry in state["log_history"] if "eval_accuracy" in entry
    ]
    final = json.loads((output_dir / "all_results.json").read_text())
    run_info = json.loads((output_dir / "run_info.json").read_text())
    return {"evaluations": evaluations, "final": final, "global_step": state["global_step"],
            "num_parameters": run_info.get("num_parameters"), "run_info": run_info}


def run_one(study: dict, run: dict, results_dir: Path, runs_dir: Path, dry_run: bool) -> None:
    name = run["name"]
    result_path = results_dir / f"{name}.json"
    if result_path.exists():
        print(f"[{name}] done ({result_path})")
        return
    output_dir = runs_dir / name
    recipe = run["recipe"]
    recipe_values = read_argument_file(str(REPO_ROOT / recipe))
    arguments = common_arguments(study) + [str(a) for a in run.get("args", [])]
    plan_path = output_dir / "study_plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    if not plan:
        batch_size = int(_last_value(arguments, "--per_device_train_batch_size", recipe_values.get("per_device_train_batch_size", 128)))
        if run.get("budget_minutes") or run.get("budget_reference_minutes"):
            if dry_run:
                plan = {"num_train_epochs": "<calibrated>"}
            else:
                plan = {}
                budget = run.get("budget_minutes")
                if run.get("budget_reference_minutes"):
                    reference = measure_reference_speed(steps=int(study.get("reference_steps", 10)))
                    budget = round(minutes_here(float(run["budget_reference_minutes"]),
                                                reference["reference_images_per_second"]), 2)
                    plan = {"budget_reference_minutes": run["budget_reference_minutes"], "reference": reference}
                calibration = calibrate(recipe, arguments, int(study.get("calibration_steps", CALIBRATION_STEPS)))
                epochs = plan_epochs(calibration, batch_size, float(budget))
                plan.update({"calibration": calibration, "num_train_epochs": epochs, "budget_minutes": budget})
        elif run.get("epochs_from"):
            source_path = results_dir / f"{run['epochs_from']}.json"
            if source_path.exists():
                source = json.loads(source_path.read_text())
                plan = {"num_train_epochs": source["plan"]["num_train_epochs"], "epochs_from": run["epochs_from"]}
            elif dry_run:
                plan = {"num_train_epochs": f"<as {run['epochs_from']}>"}
            else:
                raise SystemExit(f"[{name}] needs the results of run {run['epochs_from']!r} first ({source_path}).")
        if plan and not dry_run:
            write_json(plan_path, plan)
    command_arguments = arguments + ["--output_dir", str(output_dir)]
    if "num_train_epochs" in plan:
        command_arguments += ["--num_train_epochs", str(plan["num_train_epochs"])]
    if plan.get("budget_minutes") or run.get("budget_minutes"):
        command_arguments += ["--max_train_minutes", str(plan.get("budget_minutes") or run["budget_minutes"])]
    command = job_command(recipe, command_arguments)
    shown = "python " + shlex.join(redact_argv([os.path.relpath(c, REPO_ROOT) if c.startswith(str(REPO_ROOT)) else c
                                                for c in command[1:]]))
    print(f"[{name}] {shown}", flush=True)
    if dry_run:
        return
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    segments = record_segment(output_dir, started, int(study.get("reference_steps", 10)))
    subprocess.run(command, check=True, cwd=REPO_ROOT)
    result = {
        "study": study["study"], "name": name, "description": run.get("description", ""), "recipe": recipe,
        "command": shown, "plan": plan, **collect(output_dir), "machine": machine(), "versions": versions(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "last_segment_started": started, "segments": segments,
    }
    write_json(result_path, result)
    if run.get("keep_model"):
        destination = results_dir / f"{name}-model"
        if destination.exists():
            shutil.rmtree(destination)
        shutil.copytree(output_dir, destination, ignore=shutil.ignore_patterns("checkpoint-*", "runs", "*.bin"))
    print(f"[{name}] top-1 {result['final'].get('eval_accuracy')}", flush=True)


def record_segment(output_dir: Path, started: str, reference_steps: int) -> list[dict]:
    """Append this segment (its start and the machine's reference speed now) to the run's segment log."""
    path = output_dir / "study_segments.json"
    segments = json.loads(path.read_text()) if path.exists() else []
    resumed = any(output_dir.glob("checkpoint-*"))
    if resumed and not segments:
        segments.append({"started": None, "note": "earlier segments ran before segments were recorded"})
    segments.append({"started": started, "resumed": resumed, "machine": machine()["cpu"],
                     **measure_reference_speed(steps=reference_steps)})
    write_json(path, segments)
    return segments


def _last_value(arguments: list[str], flag: str, default):
    value = default
    for index, argument in enumerate(arguments[:-1]):
        if argument == flag:
            value = arguments[index + 1]
    return value


def runs_root(given: str | None, study: dict) -> Path:
    """The folder of the runs' checkpoints: `--runs_root`, else the study file's `runs_root` (`~` expanded), else
    `runs/` in the checkout. A study that outlives a session keeps its checkpoints outside the checkout, which a new
    session may lay down afresh."""
    if given:
        return Path(given)
    if study.get("runs_root"):
        return Path(os.path.expanduser(str(study["runs_root"])))
    return REPO_ROOT / "runs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="A study file, e.g. studies/cifar10_hour.yaml.")
    parser.add_argument("--only", nargs="+", help="Run only these runs (by name), in the study's order.")
    parser.add_argument("--dry_run", action="store_true", help="Print the commands without running anything.")
    parser.add_argument("--results_root", default=str(REPO_ROOT / "studies" / "results"))
    parser.add_argument("--runs_root", default=None,
                        help="Where runs keep their checkpoints: the study file's runs_root, else runs/ in the checkout.")
    args = parser.parse_args()
    study = yaml.safe_load(Path(args.study).read_text())
    names = [run["name"] for run in study["runs"]]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        raise SystemExit(f"Unknown run(s) {unknown}; {args.study} has: {', '.join(names)}.")
    results_dir = Path(args.results_root) / study["study"]
    runs_dir = runs_root(args.runs_root, study) / study["study"]
    for run in study["runs"]:
        if args.only and run["name"] not in args.only:
            continue
        run_one(study, run, results_dir, runs_dir, args.dry_run)


if __name__ == "__main__":
    main()
