"""The README's results tables: rows in the study's order with the paper's numbers, unfinished runs marked, the
minutes of the loop's last evaluation (not the script's repeated one), and the spread of repeated seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "studies"))

import results_table  # noqa: E402


def write_result(folder: Path, name: str, accuracy: float, evaluations: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({
        "name": name, "num_parameters": 1017738, "evaluations": evaluations,
        "final": {"epoch": 1.6, "eval_accuracy": accuracy, "eval_top5_accuracy": 0.95, "train_minutes": 10.93},
    }))


def write_study(tmp_path: Path, runs: list[dict], **fields) -> tuple[Path, Path]:
    """A study file named "mini" and the folder its results go in."""
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({"study": "mini", **fields, "runs": runs}))
    return study_file, tmp_path / "results" / "mini"


def test_table_rows_minutes_and_seed_spread(tmp_path):
    study_file, folder = write_study(tmp_path, [
        {"name": "k3", "description": "Kernel 3", "paper": "96.41 (ViT-Tiny + DW)"},
        {"name": "k3-seed1", "description": "Kernel 3, seed 1", "seed_of": "k3"},
        {"name": "k3-seed2", "description": "Kernel 3, seed 2", "seed_of": "k3"},
        {"name": "k5", "description": "Kernel 5", "paper": "96.26"},
    ])
    # The loop evaluated at steps 391 and 626; the script then evaluated step 626 again, later.
    write_result(folder, "k3", 0.5602, [
        {"step": 391, "epoch": 1.0, "train_minutes": 6.34, "eval_accuracy": 0.509},
        {"step": 626, "epoch": 1.6, "train_minutes": 10.43, "eval_accuracy": 0.5602},
        {"step": 626, "epoch": 1.6, "train_minutes": 10.93, "eval_accuracy": 0.5602},
    ])
    write_result(folder, "k3-seed1", 0.5480, [{"step": 626, "epoch": 1.6, "train_minutes": 10.2, "eval_accuracy": 0.548}])
    write_result(folder, "k3-seed2", 0.5700, [{"step": 626, "epoch": 1.6, "train_minutes": 10.3, "eval_accuracy": 0.57}])

    table = results_table.markdown_table(study_file, tmp_path / "results").splitlines()
    rows = [line for line in table if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows] == ["`k3`", "`k3-seed1`", "`k3-seed2`", "`k5`"]
    k3 = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    assert k3 == ["`k3`", "Kernel 3", "1.6", "10.4", "1,017,738", "56.02 %", "95.00 %", "96.41 (ViT-Tiny + DW)"]
    assert "not run yet" in rows[3] and "96.26" in rows[3]
    # (56.02 + 54.80 + 57.00) / 3 = 55.94; range 54.80-57.00, 2.20 points.
    assert table[-1] == "`k3` over 3 seeds: mean 55.94 %, range 54.80-57.00 % (spread 2.20 points)."


def test_the_studies_name_the_papers_numbers():
    # Every run of the committed studies either carries the paper's number or repeats another run's seed.
    for study_file in sorted((REPO_ROOT / "studies").glob("*.yaml")):
        study = yaml.safe_load(study_file.read_text())
        names = {run["name"] for run in study["runs"]}
        for run in study["runs"]:
            assert run.get("paper") or run.get("seed_of") in names, (study_file.name, run["name"])


def test_compare_at_epoch_column_and_seed_spread(tmp_path):
    study_file, folder = write_study(tmp_path, [
        {"name": "k3", "description": "Kernel 3", "paper": "96.41"},
        {"name": "k3-seed1", "description": "Kernel 3, seed 1", "seed_of": "k3"},
        {"name": "plain", "description": "No shortcut", "paper": "94.01"},
        {"name": "k5", "description": "Kernel 5", "paper": "96.26"},
    ], compare_at_epoch=1)
    write_result(folder, "k3", 0.5602, [
        {"step": 391, "epoch": 1.0, "train_minutes": 6.34, "eval_accuracy": 0.509},
        {"step": 626, "epoch": 1.6, "train_minutes": 10.43, "eval_accuracy": 0.5602},
    ])
    write_result(folder, "k3-seed1", 0.5480, [
        {"step": 391, "epoch": 1.0, "train_minutes": 6.1, "eval_accuracy": 0.523},
        {"step": 587, "epoch": 1.5, "train_minutes": 9.0, "eval_accuracy": 0.548},
    ])
    # Stopped before its first epoch ended: no evaluation at epoch 1 to compare.
    write_result(folder, "plain", 0.30, [{"step": 300, "epoch": 0.77, "train_minutes": 9.9, "eval_accuracy": 0.30}])

    table = results_table.markdown_table(study_file, tmp_path / "results").splitlines()
    assert table[2].split("|")[8].strip() == "top-1 at epoch 1"
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[1:-1]]
            for line in table if line.startswith("| `")}
    assert rows["`k3`"][7:] == ["50.90 %", "96.41"]
    assert rows["`k3-seed1`"][7] == "52.30 %"
    assert rows["`plain`"][5:] == ["30.00 %", "95.00 %", "", "94.01"]
    assert rows["`k5`"][5:] == ["not run yet", "", "", "96.26"]
    # At the end: (56.02 + 54.80) / 2 = 55.41; at epoch 1: (50.90 + 52.30) / 2 = 51.60, range 1.40 points.
    assert table[-1] == ("`k3` over 2 seeds: mean 55.41 %, range 54.80-56.02 % (spread 1.22 points); "
                         "at epoch 1 over 2 seeds: mean 51.60 %, range 50.90-52.30 % (spread 1.40 points).")
