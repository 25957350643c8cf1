"""The depth-wise shortcut as a fused CPU kernel: four passes over the tokens per training step.

PyTorch runs the shortcut as separate memory-bound ops (GELU, BatchNorm statistics, normalise, conv, their
backward kernels), each a full pass over a `(batch, tokens, channels)` tensor. `csrc/dw_shortcut_cpu.cpp` (with
the headers beside it, split by job) folds every branch's BatchNorm and kernel into one k x k scale kernel and
shift kernel and computes, in one pass each, the batch statistics (leaving GELU in the output), the output with the
add into the block output, the backward reductions, and the input gradient (GELU recomputed from the tokens, so
autograd keeps only the input and two numbers per channel); the per-channel algebra (folding, running statistics,
every parameter gradient) is C too, and a training forward or backward is one call (inside a training step Python
costs several times what it costs alone).
`_KernelShortcut` is the autograd node around it.

The library is compiled on first use with the host C++ compiler (about two seconds) into a cache folder keyed by
the sources, the compiler and the CPU, and loaded with ctypes. Without a compiler, with `DWVIT_CPU_KERNEL=0`, or
wherever `kernel_applies` says no (graph capture, hooks on the shortcut's parts, other modules in its slots,
weights other than float32, another device), the shortcut runs as PyTorch ops (dw_shortcut_autograd.py,
dw_layers.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .dw_shortcut_autograd import _differentiable_backward, _has_hooks, _runs_as_plain_modules

_SOURCE_NAME = "dw_shortcut_cpu.cpp"
_FLAGS = ["-O3", "-std=gnu++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]


def _arch_flags() -> list[list[str]]:
    """Flags to try in turn: the host CPU's instructions, then generic code for a compiler that does not know them.
    On x86, 512-bit vectors where the CPU has them: gcc otherwise keeps 256-bit ones on AVX-512 CPUs, and the four
    passes measured about 9-13% faster with 512 inside training steps (docs/speed.md); on CPUs without AVX-512 the
    option changes nothing."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return [["-march=native", "-mprefer-vector-width=512"], ["-march=native"], []]
    return [["-mcpu=native"], []]


def _source_path() -> Path | None:
    """The kernel source beside this file, or in the installed package (remote code copies only `.py` files)."""
    local = Path(__file__).with_name("csrc") / _SOURCE_NAME
    if local.is_file():
        return local
    try:
        import dwvit.models  # noqa: PLC0415

        installed = Path(dwvit.models.__file__).with_name("csrc") / _SOURCE_NAME
    except ImportError:
        return None
    return installed if installed.is_file() else None


def _source_files(source: Path) -> list[Path]:
    """The translation unit `source` and the headers beside it that it includes: what the build depends on."""
    return [source, *sorted(source.parent.glob("*.h"))]


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _cache_dir() -> Path:
    root = os.environ.get("DWVIT_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dwvit", "kernels"
    )
    return Path(root)


def _compile(source: Path, compiler: list[str], target: Path) -> None:
    """Build the library into `target` whole or not at all (a temporary file renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        for arch in _arch_flags():
            result = subprocess.run(
                [*compiler, *_FLAGS, *arch, str(source), "-o", str(built)], capture_output=True, text=True
            )
            if result.returncode == 0:
                os.replace(built, target)
                return
        raise RuntimeError(f"{' '.join(compiler)} could not build {source.name}: {result.stderr.strip()[-2000:]}")


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; `None` (with one warning) where it cannot be had."""
    if os.environ.get("DWVIT_CPU_KERNEL", "1") == "0" or platform.system() != "Linux":
        return None
    source = _source_path()
    compiler = shlex.split(os.environ.get("CXX", "")) or [shutil.which("g++") or shutil.which("c++")]
    if source is None or compiler[0] is None:
        return None
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        sources = [path.read_text() for path in _source_files(source)]
        identity = [*sources, version, repr((_FLAGS, _arch_flags())), _cpu_signature()]
        key = hashlib.sha256("\0".join(identity).encode())
        target = _cache_dir() / f"dw_shortcut_cpu_{key.hexdigest()[:16]}.so"
        if not target.is_file():
            _compile(source, compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"The fused CPU kernel of the depth-wise shortcut is unavailable ({error}); the shortcut runs as "
            f"PyTorch ops (slower). Set DWVIT_CPU_KERNEL=0 to silence this.",
            stacklevel=2,
        )
        return None
    pointer, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    library.dws_training_forward.argtypes = [*[pointer] * 4, *[i64] * 9, *[pointer] * 4, i32, pointer]
    library.dws_training_backward.argtypes = [*[pointer] * 3, *[i64] * 9, pointer, pointer, i32, i32, pointer]
    library.dws_forward.argtypes = [*[pointer] * 7, *[i64] * 8, i32]
    library.dws_input_gradient.argtypes = [*[pointer] * 4, *[i64] * 8, i32]
    library.dws_fold.argtypes = [i64, pointer, pointer, i64, i64, pointer, pointer, pointer]
    return library


