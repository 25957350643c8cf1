"""What the depth-wise shortcut's training step is made of, op by op, against what the block around it costs.

Builds the DW model of a size, measures one training step with the shortcut on and off (interleaved rounds),
and profiles the shortcut alone (its forward, the add into the block output and their backward, on a block's
tensors) with `torch.profiler`: per aten op its time per shortcut step. Every op of the shortcut is one or two full passes over a (batch, tokens, channels) tensor, so its
cost is the number of passes times the machine's memory rate, whatever its FLOPs.

    python benchmarks/bench_shortcut_ops.py                          # the studies' model: 128 wide, 6 blocks, 32/4
    python benchmarks/bench_shortcut_ops.py --size vit-tiny --batch-size 16 --image-size 224 --patch-size 16
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import format_table, machine_summary, median, time_interleaved  # noqa: E402

from dwvit import DWViTForImageClassification, named_config  # noqa: E402
from dwvit.models.dw_layers import add_shortcut  # noqa: E402

SIZES = {
    "studies": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512),
    "vit-tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="studies")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds of the training step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def build(on: bool) -> DWViTForImageClassification:
        config = named_config(
            "vit-tiny-cifar", image_size=args.image_size, patch_size=args.patch_size, num_labels=10,
            use_dw_shortcut=on, **SIZES[args.size],
        )  # fmt: skip
        return DWViTForImageClassification(config).train()

    models = {"off": build(False), "on": build(True)}
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch_size,))
    optimizers = {name: torch.optim.AdamW(model.parameters()) for name, model in models.items()}

    def step(name):
        def run():
            models[name](pixel_values=pixel_values, labels=labels).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return run

    times = time_interleaved({name: step(name) for name in models}, args.repeats)
    step_on, step_off = median(times["on"]), median(times["off"])
    num_blocks = models["on"].config.num_hidden_layers

    # One shortcut on a block's tensors: its forward, the add, and the backward of both.
    shortcut = models["on"].dwvit.encoder.shortcuts[0]
    grid = args.image_size // args.patch_size
    channels = models["on"].config.hidden_size
    tokens = torch.randn(args.batch_size, 1 + grid * grid, channels, requires_grad=True)
    block_output = torch.randn_like(tokens, requires_grad=True)
    output_grad = torch.randn_like(tokens)

    def shortcut_step():
        output = add_shortcut(block_output * 1.0, shortcut(tokens, grid, grid, 1), 1)
        output.backward(output_grad)
        tokens.grad = block_output.grad = None
        shortcut.zero_grad(set_to_none=True)

    for _ in range(3):
        shortcut_step()
    calls = 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            shortcut_step()
    tensor_bytes = tokens.numel() * tokens.element_size()
    rows, total = [], 0.0
    for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total):
        milliseconds = event.self_cpu_time_total / 1000 / calls
        if milliseconds < 0.02 or not event.key.startswith("aten::") or event.key == "aten::mul":
            continue  # `mul` is the harness's own block output
        total += milliseconds
        rows.append([event.key, f"{event.count / calls:.0f}", f"{milliseconds:.3f}"])
    rows.append(["all shortcut ops (one shortcut, forward + backward)", "", f"{total:.3f}"])
    print(machine_summary(torch.device("cpu")))
    print(
        f"\nmodel: {args.size} {args.image_size}/{args.patch_size}, batch {args.batch_size}, {num_blocks} shortcuts; "
        f"one (batch, tokens, channels) tensor = {tensor_bytes / 2**20:.2f} MiB\n"
    )
    print(format_table(["aten op", "calls", "ms per shortcut step"], rows))
    print(
        f"\ntraining step: shortcut on {1000 * step_on:.1f} ms, off {1000 * step_off:.1f} ms, ratio "
        f"{step_on / step_off:.3f}; the shortcut's ops above x {num_blocks} = {total * num_blocks:.1f} ms "
        f"({total * num_blocks / (1000 * step_off):.1%} of the step off)"
    )
    one_pass = pass_milliseconds(tokens)
    print(
        f"one pass over the tensor at the rate of a plain add here: {one_pass:.3f} ms; "
        f"the shortcut's ops = {total / one_pass:.1f} such passes"
    )


def pass_milliseconds(tensor: torch.Tensor) -> float:
    """Time of `a + b` into a fresh tensor of `tensor`'s size (reads two, writes one): the rate of a pass."""
    a, b = torch.randn_like(tensor), torch.randn_like(tensor)
    times = time_interleaved({"add": lambda: a + b}, 30)
    return 1000 * median(times["add"])


if __name__ == "__main__":
    main()
