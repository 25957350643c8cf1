#!/usr/bin/env python
"""Draw top-1 accuracy against training minutes and against epochs for every run of a study, from its results.

    python studies/plot_curves.py cifar10-hour            # -> docs/curves_cifar10-hour.png
    python studies/plot_curves.py tiny-imagenet variants

Reads `studies/results/<study>/*.json` (written by `run_study.py`, one per finished run): each evaluation's
`eval_accuracy` with its `train_minutes` and `epoch`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "studies"))

from results_table import loop_evaluations  # noqa: E402


def load_results(study: str, results_root: Path = REPO_ROOT / "studies" / "results") -> list[dict]:
    folder = Path(results_root) / study
    # Other JSON files may sit beside the runs' results (e.g. ship_checkpoint.py's pipeline check).
    results = [result for path in sorted(folder.glob("*.json")) if "evaluations" in (result := json.loads(path.read_text()))]
    if not results:
        raise SystemExit(f"No results in {folder}; run `python studies/run_study.py studies/<file>.yaml` first.")
    return results


def plot_study(study: str, output: Path, results_root: Path = REPO_ROOT / "studies" / "results") -> Path:
    results = load_results(study, results_root)
    figure, (by_time, by_epoch) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    # tab10 repeats after ten runs, which would give two runs of the variants study one colour; cycled past
    # twenty so that no run is ever left out of the plot.
    colors = itertools.cycle(plt.get_cmap("tab10" if len(results) <= 10 else "tab20").colors)
    for result, color in zip(results, colors):
        evaluations = loop_evaluations(result)
        if not evaluations:
            continue
        label = f"{result['name']} ({100 * result['final']['eval_accuracy']:.1f}%)"
        style = "-" if "plain" not in result["name"] else "--"
        accuracy = [100 * e["eval_accuracy"] for e in evaluations]
        line_style = {"linestyle": style, "marker": "o", "markersize": 3, "color": color, "label": label}
        by_time.plot([e["train_minutes"] for e in evaluations], accuracy, **line_style)
        by_epoch.plot([e["epoch"] for e in evaluations], accuracy, **line_style)
    by_time.set_xlabel("training minutes (2 CPU cores, evaluations included)")
    by_epoch.set_xlabel("epochs")
    by_time.set_ylabel("top-1 accuracy (%)")
    for axis in (by_time, by_epoch):
        axis.grid(alpha=0.3)
    # Beside the plots rather than on them: with a dozen runs a legend inside covers curves.
    by_epoch.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.suptitle(f"{study}: top-1 on the full evaluation split")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.stem + ".tmp.png")
    figure.savefig(temporary, dpi=110, bbox_inches="tight")
    plt.close(figure)
    os.replace(temporary, output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", help="Study names (folders of studies/results).")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "docs"))
    parser.add_argument("--results_root", default=str(REPO_ROOT / "studies" / "results"))
    args = parser.parse_args()
    for study in args.studies:
        print(plot_study(study, Path(args.output_dir) / f"curves_{study}.png", Path(args.results_root)))


if __name__ == "__main__":
    main()