# The kernel reads float32; half-precision tokens (DWSwin's under autocast) are cast to it in the node, not kept.
_TOKEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_applies(shortcut: nn.Module, tokens: torch.Tensor) -> bool:
    """Whether the kernel computes what the modules of `shortcut` would, for these tokens, autograd included.

    Autocast does not matter: the shortcut computes in float32 under it (`DepthwiseShortcut.forward`), and so
    does the kernel, which calls no op that autocast casts."""
    if tokens.device.type != "cpu" or tokens.dtype not in _TOKEN_DTYPES or not tokens.is_contiguous():
        return False
    if not _runs_as_plain_modules(shortcut, branches=not shortcut.is_fused):
        return False
    if shortcut.activation.approximate != "none":
        return False
    if shortcut.is_fused:
        return shortcut.fused_weight.dtype == torch.float32 and load_library() is not None
    training = shortcut.branches[0].norm.training
    for branch in shortcut.branches:
        norm, conv = branch.norm, branch.conv
        if norm.training != training:
            return False
        if any(tensor.dtype != torch.float32 for tensor in (norm.weight, norm.running_mean, conv.weight)):
            return False
    return load_library() is not None


def kernel_adds(shortcut: nn.Module, block_output: torch.Tensor, tokens: torch.Tensor,
                residual: torch.Tensor | None = None) -> bool:
    """Whether the kernel can also add the shortcut to `block_output` (and `residual`, where given): same shape as the
    tokens, all float32 and contiguous. The module's own forward hooks must see its output, so they keep the
    separate add."""
    addends = (block_output,) if residual is None else (block_output, residual)
    return (
        not _has_hooks(shortcut)
        and tokens.dtype == torch.float32
        and all(
            addend.shape == tokens.shape and addend.dtype == torch.float32 and addend.is_contiguous()
            and addend.device == tokens.device
            for addend in addends
        )
        and kernel_applies(shortcut, tokens)
    )  # fmt: skip


def _taps(weight: torch.Tensor, kernel: int) -> torch.Tensor:
    """A `(C, 1, k, k)` depth-wise weight as `(kernel*kernel, C)` taps, centred in the larger `kernel` window."""
    inset = (kernel - weight.shape[-1]) // 2
    if inset:
        weight = F.pad(weight, (inset, inset, inset, inset))
    return weight.reshape(weight.shape[0], kernel * kernel).t()


# Optional profile of the training passes: a float64 tensor of six seconds counters (statistics, forward per-channel
# work, forward; reductions, backward per-channel work, input gradient) that the kernel adds to; benchmarks set it.
pass_seconds: torch.Tensor | None = None


def _seconds_pointer(offset: int):
    if pass_seconds is None:
        return None
    counters = pass_seconds
    if counters.dtype != torch.float64 or counters.device.type != "cpu" or not counters.is_contiguous():
        raise ValueError(f"pass_seconds must be a contiguous float64 CPU tensor of 6 counters, got {counters.dtype} "
                         f"on {counters.device}")  # fmt: skip
    if counters.numel() < 6:
        raise ValueError(f"pass_seconds must hold 6 counters, got {counters.numel()}")
    return counters.data_ptr() + 8 * offset


