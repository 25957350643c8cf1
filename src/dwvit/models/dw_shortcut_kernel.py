"""The depth-wise shortcut as a fused CPU kernel: four passes over the tokens per training step instead of ~22.

PyTorch runs the shortcut as separate memory-bound ops (GELU, BatchNorm statistics, normalise, conv, their
backward kernels), each a full pass over a `(batch, tokens, channels)` tensor. `csrc/dw_shortcut_cpu.cpp` folds
them: the caller turns every branch's BatchNorm and kernel into one k x k scale kernel and shift kernel, and the
C++ loops compute the batch statistics (one read), the output (one read, one write), the backward reductions
(two reads) and the input gradient (two reads, one write), recomputing GELU from the tokens each time. What is
left in Python is per-channel arithmetic on `(k*k, C)` tensors.

The library is compiled on first use with the host C++ compiler (about two seconds) into a cache folder keyed by
the source, the compiler and the CPU, and loaded with ctypes. Without a compiler, with `DWVIT_CPU_KERNEL=0`, or
wherever `kernel_applies` says no (graph capture, hooks on the shortcut's parts, other modules in its slots,
another dtype or device), the shortcut runs as PyTorch ops as before.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .dw_shortcut_autograd import _capturing_or_transforming, _differentiable_backward, _has_hooks, module_hooks

_SOURCE_NAME = "dw_shortcut_cpu.cpp"
_FLAGS = ["-O3", "-std=gnu++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]


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


def _compile(source: Path, compiler: str, target: Path) -> None:
    """Build the library into `target` whole or not at all (a temporary file renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        for arch in (["-march=native"], []):  # a compiler that does not know the host CPU builds generic code
            result = subprocess.run(
                [compiler, *_FLAGS, *arch, str(source), "-o", str(built)], capture_output=True, text=True
            )
            if result.returncode == 0:
                os.replace(built, target)
                return
        raise RuntimeError(f"{compiler} could not build {source.name}: {result.stderr.strip()[-2000:]}")


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; `None` (with one warning) where it cannot be had."""
    if os.environ.get("DWVIT_CPU_KERNEL", "1") == "0" or platform.system() != "Linux":
        return None
    source = _source_path()
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if source is None or compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256("\0".join([source.read_text(), version, " ".join(_FLAGS), _cpu_signature()]).encode())
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
    library.dws_statistics.argtypes = [pointer, *[i64] * 5, pointer, pointer, pointer, i32]
    library.dws_forward.argtypes = [*[pointer] * 6, *[i64] * 7, i32]
    library.dws_backward_reductions.argtypes = [pointer, pointer, *[i64] * 7, pointer, pointer, i32]
    library.dws_input_gradient.argtypes = [*[pointer] * 6, *[i64] * 7, i32]
    return library


def kernel_applies(shortcut: nn.Module, tokens: torch.Tensor) -> bool:
    """Whether the kernel computes what the modules of `shortcut` would, for these tokens, autograd included.

    Not under autocast: the modules would round the conv's inputs to half precision, which a kernel that folds
    BatchNorm into the conv cannot repeat; the PyTorch path keeps those semantics."""
    if tokens.device.type != "cpu" or tokens.dtype != torch.float32 or not tokens.is_contiguous():
        return False
    if _capturing_or_transforming() or torch.is_autocast_enabled("cpu"):
        return False
    global_hooks = (
        module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks,
        module_hooks._global_backward_hooks, module_hooks._global_backward_pre_hooks,
    )  # fmt: skip
    if any(global_hooks):
        return False
    activation = shortcut.activation
    if type(activation) is not nn.GELU or activation.approximate != "none" or _has_hooks(activation):
        return False
    if shortcut.is_fused:
        return shortcut.fused_weight.dtype == torch.float32 and load_library() is not None
    for branch in shortcut.branches:
        norm, conv = branch.norm, branch.conv
        if _has_hooks(branch) or _has_hooks(norm) or _has_hooks(conv):
            return False
        if type(norm) is not nn.BatchNorm2d or not (norm.affine and norm.track_running_stats):
            return False
        if norm.training != shortcut.branches[0].norm.training:
            return False
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or conv.bias is None:
            return False
        if any(tensor.dtype != torch.float32 for tensor in (norm.weight, norm.running_mean, conv.weight)):
            return False
    return load_library() is not None


def kernel_adds(shortcut: nn.Module, block_output: torch.Tensor, tokens: torch.Tensor) -> bool:
    """Whether the kernel can also add the shortcut to `block_output` (same shape, float32, contiguous); the
    module's own forward hooks must see its output, so they keep the separate add."""
    return (
        not _has_hooks(shortcut)
        and block_output.shape == tokens.shape
        and block_output.dtype == torch.float32
        and block_output.is_contiguous()
        and block_output.device == tokens.device
        and kernel_applies(shortcut, tokens)
    )


def _taps(weight: torch.Tensor, kernel: int) -> torch.Tensor:
    """A `(C, 1, k, k)` depth-wise weight as `(kernel*kernel, C)` taps, centred in the larger `kernel` window."""
    inset = (kernel - weight.shape[-1]) // 2
    if inset:
        weight = F.pad(weight, (inset, inset, inset, inset))
    return weight.reshape(weight.shape[0], kernel * kernel).t()


def _fold(shortcut: nn.Module, moments):
    """Every branch's BatchNorm (with the given `(mean, variance)` per branch) and kernel as one k x k scale kernel and
    shift kernel in taps, plus the summed conv bias; also each branch's `(mean, inverse_std)` for backward."""
    with torch.no_grad():
        if shortcut.is_fused:
            kernel = shortcut.fused_weight.shape[-1]
            scale_taps = _taps(shortcut.fused_weight, kernel).contiguous()
            shift_taps = _taps(shortcut.fused_shift_weight.float(), kernel).contiguous()
            return kernel, scale_taps, shift_taps, shortcut.fused_bias.float().contiguous(), []
        kernel = max(branch.conv.kernel_size[0] for branch in shortcut.branches)
        scale_taps = shift_taps = bias = 0
        statistics = []
        for branch, (mean, variance) in zip(shortcut.branches, moments):
            norm, conv = branch.norm, branch.conv
            inverse_std = torch.rsqrt(variance + norm.eps)
            scale = norm.weight * inverse_std
            taps = _taps(conv.weight, kernel)
            scale_taps = scale_taps + taps * scale
            shift_taps = shift_taps + taps * (norm.bias - mean * scale)
            bias = bias + conv.bias
            statistics += [mean, inverse_std]
    return kernel, scale_taps.contiguous(), shift_taps.contiguous(), bias.contiguous(), statistics


def _folded_with_running_statistics(shortcut: nn.Module):
    """`_fold` with each BatchNorm's running statistics (eval mode, or the fused form), cached on the module until
    a parameter or buffer changes (any in-place update bumps its version) or the inference mode does."""
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
    folded = _fold(shortcut, [(b.norm.running_mean, b.norm.running_var) for b in shortcut.branches])
    shortcut._kernel_folding = (key, folded)
    return folded


def _batch_statistics(library, patches, shape, threads, branches):
    """The batch mean and (biased) variance of GELU(patches) per channel; moves every branch's running statistics
    exactly as `nn.BatchNorm2d` does (unbiased variance, momentum or a cumulative average)."""
    moments = torch.empty(3, shape[-1])
    mean, variance, unbiased = moments.unbind()
    library.dws_statistics(
        patches.data_ptr(), *shape, patches.stride(0), mean.data_ptr(), variance.data_ptr(), unbiased.data_ptr(),
        threads,
    )  # fmt: skip
    with torch.no_grad():
        for branch in branches:
            norm = branch.norm
            norm.num_batches_tracked.add_(1)
            momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
            norm.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            norm.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    return mean, variance


class _KernelShortcut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, block_output, shortcut, height, width, num_prefix_tokens, *parameters):
        library, threads = load_library(), torch.get_num_threads()
        batch_size, channels = tokens.shape[0], tokens.shape[2]
        patches = tokens[:, num_prefix_tokens:]
        shape = (batch_size, height, width, channels)
        batch_statistics = not shortcut.is_fused and shortcut.branches[0].norm.training
        if batch_statistics:
            moments = _batch_statistics(library, patches, shape, threads, shortcut.branches)
            folded = _fold(shortcut, [moments] * len(shortcut.branches))
        else:
            folded = _folded_with_running_statistics(shortcut)
        kernel, scale_taps, shift_taps, bias, statistics = folded
        if block_output is None:
            output = tokens.new_empty((batch_size, height * width, channels))
            written, added = output, None
        else:
            output = torch.empty_like(block_output)
            output[:, :num_prefix_tokens] = block_output[:, :num_prefix_tokens]
            written, added = output[:, num_prefix_tokens:], block_output[:, num_prefix_tokens:]
        library.dws_forward(
            patches.data_ptr(), scale_taps.data_ptr(), shift_taps.data_ptr(), bias.data_ptr(),
            None if added is None else added.data_ptr(), written.data_ptr(), *shape, kernel, tokens.stride(0),
            output.stride(0), threads,
        )  # fmt: skip
        ctx.shortcut, ctx.grid_shape = shortcut, (height, width, num_prefix_tokens)
        ctx.kernel, ctx.batch_statistics, ctx.adds = kernel, batch_statistics, block_output is not None
        ctx.fused = shortcut.is_fused
        fused = [shortcut.fused_weight] if ctx.fused else []
        ctx.save_for_backward(tokens, *fused, *statistics, *parameters)
        return output

    @staticmethod
    def backward(ctx, output_grad):
        shortcut, (height, width, num_prefix_tokens) = ctx.shortcut, ctx.grid_shape
        tokens, *saved = ctx.saved_tensors
        block_grad = output_grad if ctx.adds else None
        if ctx.adds:
            output_grad = output_grad[:, num_prefix_tokens:]
        fused_weight = saved.pop(0) if ctx.fused else None
        num_branches = 0 if fused_weight is not None else len(shortcut.branches)
        statistics, parameters = saved[: 2 * num_branches], saved[2 * num_branches :]
        if torch.is_grad_enabled():
            tokens_grad, *parameter_grads = _differentiable_backward(
                shortcut, tokens, parameters, output_grad, ctx.grid_shape
            )
            return (tokens_grad, block_grad, None, None, None, None, *parameter_grads)

        library, threads, kernel = load_library(), torch.get_num_threads(), ctx.kernel
        batch_size, channels = tokens.shape[0], tokens.shape[2]
        shape = (batch_size, height, width, channels)
        if output_grad.stride(-1) != 1 or output_grad.stride(1) != channels:
            output_grad = output_grad.contiguous()
        patches = tokens[:, num_prefix_tokens:]
        if fused_weight is not None:
            scale_taps, parameter_grads = _taps(fused_weight, kernel).contiguous(), []
            alpha = beta = torch.zeros(channels)
        else:
            scale_taps, alpha, beta, parameter_grads = _parameter_gradients(
                library, threads, patches, output_grad, shape, kernel, ctx.batch_statistics, statistics, parameters
            )
        tokens_grad = torch.empty_like(tokens)
        tokens_grad[:, :num_prefix_tokens] = 0
        library.dws_input_gradient(
            patches.data_ptr(), output_grad.data_ptr(), scale_taps.data_ptr(), alpha.data_ptr(), beta.data_ptr(),
            tokens_grad[:, num_prefix_tokens:].data_ptr(), *shape, kernel, tokens.stride(0), output_grad.stride(0),
            threads,
        )  # fmt: skip
        return (tokens_grad, block_grad, None, None, None, None, *parameter_grads)


