"""Layers shared by every DW family: the depth-wise convolution shortcut, stochastic depth and the
classification loss. Kept free of package-absolute imports so that it travels with remote code."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def _capturing() -> bool:
    """Whether a graph is being captured (compile, export, tracing): capture sees plain ops, not the eager
    shortcuts below, and the compiler fuses those itself."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def scratch_in_place() -> bool:
    """Whether fresh intermediate tensors may be overwritten: no autograd graph and no graph capture."""
    return not torch.is_grad_enabled() and not _capturing()


def block_groups(num_blocks: int, span: int) -> list[tuple[int, int]]:
    """Split `num_blocks` consecutive blocks into half-open `(start, end)` groups of at most `span` blocks.

    One depth-wise shortcut bypasses each group (the paper's variant 1 for `span > 1`); the last group is
    shorter when `span` does not divide `num_blocks`, so a shortcut never reaches past the blocks it is given.
    """
    return [(start, min(start + span, num_blocks)) for start in range(0, num_blocks, span)]


def _batch_norm_as_affine(norm: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`(scale, shift)` per channel such that eval-mode `norm(x) == x * scale + shift`, computed in `dtype`."""
    scale = torch.rsqrt(norm.running_var.to(dtype) + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.to(dtype)
    shift = -norm.running_mean.to(dtype) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.to(dtype)
    return scale, shift


class DepthwiseConvBranch(nn.Module):
    """BatchNorm2d followed by a k x k depth-wise convolution: one branch of the shortcut."""

    def __init__(self, channels: int, kernel_size: int, batch_norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, eps=batch_norm_eps)
        self.conv = nn.Conv2d(
            channels, channels, kernel_size, stride=1, padding=kernel_size // 2, groups=channels, bias=True
        )

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(grid))


class DepthwiseShortcut(nn.Module):
    """The paper's shortcut: GELU -> BatchNorm2d -> depth-wise Conv2d on the 2-D grid of patch tokens.

    Several kernel sizes build independent parallel branches (variant 2) whose outputs are summed; the GELU
    is shared because every branch applies it to the same input. Input and output are `(batch, H*W, C)`
    patch tokens in row-major grid order; the caller keeps class tokens out.

    For inference, `fuse()` re-parameterizes the module exactly (see `fuse`); `train()` undoes it.
    """

    def __init__(self, channels: int, kernel_sizes: list[int] | tuple[int, ...] = (3,), batch_norm_eps: float = 1e-5):
        super().__init__()
        self.activation = nn.GELU()
        self.branches = nn.ModuleList(DepthwiseConvBranch(channels, k, batch_norm_eps) for k in kernel_sizes)
        # Derived from the branches by `fuse()`; never saved, so checkpoints always hold the trainable form.
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_shift_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)
        self._bias_maps: dict = {}
        # Set by `model.gradient_checkpointing_enable()` (transformers toggles every module with this attribute):
        # the shortcut then keeps no activations for backward and recomputes them, like the blocks beside it.
        self.gradient_checkpointing = False

    @property
    def is_fused(self) -> bool:
        return self.fused_weight is not None

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold every branch's BatchNorm (running statistics) into its conv and merge the branches into one conv.

        A branch computes `conv_w(s * g + t) + b` on the zero-padded grid of `g = GELU(x)`, where
        `s = gamma / sqrt(var + eps)` and `t = beta - mean * s`. By linearity this equals
        `conv_{w*s}(g) + conv_{w*t}(1) + b`: the first term merges across branches into one conv of the
        largest kernel (smaller kernels zero-padded, centred), and `conv_{w*t}(1) + b` is a bias *map* that is
        constant inside the grid but differs within `k // 2` of its borders, where zero padding drops part of
        the shift. The map is computed exactly per grid size (and cached), so the fused module is exact.
        """
        if self.training:
            raise RuntimeError("DepthwiseShortcut.fuse() uses BatchNorm running statistics: call .eval() first.")
        kernel = max(branch.conv.kernel_size[0] for branch in self.branches)
        reference = self.branches[0].conv.weight
        channels = reference.shape[0]
        # float64 keeps the folded weights as close as the parameter dtype allows to the unfused computation.
        weight = torch.zeros(channels, 1, kernel, kernel, dtype=torch.float64, device=reference.device)
        shift_weight = torch.zeros_like(weight)
        bias = torch.zeros(channels, dtype=torch.float64, device=reference.device)
        for branch in self.branches:
            norm, conv = branch.norm, branch.conv
            scale, shift = _batch_norm_as_affine(norm, torch.float64)
            k = conv.kernel_size[0]
            offset = (kernel - k) // 2
            branch_weight = conv.weight.double()
            weight[:, :, offset : offset + k, offset : offset + k] += branch_weight * scale.view(-1, 1, 1, 1)
            shift_weight[:, :, offset : offset + k, offset : offset + k] += branch_weight * shift.view(-1, 1, 1, 1)
            if conv.bias is not None:
                bias += conv.bias.double()
        self.fused_weight = weight.to(reference.dtype)
        self.fused_shift_weight = shift_weight.to(reference.dtype)
        self.fused_bias = bias.to(reference.dtype)
        self._bias_maps = {}

    def unfuse(self) -> None:
        """Drop the fused form; the module computes from its branches again."""
        self.fused_weight = None
        self.fused_shift_weight = None
        self.fused_bias = None
        self._bias_maps = {}

    def train(self, mode: bool = True):
        # The fused form freezes BatchNorm statistics and would miss parameter updates: training undoes it.
        if mode:
            self.unfuse()
        return super().train(mode)

    def _bias_map(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The fused bias at every grid position, `(1, C, H, W)`: `conv_{w*t}(ones) + b` with zero padding."""
        key = (height, width, dtype, self.fused_shift_weight.device)
        # Graph capture (compile, export, tracing) must see the computation, not a Python-side cache.
        capturing = _capturing()
        if not capturing and key in self._bias_maps:
            return self._bias_maps[key]
        channels, kernel = self.fused_shift_weight.shape[0], self.fused_shift_weight.shape[-1]
        ones = self.fused_shift_weight.new_ones(1, channels, height, width)
        bias_map = F.conv2d(ones, self.fused_shift_weight, self.fused_bias, padding=kernel // 2, groups=channels)
        bias_map = bias_map.to(dtype)
        if not capturing:
            self._bias_maps[key] = bias_map
        return bias_map

    def forward(self, tokens: torch.Tensor, height: int, width: int, num_prefix_tokens: int = 0) -> torch.Tensor:
        """The shortcut for the patch tokens of `tokens`, `(batch, H*W, C)`, skipping `num_prefix_tokens` leading
        (class) tokens, which never enter the convolution."""
        batch_size, num_tokens, channels = tokens.shape
        if num_tokens - num_prefix_tokens != height * width:
            raise ValueError(
                f"The depth-wise shortcut got {num_tokens - num_prefix_tokens} patch tokens for a {height}x{width} "
                f"grid; expected {height * width}."
            )
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            output = torch.utils.checkpoint.checkpoint(
                self._shortcut_forward,
                tokens,
                height,
                width,
                num_prefix_tokens,
                use_reentrant=False,
                context_fn=self._recompute_contexts,
            )
        else:
            output = self._shortcut_forward(tokens, height, width, num_prefix_tokens)
        # The channels-last convolution output permutes back to tokens without a copy.
        return output.permute(0, 2, 3, 1).reshape(batch_size, height * width, channels)

    def _shortcut_forward(self, tokens: torch.Tensor, height: int, width: int, num_prefix_tokens: int) -> torch.Tensor:
        batch_size, _, channels = tokens.shape
        if num_prefix_tokens and torch.is_grad_enabled() and tokens.requires_grad and not _capturing():
            activated = _PatchTokenGELU.apply(tokens, num_prefix_tokens, self.activation.approximate)
        elif num_prefix_tokens and scratch_in_place():
            activated = _gelu_of_patch_tokens(tokens, num_prefix_tokens, self.activation.approximate)
        else:
            activated = self.activation(tokens[:, num_prefix_tokens:])
        # A (B, H, W, C) view permuted to NCHW is channels-last, so BatchNorm and the oneDNN depth-wise conv
        # run channels-last without a copy.
        grid = activated.reshape(batch_size, height, width, channels).permute(0, 3, 1, 2)
        return self._grid_forward(grid)

    def _recompute_contexts(self):
        """Checkpoint contexts: the first forward runs as is; the recomputation must not move BatchNorm statistics."""
        return contextlib.nullcontext(), self._batch_norm_statistics_frozen()

    @contextlib.contextmanager
    def _batch_norm_statistics_frozen(self):
        # Momentum 0 keeps the running statistics exactly (running * 1 + batch * 0); the batch counter is restored.
        norms = [branch.norm for branch in self.branches]
        saved = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
        for norm in norms:
            norm.momentum = 0.0
        try:
            yield
        finally:
            for norm, (momentum, batches) in zip(norms, saved):
                norm.momentum = momentum
                norm.num_batches_tracked.copy_(batches)

    def _grid_forward(self, grid: torch.Tensor) -> torch.Tensor:
        """The summed branches on an activated `(B, C, H, W)` grid."""
        # Without autograd the activated grid and the conv outputs are scratch, so work happens in place: on the
        # CPU every full-size buffer avoided is also a round of page faults avoided.
        in_place = scratch_in_place()
        if self.fused_weight is not None and not self.training:
            channels, height, width = grid.shape[1:]
            kernel = self.fused_weight.shape[-1]
            output = F.conv2d(grid, self.fused_weight, None, padding=kernel // 2, groups=channels)
            bias_map = self._bias_map(height, width, output.dtype)
            return output.add_(bias_map) if in_place else output + bias_map
        if in_place and not any(branch.norm.training or branch.norm.running_mean is None for branch in self.branches):
            return self._branches_in_place(grid)
        output = self.branches[0](grid)
        for branch in self.branches[1:]:
            output = output + branch(grid)
        return output

    def _branches_in_place(self, grid: torch.Tensor) -> torch.Tensor:
        """Inference with running statistics: each BatchNorm is a per-channel affine map, and the last branch
        applies it to `grid` in place instead of allocating its normalised copy."""
        output = None
        for index, branch in enumerate(self.branches):
            scale, shift = _batch_norm_as_affine(branch.norm, branch.norm.running_var.dtype)
            last = index == len(self.branches) - 1
            normalised = torch.addcmul(
                shift.view(1, -1, 1, 1), grid, scale.view(1, -1, 1, 1), out=grid if last else None
            )
            branch_output = branch.conv(normalised)
            output = branch_output if output is None else output.add_(branch_output)
        return output


def _gelu_of_patch_tokens(tokens: torch.Tensor, num_prefix_tokens: int, approximate: str) -> torch.Tensor:
    """GELU of `tokens[:, num_prefix_tokens:]` as a new dense tensor. Gathering the strided slice into a copy and
    applying GELU in place there is faster than GELU on the strided slice, which misses the vectorized loop."""
    patch_tokens = tokens[:, num_prefix_tokens:].clone(memory_format=torch.contiguous_format)
    return torch.ops.aten.gelu_(patch_tokens, approximate=approximate)


class _PatchTokenGELU(torch.autograd.Function):
    """GELU of the patch tokens, `tokens[:, num_prefix_tokens:]`, as a dense tensor.

    Autograd's slice would give `tokens` a gradient by zero-filling a full-size tensor and copying the patch
    gradient into it; this backward writes the GELU gradient straight into the patch rows of one fresh tensor
    and zeroes only the prefix rows.
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, num_prefix_tokens: int, approximate: str) -> torch.Tensor:
        ctx.save_for_backward(tokens)
        ctx.num_prefix_tokens, ctx.approximate = num_prefix_tokens, approximate
        return _gelu_of_patch_tokens(tokens, num_prefix_tokens, approximate)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (tokens,) = ctx.saved_tensors
        prefix = ctx.num_prefix_tokens
        grad_tokens = torch.empty_like(tokens, memory_format=torch.contiguous_format)
        grad_tokens[:, :prefix].zero_()
        torch.ops.aten.gelu_backward.grad_input(
            grad_output, tokens[:, prefix:], approximate=ctx.approximate, grad_input=grad_tokens[:, prefix:]
        )
        return grad_tokens, None, None


class _AddToPatchTokens(torch.autograd.Function):
    """`block_output` with `patch_update` added to its patch tokens, in one pass over the sequence.

    Zero-padding the update and adding would fill and copy a full-size tensor first; in-place slice assignment
    would make backward clone the whole gradient. The update's gradient is made dense here because the
    depth-wise conv's backward is markedly slower on a strided gradient.
    """

    @staticmethod
    def forward(ctx, block_output: torch.Tensor, patch_update: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        ctx.num_prefix_tokens = num_prefix_tokens
        output = torch.empty_like(block_output, memory_format=torch.contiguous_format)
        output[:, :num_prefix_tokens] = block_output[:, :num_prefix_tokens]
        torch.add(block_output[:, num_prefix_tokens:], patch_update, out=output[:, num_prefix_tokens:])
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, grad_output[:, ctx.num_prefix_tokens :].contiguous(), None


def add_shortcut(block_output: torch.Tensor, shortcut_output: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Add the shortcut to the patch tokens of `block_output`; prefix (class) tokens receive zeros.

    Without autograd (inference) `block_output`, a fresh tensor made by the block, is updated in place.
    """
    if num_prefix_tokens == 0:
        return block_output + shortcut_output
    if scratch_in_place():
        block_output[:, num_prefix_tokens:] += shortcut_output
        return block_output
    if _capturing() or block_output.dtype != shortcut_output.dtype:
        return block_output + F.pad(shortcut_output, (0, 0, num_prefix_tokens, 0))
    return _AddToPatchTokens.apply(block_output, shortcut_output, num_prefix_tokens)


def add_residual(branch_output: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`residual + branch_output`. Without autograd the sum is written into `branch_output`, a fresh tensor made
    by the branch, which saves allocating (and on the CPU page-faulting in) a new full-size buffer per block."""
    # Same shape and dtype, or the in-place sum would differ from the promoted one (e.g. bf16 branches under autocast).
    if scratch_in_place() and branch_output.shape == residual.shape and branch_output.dtype == residual.dtype:
        return branch_output.add_(residual)
    return residual + branch_output


def apply_activation(activation_fn: nn.Module, hidden_states: torch.Tensor, exact_gelu: bool) -> torch.Tensor:
    """`activation_fn(hidden_states)`; the exact GELU runs in place when no autograd graph is recorded (the input,
    a linear layer's fresh output, is scratch then), so the block's widest buffer is not allocated twice."""
    if exact_gelu and scratch_in_place():
        return torch.ops.aten.gelu_(hidden_states)
    return activation_fn(hidden_states)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample, scaling survivors by 1 / keep probability."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep_prob)
        return hidden_states * mask / keep_prob

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Stochastic depth rates rising linearly from 0 to `drop_path_rate` over the blocks."""
    if num_blocks <= 1:
        return [drop_path_rate] * num_blocks
    return [drop_path_rate * index / (num_blocks - 1) for index in range(num_blocks)]


def image_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """Loss for integer labels, soft or mixed labels (Mixup/CutMix), multi-label targets and regression.

    Unlike the generic `transformers` rule, float targets of shape `(batch, num_labels)` are read as class
    probabilities (soft cross-entropy) unless `config.problem_type` says multi-label.
    """
    num_labels = logits.shape[-1]
    labels = labels.to(logits.device)
    problem_type = getattr(config, "problem_type", None)
    if problem_type == "regression" or (problem_type is None and num_labels == 1):
        if num_labels == 1:
            logits, labels = logits.squeeze(-1), labels.squeeze(-1)
        return F.mse_loss(logits.float(), labels.float())
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    if labels.is_floating_point():
        if labels.shape != logits.shape:
            raise ValueError(
                f"Soft labels must have the logits' shape {tuple(logits.shape)}; got {tuple(labels.shape)}."
            )
        return torch.sum(-labels.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float().view(-1, num_labels), labels.view(-1))


class DepthwiseFusionMixin:
    """Re-parameterized inference for every family: `fuse_dw_shortcuts()` / `unfuse_dw_shortcuts()`.

    Fusion needs eval mode (it reads BatchNorm running statistics) and is undone by `model.train()`. The fused
    tensors are non-persistent buffers: `save_pretrained` after fusion writes the ordinary unfused weights, and
    a reloaded model is unfused until `fuse_dw_shortcuts()` is called again.
    """

    def fuse_dw_shortcuts(self):
        """Fold BatchNorm into each depth-wise shortcut and merge its parallel kernels, in place; returns `self`."""
        if self.training:
            raise RuntimeError(
                "fuse_dw_shortcuts() needs eval mode (it folds BatchNorm running statistics): call model.eval() "
                "first; model.train() undoes the fusion."
            )
        for module in self.modules():
            if isinstance(module, DepthwiseShortcut):
                module.fuse()
        return self

    def unfuse_dw_shortcuts(self):
        """Return every depth-wise shortcut to its trainable (branch) form; returns `self`."""
        for module in self.modules():
            if isinstance(module, DepthwiseShortcut):
                module.unfuse()
        return self

    @property
    def dw_shortcuts_fused(self) -> bool:
        shortcuts = [module for module in self.modules() if isinstance(module, DepthwiseShortcut)]
        return bool(shortcuts) and all(module.is_fused for module in shortcuts)


class RemoteCodeSaveMixin(DepthwiseFusionMixin):
    """Mixin for a family's `PreTrainedModel`: a saved head model also names its bare encoder in `auto_map`.

    It also brings `DepthwiseFusionMixin` (re-parameterized inference) to every family that lists it first.

    `transformers` only records the class being saved, so `AutoModel.from_pretrained(folder,
    trust_remote_code=True)` would otherwise find no entry for the encoder.
    """

    # The loss is a per-batch mean that ignores `num_items_in_batch`: Trainer must scale it for gradient
    # accumulation and data parallelism itself instead of trusting the model to.
    accepts_loss_kwargs = False

    def save_pretrained(self, save_directory, *args, **kwargs):
        base_model = getattr(self, self.base_model_prefix, None)
        auto_class = getattr(type(base_model), "_auto_class", None)
        if base_model is not None and base_model is not self and auto_class is not None:
            module_name = type(base_model).__module__.split(".")[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map[auto_class] = f"{module_name}.{type(base_model).__name__}"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)