def _pointer_table(rows) -> tuple:
    """The C side's per-branch `Table` from one row of tensors (or `None`) per branch in its `Group` order (BatchNorm
    weight and bias, conv weight and bias, running mean and variance, the normalising mean and inverse deviation,
    then the four gradients), and the branches' kernel sizes (from the conv weights), as ctypes arrays."""
    pointers = [0 if row[group] is None else row[group].data_ptr() for group in range(len(rows[0])) for row in rows]
    sizes = (ctypes.c_int64 * len(rows))(*(row[2].shape[-1] for row in rows))
    return sizes, (ctypes.c_void_p * len(pointers))(*pointers)


def _branch_table(branches, statistics) -> tuple:
    """`_pointer_table` of the modules' tensors, with the `(mean, inverse_std)` pairs in `statistics`."""
    rows = []
    for index, branch in enumerate(branches):
        norm, conv = branch.norm, branch.conv
        rows.append([norm.weight, norm.bias, conv.weight, conv.bias, norm.running_mean, norm.running_var,
                     statistics[2 * index], statistics[2 * index + 1]])  # fmt: skip
    return _pointer_table(rows)


def _fold(library, shortcut: nn.Module, statistics):
    """Every branch's BatchNorm (normalising with the `(mean, inverse_std)` pairs in `statistics`) and kernel as one
    k x k scale kernel and shift kernel in taps `(k*k, C)`, and the summed conv bias."""
    if shortcut.is_fused:
        kernel = shortcut.fused_weight.shape[-1]
        scale_taps = _taps(shortcut.fused_weight, kernel).contiguous()
        shift_taps = _taps(shortcut.fused_shift_weight.float(), kernel).contiguous()
        return kernel, scale_taps, shift_taps, shortcut.fused_bias.float().contiguous()
    kernel = _largest_kernel(shortcut.branches)
    channels = shortcut.branches[0].norm.num_features
    buffer = torch.empty((2 * kernel * kernel + 1) * channels)
    scale_taps, shift_taps = buffer[: 2 * kernel * kernel * channels].view(2, kernel * kernel, channels).unbind()
    bias = buffer[2 * kernel * kernel * channels :]
    library.dws_fold(
        len(shortcut.branches), *_branch_table(shortcut.branches, statistics), channels, kernel,
        scale_taps.data_ptr(), shift_taps.data_ptr(), bias.data_ptr(),
    )  # fmt: skip
    return kernel, scale_taps, shift_taps, bias


def _folded_with_running_statistics(library, shortcut: nn.Module):
    """`_fold` with each BatchNorm's running statistics (eval mode, or the fused form), and those statistics, cached
    on the module until a parameter or buffer changes (any in-place update bumps its version) or the inference mode
    does."""
    if shortcut.is_fused:
        tensors = [shortcut.fused_weight, shortcut.fused_shift_weight, shortcut.fused_bias]
    else:
        tensors = []
        for branch in shortcut.branches:
            norm, conv = branch.norm, branch.conv
            tensors += [norm.weight, norm.bias, norm.running_mean, norm.running_var, conv.weight, conv.bias]
    # Tensors made under inference mode cannot be saved for a later backward: the mode is part of the key.
    key = (torch.is_inference_mode_enabled(), *((tensor.data_ptr(), tensor._version) for tensor in tensors))
    cached = getattr(shortcut, "_kernel_folding", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    statistics = []
    if not shortcut.is_fused:
        with torch.no_grad():
            for branch in shortcut.branches:
                norm = branch.norm
                statistics += [norm.running_mean, torch.rsqrt(norm.running_var + norm.eps)]
    folded = (*_fold(library, shortcut, statistics), statistics)
    shortcut._kernel_folding = (key, folded)
    return folded


def _training_forward(library, rows, strides, shape, kernel, shortcut, threads):
    """The forward with batch statistics, in one call (`rows` and `strides` as `_forward` makes them): statistics,
    each branch's running statistics moved exactly as `nn.BatchNorm2d` moves them (unbiased variance, momentum or a
    cumulative average), folding and the forward pass. Returns each branch's `(mean, inverse_std)`, what backward
    normalises with."""
    branches = shortcut.branches
    moments = torch.empty(1 + len(branches), shape[-1]).unbind()  # the batch mean, then each inverse deviation
    statistics, eps, momenta = [], [], []
    for index, branch in enumerate(branches):
        norm = branch.norm
        norm.num_batches_tracked.add_(1)
        statistics += [moments[0], moments[1 + index]]
        eps.append(norm.eps)
        momenta.append(norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked))
    x, add, add2, y, prefix = rows
    library.dws_training_forward(
        x, add, add2, y, *shape, kernel, *strides, prefix, len(branches), *_branch_table(branches, statistics),
        (ctypes.c_double * len(eps))(*eps), (ctypes.c_double * len(momenta))(*momenta), threads, _seconds_pointer(0),
    )  # fmt: skip
    # written outside PyTorch: their versions must still move (the eval fold's cache key)
    torch.autograd.graph.increment_version([tensor for branch in branches for tensor in
                                            (branch.norm.running_mean, branch.norm.running_var)])  # fmt: skip
    return statistics


