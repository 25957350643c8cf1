"""The depth-wise shortcut's PyTorch-ops training path: two autograd nodes, each with a reference path in plain ops.
Where the fused CPU kernel applies (dw_shortcut_kernel.py) it runs instead; these run without a compiler, on other
devices and dtypes, and wherever the kernel steps aside.

`recomputing_shortcut` is the shortcut's training forward (GELU -> BatchNorm2d -> depth-wise conv per branch) as
one node that keeps only its input (a view of the block input, which the block keeps anyway) and each BatchNorm's
batch mean and inverse deviation: backward recomputes the GELU and BatchNorm outputs (two cheap passes) instead of
holding two activation-sized tensors per block for the whole step, and writes the input gradient straight into a
full-size tensor, so no zero-padded copy is made at the class-token boundary.

`add_shortcut` adds the shortcut to the patch tokens of a block output in one pass, where padding the
shortcut for the class tokens and adding would write a second full-size tensor.

Both are used only where their hand-written backward is known to match: `DepthwiseShortcut` falls back to the
plain composition under function transforms, graph capture, hooks on its parts, another module in the activation
slot, or any norm other than a training-mode `nn.BatchNorm2d`. Under autocast a float32 shortcut turns it off
and computes in float32 (`DepthwiseShortcut.forward`), from half-precision tokens too (`upcasts`). A second-order
backward (`create_graph=True`) recomputes the plain composition with autograd, so gradient penalties see the exact
derivative.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks


def patch_grid(tokens: torch.Tensor, height: int, width: int, num_prefix_tokens: int) -> torch.Tensor:
    """The `(B, C, H, W)` view of the row-major patch tokens of `(B, prefix + H*W, C)` tokens (channels-last)."""
    batch_size, _, channels = tokens.shape
    return tokens[:, num_prefix_tokens:].reshape(batch_size, height, width, channels).permute(0, 3, 1, 2)


def grid_tokens(grid: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` back to `(B, H*W, C)` tokens: a view when the grid is channels-last."""
    batch_size, channels, height, width = grid.shape
    return grid.permute(0, 2, 3, 1).reshape(batch_size, height * width, channels)


def autocast_off(device_type: str):
    """A context with autocast off on `device_type`; nothing to turn off where autocast does not exist ("meta")."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def has_float32_weights(shortcut: nn.Module) -> bool:
    """Whether the shortcut's conv weights (fused or not) are float32: it then computes in float32."""
    weight = shortcut.fused_weight if shortcut.fused_weight is not None else shortcut.branches[0].conv.weight
    return weight.dtype == torch.float32


def upcasts(shortcut: nn.Module, tokens: torch.Tensor) -> bool:
    """Whether the shortcut computes from half-precision `tokens` in float32, its weights' dtype (DWSwin's bf16
    stream under autocast). The paths cast inside, so that the kernel's node, the recomputing node and the
    checkpointed recompute keep the tokens themselves (a view of the block input) rather than a float32 copy. Other
    mixes of dtypes are left to the modules."""
    return tokens.dtype in (torch.bfloat16, torch.float16) and has_float32_weights(shortcut)