def _parameter_gradients(library, threads, patches, output_grad, shape, kernel, batch_statistics, statistics,
                         parameters):
    """Every branch's BatchNorm and conv gradients from two per-tap reductions, and what the input gradient needs:
    the folded scale kernel and the per-channel terms `alpha + beta * GELU(x)` of BatchNorm's batch statistics."""
    channels, count = shape[-1], shape[0] * shape[1] * shape[2]
    reductions = torch.zeros(2, kernel * kernel, channels, dtype=torch.float64)
    library.dws_backward_reductions(
        patches.data_ptr(), output_grad.data_ptr(), *shape, kernel, patches.stride(0), output_grad.stride(0),
        reductions[0].data_ptr(), reductions[1].data_ptr(), threads,
    )  # fmt: skip
    # tap_grad[tap] = sum_p grad[p] * GELU(x)[p + tap]; tap_count[tap] = sum_p grad[p], over p with p + tap in grid.
    tap_grad, tap_count = reductions.float().unbind()
    bias_grad = tap_count[(kernel * kernel) // 2]  # the centre tap is in the grid for every output
    scale_taps = alpha = beta = 0
    parameter_grads = []
    for index in range(len(parameters) // 4):
        mean, inverse_std = statistics[2 * index : 2 * index + 2]
        norm_weight, norm_bias, conv_weight, _ = parameters[4 * index : 4 * index + 4]
        size = conv_weight.shape[-1]
        scale = norm_weight * inverse_std
        if size == kernel:
            branch_grad, branch_count = tap_grad, tap_count
        else:  # the branch's window, centred in the largest kernel
            inset = (kernel - size) // 2
            window = (slice(inset, kernel - inset),) * 2
            branch_grad = tap_grad.view(kernel, kernel, channels)[window].reshape(size * size, channels)
            branch_count = tap_count.view(kernel, kernel, channels)[window].reshape(size * size, channels)
        taps = _taps(conv_weight, size)
        scale_taps = scale_taps + _taps(conv_weight, kernel) * scale
        shift = norm_bias - mean * scale
        conv_weight_grad = (branch_grad * scale + branch_count * shift).t().reshape(conv_weight.shape)
        norm_bias_grad = (taps * branch_count).sum(0)  # the sum of the normalised tensor's gradient
        norm_weight_grad = inverse_std * ((taps * branch_grad).sum(0) - mean * norm_bias_grad)
        if batch_statistics:
            alpha = alpha + scale * (inverse_std * norm_weight_grad * mean - norm_bias_grad) / count
            beta = beta - scale * inverse_std * norm_weight_grad / count
        parameter_grads += [norm_weight_grad, norm_bias_grad, conv_weight_grad, bias_grad]
    if not batch_statistics:
        alpha = beta = torch.zeros(channels)
    return scale_taps.contiguous(), alpha.contiguous(), beta.contiguous(), parameter_grads


def kernel_shortcut(shortcut: nn.Module, tokens: torch.Tensor, height: int, width: int, num_prefix_tokens: int,
                    block_output: torch.Tensor | None = None) -> torch.Tensor:
    """The shortcut of `tokens` through the fused kernel, `(B, H*W, C)`; with `block_output`, that tensor with the
    shortcut added to its patch tokens, in the same pass. Call it where `kernel_applies` (and `kernel_adds`)."""
    parameters = []
    if not shortcut.is_fused:
        for branch in shortcut.branches:
            parameters += [branch.norm.weight, branch.norm.bias, branch.conv.weight, branch.conv.bias]
    return _KernelShortcut.apply(tokens, block_output, shortcut, height, width, num_prefix_tokens, *parameters)
