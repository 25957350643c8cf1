"""DWViT-Tiny (shortcut on, on and fused, off) against `transformers`' ViTForImageClassification of the same size.

One process, repetitions interleaved across the models, inference and a full training step (forward,
cross-entropy, backward, AdamW step), at 224/16 and at 32/4, plus the peak memory of a training step. Ratios are
against `transformers`' ViT and against the same DWViT with the shortcut off (what the shortcut costs).

    python benchmarks/bench_vs_transformers.py            # the table
    python benchmarks/bench_vs_transformers.py --quick    # a smoke run
    python benchmarks/bench_vs_transformers.py --profile  # plus a torch.profiler op table per model
    python benchmarks/bench_vs_transformers.py --bf16     # under bf16 autocast (on the CPU too)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import (  # noqa: E402
    device_and_autocast,
    format_table,
    machine_summary,
    make_inference_fn,
    make_train_step_fn,
    median,
    peak_train_memory,
    precision_summary,
    time_interleaved,
)

from dwvit import DWViTForImageClassification, named_config  # noqa: E402

TINY = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)


def build_models(image_size: int, patch_size: int, num_labels: int) -> dict[str, torch.nn.Module]:
    hf_config = ViTConfig(image_size=image_size, patch_size=patch_size, num_labels=num_labels, **TINY)
    hf_config._attn_implementation = "sdpa"
    name = "vit-tiny" if image_size == 224 else "vit-tiny-cifar"
    return {
        "transformers ViT": ViTForImageClassification(hf_config),
        "DWViT shortcut off": DWViTForImageClassification(
            named_config(name, image_size=image_size, patch_size=patch_size, num_labels=num_labels, use_dw_shortcut=False)
        ),
        "DWViT shortcut on": DWViTForImageClassification(
            named_config(name, image_size=image_size, patch_size=patch_size, num_labels=num_labels)
        ),
    }


FUSED = "DWViT shortcut on, fused"


def ratio_spread(times: list[float], baseline: list[float]) -> str:
    """Interquartile range of the per-round ratios: a round runs every model once, back to back, so its ratio
    shares the machine's state of the moment (background load, the heap left by the model before)."""
    ratios = sorted(time / base for time, base in zip(times, baseline))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return f"{quartiles[0]:.2f}-{quartiles[2]:.2f}"


def profile_models(models, functions, title: str, rows: int) -> None:
    for name, function in functions.items():
        function()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            function()
        print(f"\n### profile: {name}, {title}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batches and few repetitions (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds per measurement")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size at 224/16 (32/4 uses 4x)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler op table per model")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU too (CUDA always uses it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 15)
    batch_224 = args.batch_size or (4 if args.quick else 16)
    device, autocast = device_and_autocast(args.device, args.bf16)
    print(f"{machine_summary(device)}, {precision_summary(device, args.bf16)}")
    print(
        f"interleaved rounds: {repeats}; median seconds per call; ratio = median time / median transformers ViT time; "
        "IQR = interquartile range of the per-round ratios; 'vs off' = the same against DWViT with the shortcut off "
        "(the shortcut's cost); memory = peak of one training step\n"
    )

    headers = [
        "setting",
        "model",
        "inference ms/batch",
        "inference ratio (IQR)",
        "inference vs off (IQR)",
        "train step ms/batch",
        "train ratio (IQR)",
        "train vs off (IQR)",
        "peak train MB",
        "memory vs off",
    ]
    rows = []
    for image_size, patch_size, batch_size, num_labels in ((224, 16, batch_224, 1000), (32, 4, 4 * batch_224, 10)):
        torch.manual_seed(0)
        models = {name: model.to(device) for name, model in build_models(image_size, patch_size, num_labels).items()}
        pixel_values = torch.randn(batch_size, 3, image_size, image_size, device=device)
        labels = torch.randint(0, num_labels, (batch_size,), device=device)

        class _Candidate:
            kind = "hf"

        inference, training = {}, {}
        fused = DWViTForImageClassification(models["DWViT shortcut on"].config).to(device).eval()
        fused.load_state_dict(models["DWViT shortcut on"].state_dict())
        fused.fuse_dw_shortcuts()
        for name, model in models.items():
            model.eval()
            inference[name] = make_inference_fn(_Candidate, model, pixel_values, autocast, device)
        inference[FUSED] = make_inference_fn(_Candidate, fused, pixel_values, autocast, device)
        infer_times = time_interleaved(inference, repeats)
        memory = {}
        for name, model in models.items():
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            training[name] = make_train_step_fn(_Candidate, model, pixel_values, labels, optimizer, autocast, device)
            training[name]()  # the optimizer state exists before the memory is measured
            memory[name] = peak_train_memory(training[name], device)
        train_times = time_interleaved(training, repeats)

        setting = f"{image_size}/{patch_size}, batch {batch_size}"
        off = "DWViT shortcut off"
        for name in [*models, FUSED]:
            infer = median(infer_times[name])
            row = [setting, name, f"{1000 * infer:.1f}"]
            row.append(f"{infer / median(infer_times['transformers ViT']):.3f} "
                       f"({ratio_spread(infer_times[name], infer_times['transformers ViT'])})")
            row.append(f"{infer / median(infer_times[off]):.3f} ({ratio_spread(infer_times[name], infer_times[off])})")
            if name in train_times:
                train = median(train_times[name])
                row += [
                    f"{1000 * train:.1f}",
                    f"{train / median(train_times['transformers ViT']):.3f} "
                    f"({ratio_spread(train_times[name], train_times['transformers ViT'])})",
                    f"{train / median(train_times[off]):.3f} ({ratio_spread(train_times[name], train_times[off])})",
                    f"{memory[name] / 2**20:.0f}",
                    f"{memory[name] / memory[off]:.3f}",
                ]
            else:
                row += ["", "", "", "", ""]
            rows.append(row)
        if args.profile:
            profile_models(models, training, f"train step {setting}", 25)
            for model in models.values():
                model.eval()
            profile_models(models, inference, f"inference {setting}", 25)
    print(format_table(headers, rows))
    print(f"\n{machine_summary(device)}")


if __name__ == "__main__":
    main()
