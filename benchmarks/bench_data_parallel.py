#!/usr/bin/env python
"""Data parallelism and bf16 on this machine's CPUs: the training job's images/s in each layout, and the bare step.

    python benchmarks/bench_data_parallel.py                      # 96-wide 6-block DW-ViT at 32/4, batch 128
    python benchmarks/bench_data_parallel.py --steps 8 --rounds 4 # shorter

(a) The bare training step (forward, loss, backward, AdamW on tensors in memory) in float32 and in bf16 autocast,
    in this process with 2 threads, in interleaved rounds (float32, bf16, float32, ...), so a background load
    slows both alike and their ratio stays meaningful.
(b) The job, `run_image_classification.py` on real CIFAR-10 with the default recipe (augmentation included), for
    the same global batch: 1 process x 2 threads, 2 processes x 1 thread (torchrun, gloo, DDP), and 1 process x
    2 threads in bf16. Images/s is the steady state: the steps after `--warmup`, timed from the job's own
    per-step stamps (`train_minutes` in the logged history). Scaling = 2-process images/s / 1-process images/s.
Writes benchmarks/results/data_parallel.json (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

OVERRIDES = "hidden_size=96,num_hidden_layers=6,num_attention_heads=3,intermediate_size=384"


def bare_steps(batch: int, rounds: int, steps_per_round: int, threads: int) -> dict:
    import torch

    import dwvit

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from transformers import AutoModelForImageClassification

    from dwvit.training.arguments import parse_config_overrides

    config = dwvit.named_config("vit-tiny-cifar", num_labels=10, **parse_config_overrides(OVERRIDES))

    model = AutoModelForImageClassification.from_config(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values=images, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for bf16 in (False, True):  # warm-up: allocator, oneDNN primitive caches
        step(bf16)
    times = {"float32": [], "bf16": []}
    for round_index in range(rounds):
        order = ("float32", "bf16") if round_index % 2 == 0 else ("bf16", "float32")
        for name in order:
            times[name] += [step(name == "bf16") for _ in range(steps_per_round)]
        print(f"  round {round_index + 1}/{rounds}: float32 {times['float32'][-1]:.2f} s, bf16 {times['bf16'][-1]:.2f} s",
              flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "threads": threads, "batch": batch, "rounds": rounds, "steps_per_round": steps_per_round,
        "float32_ms": 1000 * medians["float32"], "bf16_ms": 1000 * medians["bf16"],
        "bf16_over_float32_time": medians["bf16"] / medians["float32"],
    }


def job_images_per_second(processes: int, threads: int, precision: str, args, work: Path) -> dict:
    out = work / f"job-{processes}x{threads}-{precision}"
    per_device = args.batch // processes
    job = [
        str(REPO_ROOT / "run_image_classification.py"), "--model_name", "vit-tiny-cifar",
        "--config_overrides", OVERRIDES, "--output_dir", str(out), "--dataset_name", str(args.data),
        "--max_train_samples", str(args.batch * (args.steps + 1)), "--per_device_train_batch_size", str(per_device),
        "--max_steps", str(args.steps), "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "1",
        "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--do_train",
        "--mixed_precision", precision,
    ]
    if processes == 1:
        command = [sys.executable, *job]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(port), *job]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    stamps = [entry["train_minutes"] for entry in history if "loss" in entry and "train_minutes" in entry]
    if len(stamps) <= args.warmup + 1:
        raise RuntimeError(f"only {len(stamps)} step stamps; run more --steps than --warmup + 1")
    seconds = (stamps[-1] - stamps[args.warmup]) * 60.0 / (len(stamps) - 1 - args.warmup)
    run_info = json.loads((out / "run_info.json").read_text())
    return {"processes": processes, "threads": threads, "precision": precision, "world_size": run_info["world_size"],
            "step_s": seconds, "images_per_s": args.batch / seconds, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="global batch (per process: batch / processes)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per job run")
    parser.add_argument("--warmup", type=int, default=2, help="job steps left out of the steady state")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of the bare-step comparison")
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--job-precisions", default="no,bf16",
                        help="comma-separated --mixed_precision values for the 1 process x 2 threads job runs")
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per job run")
    parser.add_argument("--result", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "data_parallel.json")
    args = parser.parse_args()
    if args.batch % 2:
        raise SystemExit(f"--batch must be even (split over 2 processes); got {args.batch}")
    if not args.data.is_dir():
        raise SystemExit(f"--data {args.data} is not a folder (the CIFAR-10 dataset in the Hub's layout)")

    with open("/proc/loadavg") as handle:
        load_before = " ".join(handle.read().split()[:3])
    bare = bare_steps(args.batch, args.rounds, args.steps_per_round, threads=2)
    with tempfile.TemporaryDirectory(prefix="bench-dp-") as work:
        precisions = [value for value in args.job_precisions.split(",") if value and value != "no"]
        jobs = []
        for processes, threads, precision in ((1, 2, "no"), (2, 1, "no"), *((1, 2, value) for value in precisions)):
            jobs.append(job_images_per_second(processes, threads, precision, args, Path(work)))
            print(f"  job {processes} x {threads} {precision}: {jobs[-1]['images_per_s']:.1f} images/s", flush=True)
    with open("/proc/loadavg") as handle:
        load_after = " ".join(handle.read().split()[:3])
    single, double = jobs[:2]
    result = {"model": f"vit-tiny-cifar with {OVERRIDES}", "cpu_cores": os.cpu_count(), "bare_step": bare,
              "jobs": jobs, "scaling_2x1_over_1x2": double["images_per_s"] / single["images_per_s"],
              "load_average_before": load_before, "load_average_after": load_after,
              "command": " ".join(["python", "benchmarks/bench_data_parallel.py", *sys.argv[1:]])}
    args.result.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.result.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=2))
    os.replace(temporary, args.result)

    print(f"bare step, batch {args.batch}, 2 threads, median of {args.rounds} interleaved rounds x "
          f"{args.steps_per_round}: float32 {bare['float32_ms']:.0f} ms, bf16 autocast {bare['bf16_ms']:.0f} ms "
          f"(bf16 / float32 time {bare['bf16_over_float32_time']:.2f})")
    print()
    print("| layout | precision | world size | step (s) | images/s | vs 1 x 2 float32 |")
    print("|---|---|---|---|---|---|")
    for job in jobs:
        print(f"| {job['processes']} process{'es' if job['processes'] > 1 else ''} x {job['threads']} thread"
              f"{'s' if job['threads'] > 1 else ''} | {'float32' if job['precision'] == 'no' else job['precision']} | "
              f"{job['world_size']} | {job['step_s']:.2f} | {job['images_per_s']:.1f} | "
              f"{job['images_per_s'] / single['images_per_s']:.2f} |")
    print(f"\nload average before {load_before}, after {load_after}")


if __name__ == "__main__":
    main()
