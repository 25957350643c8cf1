#!/usr/bin/env python
"""Print a study's results as a Markdown table, the paper's numbers beside ours, for the README.

    python studies/results_table.py studies/variants.yaml
    python studies/results_table.py studies/cifar10_hour.yaml studies/tiny_imagenet.yaml

Rows follow the study file's order; a run without a results JSON yet reads "not run yet". A run's `paper` field in
the study file is the paper's number for the closest configuration (`../shared/paper.md`, 300 epochs at 224x224).
Runs that name another run in `seed_of` are repeats with other seeds: a line under the table gives their mean and
range, so differences smaller than that range read as noise. A study with `compare_at_epoch: N` gets a column with
each run's top-1 at the loop's evaluation at epoch N: runs at an equal time budget plan different epoch counts from
a noisy step-time calibration, and the equal-epochs column shows which gaps are per-epoch learning and which are speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_study(study_file: Path, results_root: Path) -> tuple[dict, dict[str, dict]]:
    study = yaml.safe_load(Path(study_file).read_text())
    folder = Path(results_root) / study["study"]
    results = {}
    for run in study["runs"]:
        path = folder / f"{run['name']}.json"
        if path.exists():
            results[run["name"]] = json.loads(path.read_text())
    return study, results


def seed_groups(study: dict, results: dict[str, dict]) -> dict[str, list[str]]:
    """Runs finished with two or more seeds: the first run's name to its and its finished repeats' names."""
    groups: dict[str, list[str]] = {}
    for run in study["runs"]:
        if run["name"] in results:
            groups.setdefault(run.get("seed_of", run["name"]), []).append(run["name"])
    return {first: names for first, names in groups.items() if len(names) > 1}


def spread_line(label: str, accuracies: list[float]) -> str:
    return (f"{label} over {len(accuracies)} seeds: mean {statistics.mean(accuracies):.2f} %, "
            f"range {min(accuracies):.2f}-{max(accuracies):.2f} % (spread {max(accuracies) - min(accuracies):.2f} points)")


def loop_evaluations(result: dict) -> list[dict]:
    """The training loop's timed evaluations, one per step: the script's final evaluation repeats the loop's last
    one at the same step, later, and is left out."""
    first_per_step: dict[int, dict] = {}
    for evaluation in result["evaluations"]:
        if "train_minutes" in evaluation:
            first_per_step.setdefault(evaluation["step"], evaluation)
    return sorted(first_per_step.values(), key=lambda evaluation: evaluation["step"])


def minutes_to_last_evaluation(result: dict) -> float:
    """Training minutes, evaluations included, when the loop's last evaluation ended."""
    evaluations = loop_evaluations(result)
    return evaluations[-1]["train_minutes"] if evaluations else result["final"]["train_minutes"]


def accuracy_at_epoch(result: dict, epoch: float) -> float | None:
    """Top-1 (in %) of the loop's evaluation at exactly `epoch`, or None when the loop did not evaluate there."""
    for evaluation in loop_evaluations(result):
        if abs(evaluation["epoch"] - epoch) < 1e-6:
            return 100 * evaluation["eval_accuracy"]
    return None


def markdown_table(study_file: Path, results_root: Path = REPO_ROOT / "studies" / "results") -> str:
    study, results = load_study(study_file, results_root)
    at_epoch = study.get("compare_at_epoch")
    epoch_header = [f"top-1 at epoch {at_epoch:g}"] if at_epoch is not None else []
    header = ["run", "description", "epochs", "training minutes", "params", "top-1", "top-5", *epoch_header,
              "paper (300 epochs, 224)"]
    lines = [
        f"`python studies/run_study.py {Path(study_file).as_posix()} --only <run>`",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for run in study["runs"]:
        name, paper = run["name"], run.get("paper", "")
        result = results.get(name)
        if result is None:
            cells = ["", "", "", "not run yet", "", *[""] * len(epoch_header)]
        else:
            final = result["final"]
            cells = [f"{final['epoch']:.1f}", f"{minutes_to_last_evaluation(result):.1f}", f"{result['num_parameters']:,}",
                     f"{100 * final['eval_accuracy']:.2f} %", f"{100 * final['eval_top5_accuracy']:.2f} %"]
            if at_epoch is not None:
                accuracy = accuracy_at_epoch(result, at_epoch)
                cells.append("" if accuracy is None else f"{accuracy:.2f} %")
        lines.append("| " + " | ".join([f"`{name}`", run.get("description", ""), *cells, paper]) + " |")
    for first, names in seed_groups(study, results).items():
        line = spread_line(f"`{first}`", [100 * results[name]["final"]["eval_accuracy"] for name in names])
        if at_epoch is not None:
            at_epoch_accuracies = [accuracy_at_epoch(results[name], at_epoch) for name in names]
            if None not in at_epoch_accuracies:
                line += "; " + spread_line(f"at epoch {at_epoch:g}", at_epoch_accuracies)
        lines += ["", line + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", help="Study files, e.g. studies/variants.yaml.")
    parser.add_argument("--results_root", default=str(REPO_ROOT / "studies" / "results"))
    args = parser.parse_args()
    print("\n\n".join(markdown_table(Path(study), Path(args.results_root)) for study in args.studies))


if __name__ == "__main__":
    main()
