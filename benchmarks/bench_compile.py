#!/usr/bin/env python
"""`torch.compile` vs eager for the DWViT training step on the CPU, measured in one process.

    python benchmarks/bench_compile.py                          # 2 threads, batch 128, small and tiny, DW on/off
    python benchmarks/bench_compile.py --variants eager compile force-layout-opt --rounds 10
    python benchmarks/bench_compile.py --shortcut-only --batch-sizes 64 128 --variants eager compile force-layout-opt
    python benchmarks/bench_compile.py --models tiny --shortcut on --profile    # + torch.profiler op tables
    python benchmarks/bench_compile.py --models tiny --shortcut on --variants eager --trainer   # the Trainer's path

The step is `bench_training_job.py`'s bare step: forward on tensors already in memory, soft-target
cross-entropy, backward, gradient clipping and AdamW. Every variant trains its own copy of the same initial
model. The first step compiles (forward on the call, backward on the first backward) and is reported as
"first step s", from a fresh inductor cache unless `--warm-cache`; after a short warm-up the variants run in
interleaved rounds of `--steps` steps each (A, B, C, then B, C, A, ...), so a background load hits them alike.
"vs eager" is the median over rounds of the per-round ratio of images/s, the figure that survives a shared
machine; images/s are medians over all timed steps; "page faults/step" counts minor faults (`getrusage`) during
the timed steps. By default glibc hands freed heap memory back to the OS, so multi-megabyte activations are
faulted in again page by page, differently for eager and compiled code and from run to run; `--keep-freed-memory`
stops that (`mallopt`), which isolates the kernels' own speed.

Variants (`--variants`): `eager`; `compile` (`torch.compile(model)`: inductor, default mode, what
`--torch_compile` does); `force-layout-opt` (`options={"force_layout_optimization": True}`, what
`dwvit.training.trainer.prepare_torch_compile` sets for the Trainer); `force-layout-opt-dynamic` (the same with
`dynamic=True`, the graph Dynamo switches to after a batch of another size); `max-autotune`
(`mode="max-autotune-no-cudagraphs"`); `max-autotune-forced` (its options plus the forced layout);
`cpp-wrapper`; `no-layout-opt` (`options={"layout_optimization": False}`).

`--shortcut-only` times `DepthwiseShortcut` plus `add_shortcut` alone (forward and backward on `(batch, 65, width)`
tokens), the part of the model where eager and compiled code differ the most. `--trainer` also runs
`transformers.Trainer` on an in-memory synthetic data set (same shapes, soft labels): eager, `torch_compile=True`
and `torch_compile=True` after `prepare_torch_compile`, in rotating order, timing optimizer steps with a callback;
the Trainer compiles the model itself (`torch.compile(model, backend=..., mode=...)` through accelerate) and
computes the loss inside the compiled forward. `--profile` prints torch.profiler tables of two steps per variant,
sorted by self CPU time, with each compiled C++ kernel named (`cpp.enable_kernel_profile`).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import logging
import os
import resource
import statistics
import sys
import tempfile
import time

if "--warm-cache" not in sys.argv and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    # A fresh cache directory, so that "first step s" is the cold compile time a user sees on a first run.
    import atexit
    import shutil

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_compile_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "src"))
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

from bench_utils import format_table, machine_summary

import dwvit

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
    # mode="max-autotune-no-cudagraphs" as options, which torch.compile cannot combine with `mode`.
    "max-autotune-forced": {"options": {
        "max_autotune": True, "coordinate_descent_tuning": True, "force_layout_optimization": True,
    }},
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


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def keep_freed_memory() -> None:
    """glibc: serve blocks up to 32 MiB from the heap and never trim it, so freed activations are reused without
    page faults (by default the heap top above the trim threshold goes back to the OS and is faulted in again)."""
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) and libc.mallopt(M_TRIM_THRESHOLD, 2**30)):
        raise RuntimeError("mallopt failed")


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def load_average() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def measure_cell(name, shortcut, batch_size, variants, rounds, steps, warmup, profile) -> list[dict]:
    # Every cell compiles afresh: Dynamo's cache for the shared forward code would otherwise fill up across cells.
    torch._dynamo.reset()
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
    faults = {variant: 0 for variant in variants}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        per_round = {}
        for variant in variants[shift:] + variants[:shift]:
            before = minor_faults()
            per_round[variant] = [timed(functions[variant]) for _ in range(steps)]
            faults[variant] += minor_faults() - before
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
            "faults_per_step": faults[variant] / (rounds * steps),
        })
    return rows


def shortcut_cell(width, batch_size, variants, rounds, steps) -> list[dict]:
    """The shortcut alone at 32/4 (an 8x8 grid plus a class token): `add_shortcut(block_output, shortcut(tokens))`,
    forward and backward, eager vs compiled; the part of the model where compilation differs the most."""
    from dwvit.models.dw_layers import DepthwiseShortcut, add_shortcut

    torch._dynamo.reset()
    torch.manual_seed(0)
    shortcut = DepthwiseShortcut(width).train()
    tokens = torch.randn(batch_size, 65, width, requires_grad=True)
    block_output = torch.randn(batch_size, 65, width, requires_grad=True)
    gradient = torch.randn(batch_size, 65, width)

    def forward(tokens, block_output):
        return add_shortcut(block_output, shortcut(tokens, 8, 8, 1), 1)

    def make(function):
        def step() -> None:
            function(tokens, block_output).backward(gradient)
            tokens.grad = block_output.grad = None
            shortcut.zero_grad(set_to_none=True)

        return step

    functions = {
        variant: make(forward if VARIANTS[variant] is None else torch.compile(forward, **VARIANTS[variant]))
        for variant in variants
    }
    first = {variant: timed(function) for variant, function in functions.items()}
    for function in functions.values():
        for _ in range(3):
            function()
    times = {variant: [] for variant in variants}
    round_ratios = {variant: [] for variant in variants}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        per_round = {variant: [] for variant in variants}
        for _ in range(steps):
            for variant in variants[shift:] + variants[:shift]:
                per_round[variant].append(timed(functions[variant]))
        for variant in variants:
            times[variant] += per_round[variant]
            round_ratios[variant].append(statistics.median(per_round["eager"]) / statistics.median(per_round[variant]))
    return [{
        "width": width, "batch": batch_size, "variant": variant, "ms": 1e3 * statistics.median(times[variant]),
        "ratio": statistics.median(round_ratios[variant]),
        "ratio_range": (min(round_ratios[variant]), max(round_ratios[variant])), "first_step_s": first[variant],
    } for variant in variants]


def shortcut_table(rows: list[dict]) -> str:
    return format_table(
        ["width", "batch", "variant", "ms fwd+bwd", "eager ms / this ms (range)", "first call s"],
        [[str(row["width"]), str(row["batch"]), row["variant"], f"{row['ms']:.2f}",
          f"{row['ratio']:.3f} ({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f})",
          f"{row['first_step_s']:.1f}"] for row in rows],
    )


def print_profile(title: str, step, row_limit: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):
            step()
    print(f"\n### Profile (2 steps): {title}\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit, max_name_column_width=60))
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=row_limit, max_name_column_width=45, max_shapes_column_width=70))


TRAINER_VARIANTS = {
    # name: (torch_compile, call dwvit.training.trainer.prepare_torch_compile first)
    "Trainer eager": (False, False),
    "Trainer compile": (True, False),
    "Trainer compile + prepare_torch_compile": (True, True),
}


def trainer_cells(name, shortcut, batch_size, rounds, steps, warmup) -> list[dict]:
    """Trainer jobs on one in-memory synthetic data set: eager, `torch_compile=True`, and `torch_compile=True` after
    `dwvit.training.trainer.prepare_torch_compile`, in rotating order; steady-state seconds per optimizer step."""
    import torch._inductor.config as inductor_config
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from dwvit.training.trainer import prepare_torch_compile

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
    variants = list(TRAINER_VARIANTS)
    models = {variant: copy.deepcopy(base) for variant in variants}
    per_step = {variant: [] for variant in variants}
    first_step = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for round_index in range(rounds):
            shift = round_index % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                compiled, prepare = TRAINER_VARIANTS[variant]
                clock = StepClock()
                arguments = TrainingArguments(
                    output_dir=output_dir, max_steps=total, per_device_train_batch_size=batch_size,
                    learning_rate=5e-4, weight_decay=0.05, max_grad_norm=5.0, lr_scheduler_type="constant",
                    eval_strategy="no", save_strategy="no", logging_steps=10_000, report_to="none",
                    disable_tqdm=True, dataloader_drop_last=True, torch_compile=compiled, use_cpu=True, seed=0,
                )
                # Dynamo guards on neither the module's identity nor the inductor config: without a reset, a compiled
                # job would reuse the graphs compiled for the previous one.
                torch._dynamo.reset()
                saved = inductor_config.force_layout_optimization
                if prepare:
                    prepare_torch_compile(arguments)
                try:
                    trainer = Trainer(model=models[variant], args=arguments, train_dataset=dataset, callbacks=[clock])
                    started = time.perf_counter()
                    trainer.train()
                finally:
                    inductor_config.force_layout_optimization = saved
                first_step.setdefault(variant, clock.times[0] - started)
                steady = clock.times[warmup:]
                per_step[variant].append((steady[-1] - steady[0]) / (len(steady) - 1))
    rows = []
    for variant in variants:
        ratios = [eager / other for eager, other in zip(per_step["Trainer eager"], per_step[variant])]
        rows.append({
            "model": name, "shortcut": "on" if shortcut else "off", "batch": batch_size, "variant": variant,
            "images_per_second": batch_size / statistics.median(per_step[variant]),
            "ratio": statistics.median(ratios), "ratio_range": (min(ratios), max(ratios)),
            "first_step_s": first_step[variant],
        })
    return rows


def table(rows: list[dict]) -> str:
    return format_table(
        ["model", "DW", "batch", "variant", "img/s", "vs eager (range)", "first step s", "page faults/step"],
        [[row["model"], row["shortcut"], str(row["batch"]), row["variant"], f"{row['images_per_second']:.1f}",
          f"{row['ratio']:.3f} ({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f})",
          f"{row['first_step_s']:.1f}", f"{row['faults_per_step']:.0f}" if "faults_per_step" in row else "-"]
         for row in rows],
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
    parser.add_argument("--profile", action="store_true",
                        help="Print torch.profiler tables (2 steps per variant); compiled kernels are named in them.")
    parser.add_argument("--trainer", action="store_true", help="Also time the Trainer's --torch_compile path.")
    parser.add_argument("--shortcut-only", action="store_true",
                        help="Time the DepthwiseShortcut module alone (forward + backward) at the models' widths.")
    parser.add_argument("--trainer-rounds", type=int, default=3)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="mallopt: glibc keeps freed activations instead of returning them to the OS.")
    parser.add_argument("--warm-cache", action="store_true",
                        help="Use inductor's usual cache directory (compile times then read from it when warm).")
    args = parser.parse_args()
    if "eager" not in args.variants:
        args.variants.insert(0, "eager")
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.profile:
        # Each inductor C++ kernel then shows up in the profile under its own name (graph_N_cpp_fused_...).
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    logging.disable(logging.WARNING)
    print(f"# {machine_summary(torch.device('cpu'))}; {args.rounds} rounds x {args.steps} steps per variant"
          f"{'; freed memory kept (mallopt)' if args.keep_freed_memory else ''}")
    if args.shortcut_only:
        rows = []
        for width in sorted({MODELS[name]["hidden_size"] for name in args.models}):
            for batch_size in args.batch_sizes:
                rows += shortcut_cell(width, batch_size, args.variants, args.rounds, args.steps * 5)
                last = shortcut_table(rows[-len(args.variants):])
                print(last + f"\n(load average now {load_average()})\n", flush=True)
        print(f"# load average at the end: {load_average()}")
        print(shortcut_table(rows))
        return
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
