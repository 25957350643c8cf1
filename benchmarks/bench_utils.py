"""Shared pieces of the benchmark scripts: interleaved timing, training steps, peak memory and FLOP counts.

Every figure compares models measured in the same process, with repetitions interleaved (model A, B, C, then
A, B, C again, in a rotating order) so that a background load slowing the machine down hits every model alike
and the *ratios* stay meaningful even when the absolute numbers do not.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def device_and_autocast(
    device_name: str | None = None, bf16: bool = False
) -> tuple[torch.device, Callable[[], contextlib.AbstractContextManager]]:
    """CUDA with bf16 autocast when present (or asked for), else the CPU in float32 (in bf16 autocast with `bf16`)."""
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if bf16 or device.type == "cuda":
        return device, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return device, contextlib.nullcontext


def precision_summary(device: torch.device, bf16: bool = False) -> str:
    """What `device_and_autocast(device, bf16)` computes in."""
    return "bf16 autocast" if bf16 or device.type == "cuda" else "float32"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_summary(device: torch.device) -> str:
    load = ""
    if os.path.exists("/proc/loadavg"):
        with open("/proc/loadavg") as handle:
            load = " ".join(handle.read().split()[:3])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, {name}, load average {load or 'n/a'}"


@dataclass
class Candidate:
    """One model under test: how to build it and how its forward returns logits."""

    name: str
    build: Callable[[], torch.nn.Module]
    image_size: int
    num_labels: int
    # "hf": forward(pixel_values=...) returns an output with .logits; "timm": forward(x) returns logits.
    kind: str = "hf"
    group: str = ""
    prepare: Callable[[torch.nn.Module], None] | None = None
    model: torch.nn.Module | None = field(default=None, repr=False)


def logits_of(candidate: Candidate, model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    if candidate.kind == "timm":
        return model(pixel_values)
    return model(pixel_values=pixel_values).logits


def make_inference_fn(candidate, model, pixel_values, autocast, device):
    def run() -> None:
        with torch.inference_mode(), autocast():
            logits_of(candidate, model, pixel_values)
        synchronize(device)

    return run


def make_train_step_fn(candidate, model, pixel_values, labels, optimizer, autocast, device):
    """A full training step: forward, cross-entropy, backward, AdamW step. The loss is computed the same way
    (outside the model) for every candidate so that no library's loss code is timed against another's."""

    def run() -> None:
        with autocast():
            loss = F.cross_entropy(logits_of(candidate, model, pixel_values).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)

    return run


def time_interleaved(functions: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Call every function `warmup` times, then `repeats` rounds of one call each in a rotating order."""
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_train_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated by one training step above what was live before it.

    On CUDA this is `torch.cuda.max_memory_allocated`. The CPU allocator keeps no peak counter, so on the CPU
    the step runs under `torch.profiler` with `profile_memory=True`, which records every allocation (+bytes) and
    free (-bytes) against the op that made it; the running sum over ops in time order is the live-tensor curve,
    and its maximum is the peak (activations, gradients and the optimizer's update) at op granularity.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Each allocation or free is counted once, in the innermost op that made it (`self_cpu_memory_usage`);
    # frees outside any op appear as "[memory]" events.
    events = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in prof.events()
        if event.self_cpu_memory_usage
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def forward_flops(candidate: Candidate, model: torch.nn.Module, pixel_values: torch.Tensor) -> int:
    """FLOPs of one forward pass per image, counted by `torch.utils.flop_counter.FlopCounterMode` (2 per MAC)."""
    counter = FlopCounterMode(display=False)
    # Grad mode stays on: FlopCounterMode's module tracker hooks outputs' autograd nodes (the graph is discarded).
    with counter:
        logits_of(candidate, model, pixel_values[:1])
    return counter.get_total_flops()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
