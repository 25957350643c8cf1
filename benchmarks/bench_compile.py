#!/usr/bin/env python
"""`torch.compile` vs eager for the DWViT training step on the CPU, measured in one process.

    python benchmarks/bench_compile.py                                  # 2 threads, batch 128, small and tiny, DW on/off
    python benchmarks/bench_compile.py --models small --batch-sizes 64 128 --variants eager compile max-autotune
    python benchmarks/bench_compile.py --models tiny --shortcut on --profile    # + torch.profiler op tables
    python benchmarks/bench_compile.py --models small --trainer                 # + the Trainer's --torch_compile path

The step is `bench_training_job.py`'s bare step: forward on tensors already in memory, soft-target
cross-entropy, backward, gradient clipping and AdamW. Every variant trains its own copy of the same initial
model. Compilation happens in the warm-up (the first step compiles forward and backward; its time is reported
as "compile s"), then the variants run in interleaved rounds of `--steps` steps each (A, B, C, then B, C, A, ...),
so a background load hits them alike. "vs eager" is the median over rounds of the per-round ratio of
images/s, the figure that survives a shared machine; the absolute images/s are medians over all timed steps.

Variants (`--variants`): `eager`; `compile` (`torch.compile(model)`: inductor, default mode, what
`--torch_compile` does); `max-autotune` (`mode="max-autotune-no-cudagraphs"`); `cpp-wrapper`
(`options={"cpp_wrapper": True}`); `no-layout-opt` (`options={"layout_optimization": False}`).

`--trainer` also runs `transformers.Trainer` on an in-memory synthetic data set (same shapes, soft labels) with
and without `torch_compile=True`, alternating eager and compiled jobs, and times each optimizer step with a
callback: the Trainer's path compiles the model itself (`torch.compile(model, backend=..., mode=...)` through
accelerate) and computes the loss inside the compiled forward.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "src"))
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import dwvit  # noqa: E402
from bench_utils import format_table, machine_summary  # noqa: E402

MODELS = {
    # The 96-wide, 6-block model and a ViT-Tiny-sized one (192 wide, 12 blocks), both at 32/4 (8x8 grid).
    "small": {"hidden_size": 96, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 384},
    "tiny": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},
}

VARIANTS = {
    "eager": None,
    "compile": {},
    "max-autotune": {"mode": "max-autotune-no-cudagraphs"},
    "cpp-wrapper": {"options": {"cpp_wrapper": True}},
    "no-layout-opt": {"options": {"layout_optimization": False}},
    "force-layout-opt": {"options": {"force_layout_optimization": True}},
    "force-layout-opt-dynamic": {"dynamic": True, "options": {"force_layout_optimization": True}},
}

NUM_LABELS = 10


def build_model(name: str, shortcut: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return dwvit.create_model(
        "vit-tiny-cifar", num_labels=NUM_LABELS, use_dw_shortcut=shortcut, **MODELS[name]
    ).train()


def make_step(model, optimizer, pixel_values, soft_labels):
    """One bare training step, as in bench_training_job.py's `bare_images_per_second`."""
    parameters = [parameter for parameter in model.parameters()]

    def step() -> None:
        logits = model(pixel_values=pixel_values).logits
        loss = torch.sum(-soft_labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def load_average() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def measure_cell(name, shortcut, batch_size, variants, rounds, steps, warmup, profile) -> list[dict]:
    base = build_model(name, shortcut)
    pixel_values = torch.randn(batch_size, 3, 32, 32)
    soft_labels = torch.softmax(torch.randn(batch_size, NUM_LABELS), dim=-1)
    functions, compile_seconds = {}, {}
    for variant in variants:
        model = copy.deepcopy(base)
        runnable = model if VARIANTS[variant] is None else torch.compile(model, **VARIANTS[variant])
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
        functions[variant] = make_step(runnable, optimizer, pixel_values, soft_labels)
        # The first step compiles (forward on the call, backward on the first backward); later ones warm up.
        compile_seconds[variant] = timed(functions[variant])
        for _ in range(warmup):
            functions[variant]()
    times = {variant: [] for variant in variants}
    round_ratios = {variant: [] for variant in variants}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        per_round = {}
        for variant in variants[shift:] + variants[:shift]:
            per_round[variant] = [timed(functions[variant]) for _ in range(steps)]
            times[variant] += per_round[variant]
        for variant in variants:
            round_ratios[variant].append(statistics.median(per_round["eager"]) / statistics.median(per_round[variant]))
    if profile:
        for variant in variants:
            print_profile(f"{name} DW {'on' if shortcut else 'off'} batch {batch_size}: {variant}", functions[variant])
    rows = []
    for variant in variants:
        rows.append({
            "model": name, "shortcut": "on" if shortcut else "off", "batch": batch_size, "variant": variant,
            "images_per_second": batch_size / statistics.median(times[variant]),
            "ratio": statistics.median(round_ratios[variant]),
            "ratio_range": (min(round_ratios[variant]), max(round_ratios[variant])),
            "first_step_s": compile_seconds[variant],
        })
    return rows


def print_profile(title: str, step, row_limit: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):
            step()
    print(f"\n### Profile (2 steps): {title}\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit, max_name_column_width=60))
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=row_limit, max_name_column_width=45, max_shapes_column_width=70))


