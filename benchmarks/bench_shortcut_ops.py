"""Where the depth-wise shortcut's time goes inside a real training step, and the floor under it.

One process, interleaved rounds of a full training step (forward, loss, backward, AdamW) of several models with the
same weights where they share them:

- `off`: the DW model with the shortcut off (the baseline of every ratio);
- `kernel`: the shortcut through the fused CPU kernel (`dw_shortcut_kernel.py`, the default);
- `pytorch ops`: the same shortcut as PyTorch ops (the recomputing node; what runs without a compiler);
- `passes skipped`: the kernel's Python, autograd nodes and allocations with its C calls replaced by no-ops (the
  outputs are left unwritten, so this model trains on whatever the memory held: a timing stand-in only), which
  splits the kernel's cost into its passes and what surrounds them;
- `add only`: the shortcut replaced by `block_output + tokens`: no GELU, BatchNorm or conv, only one more read of
  the group input, its gradient and the sum's allocation; the floor for any shortcut that reads its input;
- `gelu only`: the shortcut replaced by `block_output + GELU(tokens)` in PyTorch's ops (GELU forward, its backward,
  one add): the floor for any shortcut that applies an exact GELU at PyTorch's speed and keeps no activation
  beyond its input;
- `traffic only`: the shortcut's memory traffic with none of its arithmetic, in PyTorch ops: in training, one read
  of the tokens (where the batch statistics are gathered), the add, and in backward one read of the tokens and the
  gradient (the reductions) and a pass that reads both and writes the input gradient (`gradient + tokens`). Batch
  statistics make any exact shortcut read its input twice in a training forward (the statistics must be complete
  before the first output is normalised) and its input and gradient twice in backward (the input gradient carries
  terms of batch-wide sums of the gradient), so this is a floor for a standalone exact shortcut in a training step,
  at PyTorch's speed for these passes; in eval mode (running statistics) it is `add only`.

In the stand-ins each group's last block keeps its own residual add; the kernel and passes-skipped models hand it to
the shortcut's pass (`DepthwiseShortcut.takes_residual_add`), which a standalone shortcut cannot, so the kernel may
come in under `traffic only` by up to that add.

The same models are also timed in inference (eval mode, `torch.no_grad`). The table also gives each model's minor
page faults per training step (fresh pages from the allocator, which glibc's default malloc maps and returns for
large blocks; the count moves the step time and differs between models, so run it also with
`GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296`, which keeps freed
blocks, to see the ratios without it).

Inside the `kernel` model's steps it also times each of the kernel's four passes (batch statistics, forward with
the add, backward reductions, input gradient) and the Python around them, per shortcut call, and compares each
with one pass of a plain add over the same tensor, warm and cold (after a 128 MB sweep, as inside a step).

    python benchmarks/bench_shortcut_ops.py                          # the studies' model: 128 wide, 6 blocks, 32/4
    python benchmarks/bench_shortcut_ops.py --size vit-tiny --batch-size 16 --image-size 224 --patch-size 16
    python benchmarks/bench_shortcut_ops.py --bf16 --attention eager   # bf16 autocast, the CPU's fast bf16 path
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import (  # noqa: E402
    device_and_autocast,
    format_table,
    machine_summary,
    median,
    precision_summary,
    time_interleaved,
)

from dwvit import DWViTForImageClassification, named_config  # noqa: E402
from dwvit.models import dw_shortcut_kernel  # noqa: E402
from dwvit.models.dw_layers import DepthwiseShortcut  # noqa: E402

SIZES = {
    "studies": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512),
    "vit-tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
}
# The four passes' places among dw_shortcut_kernel.pass_seconds' six counters
PASSES = {"batch statistics": 0, "forward (with the add)": 2, "backward reductions": 3, "input gradient": 5}
PER_CHANNEL = [1, 4]  # folding and running statistics; parameter gradients (single-threaded)


class _TrafficOnly(torch.autograd.Function):
    """`block_output + tokens` with the reads and writes of a shortcut's four training passes and no arithmetic."""

    @staticmethod
    def forward(ctx, block_output, tokens):
        tokens.sum(dim=(0, 1))  # the statistics pass
        ctx.save_for_backward(tokens)
        return block_output + tokens  # the forward pass with the add

    @staticmethod
    def backward(ctx, grad):
        (tokens,) = ctx.saved_tensors
        tokens.sum(dim=(0, 1)), grad.sum(dim=(0, 1))  # the reductions
        return grad, grad + tokens  # the input gradient


