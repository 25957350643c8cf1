"""Every DW family (shortcut on and off) against `transformers` and `timm` models of the same size.

Groups, each measured in one interleaved run (ratios hold on a noisy machine):
  vit-224   DWViT-Tiny 224/16 (on, off) | transformers ViTForImageClassification | timm vit_tiny_patch16_224
  vit-32    DWViT-Tiny 32/4 (on, off)   | transformers ViT 32/4                   | timm vit_tiny (img 32, patch 4)
  cait-224  DWCaiT-XXS12 (on, off)      | timm cait_xxs12_224 (transformers has no CaiT)
  swin-224  DWSwin-T (on, off)          | transformers SwinForImageClassification | timm swin_tiny_patch4_window7_224
  reparam   DWViT-Tiny inference: off, k3, k3 fused, k7, k3+5+7, k3+5+7 fused

Figures: inference images/s, training-step images/s (forward, cross-entropy, backward, AdamW), peak memory of a
training step (CUDA: max_memory_allocated; CPU: torch.profiler allocation events, see bench_utils), parameters
and forward FLOPs per image (torch.utils.flop_counter.FlopCounterMode; 2 FLOPs per multiply-add). Ratios are
against the same family with the shortcut off. CPU by default, float32; with CUDA, bf16 autocast.

    python benchmarks/bench_families.py                 # everything
    python benchmarks/bench_families.py --quick         # smoke run: tiny batches, 2 rounds
    python benchmarks/bench_families.py --groups vit-224 reparam --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import (  # noqa: E402
    Candidate,
    count_parameters,
    device_and_autocast,
    format_table,
    forward_flops,
    machine_summary,
    make_inference_fn,
    make_train_step_fn,
    median,
    peak_train_memory,
    precision_summary,
    time_interleaved,
)

import dwvit  # noqa: E402

VIT_TINY = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)
SWIN_TINY = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)


def _dw(size: str, label: str, group: str, image_size: int, num_labels: int, fuse: bool = False, **overrides):
    """A DW family model by its named size; skipped (None) when the family is not in this checkout."""
    if size not in dwvit.NAMED_SIZES:
        print(f"[skip] {label}: size {size!r} is not registered in dwvit.NAMED_SIZES yet")
        return None

    def build():
        # No stochastic depth anywhere: every model's training step does the same work on every call.
        return dwvit.create_model(size, num_labels=num_labels, drop_path_rate=0.0, **overrides)

    prepare = (lambda model: model.fuse_dw_shortcuts()) if fuse else None
    return Candidate(label, build, image_size, num_labels, "hf", group, prepare)


def _hf(label, group, image_size, num_labels, config_factory, model_class_name):
    def build():
        import transformers

        config = config_factory(transformers)
        config._attn_implementation = "sdpa"
        return getattr(transformers, model_class_name)(config)

    return Candidate(label, build, image_size, num_labels, "hf", group)


def _timm(label, group, image_size, num_labels, name, **kwargs):
    try:
        import timm  # noqa: F401
    except ImportError:
        print(f"[skip] {label}: timm is not installed (pip install 'dwvit[bench]')")
        return None

    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_labels, drop_path_rate=0.0, **kwargs)

    return Candidate(label, build, image_size, num_labels, "timm", group)


def candidates(group: str) -> list[Candidate]:
    if group == "vit-224":
        found = [
            _dw("vit-tiny", "DWViT-Tiny, shortcut off", group, 224, 1000, use_dw_shortcut=False),
            _dw("vit-tiny", "DWViT-Tiny, shortcut on", group, 224, 1000),
            _hf("transformers ViT-Tiny", group, 224, 1000,
                lambda t: t.ViTConfig(image_size=224, patch_size=16, num_labels=1000, **VIT_TINY), "ViTForImageClassification"),
            _timm("timm vit_tiny_patch16_224", group, 224, 1000, "vit_tiny_patch16_224"),
        ]
    elif group == "vit-32":
        found = [
            _dw("vit-tiny-cifar", "DWViT-Tiny 32/4, shortcut off", group, 32, 10, use_dw_shortcut=False),
            _dw("vit-tiny-cifar", "DWViT-Tiny 32/4, shortcut on", group, 32, 10),
            _hf("transformers ViT-Tiny 32/4", group, 32, 10,
                lambda t: t.ViTConfig(image_size=32, patch_size=4, num_labels=10, **VIT_TINY), "ViTForImageClassification"),
            _timm("timm vit_tiny 32/4", group, 32, 10, "vit_tiny_patch16_224", img_size=32, patch_size=4),
        ]
    elif group == "cait-224":
        found = [
            _dw("cait-xxs12", "DWCaiT-XXS12, shortcut off", group, 224, 1000, use_dw_shortcut=False),
            _dw("cait-xxs12", "DWCaiT-XXS12, shortcut on", group, 224, 1000),
            # timm registers XXS24/XXS36 only: XXS12 is its XXS24 architecture with 12 blocks.
            _timm("timm cait_xxs24_224, depth 12", group, 224, 1000, "cait_xxs24_224", depth=12),
        ]
    elif group == "swin-224":
        found = [
            _dw("swin-tiny", "DWSwin-T, shortcut off", group, 224, 1000, use_dw_shortcut=False),
            _dw("swin-tiny", "DWSwin-T, shortcut on", group, 224, 1000),
            _hf("transformers Swin-T", group, 224, 1000,
                lambda t: t.SwinConfig(image_size=224, num_labels=1000, drop_path_rate=0.0, **SWIN_TINY),
                "SwinForImageClassification"),
            _timm("timm swin_tiny_patch4_window7_224", group, 224, 1000, "swin_tiny_patch4_window7_224"),
        ]
    elif group == "reparam":
        found = [
            _dw("vit-tiny", "shortcut off", group, 224, 1000, use_dw_shortcut=False),
            _dw("vit-tiny", "k3", group, 224, 1000),
            _dw("vit-tiny", "k3 fused", group, 224, 1000, fuse=True),
            _dw("vit-tiny", "k7", group, 224, 1000, dw_kernel_sizes=[7]),
            _dw("vit-tiny", "k3+5+7", group, 224, 1000, dw_kernel_sizes=[3, 5, 7]),
            _dw("vit-tiny", "k3+5+7 fused", group, 224, 1000, dw_kernel_sizes=[3, 5, 7], fuse=True),
        ]
    else:
        raise ValueError(f"Unknown group {group!r}; choose from {', '.join(GROUPS)}.")
    return [candidate for candidate in found if candidate is not None]


GROUPS = ["vit-224", "vit-32", "cait-224", "swin-224", "reparam"]


def run_group(group, args, device, autocast) -> tuple[list[str], list[list[str]]]:
    found = candidates(group)
    if not found:
        return [], []
    batch_size = args.batch_size or (2 if args.quick else 16)
    if found[0].image_size == 32:
        batch_size *= 8
    torch.manual_seed(0)
    image_size, num_labels = found[0].image_size, found[0].num_labels
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, device=device)
    labels = torch.randint(0, num_labels, (batch_size,), device=device)
    inference_only = group == "reparam"

    infer_fns, train_fns, stats = {}, {}, {}
    for candidate in found:
        model = candidate.build().to(device).eval()
        if candidate.prepare is not None:
            candidate.prepare(model)
        candidate.model = model
        infer_fns[candidate.name] = make_inference_fn(candidate, model, pixel_values, autocast, device)
        # One call first: a fused model computes its per-grid bias map once, which is not per-image work.
        infer_fns[candidate.name]()
        stats[candidate.name] = {
            "params": count_parameters(model),
            "flops": forward_flops(candidate, model, pixel_values) if not args.no_flops else None,
        }
    infer_times = time_interleaved(infer_fns, args.repeats)

    train_times = {}
    if not inference_only:
        for candidate in found:
            model = candidate.model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            train_fns[candidate.name] = make_train_step_fn(candidate, model, pixel_values, labels, optimizer, autocast, device)
        train_times = time_interleaved(train_fns, args.repeats)
        if not args.no_memory:
            for candidate in found:
                # After the timed steps the optimizer state exists, so this is a steady-state step's peak.
                stats[candidate.name]["memory"] = peak_train_memory(train_fns[candidate.name], device)

    baseline = found[0].name
    headers = [
        "group", "model", "params M", "fwd GFLOPs/img", "infer img/s", "infer vs off",
        "train img/s", "train vs off", "peak train MiB", "memory vs off",
    ]
    rows = []
    for candidate in found:
        name = candidate.name
        infer = median(infer_times[name])
        row = [
            f"{group}, batch {batch_size}",
            name,
            f"{stats[name]['params'] / 1e6:.3f}",
            f"{stats[name]['flops'] / 1e9:.3f}" if stats[name]["flops"] is not None else "-",
            f"{batch_size / infer:.1f}",
            f"{infer / median(infer_times[baseline]):.3f}",
        ]
        if train_times:
            train = median(train_times[name])
            row += [f"{batch_size / train:.1f}", f"{train / median(train_times[baseline]):.3f}"]
            memory = stats[name].get("memory")
            if memory is not None:
                row += [f"{memory / 2**20:.0f}", f"{memory / stats[baseline]['memory']:.3f}"]
            else:
                row += ["-", "-"]
        else:
            row += ["-", "-", "-", "-"]
        rows.append(row)
        candidate.model = None
    return headers, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", nargs="+", default=GROUPS, choices=GROUPS)
    parser.add_argument("--quick", action="store_true", help="batch 2 (16 at 32x32), 2 rounds: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 10; 2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch at 224 (x8 at 32); default 16")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU too (CUDA always uses it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (2 if args.quick else 10)
    device, autocast = device_and_autocast(args.device, args.bf16)
    print(f"{machine_summary(device)}, {precision_summary(device, args.bf16)}")
    print(
        f"{args.repeats} interleaved rounds, median per call; 'vs off' = time (or memory) relative to the first row "
        f"of the group (the DW model with the shortcut off); < 1 is faster.\n"
    )
    all_rows, headers = [], None
    for group in args.groups:
        group_headers, rows = run_group(group, args, device, autocast)
        if rows:
            headers = group_headers
            print(format_table(headers, rows) + "\n", flush=True)
            all_rows += rows
    if headers:
        print("## all groups\n" + format_table(headers, all_rows))
    print(f"\n{machine_summary(device)}")


if __name__ == "__main__":
    main()
