"""What the job decides about devices, precision and its processes, and how several processes agree on it.

* `runs_on_cpu`: without an accelerator the job trains on CPUs, and says so to transformers (`use_cpu`), which is
  what makes accelerate set up a gloo process group and wrap the model in DDP under torchrun or `accelerate launch`,
  as it sets up NCCL on GPUs. Left unsaid, torchrun on CPUs gives each process its own, unsynchronised model.
* `decide_mixed_precision`: what `--mixed_precision auto` means on this machine (docs/distributed.md).
* `rank_zero_decides`, `any_rank`, `rank_zero_value`, `same_on_every_rank`: a decision
  that every rank must share (stop training now, resume from this checkpoint, these images are unreadable) is
  taken once.
"""

from __future__ import annotations

import os
import platform
import socket

import torch

PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def accelerator_available() -> bool:
    """Whether torch sees a GPU or other accelerator (CUDA, XPU, MPS, ...) this process could train on."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def runs_on_cpu(use_cpu: bool) -> bool:
    """`use_cpu` as the job must pass it on: asked for, set by `accelerate launch --cpu`, or no accelerator at all."""
    from_env = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes", "on")
    return bool(use_cpu) or from_env or not accelerator_available()


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (AVX512-BF16 or AMX on x86, the BF16 extension on Arm).

    Without it, oneDNN and ATen emulate bf16 by converting to float32 and back, which is slower than float32
    (measured in docs/distributed.md).
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(getattr(torch.cpu, name, lambda: False)() for name in probes):
        return True
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            with open("/proc/cpuinfo") as handle:
                return any(line.lower().startswith("features") and " bf16" in line for line in handle)
        except OSError:
            return False
    return False


def decide_mixed_precision(choice: str, on_cpu: bool, env_choice: str | None = None) -> str:
    """`"no"`, `"bf16"` or `"fp16"` for `--mixed_precision choice` on a CPU (`on_cpu`) or accelerator run.

    `auto`: an `accelerate launch` config's mixed precision (`env_choice`, ACCELERATE_MIXED_PRECISION) when it
    asks for one; else bf16 on a CUDA GPU that has it, fp16 on other CUDA GPUs, and float32 on CPUs: without
    native bf16, bf16 autocast is emulated and several times slower; with it (AVX512-BF16, AMX), the training step
    with SDPA attention still measured 1.37x slower than float32, its CPU flash-attention backward in bf16 taking
    most of the step (docs/distributed.md).
    """
    if choice not in PRECISION_CHOICES:
        raise ValueError(f"mixed_precision must be one of {', '.join(map(repr, PRECISION_CHOICES))}; got {choice!r}.")
    if choice == "fp16" and on_cpu:
        raise ValueError(
            "fp16 mixed precision (--mixed_precision fp16 or --fp16) needs a GPU (fp16 autocast with loss scaling "
            "is a CUDA feature); on CPUs use --mixed_precision bf16 or no."
        )
    if choice != "auto":
        return choice
    if env_choice in ("bf16", "fp16") and not (env_choice == "fp16" and on_cpu):
        return env_choice
    if on_cpu:
        return "no"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def rank_zero_decides(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Rank 0's `flag` on every rank (one broadcast), so ranks whose clocks or checks disagree still act alike.

    `device` is where the process group's backend takes tensors: the CPU for gloo, this rank's GPU for NCCL.
    """
    if not _distributed():
        return bool(flag)
    import torch.distributed as dist

    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether `flag` holds on any rank (one all-reduce): for a check each rank makes on its own share, such as a
    non-finite loss, after which every rank must stop together rather than one leaving the others waiting."""
    if not _distributed():
        return bool(flag)
    import torch.distributed as dist

    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def rank_zero_value(value):
    """Rank 0's `value` (any picklable object) on every rank."""
    if not _distributed():
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def same_on_every_rank(value, what: str):
    """`value` if every rank computed the same; otherwise a ValueError on every rank naming `what` and the ranks.

    For results each process works out from its own copy of the data (unreadable images), where a difference
    means the processes do not see the same files and would train on different datasets.
    """
    if not _distributed():
        return value
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    differing = [rank for rank, other in enumerate(values) if other != values[0]]
    if differing:
        raise ValueError(
            f"The processes disagree about {what}: rank(s) {differing} differ from rank 0 "
            f"({values[differing[0]]!r} against {values[0]!r}). Every process must read the same data."
        )
    return values[0]


def broadcast_buffers_from_rank_zero(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), in place."""
    if not _distributed():
        return
    import torch.distributed as dist

    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def unique_suffix() -> str:
    """A name part no other process writing the same shared folder uses (machine and process id)."""
    return f"{socket.gethostname()}-{os.getpid()}"