def trainer_cells(name, shortcut, batch_size, rounds, steps, warmup) -> list[dict]:
    """Eager and `torch_compile=True` Trainer jobs, alternating, on one in-memory synthetic data set."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    class Synthetic(torch.utils.data.Dataset):
        def __init__(self, size):
            generator = torch.Generator().manual_seed(0)
            self.images = torch.randn(size, 3, 32, 32, generator=generator)
            self.labels = torch.softmax(torch.randn(size, NUM_LABELS, generator=generator), dim=-1)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            return {"pixel_values": self.images[index], "labels": self.labels[index]}

    total = warmup + steps
    dataset = Synthetic(batch_size * total)
    base = build_model(name, shortcut)
    models = {"eager": copy.deepcopy(base), "compile": copy.deepcopy(base)}
    per_step = {"eager": [], "compile": []}
    first_step = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for round_index in range(rounds):
            order = ["eager", "compile"] if round_index % 2 == 0 else ["compile", "eager"]
            for variant in order:
                clock = StepClock()
                arguments = TrainingArguments(
                    output_dir=output_dir, max_steps=total, per_device_train_batch_size=batch_size,
                    learning_rate=5e-4, weight_decay=0.05, max_grad_norm=5.0, lr_scheduler_type="constant",
                    eval_strategy="no", save_strategy="no", logging_steps=10_000, report_to="none",
                    disable_tqdm=True, dataloader_drop_last=True, torch_compile=variant == "compile",
                    use_cpu=True, seed=0,
                )
                trainer = Trainer(model=models[variant], args=arguments, train_dataset=dataset,
                                  callbacks=[clock])
                started = time.perf_counter()
                trainer.train()
                first_step.setdefault(variant, clock.times[0] - started)
                steady = clock.times[warmup:]
                per_step[variant].append((steady[-1] - steady[0]) / (len(steady) - 1))
    ratios = [eager / compiled for eager, compiled in zip(per_step["eager"], per_step["compile"])]
    return [{
        "model": name, "shortcut": "on" if shortcut else "off", "batch": batch_size, "variant": f"Trainer {variant}",
        "images_per_second": batch_size / statistics.median(per_step[variant]),
        "ratio": 1.0 if variant == "eager" else statistics.median(ratios),
        "ratio_range": (1.0, 1.0) if variant == "eager" else (min(ratios), max(ratios)),
        "first_step_s": first_step[variant],
    } for variant in ("eager", "compile")]


def table(rows: list[dict]) -> str:
    return format_table(
        ["model", "DW", "batch", "variant", "img/s", "vs eager (range)", "first step s"],
        [[row["model"], row["shortcut"], str(row["batch"]), row["variant"], f"{row['images_per_second']:.1f}",
          f"{row['ratio']:.3f} ({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f})",
          f"{row['first_step_s']:.1f}"] for row in rows],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--shortcut", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128])
    parser.add_argument("--variants", nargs="+", default=["eager", "compile"], choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per variant and round.")
    parser.add_argument("--warmup", type=int, default=2, help="Steps after the compiling one, before timing.")
    parser.add_argument("--profile", action="store_true", help="Print torch.profiler tables (2 steps per variant).")
    parser.add_argument("--trainer", action="store_true", help="Also time the Trainer's --torch_compile path.")
    parser.add_argument("--trainer-rounds", type=int, default=2)
    args = parser.parse_args()
    if "eager" not in args.variants:
        args.variants.insert(0, "eager")
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    print(f"# {machine_summary(torch.device('cpu'))}; {args.rounds} rounds x {args.steps} steps per variant")
    rows = []
    for name in args.models:
        for shortcut in args.shortcut:
            for batch_size in args.batch_sizes:
                cell = measure_cell(name, shortcut == "on", batch_size, args.variants, args.rounds, args.steps,
                                    args.warmup, args.profile)
                if args.trainer:
                    cell += trainer_cells(name, shortcut == "on", batch_size, args.trainer_rounds, 8, 4)
                rows += cell
                print(table(cell) + f"\n(load average now {load_average()})\n", flush=True)
    print(f"# load average at the end: {load_average()}")
    print(table(rows))


if __name__ == "__main__":
    main()
