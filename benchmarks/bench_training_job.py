#!/usr/bin/env python
"""How fast the training job runs compared with the bare training step of the same model, on real CIFAR-10.

    python benchmarks/bench_training_job.py                    # 2 threads, batch 128, small and ViT-Tiny, DW on/off
    python benchmarks/bench_training_job.py --models small --steps 30 --threads 2

For each model, in this one process and at the same batch size and thread count:
  (a) the bare step: forward, loss, backward, gradient clipping and AdamW on tensors already in memory;
  (b) the job: `run_image_classification.py`'s `main` on the full CIFAR-10 train split with the default recipe
      (RandomResizedCrop, flip, RandAugment, color jitter, random erasing, Mixup/CutMix, label smoothing),
      timed per optimizer step by a callback; steady state is the steps after `--warmup`.
The ratio job / bare is the share of the model's own speed that the job keeps. Startup is the time from the
call of `main` to the end of the first optimizer step (data, decoding cache, model, Trainer, first step), plus
the interpreter's import time measured at the start of this process. Bare steps are timed before and after the
job and their median is used, so a change of machine load during the job shows up as a spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

PROCESS_START = time.time()

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(REPO_ROOT, "studies"))

import run_image_classification as job  # noqa: E402
from bench_utils import format_table, machine_summary  # noqa: E402
from reference_speed import REFERENCE_OVERRIDES, bare_images_per_second  # noqa: E402

IMPORTS_DONE = time.time()

MODELS = {
    # The 96-wide, 6-block model and a ViT-Tiny-sized one, both at 32/4 (an 8x8 grid).
    "small": REFERENCE_OVERRIDES,
    "tiny": "hidden_size=192,num_hidden_layers=12,num_attention_heads=3,intermediate_size=768",
}


class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def job_run(dataset: str, overrides: str, batch_size: int, warmup: int, steps: int, extra: list[str]) -> dict:
    clock = StepClock()
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = [
            "--dataset_name", dataset, "--model_name", "vit-tiny-cifar", "--config_overrides", overrides,
            "--output_dir", output_dir, "--do_train", "--max_steps", str(warmup + steps),
            "--per_device_train_batch_size", str(batch_size), "--eval_strategy", "no", "--save_strategy", "no",
            "--logging_steps", "1000", "--report_to", "none", "--disable_tqdm", "true", "--auto_resume", "false",
            *extra,
        ]
        called = time.perf_counter()
        job.main(arguments, callbacks=[clock])
    steady = clock.times[warmup:]
    per_step = (steady[-1] - steady[0]) / (len(steady) - 1)
    return {"images_per_second": batch_size / per_step, "startup_s": clock.times[0] - called}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=os.path.join(REPO_ROOT, "..", "shared", "data", "cifar10"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shortcut", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--job-args", default="", help="Extra arguments for the job, e.g. '--dataloader_num_workers 1'.")
    parser.add_argument("--json", help="Also write the rows to this JSON file.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.disable(logging.WARNING)
    print(f"# {machine_summary(torch.device('cpu'))}; batch {args.batch_size}; {args.warmup} warm-up + "
          f"{args.steps} timed steps; interpreter start and imports {IMPORTS_DONE - psutil.Process().create_time():.1f} s")
    rows, records = [], []
    for name in args.models:
        for shortcut in args.shortcut:
            overrides = MODELS[name] + ("" if shortcut == "on" else ",use_dw_shortcut=false")
            before = bare_images_per_second(overrides, args.batch_size, args.warmup, args.steps)
            run = job_run(args.dataset, overrides, args.batch_size, args.warmup, args.steps, args.job_args.split())
            after = bare_images_per_second(overrides, args.batch_size, args.warmup, args.steps)
            bare = statistics.median([before, after])
            record = {
                "model": name, "shortcut": shortcut, "bare_images_per_second": bare,
                "bare_spread": [min(before, after), max(before, after)], **run,
                "ratio": run["images_per_second"] / bare,
            }
            records.append(record)
            rows.append([
                name, shortcut, f"{bare:.1f} ({min(before, after):.0f}-{max(before, after):.0f})",
                f"{run['images_per_second']:.1f}", f"{record['ratio']:.3f}", f"{run['startup_s']:.1f}",
            ])
            print(format_table(["model", "DW", "bare img/s (range)", "job img/s", "job/bare", "startup s"], rows[-1:]),
                  flush=True)
    print()
    print(format_table(["model", "DW", "bare img/s (range)", "job img/s", "job/bare", "startup s"], rows))
    if args.json:
        temporary = args.json + ".tmp"
        with open(temporary, "w") as handle:
            json.dump({"machine": machine_summary(torch.device("cpu")), "rows": records}, handle, indent=2)
        os.replace(temporary, args.json)


if __name__ == "__main__":
    main()