def _largest_kernel(branches) -> int:
    return max(branch.conv.kernel_size[0] for branch in branches)


def _forward(tokens, block_output, shortcut, height, width, num_prefix_tokens, residual=None):
    """The kernel's forward: the shortcut, or `block_output` (plus `residual`, where given) with it added; also what
    backward needs."""
    library, threads = load_library(), torch.get_num_threads()
    tokens = tokens.float()  # the tokens themselves when float32
    batch_size, channels = tokens.shape[0], tokens.shape[2]
    shape = (batch_size, height, width, channels)
    # The rows the C side reads and writes: the first patch token of the tokens, of the block output and of the
    # output (which holds class tokens only as the sum), and the class-token elements it copies per image.
    offset = num_prefix_tokens * channels * 4  # bytes (float32, contiguous rows)
    if block_output is None:
        output = tokens.new_empty((batch_size, height * width, channels))
        rows = (tokens.data_ptr() + offset, None, None, output.data_ptr(), 0)
    else:
        output = torch.empty_like(block_output)
        residual_row = None if residual is None else residual.data_ptr() + offset
        rows = (tokens.data_ptr() + offset, block_output.data_ptr() + offset, residual_row,
                output.data_ptr() + offset, num_prefix_tokens * channels)  # fmt: skip
    strides = (tokens.stride(0), output.stride(0))
    if not shortcut.is_fused and shortcut.branches[0].norm.training:
        kernel = _largest_kernel(shortcut.branches)
        statistics = _training_forward(library, rows, strides, shape, kernel, shortcut, threads)
        return output, (kernel, True, statistics)
    kernel, scale_taps, shift_taps, bias, statistics = _folded_with_running_statistics(library, shortcut)
    x, add, add2, y, prefix = rows
    library.dws_forward(
        x, scale_taps.data_ptr(), shift_taps.data_ptr(), bias.data_ptr(), add, add2, y, *shape, kernel, *strides, prefix,
        threads,
    )  # fmt: skip
    return output, (kernel, False, statistics)


