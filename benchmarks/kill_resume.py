"""Kill a real training job at random moments, resume it each time, and check that nothing was lost.

Launches run_image_classification.py as a subprocess (a tiny DW-ViT on a real CIFAR-10 subset, a checkpoint every
few steps, the paper's random augmentation and stochastic depth), SIGKILLs it `--kills` times, and relaunches the
same command after each kill (the script resumes by itself from the newest complete checkpoint). Some kills land
at a random moment of the run (start-up included), others while a checkpoint is being written: the benchmark
watches the output folder for the staging folder `_tmp-checkpoint-N` and kills a few milliseconds after it
appears. A kill counts as "in save" when it leaves a staging folder written during that attempt: a checkpoint being
written (`_tmp-checkpoint-N`) or one being deleted by rotation (`_tmp-old-checkpoint-N`). After every kill it
checks the invariant that every visible `checkpoint-N` is complete (`dwvit.training.checkpointing.checkpoint_problems`). Finally the resumed job runs to its end and its weights are compared
with those of an uninterrupted run of the same command.

    python benchmarks/kill_resume.py                       # 20 kills; prints a table and a summary
    python benchmarks/kill_resume.py --kills 5 --keep      # keep the work folder for inspection
    python benchmarks/kill_resume.py --result out.json     # where the JSON result goes (written atomically)

Exit status 0 when the final weights equal the uninterrupted run's bit for bit and no visible checkpoint was ever
incomplete; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

from dwvit.training.checkpointing import checkpoint_problems, latest_complete_checkpoint, list_checkpoints  # noqa: E402

TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,drop_path_rate=0.1"
LOSS_LINE = re.compile(r"\{'loss'|\{\"loss\"|'loss':")


def job_command(output_dir: Path, data: Path, args) -> list[str]:
    return [
        sys.executable, str(REPO_ROOT / "run_image_classification.py"),
        "--model_name", "vit-tiny-cifar", "--config_overrides", TINY, "--output_dir", str(output_dir),
        "--dataset_name", str(data), "--max_train_samples", str(args.train_samples),
        "--per_device_train_batch_size", str(args.batch_size), "--num_train_epochs", str(args.epochs),
        "--save_strategy", "steps", "--save_steps", str(args.save_steps), "--save_total_limit", "2",
        "--eval_strategy", "no", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
        "--dataloader_pin_memory", "false", "--do_train", "--seed", str(args.seed),
    ]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONUNBUFFERED": "1"}


def steps_logged(log: Path) -> int:
    try:
        return sum(1 for line in log.read_text(errors="replace").splitlines() if LOSS_LINE.search(line))
    except FileNotFoundError:
        return 0


def staging_folders(output_dir: Path) -> list[str]:
    try:
        return sorted(name for name in os.listdir(output_dir) if name.startswith("_tmp-"))
    except FileNotFoundError:
        return []


def written_since(output_dir: Path, names: list[str], since: float) -> list[str]:
    """The staging folders among `names` with something in them written after `since` (a time.time())."""
    fresh = []
    for name in names:
        newest = 0.0
        for root, folders, files in os.walk(output_dir / name):
            for entry in [root, *(os.path.join(root, f) for f in files)]:
                try:
                    newest = max(newest, os.path.getmtime(entry))
                except OSError:
                    pass
        if newest >= since:
            fresh.append(name)
    return fresh


def run_to_end(command, log: Path, timeout: float) -> float:
    start = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=environment(),
                                cwd=REPO_ROOT, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"run failed (exit {result.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def kill_once(command, output_dir: Path, log: Path, mode: str, rng: random.Random, args) -> dict:
    """Launch the job, kill it as `mode` says, and report what happened."""
    resumed_from = latest_complete_checkpoint(output_dir) if output_dir.is_dir() else None
    start_step = int(resumed_from.rsplit("-", 1)[1]) if resumed_from else 0
    handle = open(log, "w")
    launched = time.time() - 0.01
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment(), cwd=REPO_ROOT)
    started = time.perf_counter()
    seen_staging: list[str] = []
    killed = False
    try:
        if mode == "random":
            # Any moment once training runs: a step, a log line, a save. (Kills during start-up, before the first
            # step, lose nothing and only cost time.)
            while process.poll() is None and not steps_logged(log) and time.perf_counter() - started < args.timeout_s:
                time.sleep(0.01)
            deadline = time.perf_counter() + rng.uniform(0.0, args.random_window_s)
            while process.poll() is None and time.perf_counter() < deadline:
                time.sleep(0.002)
        else:  # "during-save": as soon as a staging folder appears (then 0-15 ms more), while it is written
            delay = rng.uniform(0.0, 0.015)
            skip = rng.randrange(0, 2)  # sometimes let one save pass first
            previous = staging_folders(output_dir)  # leftovers of the last kill are not this run's saves
            while process.poll() is None and time.perf_counter() - started < args.timeout_s:
                current = staging_folders(output_dir)
                fresh = [name for name in current if name not in previous and not name.startswith("_tmp-old-")]
                previous = current
                if fresh:
                    if skip:
                        skip -= 1
                    else:
                        seen_staging = fresh
                        time.sleep(delay)
                        break
                time.sleep(0.0005)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed = True
        process.wait()
    finally:
        handle.close()
    after = staging_folders(output_dir)
    checkpoints = [path.name for path in list_checkpoints(output_dir)]
    incomplete = {}
    for path in list_checkpoints(output_dir):
        problems = checkpoint_problems(path)
        if problems:
            incomplete[path.name] = problems
    return {
        "mode": mode,
        "killed": killed,
        "exit_code": process.returncode,
        "seconds_alive": round(time.perf_counter() - started, 2),
        "resumed_from": Path(resumed_from).name if resumed_from else None,
        "step_at_kill": start_step + steps_logged(log),
        "staging_seen": seen_staging,
        "staging_left": after,
        "killed_during_save": bool(written_since(output_dir, after, launched)),
        "checkpoints_after": checkpoints,
        "visible_incomplete": incomplete,
    }


def write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def compare_weights(expected_path: Path, actual_path: Path) -> dict:
    from safetensors.torch import load_file

    expected, actual = load_file(expected_path), load_file(actual_path)
    if set(expected) != set(actual):
        return {"identical": False, "max_abs_diff": None, "tensors": len(expected), "reason": "different tensors"}
    differences = [float((actual[name].double() - expected[name].double()).abs().max()) for name in expected]
    identical = all(actual[name].equal(expected[name]) for name in expected)
    return {"identical": identical, "max_abs_diff": max(differences), "tensors": len(expected)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--during_save_fraction", type=float, default=0.4, help="Share of kills aimed at saves.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the job and of the kill schedule.")
    parser.add_argument("--train_samples", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--save_steps", type=int, default=3)
    parser.add_argument("--random_window_s", type=float, default=None,
                        help="Random kills fall within this many seconds of the first training step (default: a "
                        "twelfth of the training time, so that 20 kills fit in one run).")
    parser.add_argument("--timeout_s", type=float, default=600)
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--workdir", default=None, help="Work folder (default: a new temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder.")
    parser.add_argument("--result", default=str(REPO_ROOT / "benchmarks" / "results" / "kill_resume.json"))
    args = parser.parse_args(argv)

    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"{data} is missing: the benchmark trains on the real CIFAR-10 (../shared/data/cifar10).")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kill-resume-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    steps_total = -(-args.train_samples // args.batch_size) * args.epochs
    began = time.perf_counter()

    # The uninterrupted run: the reference, and the timing that places the random kills.
    reference = workdir / "reference"
    reference_s = run_to_end(job_command(reference, data, args), workdir / "reference.log", args.timeout_s)
    startup_s = None
    if args.random_window_s is None:
        probe_log = (workdir / "reference.log").read_text(errors="replace")
        train_s = None
        match = re.search(r"'train_runtime': '?([0-9.]+)", probe_log) or re.search(r"train_runtime\s*=\s*([0-9:.]+)", probe_log)
        if match:
            value = match.group(1)
            train_s = sum(float(part) * 60 ** i for i, part in enumerate(reversed(value.split(":"))))
        train_s = train_s or reference_s / 2
        startup_s = reference_s - train_s
        args.random_window_s = train_s / 12
    print(f"reference run: {steps_total} steps, {reference_s:.1f} s" + (f" ({startup_s:.1f} s before training)" if
          startup_s else "") + f"; random kills within {args.random_window_s:.2f} s of a run's first step")

    modes = ["during-save"] * round(args.kills * args.during_save_fraction)
    modes += ["random"] * (args.kills - len(modes))
    rng.shuffle(modes)
    resumed = workdir / "resumed"
    command = job_command(resumed, data, args)
    attempts = []
    for index, mode in enumerate(modes, 1):
        attempt = kill_once(command, resumed, workdir / f"attempt-{index:02d}.log", mode, rng, args)
        attempts.append(attempt)
        print(f"  kill {index:2d}/{len(modes)} {mode:<11} at step {attempt['step_at_kill']:>3} "
              f"(from {attempt['resumed_from'] or 'scratch'}): killed={attempt['killed']} "
              f"during_save={attempt['killed_during_save']} left={attempt['staging_left'] or '-'} "
              f"checkpoints={','.join(attempt['checkpoints_after']) or '-'}", flush=True)
        if not attempt["killed"]:
            print(f"    the job ended (exit {attempt['exit_code']}) before the kill: the run is too short for "
                  f"{args.kills} kills; see {workdir / f'attempt-{index:02d}.log'}")
            break

    final_from = latest_complete_checkpoint(resumed)
    final_s = run_to_end(command, workdir / "final.log", args.timeout_s)  # to the end (0 steps left is fine)
    state = json.loads((resumed / "trainer_state.json").read_text())
    comparison = compare_weights(reference / "model.safetensors", resumed / "model.safetensors")
    leftovers = staging_folders(resumed)
    violations = {f"kill {i}": a["visible_incomplete"] for i, a in enumerate(attempts, 1) if a["visible_incomplete"]}

    rows = [("#", "mode", "step", "from", "in save", "staging left", "checkpoints after")]
    for i, a in enumerate(attempts, 1):
        rows.append((str(i), a["mode"], str(a["step_at_kill"]), a["resumed_from"] or "scratch",
                     "yes" if a["killed_during_save"] else "no", ",".join(a["staging_left"]) or "-",
                     ",".join(a["checkpoints_after"]) or "-"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    kills = sum(a["killed"] for a in attempts)
    in_save = sum(a["killed_during_save"] for a in attempts)
    ok = comparison["identical"] and not violations and state["global_step"] == steps_total and not leftovers
    summary = {
        "kills": kills,
        "kills_during_a_save": in_save,
        "visible_incomplete_checkpoints": violations,
        "final_run_resumed_from": Path(final_from).name if final_from else None,
        "final_global_step": state["global_step"],
        "expected_global_step": steps_total,
        "final_weights_identical": comparison["identical"],
        "max_abs_diff": comparison["max_abs_diff"],
        "staging_folders_left_at_the_end": leftovers,
        "ok": ok,
    }
    print()
    print(f"kills: {kills} ({in_save} while a checkpoint was being written); visible incomplete checkpoints: "
          f"{len(violations)}; final step {state['global_step']}/{steps_total}; final weights identical to the "
          f"uninterrupted run: {comparison['identical']} (max |diff| {comparison['max_abs_diff']}, "
          f"{comparison['tensors']} tensors) -> {'OK' if ok else 'FAILED'}")

    payload = {
        "benchmark": "kill_resume",
        "command": command[1:],
        "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "result")},
        "reference_seconds": round(reference_s, 1),
        "final_run_seconds": round(final_s, 1),
        "total_seconds": round(time.perf_counter() - began, 1),
        "attempts": attempts,
        "summary": summary,
    }
    write_json_atomically(Path(args.result), payload)
    print(f"result: {args.result}")
    if args.keep or not ok:
        print(f"work folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
