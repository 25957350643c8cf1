"""The reference speed that makes a study's time budget mean the same on every machine.

Machines of this kind differ by up to 2x, so "60 minutes" alone is not a budget. A budget is given in reference
minutes: minutes on the machine where the bare training step of the reference model (the 96-wide, 6-block DW-ViT
at 32/4, float32, batch 128, 2 threads) ran at `REFERENCE_IMAGES_PER_SECOND`. On a machine that runs it at `s`
images/s, R reference minutes are `R * REFERENCE_IMAGES_PER_SECOND / s` minutes.

    python studies/reference_speed.py        # this machine's reference speed and what 60 reference minutes are here
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

REFERENCE_OVERRIDES = "hidden_size=96,num_hidden_layers=6,num_attention_heads=3,intermediate_size=384"
# The bare step's speed on the machine the CIFAR-10 hour study ran on (benchmarks/bench_training_job.py, bare row).
REFERENCE_IMAGES_PER_SECOND = 205.0


def bare_images_per_second(overrides: str, batch_size: int = 128, warmup: int = 3, steps: int = 10) -> float:
    """Images/s of a bare AdamW training step (forward, soft-target loss, backward, clipping, update) on random
    32x32 images: the model's own speed, without data loading or the Trainer."""
    import torch
    import torch.nn.functional as F

    import dwvit
    from dwvit.training.arguments import parse_config_overrides

    torch.manual_seed(0)
    model = dwvit.create_model("vit-tiny-cifar", num_labels=10, **parse_config_overrides(overrides)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    pixel_values = torch.randn(batch_size, 3, 32, 32)
    soft_labels = torch.softmax(torch.randn(batch_size, 10), dim=-1)
    times = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        logits = model(pixel_values=pixel_values).logits
        loss = torch.sum(-soft_labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return batch_size / statistics.median(times[warmup:])


def measure_reference_speed(warmup: int = 3, steps: int = 10, threads: int = 2) -> dict:
    """This machine's reference speed, measured now with `threads` threads (restored afterwards)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        speed = bare_images_per_second(REFERENCE_OVERRIDES, 128, warmup, steps)
    finally:
        torch.set_num_threads(previous)
    return {
        "reference_images_per_second": round(speed, 1),
        "reference_images_per_second_of_the_budget": REFERENCE_IMAGES_PER_SECOND,
        "reference_model": REFERENCE_OVERRIDES,
        "reference_steps": steps,
        "reference_threads": threads,
    }


def minutes_here(reference_minutes: float, images_per_second_here: float) -> float:
    """Minutes on this machine that equal `reference_minutes` on the reference machine."""
    if images_per_second_here <= 0:
        raise ValueError(f"The reference speed must be positive; got {images_per_second_here} images/s.")
    return reference_minutes * REFERENCE_IMAGES_PER_SECOND / images_per_second_here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_minutes", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    measured = measure_reference_speed(steps=args.steps)
    speed = measured["reference_images_per_second"]
    print(f"reference speed here: {speed:.1f} images/s (reference machine: {REFERENCE_IMAGES_PER_SECOND:.0f})")
    print(f"{args.reference_minutes:g} reference minutes = {minutes_here(args.reference_minutes, speed):.1f} minutes here")


if __name__ == "__main__":
    main()