class _KernelShortcut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, block_output, residual, shortcut, height, width, num_prefix_tokens, *parameters):
        output, (kernel, batch_statistics, statistics) = _forward(
            tokens, block_output, shortcut, height, width, num_prefix_tokens, residual
        )
        ctx.shortcut, ctx.grid_shape = shortcut, (height, width, num_prefix_tokens)
        ctx.kernel, ctx.batch_statistics, ctx.adds = kernel, batch_statistics, block_output is not None
        ctx.adds_residual = residual is not None
        ctx.fused = shortcut.is_fused
        fused = [shortcut.fused_weight] if ctx.fused else []
        ctx.save_for_backward(tokens, *fused, *statistics, *parameters)
        return output

    @staticmethod
    def backward(ctx, output_grad):
        shortcut, (height, width, num_prefix_tokens) = ctx.shortcut, ctx.grid_shape
        tokens, *saved = ctx.saved_tensors
        block_grad = output_grad if ctx.adds else None
        residual_grad = output_grad if ctx.adds_residual else None
        fused_weight = saved.pop(0) if ctx.fused else None
        num_branches = len(saved) // 6  # two statistics and four parameters per branch; none when fused
        statistics, parameters = saved[: 2 * num_branches], saved[2 * num_branches :]
        if torch.is_grad_enabled():
            patches_grad = output_grad[:, num_prefix_tokens:] if ctx.adds else output_grad
            tokens_grad, *parameter_grads = _differentiable_backward(
                shortcut, tokens, parameters, patches_grad, ctx.grid_shape
            )
            return (tokens_grad, block_grad, residual_grad, None, None, None, None, *parameter_grads)

        library, threads, kernel = load_library(), torch.get_num_threads(), ctx.kernel
        tokens_dtype, tokens = tokens.dtype, tokens.float()
        batch_size, channels = tokens.shape[0], tokens.shape[2]
        shape = (batch_size, height, width, channels)
        if not output_grad.is_contiguous():
            output_grad = output_grad.contiguous()
        offset = num_prefix_tokens * channels * 4  # bytes to the first patch token
        grad_offset = offset if ctx.adds else 0
        tokens_grad = torch.empty_like(tokens)  # the kernel writes zeros into the class tokens
        pointers = (tokens.data_ptr() + offset, output_grad.data_ptr() + grad_offset, tokens_grad.data_ptr() + offset)
        if fused_weight is not None:
            scale_taps = _taps(fused_weight, kernel).contiguous()
            library.dws_input_gradient(
                pointers[0], pointers[1], scale_taps.data_ptr(), pointers[2], *shape, kernel, tokens.stride(0),
                output_grad.stride(0), offset // 4, threads,
            )  # fmt: skip
            return (tokens_grad.to(tokens_dtype), block_grad, residual_grad, None, None, None, None)
        parameter_grads = [torch.empty_like(parameter) for parameter in parameters]
        # From the saved tensors alone (the running statistics are not read in backward).
        rows = [[*parameters[4 * n : 4 * n + 4], None, None, *statistics[2 * n : 2 * n + 2],
                 *parameter_grads[4 * n : 4 * n + 4]] for n in range(num_branches)]  # fmt: skip
        library.dws_training_backward(
            *pointers, *shape, kernel, tokens.stride(0), output_grad.stride(0), offset // 4, num_branches,
            *_pointer_table(rows), int(ctx.batch_statistics), threads, _seconds_pointer(3),
        )  # fmt: skip
        return (tokens_grad.to(tokens_dtype), block_grad, residual_grad, None, None, None, None, *parameter_grads)


def kernel_shortcut(shortcut: nn.Module, tokens: torch.Tensor, height: int, width: int, num_prefix_tokens: int,
                    block_output: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The shortcut of `tokens` through the fused kernel, `(B, H*W, C)`; with `block_output`, that tensor with the
    shortcut added to its patch tokens, in the same pass, and with `residual` too, `(block_output + residual)` plus
    the shortcut. Call it where `kernel_applies` (and `kernel_adds`)."""
    if not torch.is_grad_enabled():  # no graph to record: skip the autograd node's bookkeeping
        if not torch.autograd._profiler_enabled():
            return _forward(tokens, block_output, shortcut, height, width, num_prefix_tokens, residual)[0]
        # A ctypes call leaves no event: name it as the node is named in training, so a profile accounts for it.
        with torch.profiler.record_function(_KernelShortcut.__name__):
            return _forward(tokens, block_output, shortcut, height, width, num_prefix_tokens, residual)[0]
    parameters = []
    if not shortcut.is_fused:
        for branch in shortcut.branches:
            parameters += [branch.norm.weight, branch.norm.bias, branch.conv.weight, branch.conv.bias]
    return _KernelShortcut.apply(
        tokens, block_output, residual, shortcut, height, width, num_prefix_tokens, *parameters
    )
