#!/usr/bin/env python
"""Print a study's results as a Markdown table, the paper's numbers beside ours, for the README.

    python studies/results_table.py studies/variants.yaml
    python studies/results_table.py studies/cifar10_hour.yaml studies/tiny_imagenet.yaml

Rows follow the study file's order; a run without a results JSON yet reads "not run yet". A run's `paper` field in
the study file is the paper's number for the closest configuration (`../shared/paper.md`, 300 epochs at 224x224).
Runs that name another run in `seed_of` are repeats with other seeds: a line under the table gives their mean and
range, so differences smaller than that range read as noise.
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


def seed_groups(study: dict, results: dict[str, dict]) -> dict[str, list[float]]:
    """Top-1 (in %) of each finished run and its finished repeats with other seeds, keyed by the first run."""
    groups: dict[str, list[str]] = {}
    for run in study["runs"]:
        groups.setdefault(run.get("seed_of", run["name"]), []).append(run["name"])
    return {first: [100 * results[name]["final"]["eval_accuracy"] for name in names if name in results]
            for first, names in groups.items() if len(names) > 1}


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


def markdown_table(study_file: Path, results_root: Path = REPO_ROOT / "studies" / "results") -> str:
    study, results = load_study(study_file, results_root)
    lines = [
        f"`python studies/run_study.py {Path(study_file).as_posix()} --only <run>`",
        "",
        "| run | description | epochs | training minutes | params | top-1 | top-5 | paper (300 epochs, 224) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in study["runs"]:
        name, paper = run["name"], run.get("paper", "")
        result = results.get(name)
        if result is None:
            lines.append(f"| `{name}` | {run.get('description', '')} | | | | not run yet | | {paper} |")
            continue
        final = result["final"]
        lines.append(
            f"| `{name}` | {run.get('description', '')} | {final['epoch']:.1f} | {minutes_to_last_evaluation(result):.1f} | "
            f"{result['num_parameters']:,} | {100 * final['eval_accuracy']:.2f} % | "
            f"{100 * final['eval_top5_accuracy']:.2f} % | {paper} |"
        )
    for first, accuracies in seed_groups(study, results).items():
        if len(accuracies) > 1:
            lines += ["", f"`{first}` over {len(accuracies)} seeds: mean {statistics.mean(accuracies):.2f} %, "
                          f"range {min(accuracies):.2f}-{max(accuracies):.2f} % "
                          f"(spread {max(accuracies) - min(accuracies):.2f} points)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", help="Study files, e.g. studies/variants.yaml.")
    parser.add_argument("--results_root", default=str(REPO_ROOT / "studies" / "results"))
    args = parser.parse_args()
    print("\n\n".join(markdown_table(Path(study), Path(args.results_root)) for study in args.studies))


if __name__ == "__main__":
    main()