class _NoPasses:
    """A stand-in for the kernel's library whose every function does nothing."""

    def __getattr__(self, name):
        return lambda *args: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="studies")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds of the training step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="forward passes under bf16 autocast")
    parser.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    args = parser.parse_args()
    _, precision = device_and_autocast("cpu", args.bf16)
    torch.set_num_threads(args.threads)
    library = dw_shortcut_kernel.load_library()
    if library is None:
        sys.exit("the fused kernel is unavailable here (no C++ compiler, or DWVIT_CPU_KERNEL=0)")
    counters, recording = torch.zeros(6, dtype=torch.float64), [False]

    def build(on: bool) -> DWViTForImageClassification:
        torch.manual_seed(0)
        config = named_config(
            "vit-tiny-cifar", image_size=args.image_size, patch_size=args.patch_size, num_labels=10,
            use_dw_shortcut=on, **SIZES[args.size],
        )  # fmt: skip
        model = DWViTForImageClassification(config).train()
        model.set_attn_implementation(args.attention)
        return model

    models = {"off": build(False), "kernel": build(True)}
    models["pytorch ops"] = copy.deepcopy(models["kernel"])
    models["passes skipped"] = copy.deepcopy(models["kernel"])
    models["add only"] = copy.deepcopy(models["kernel"])
    models["gelu only"] = copy.deepcopy(models["kernel"])
    models["traffic only"] = copy.deepcopy(models["kernel"])
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch_size,))
    optimizers = {name: torch.optim.AdamW(model.parameters()) for name, model in models.items()}
    add_to, takes_residual_add = DepthwiseShortcut.add_to, DepthwiseShortcut.takes_residual_add

    def block_adds(self, block):
        return False  # the stand-ins are standalone shortcuts: the block keeps its residual add

    def add_only(self, block_output, tokens, height, width, num_prefix_tokens=0, residual=None):
        return block_output + tokens

    def gelu_only(self, block_output, tokens, height, width, num_prefix_tokens=0, residual=None):
        return block_output + torch.nn.functional.gelu(tokens)

    def traffic_only(self, block_output, tokens, height, width, num_prefix_tokens=0, residual=None):
        if not self.training:  # running statistics: no statistics pass, nothing but the add
            return add_only(self, block_output, tokens, height, width)
        return _TrafficOnly.apply(block_output, tokens)

    replacements = {"add only": add_only, "gelu only": gelu_only, "traffic only": traffic_only}
    no_passes = _NoPasses()
    libraries = {"pytorch ops": lambda: None, "passes skipped": lambda: no_passes}

    node_seconds = {"forward": 0.0, "backward": 0.0}
    forward_calls = [0]
    kernel_node = dw_shortcut_kernel._KernelShortcut
    for phase in node_seconds:
        function = getattr(kernel_node, phase)

        def timed(ctx, *inputs, _function=function, _phase=phase):
            start = time.perf_counter()
            result = _function(ctx, *inputs)
            if recording[0]:
                node_seconds[_phase] += time.perf_counter() - start
                forward_calls[0] += _phase == "forward"
            return result

        setattr(kernel_node, phase, staticmethod(timed))

    def step(name):
        def run():
            DepthwiseShortcut.add_to = replacements.get(name, add_to)
            DepthwiseShortcut.takes_residual_add = block_adds if name in replacements else takes_residual_add
            dw_shortcut_kernel.load_library = libraries.get(name, lambda: library)
            recording[0] = name == "kernel"
            dw_shortcut_kernel.pass_seconds = counters if recording[0] else None
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with precision():
                loss = models[name](pixel_values=pixel_values, labels=labels).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            page_faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
            recording[0], dw_shortcut_kernel.pass_seconds = False, None

        return run

    page_faults = {name: [] for name in models}  # minor faults per training step: fresh pages from the allocator
    steps = {name: step(name) for name in models}
    for run in steps.values():
        run()  # optimizer state
    counters.zero_()
    node_seconds.update(forward=0.0, backward=0.0)
    forward_calls[0] = 0
    times = time_interleaved(steps, args.repeats)

    def inference(name):
        def run():
            DepthwiseShortcut.add_to = replacements.get(name, add_to)
            DepthwiseShortcut.takes_residual_add = block_adds if name in replacements else takes_residual_add
            dw_shortcut_kernel.load_library = libraries.get(name, lambda: library)
            with torch.no_grad(), precision():
                models[name](pixel_values=pixel_values)

        return run

    for model in models.values():
        model.eval()
    inference_times = time_interleaved({name: inference(name) for name in models}, args.repeats)
    DepthwiseShortcut.add_to, dw_shortcut_kernel.load_library = add_to, lambda: library
    DepthwiseShortcut.takes_residual_add = takes_residual_add
    off = median(times["off"])
    num_shortcuts = len(models["kernel"].dwvit.encoder.shortcuts)
    calls = forward_calls[0]

    grid = args.image_size // args.patch_size
    channels = models["kernel"].config.hidden_size
    tokens = torch.randn(args.batch_size, 1 + grid * grid, channels)
    warm, cold = pass_milliseconds(tokens)
    print(machine_summary(torch.device("cpu")))
    print(
        f"\nmodel: {args.size} {args.image_size}/{args.patch_size}, batch {args.batch_size}, {args.attention} "
        f"attention, {precision_summary(torch.device('cpu'), args.bf16)}, {num_shortcuts} "
        f"shortcuts; one (batch, tokens, channels) tensor = {tokens.numel() * 4 / 2**20:.2f} MiB; one plain add "
        f"over it: {warm:.3f} ms warm, {cold:.3f} ms cold\n"
    )
    rows = []
    inference_off = median(inference_times["off"])
    for name in models:
        seconds, inference_seconds = median(times[name]), median(inference_times[name])
        faults = median(page_faults[name][-args.repeats :])
        rows.append([name, f"{1000 * seconds:.1f}", f"{seconds / off:.3f}",
                     f"{1000 * (seconds - off) / num_shortcuts:.2f}", f"{1000 * inference_seconds:.1f}",
                     f"{inference_seconds / inference_off:.3f}", f"{faults:.0f}"])  # fmt: skip
    headers = ["model", "training step ms", "training vs off", "ms per shortcut over off", "inference ms",
               "inference vs off", "page faults per step"]
    print(format_table(headers, rows))
    print()
    rows = []
    milliseconds = (1000 * counters / calls).tolist()
    for name, counter in PASSES.items():
        rows.append([name, f"{milliseconds[counter]:.3f}", f"{milliseconds[counter] / cold:.1f}"])
    small = sum(milliseconds[index] for index in PER_CHANNEL)
    rows.append(["folding, running statistics, parameter gradients (per-channel C)", f"{small:.3f}", ""])
    for phase, inside in (("forward", sum(milliseconds[:3])), ("backward", sum(milliseconds[3:]))):
        rows.append([f"Python and allocations in the {phase} node",
                     f"{1000 * node_seconds[phase] / calls - inside:.3f}", ""])  # fmt: skip
    node_total = 1000 * sum(node_seconds.values()) / calls
    rows.append(["**the kernel's two autograd nodes**", f"**{node_total:.3f}**", f"{node_total / cold:.1f}"])
    print(format_table(["inside the kernel model's steps, per shortcut", "ms", "cold plain-add passes"], rows))


def pass_milliseconds(tensor: torch.Tensor) -> tuple[float, float]:
    """Median time of `a + b` into a fresh tensor of `tensor`'s size (reads two, writes one), with the operands in
    the cache and after a sweep over 128 MB that evicts them."""
    a, b = torch.randn_like(tensor), torch.randn_like(tensor)
    sweep = torch.zeros(32 * 2**20)
    warm, cold = [], []
    for _ in range(30):
        start = time.perf_counter()
        a + b
        warm.append(time.perf_counter() - start)
        sweep.add_(1)
        start = time.perf_counter()
        a + b
        cold.append(time.perf_counter() - start)
    return 1000 * median(warm), 1000 * median(cold)


if __name__ == "__main__":
    main()
