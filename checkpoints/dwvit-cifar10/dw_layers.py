"""Layers shared by every DW family: the depth-wise convolution shortcut and its initialisation, stochastic depth,
position-embedding resizing and the classification loss. Kept free of package-absolute imports so that it travels
with remote code."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import initialization as init

from .dw_shortcut_autograd import (
    _capturing_or_transforming,
    _global_hooks_registered,
    _has_hooks,
    add_shortcut,
    autocast_off,
    grid_tokens,
    has_float32_weights,
    patch_grid,
    recomputation_applies,
    recomputing_shortcut,
    upcasts,
)
from .dw_shortcut_kernel import kernel_adds, kernel_applies, kernel_shortcut


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `(batch, heads, length, head_dim)` tensors, with an optional additive mask; transformers'
    `eager` implementation. Returns the output as `(batch, length, heads, head_dim)`, like every function of
    `ALL_ATTENTION_FUNCTIONS`, and the weights applied to the values."""
    attn_weights = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    return torch.matmul(attn_weights, value).transpose(1, 2), attn_weights


def block_groups(num_blocks: int, span: int) -> list[tuple[int, int]]:
    """Split `num_blocks` consecutive blocks into half-open `(start, end)` groups of at most `span` blocks.

    One depth-wise shortcut bypasses each group (the paper's variant 1 for `span > 1`); the last group is
    shorter when `span` does not divide `num_blocks`, so a shortcut never reaches past the blocks it is given.
    """
    return [(start, min(start + span, num_blocks)) for start in range(0, num_blocks, span)]


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

    Several kernel sizes build independent parallel branches (variant 2) whose outputs are summed; the GELU is
    shared because every branch applies it to the same input. `forward` reads `(batch, prefix + H*W, C)` tokens and
    returns the shortcut of the `H*W` patch tokens, `(batch, H*W, C)`, in row-major grid order; `add_shortcut` adds
    it to a block output.

    A branch's `norm` slot may hold another module (DETR swaps every BatchNorm2d for a frozen one): the forward just
    calls it. For inference, `fuse()` re-parameterizes the module exactly; `train()` and loading weights undo it.
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
        # Set by `model.activation_checkpointing_enable()` (transformers toggles every module with this attribute):
        # the shortcut then keeps no activations for backward and recomputes them. It checkpoints itself rather than
        # being a `GradientCheckpointingLayer`, because only its own recompute can keep BatchNorm statistics still;
        # so it is not counted by `every_n_layers` and is recomputed whenever checkpointing is on.
        self.gradient_checkpointing = False

    @property
    def is_fused(self) -> bool:
        return self.fused_weight is not None

    def forward(self, tokens: torch.Tensor, height: int, width: int, num_prefix_tokens: int = 0) -> torch.Tensor:
        self._check_grid(tokens, height, width, num_prefix_tokens)
        with autocast_off(tokens.device.type) if self._in_float32_under_autocast(tokens) else contextlib.nullcontext():
            output = self._shortcut(tokens, height, width, num_prefix_tokens)
        return output.to(tokens.dtype) if upcasts(self, tokens) else output

    def _in_float32_under_autocast(self, tokens: torch.Tensor) -> bool:
        """Whether autocast is on and the shortcut's weights are float32: it then computes in float32, as autocast
        keeps its norms. In DWViT and DWCaiT its input and output are the residual stream, float32 under autocast,
        so half precision would save the memory-bound shortcut no traffic, only add casts; and every path (the fused
        kernel, the recomputing node, the plain modules) computes the same. Half-precision tokens (DWSwin's) are
        cast up inside each path and the result rounded once to their dtype (`upcasts`). A shortcut with
        half-precision weights (a model cast to bf16) runs under autocast as its modules would."""
        device = tokens.device.type
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):  # none on "meta"
            return False
        return has_float32_weights(self)

    def _shortcut(self, tokens: torch.Tensor, height: int, width: int, num_prefix_tokens: int) -> torch.Tensor:
        if self._checkpointing():
            return torch.utils.checkpoint.checkpoint(
                reference_shortcut,
                self,
                tokens,
                height,
                width,
                num_prefix_tokens,
                use_reentrant=False,
                context_fn=self._recompute_contexts,
            )
        if kernel_applies(self, tokens):
            return kernel_shortcut(self, tokens, height, width, num_prefix_tokens)
        if not self.is_fused and recomputation_applies(self, tokens):
            return recomputing_shortcut(self, tokens, height, width, num_prefix_tokens)
        return reference_shortcut(self, tokens, height, width, num_prefix_tokens)

    def add_to(self, block_output: torch.Tensor, tokens: torch.Tensor, height: int, width: int,
               num_prefix_tokens: int = 0, residual: torch.Tensor | None = None) -> torch.Tensor:
        """`block_output` with the shortcut of `tokens` added to its patch tokens: what every family's encoder does
        after a block group. Where the fused CPU kernel applies, the sum is written in the shortcut's own pass;
        otherwise (or with forward hooks on this module, which must see its output) it is
        `add_shortcut(block_output, self(tokens, ...), num_prefix_tokens)`. With `residual`, `block_output` is the
        last block's final branch and the block's own residual add `block_output + residual` is done here too (see
        `takes_residual_add`)."""
        kernel_allowed = not self._checkpointing()
        if kernel_allowed and kernel_adds(self, block_output, tokens, residual):
            self._check_grid(tokens, height, width, num_prefix_tokens)
            return kernel_shortcut(self, tokens, height, width, num_prefix_tokens, block_output, residual)
        if residual is not None:
            # A branch the kernel cannot read (bf16 under autocast) still leaves a float32 sum it can add to.
            block_output = block_output + residual
            if kernel_allowed and kernel_adds(self, block_output, tokens):
                self._check_grid(tokens, height, width, num_prefix_tokens)
                return kernel_shortcut(self, tokens, height, width, num_prefix_tokens, block_output)
        return add_shortcut(block_output, self(tokens, height, width, num_prefix_tokens), num_prefix_tokens)

    def takes_residual_add(self, block: nn.Module) -> bool:
        """Whether the group's last `block` may leave its final residual add to `add_to`, which then writes
        `branch + residual + shortcut` in the kernel's one pass instead of the block writing a sum for the kernel to
        read back. Not where anything could tell: hooks on the block must see its output, a checkpointed block
        would run the shortcut inside its recompute, and graph capture sees the plain ops."""
        checkpointed = block.gradient_checkpointing and block.training and torch.is_grad_enabled()
        return not (
            checkpointed or self._checkpointing() or _has_hooks(block) or _global_hooks_registered()
            or _capturing_or_transforming()
        )  # fmt: skip

    def _checkpointing(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    @staticmethod
    def _check_grid(tokens: torch.Tensor, height: int, width: int, num_prefix_tokens: int) -> None:
        num_patches = tokens.shape[1] - num_prefix_tokens
        if num_patches != height * width:
            raise ValueError(
                f"The depth-wise shortcut got {num_patches} patch tokens for a {height}x{width} grid; expected "
                f"{height * width}."
            )

    def _recompute_contexts(self):
        """Checkpoint contexts: the forward runs as is; its recomputation in backward must not move statistics."""
        return contextlib.nullcontext(), _FrozenRunningStatistics(self.branches)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold every branch's norm (running statistics) into its conv and merge the branches into one conv.

        A branch computes `conv_w(s * g + t) + b` on the zero-padded grid of `g = GELU(x)`, where
        `s = gamma / sqrt(var + eps)` and `t = beta - mean * s`. By linearity this equals
        `conv_{w*s}(g) + conv_{w*t}(1) + b`: the first term merges across branches into one conv of the
        largest kernel (smaller kernels zero-padded, centred), and `conv_{w*t}(1) + b` is a bias *map* that is
        constant inside the grid but differs within `k // 2` of its borders, where zero padding drops part of
        the shift. The map is computed exactly per grid size (and cached), so the fused module is exact.

        Folding runs in at least float32 and is cast to the parameters' dtype once; the bias-map terms, which
        may cancel, stay in that precision. The norm may be a BatchNorm2d or a look-alike holding the same running
        statistics (DETR's frozen BatchNorm); any other norm raises a `TypeError`.
        """
        if self.training:
            raise RuntimeError("DepthwiseShortcut.fuse() uses BatchNorm running statistics: call .eval() first.")
        reference = self.branches[0].conv.weight
        dtype = torch.promote_types(reference.dtype, torch.float32)
        channels = reference.shape[0]
        kernel = max(branch.conv.kernel_size[0] for branch in self.branches)
        weight = reference.new_zeros(channels, 1, kernel, kernel, dtype=dtype)
        shift_weight = torch.zeros_like(weight)
        bias = reference.new_zeros(channels, dtype=dtype)
        for branch in self.branches:
            scale, shift = _norm_as_affine(branch.norm, dtype)
            conv_weight = branch.conv.weight.to(dtype)
            inset = (kernel - conv_weight.shape[-1]) // 2
            window = (slice(None), slice(None), slice(inset, kernel - inset), slice(inset, kernel - inset))
            weight[window] += conv_weight * scale.view(-1, 1, 1, 1)
            shift_weight[window] += conv_weight * shift.view(-1, 1, 1, 1)
            if branch.conv.bias is not None:
                bias += branch.conv.bias.to(dtype)
        self.fused_weight = weight.to(reference.dtype)
        self.fused_shift_weight = shift_weight
        self.fused_bias = bias
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

    def _load_from_state_dict(self, *args, **kwargs):
        # New weights make the fused tensors stale: the module computes from its branches until fused again.
        self.unfuse()
        super()._load_from_state_dict(*args, **kwargs)

    def _fused_conv(self, grid: torch.Tensor) -> torch.Tensor:
        channels, height, width = grid.shape[1:]
        reach = self.fused_weight.shape[-1] // 2
        # In half precision the map is added whole, so that it is rounded once, like every other fused term.
        low_precision = grid.dtype in (torch.float16, torch.bfloat16)
        if low_precision or 2 * reach >= min(height, width):  # or every position lies near a border
            output = F.conv2d(grid, self.fused_weight, None, padding=reach, groups=channels)
            return output.add_(self._bias_map(height, width, output.dtype))
        # The conv adds the bias of the interior, where the whole window lies inside the grid; only the rows and
        # columns within `reach` of a border, where zero padding drops part of the shift, are corrected after.
        bias_map = self._bias_map(height, width, grid.dtype)  # float32 or float64 here: the conv output's dtype
        interior = bias_map[0, :, reach, reach]
        output = F.conv2d(grid, self.fused_weight, interior, padding=reach, groups=channels)
        correction = bias_map - interior.view(1, -1, 1, 1)
        borders, middle = (slice(None, reach), slice(-reach, None)), slice(reach, height - reach)
        for band in borders:
            output[:, :, band] += correction[:, :, band]  # top and bottom rows
            output[:, :, middle, band] += correction[:, :, middle, band]  # left and right columns between them
        return output

    def _bias_map(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The fused bias at every grid position, `(1, C, H, W)`: `conv_{w*t}(ones) + b` with zero padding."""
        key = (height, width, dtype, self.fused_shift_weight.device)
        # Graph capture (compile, export, tracing) must see the computation, not a Python-side cache.
        capturing = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if not capturing and key in self._bias_maps:
            return self._bias_maps[key]
        channels, kernel = self.fused_shift_weight.shape[0], self.fused_shift_weight.shape[-1]
        ones = self.fused_shift_weight.new_ones(1, channels, height, width)
        # Autocast (a direct call of `reference_shortcut` under it) would round the map before the single cast below.
        with autocast_off(ones.device.type):
            bias_map = F.conv2d(ones, self.fused_shift_weight, self.fused_bias, padding=kernel // 2, groups=channels)
        # Channels-last like the conv output it is added to: a broadcast add across layouts is several times slower.
        bias_map = bias_map.to(dtype).contiguous(memory_format=torch.channels_last)
        if not capturing:
            self._bias_maps[key] = bias_map
        return bias_map


def reference_shortcut(shortcut: DepthwiseShortcut, tokens: torch.Tensor, height: int, width: int,
                       num_prefix_tokens: int = 0) -> torch.Tensor:
    """The shortcut as plain module calls (its definition): what every faster path must compute. Half-precision
    tokens of a float32 shortcut (DWSwin's under autocast) are computed from in float32 (`upcasts`)."""
    grid = patch_grid(tokens, height, width, num_prefix_tokens)
    grid = shortcut.activation(grid.float() if upcasts(shortcut, tokens) else grid)
    if shortcut.is_fused:
        output = shortcut._fused_conv(grid)
    else:
        output = shortcut.branches[0](grid)
        for branch in shortcut.branches[1:]:
            output = output + branch(grid)
    return grid_tokens(output)


class _FrozenRunningStatistics:
    """A context in which the `branches`' BatchNorms compute with batch statistics but leave their running
    statistics and batch counters as they were. Re-enterable: a checkpoint recomputes once per backward, and a
    double backward runs more than one."""

    def __init__(self, branches):
        # Momentum 0 keeps running statistics exactly (running * 1 + batch * 0); the batch counter is restored.
        # A norm without a momentum (DETR's frozen BatchNorm) has no statistics to move.
        self.norms = [branch.norm for branch in branches if hasattr(branch.norm, "momentum")]
        self.saved = []

    def __enter__(self):
        counters = [getattr(norm, "num_batches_tracked", None) for norm in self.norms]
        self.saved.append([(norm.momentum, None if counter is None else counter.clone())
                           for norm, counter in zip(self.norms, counters)])  # fmt: skip
        for norm in self.norms:
            norm.momentum = 0.0
        return self

    def __exit__(self, *exception):
        for norm, (momentum, counter) in zip(self.norms, self.saved.pop()):
            norm.momentum = momentum
            if counter is not None:
                norm.num_batches_tracked.copy_(counter)
        return False


def _norm_as_affine(norm: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`(scale, shift)` per channel such that `norm(x) == x * scale + shift` with running statistics, in `dtype`."""
    running_mean, running_var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    if running_mean is None or running_var is None:
        raise TypeError(
            f"Cannot fuse a depth-wise shortcut whose norm is {type(norm).__name__}: fusion folds a BatchNorm's "
            f"running statistics (running_mean, running_var) into the conv. Run this shortcut unfused."
        )
    scale = torch.rsqrt(running_var.to(dtype) + getattr(norm, "eps", 1e-5))
    if getattr(norm, "weight", None) is not None:
        scale = scale * norm.weight.to(dtype)
    shift = -running_mean.to(dtype) * scale
    if getattr(norm, "bias", None) is not None:
        shift = shift + norm.bias.to(dtype)
    return scale, shift


def depthwise_shortcuts(config, channels: int, num_groups: int) -> nn.ModuleList | None:
    """One shortcut per block group as `config`'s `dw_*` fields describe it; `None` when the shortcut is off."""
    if not config.use_dw_shortcut:
        return None
    return nn.ModuleList(
        DepthwiseShortcut(channels, config.dw_kernel_sizes, config.dw_batch_norm_eps) for _ in range(num_groups)
    )


def init_shortcut_weights(module: nn.Module, dw_init: str) -> bool:
    """Initialise `module` if it is a leaf of a depth-wise shortcut (its BatchNorm or depth-wise conv); returns
    whether it was one.

    `from_pretrained` initialises only the leaf modules that own missing weights (a checkpoint saved without the
    shortcut, with other kernels or another span), so each leaf is handled here rather than through its parent.
    The `init` helpers leave loaded tensors alone. `dw_init="zeros"` makes the shortcut add exactly nothing.
    """
    if isinstance(module, nn.BatchNorm2d):
        init.ones_(module.weight)
        init.zeros_(module.bias)
        init.zeros_(module.running_mean)
        init.ones_(module.running_var)
        init.zeros_(module.num_batches_tracked)
        return True
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        if dw_init == "zeros":
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        else:
            # The paper keeps PyTorch's default for this conv (`Conv2d.reset_parameters`), written with the
            # loading-aware helpers: Kaiming-uniform weight, bias uniform within 1 / sqrt(fan_in).
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.weight[0].numel())
            init.uniform_(module.bias, -bound, bound)
        return True
    return False


def interpolate_grid_positions(positions: torch.Tensor, trained_grid, grid_size) -> torch.Tensor:
    """Resize `(1, H*W, C)` position embeddings of the trained `H x W` patch grid bicubically to `grid_size`."""
    if tuple(grid_size) == tuple(trained_grid) and not torch.jit.is_tracing():
        return positions
    dim = positions.shape[-1]
    positions = positions.reshape(1, trained_grid[0], trained_grid[1], dim).permute(0, 3, 1, 2)
    positions = F.interpolate(positions, size=tuple(grid_size), mode="bicubic", align_corners=False)
    return positions.permute(0, 2, 3, 1).reshape(1, -1, dim)


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
    if getattr(config, "num_labels", None) == 0:
        raise ValueError(
            "This model has no classification head (num_labels=0): its logits are the pooled features, so labels "
            "cannot be scored. Build it with num_labels set to the number of classes, or call it without labels."
        )
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

    Fusion needs eval mode (it reads BatchNorm running statistics) and is undone by `model.train()` and by
    `load_state_dict`. The fused tensors are non-persistent buffers: `save_pretrained` after fusion writes the
    ordinary unfused weights, and a reloaded model is unfused until `fuse_dw_shortcuts()` is called again.
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