def _capturing_or_transforming() -> bool:
    """Graph capture (compile, export, tracing) or a `torch.func` transform: the plain ops must be seen."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()  # torch >= 2.6
    return (
        torch.compiler.is_compiling()
        or exporting
        or torch.jit.is_tracing()
        or torch._C._functorch.peek_interpreter_stack() is not None
    )


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _global_hooks_registered() -> bool:
    """Hooks registered for every module (`register_module_forward_hook` and the like) must see the module calls."""
    return any((
        module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks,
        module_hooks._global_backward_hooks, module_hooks._global_backward_pre_hooks,
    ))  # fmt: skip


def _runs_as_plain_modules(shortcut: nn.Module, branches: bool = True) -> bool:
    """Whether a hand-written path may stand in for the modules of `shortcut`: no graph capture or function
    transform, no hooks (global, on the activation, a branch, its norm or its conv), an `nn.GELU` activation and,
    when `branches`, in each branch an affine, statistics-tracking `nn.BatchNorm2d` and a zero-padded `nn.Conv2d`
    with a bias. Shared by the recomputing node and the fused kernel."""
    if _capturing_or_transforming() or _global_hooks_registered():
        return False
    activation = shortcut.activation
    if type(activation) is not nn.GELU or _has_hooks(activation):
        return False
    if not branches:
        return True
    for branch in shortcut.branches:
        norm, conv = branch.norm, branch.conv
        if _has_hooks(branch) or _has_hooks(norm) or _has_hooks(conv):
            return False
        if type(norm) is not nn.BatchNorm2d or not (norm.affine and norm.track_running_stats):
            return False
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or conv.bias is None:
            return False
    return True


def recomputation_applies(shortcut: nn.Module, tokens: torch.Tensor) -> bool:
    """Whether `recomputing_shortcut` computes exactly what the modules of `shortcut` would, autograd included."""
    if not (shortcut.training and torch.is_grad_enabled()):
        return False
    return _runs_as_plain_modules(shortcut) and all(branch.norm.training for branch in shortcut.branches)


def _batch_norm_training(norm: nn.BatchNorm2d, grid: torch.Tensor):
    """`norm(grid)` in training mode, also returning the batch mean and inverse deviation backward needs; the
    running statistics move exactly as `nn.BatchNorm2d.forward` moves them."""
    momentum = norm.momentum
    norm.num_batches_tracked.add_(1)
    if momentum is None:  # a cumulative moving average
        momentum = 1.0 / float(norm.num_batches_tracked)
    return torch.ops.aten._native_batch_norm_legit(
        grid, norm.weight, norm.bias, norm.running_mean, norm.running_var, True, momentum, norm.eps
    )


class _RecomputingShortcut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, shortcut, height, width, num_prefix_tokens, *parameters):
        grid = patch_grid(tokens, height, width, num_prefix_tokens)
        grid = grid.float() if upcasts(shortcut, tokens) else grid
        activated = F.gelu(grid, approximate=shortcut.activation.approximate)
        output, statistics = None, []
        for branch in shortcut.branches:
            normalized, mean, inverse_std = _batch_norm_training(branch.norm, activated)
            conv = branch.conv
            convolved = F.conv2d(normalized, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            output = convolved if output is None else output.add_(convolved)
            statistics += [mean, inverse_std]
        ctx.shortcut, ctx.grid_shape = shortcut, (height, width, num_prefix_tokens)
        ctx.save_for_backward(tokens, *statistics, *parameters)
        return grid_tokens(output)

    @staticmethod
    def backward(ctx, output_grad):
        tokens, *saved = ctx.saved_tensors
        shortcut, (height, width, num_prefix_tokens) = ctx.shortcut, ctx.grid_shape
        num_branches = len(shortcut.branches)
        statistics, parameters = saved[: 2 * num_branches], saved[2 * num_branches :]
        if torch.is_grad_enabled():
            tokens_grad, *parameter_grads = _differentiable_backward(
                shortcut, tokens, parameters, output_grad, ctx.grid_shape
            )
            return (tokens_grad, None, None, None, None, *parameter_grads)

        grid = patch_grid(tokens, height, width, num_prefix_tokens)
        grid = grid.float() if upcasts(shortcut, tokens) else grid
        approximate = shortcut.activation.approximate
        activated = F.gelu(grid, approximate=approximate)
        batch_size, channels = grid.shape[:2]
        grid_grad = output_grad.reshape(batch_size, height, width, channels).permute(0, 3, 1, 2)
        activated_grad, parameter_grads = None, []
        for index, branch in enumerate(shortcut.branches):
            norm, conv = branch.norm, branch.conv
            mean, inverse_std = statistics[2 * index], statistics[2 * index + 1]
            norm_weight, norm_bias, conv_weight, _ = parameters[4 * index : 4 * index + 4]
            scale = (norm_weight * inverse_std).view(1, -1, 1, 1)
            normalized = torch.addcmul(norm_bias.view(1, -1, 1, 1) - mean.view(1, -1, 1, 1) * scale, activated, scale)
            normalized_grad, conv_weight_grad, conv_bias_grad = torch.ops.aten.convolution_backward(
                grid_grad, normalized, conv_weight, [channels], conv.stride, conv.padding, conv.dilation, False,
                [0, 0], conv.groups, [True, True, True],
            )  # fmt: skip
            branch_grad, norm_weight_grad, norm_bias_grad = torch.ops.aten.native_batch_norm_backward(
                normalized_grad, activated, norm_weight, None, None, mean, inverse_std, True, norm.eps,
                [True, True, True],
            )  # fmt: skip
            activated_grad = branch_grad if activated_grad is None else activated_grad.add_(branch_grad)
            parameter_grads += [norm_weight_grad, norm_bias_grad, conv_weight_grad, conv_bias_grad]
        tokens_grad = torch.empty_like(tokens, dtype=grid.dtype)
        tokens_grad[:, :num_prefix_tokens].zero_()
        torch.ops.aten.gelu_backward.grad_input(
            activated_grad, grid, approximate=approximate,
            grad_input=patch_grid(tokens_grad, height, width, num_prefix_tokens),
        )  # fmt: skip
        return (tokens_grad.to(tokens.dtype), None, None, None, None, *parameter_grads)


def _differentiable_backward(shortcut, tokens, parameters, output_grad, grid_shape):
    """The backward of the plain composition, recorded for a further derivative; BatchNorm statistics stay still
    and, as in the forward, autocast is off (a backward called under autocast would otherwise recompute in bf16)."""
    from .dw_layers import _FrozenRunningStatistics, reference_shortcut  # noqa: PLC0415 (a cycle at import)

    with torch.enable_grad(), autocast_off(tokens.device.type), _FrozenRunningStatistics(shortcut.branches):
        output = reference_shortcut(shortcut, tokens, *grid_shape)
        inputs = [tokens, *parameters]
        wanted = [tensor for tensor in inputs if tensor.requires_grad]
        grads = iter(torch.autograd.grad(output, wanted, output_grad, create_graph=True, allow_unused=True))
    return tuple(next(grads) if tensor.requires_grad else None for tensor in inputs)


def recomputing_shortcut(shortcut: nn.Module, tokens: torch.Tensor, height: int, width: int, num_prefix_tokens: int):
    """The training forward of `shortcut` through `_RecomputingShortcut`; call it where `recomputation_applies`."""
    parameters = []
    for branch in shortcut.branches:
        parameters += [branch.norm.weight, branch.norm.bias, branch.conv.weight, branch.conv.bias]
    return _RecomputingShortcut.apply(tokens, shortcut, height, width, num_prefix_tokens, *parameters)


class _AddToPatchTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block_output, shortcut_output, num_prefix_tokens):
        ctx.num_prefix_tokens, ctx.shortcut_dtype = num_prefix_tokens, shortcut_output.dtype
        output = torch.empty_like(block_output, memory_format=torch.contiguous_format)
        output[:, :num_prefix_tokens] = block_output[:, :num_prefix_tokens]
        torch.add(block_output[:, num_prefix_tokens:], shortcut_output, out=output[:, num_prefix_tokens:])
        return output

    @staticmethod
    def backward(ctx, output_grad):
        return output_grad, output_grad[:, ctx.num_prefix_tokens :].to(ctx.shortcut_dtype), None


def add_shortcut(block_output: torch.Tensor, shortcut_output: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Add the shortcut to the patch tokens of `block_output`, as a new tensor; prefix (class) tokens receive
    zeros."""
    if not num_prefix_tokens:
        return block_output + shortcut_output
    plain = (
        _capturing_or_transforming()
        or torch.promote_types(block_output.dtype, shortcut_output.dtype) != block_output.dtype
        or block_output.shape[0] != shortcut_output.shape[0]
    )
    if plain:
        return block_output + F.pad(shortcut_output, (0, 0, num_prefix_tokens, 0))
    return _AddToPatchTokens.apply(block_output, shortcut_output, num_prefix_tokens)
