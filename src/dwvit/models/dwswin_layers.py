"""The building blocks of DWSwin below the stage: window helpers, patch embeddings and merging, window attention
and the Swin block. The stages, the shortcuts between blocks and the models are in `modeling_dwswin.py`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_dwswin import DWSwinConfig
from .configuration_dwvit import to_pair
from .dw_layers import DropPath, eager_attention_forward, interpolate_grid_positions


def window_partition(grid: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut a `(batch, H, W, C)` grid into `(batch * num_windows, window_size, window_size, C)` windows.

    Windows are ordered row-major over the grid of windows, batch first.
    """
    batch_size, height, width, channels = grid.shape
    grid = grid.view(batch_size, height // window_size, window_size, width // window_size, window_size, channels)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, channels)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: reassemble the windows into a `(batch, height, width, C)` grid."""
    channels = windows.shape[-1]
    windows = windows.view(-1, height // window_size, width // window_size, window_size, window_size, channels)
    return windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def stage_window_and_shift(config: DWSwinConfig, stage_resolution: tuple[int, int]) -> tuple[int, int]:
    """The window and shift a stage's blocks are built with.

    As in Swin, a stage whose grid is no larger than the window uses one window covering the grid and no shift.
    """
    window_size, shift_size = config.window_size, config.window_size // 2
    if min(stage_resolution) <= window_size:
        window_size, shift_size = min(stage_resolution), 0
    if not config.use_shifted_windows:
        shift_size = 0
    return window_size, shift_size


class DWSwinPatchEmbeddings(nn.Module):
    """Project non-overlapping `patch_size` patches to `embed_dim`, padding the image to a whole number of patches."""

    def __init__(self, config: DWSwinConfig):
        super().__init__()
        self.image_size = to_pair(config.image_size)
        self.patch_size = to_pair(config.patch_size)
        self.num_channels = config.num_channels
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.projection = nn.Conv2d(
            config.num_channels, config.embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        height, width = pixel_values.shape[-2:]
        pad_bottom = (-height) % self.patch_size[0]
        pad_right = (-width) % self.patch_size[1]
        if pad_bottom or pad_right:
            pixel_values = F.pad(pixel_values, (0, pad_right, 0, pad_bottom))
        embeddings = self.projection(pixel_values)
        grid_size = (embeddings.shape[2], embeddings.shape[3])
        return embeddings.flatten(2).transpose(1, 2), grid_size


class DWSwinEmbeddings(nn.Module):
    """Patch embeddings, LayerNorm and (optional) absolute position embeddings. Swin has no class token."""

    def __init__(self, config: DWSwinConfig):
        super().__init__()
        self.patch_embeddings = DWSwinPatchEmbeddings(config)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps) if config.patch_norm else None
        if config.use_absolute_embeddings:
            self.position_embeddings = nn.Parameter(
                torch.zeros(1, self.patch_embeddings.num_patches, config.embed_dim)
            )
        else:
            self.position_embeddings = None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Resize the position embeddings bicubically from the trained patch grid to `grid_size`."""
        return interpolate_grid_positions(self.position_embeddings, self.patch_embeddings.grid_size, grid_size)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False):
        if pixel_values.ndim != 4:
            raise ValueError(
                "pixel_values must be a 4-D tensor (batch, channels, height, width); "
                f"got shape {tuple(pixel_values.shape)}."
            )
        _, num_channels, height, width = pixel_values.shape
        if num_channels != self.patch_embeddings.num_channels:
            raise ValueError(
                f"pixel_values has {num_channels} channels but the model expects "
                f"num_channels={self.patch_embeddings.num_channels}."
            )
        image_size = self.patch_embeddings.image_size
        if self.position_embeddings is not None and not interpolate_pos_encoding and (height, width) != image_size:
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model's image_size "
                f"({image_size[0]}x{image_size[1]}) and the model has absolute position embeddings; resize the "
                f"input or pass interpolate_pos_encoding=True."
            )
        embeddings, grid_size = self.patch_embeddings(pixel_values)
        if self.norm is not None:
            embeddings = self.norm(embeddings)
        if self.position_embeddings is not None:
            if interpolate_pos_encoding:
                embeddings = embeddings + self.interpolate_pos_encoding(grid_size)
            else:
                embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings), grid_size


class DWSwinPatchMerging(nn.Module):
    """Halve the grid and double the width: concatenate each 2x2 neighbourhood, LayerNorm, then project 4C -> 2C."""

    def __init__(self, dim: int, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int]) -> torch.Tensor:
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.shape
        grid = hidden_states.view(batch_size, height, width, channels)
        if height % 2 or width % 2:
            grid = F.pad(grid, (0, 0, 0, width % 2, 0, height % 2))
        # Channel order of the concatenation (Swin's): (even row, even col), (odd, even), (even, odd), (odd, odd).
        merged = torch.cat(
            [grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], dim=-1
        )
        merged = merged.view(batch_size, -1, 4 * channels)
        return self.reduction(self.norm(merged))


class DWSwinAttention(nn.Module):
    """Window multi-head self-attention with a learned relative position bias; SDPA unless eager is asked for.

    The bias (and, for shifted windows, the mask that keeps regions rolled together from attending to each other)
    is passed to SDPA as an additive `attn_mask`.
    """

    def __init__(self, config: DWSwinConfig, dim: int, num_heads: int, window_size: int):
        super().__init__()
        self.config = config
        self.num_attention_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.window_size = window_size
        self.attention_dropout = config.attention_probs_dropout_prob
        # Windows attend fully within themselves: SDPA must never apply a causal mask here.
        self.is_causal = False
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Derived from the window size alone, so it is rebuilt rather than saved.
        self.register_buffer("relative_position_index", self.build_relative_position_index(), persistent=False)

    def build_relative_position_index(self) -> torch.Tensor:
        """`(window_area, window_area)` index into the bias table of each (query, key) offset (dy, dx)."""
        size = self.window_size
        coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).flatten(1)
        offsets = coords[:, :, None] - coords[:, None, :] + (size - 1)  # both offsets shifted into [0, 2*size-2]
        return offsets[0] * (2 * size - 1) + offsets[1]

    def relative_position_bias(self) -> torch.Tensor:
        area = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(area, area, -1)
        return bias.permute(2, 0, 1)  # (heads, area, area)

    def forward(
        self, hidden_states: torch.Tensor, window_mask: torch.Tensor | None = None, output_attentions: bool = False
    ):
        num_windows_total, area, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).view(num_windows_total, area, 3, self.num_attention_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        bias = self.relative_position_bias().to(query.dtype).unsqueeze(0)  # (1, heads, area, area)
        if window_mask is not None:
            num_windows = window_mask.shape[0]
            bias = bias.unsqueeze(0) + window_mask.to(query.dtype)[None, :, None]  # (1, nW, heads, area, area)
            bias = bias.expand(num_windows_total // num_windows, -1, -1, -1, -1)
            bias = bias.reshape(num_windows_total, self.num_attention_heads, area, area)

        # Read at every call, so that `model.set_attn_implementation()` takes effect; returned maps need eager.
        attention_interface = eager_attention_forward
        if not output_attentions:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            bias,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=self.is_causal,
        )
        attn_output = attn_output.reshape(num_windows_total, area, dim)
        return self.out_proj(attn_output), attn_weights


class DWSwinMLP(nn.Module):
    """Two-layer feed-forward network, `mlp_ratio` times wider inside."""

    def __init__(self, config: DWSwinConfig, dim: int):
        super().__init__()
        hidden = int(config.mlp_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        return self.dropout(self.fc2(hidden_states))


class DWSwinLayer(GradientCheckpointingLayer):
    """A Swin block: (shifted-)window attention then MLP, each pre-norm in a residual branch with stochastic depth."""

    def __init__(
        self, config: DWSwinConfig, dim: int, num_heads: int, window_size: int, shift_size: int, drop_path: float
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = DWSwinAttention(config, dim, num_heads, window_size)
        self.attention_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = DWSwinMLP(config, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def shifted_window_mask(self, height: int, width: int, shift_size: int, device, dtype) -> torch.Tensor:
        """`(num_windows, area, area)` additive mask: -100 between tokens that the cyclic roll brought together.

        After rolling by `shift_size`, each axis splits into three regions (kept in place, wrapped within the
        last window, wrapped around the edge); only tokens of the same region pair may attend to each other.
        """
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)
        row_region = (rows >= height - self.window_size).long() + (rows >= height - shift_size).long()
        col_region = (cols >= width - self.window_size).long() + (cols >= width - shift_size).long()
        regions = (row_region[:, None] * 3 + col_region[None, :]).view(1, height, width, 1)
        regions = window_partition(regions, self.window_size).view(-1, self.window_size * self.window_size)
        different = regions[:, None, :] != regions[:, :, None]
        return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, -100.0)

    def forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], output_attentions: bool = False,
                defer_residual_add: bool = False):
        """With `defer_residual_add`, returns `(mlp branch, residual)` in place of their sum, for the stage's
        depth-wise shortcut to add in its own pass (`DepthwiseShortcut.takes_residual_add`)."""
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.shape
        # An input grid no larger than the window (other resolutions than the trained one) fits one window: no shift.
        shift_size = self.shift_size if min(height, width) > self.window_size else 0

        grid = self.layernorm_before(hidden_states).view(batch_size, height, width, channels)
        pad_bottom = (-height) % self.window_size
        pad_right = (-width) % self.window_size
        if pad_bottom or pad_right:
            grid = F.pad(grid, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_height, padded_width = grid.shape[1], grid.shape[2]
        if shift_size > 0:
            grid = torch.roll(grid, shifts=(-shift_size, -shift_size), dims=(1, 2))
            window_mask = self.shifted_window_mask(padded_height, padded_width, shift_size, grid.device, grid.dtype)
        else:
            window_mask = None

        windows = window_partition(grid, self.window_size).view(-1, self.window_size * self.window_size, channels)
        attention_output, attn_weights = self.attention(windows, window_mask, output_attentions)
        attention_output = attention_output.view(-1, self.window_size, self.window_size, channels)
        grid = window_reverse(attention_output, self.window_size, padded_height, padded_width)
        if shift_size > 0:
            grid = torch.roll(grid, shifts=(shift_size, shift_size), dims=(1, 2))
        attention_output = grid[:, :height, :width].reshape(batch_size, height * width, channels)

        hidden_states = self.drop_path(self.attention_dropout(attention_output)) + hidden_states
        branch = self.drop_path(self.mlp(self.layernorm_after(hidden_states)))
        if defer_residual_add:
            return (branch, hidden_states), attn_weights
        return branch + hidden_states, attn_weights
