"""PyTorch DWSwin: a Swin Transformer with depth-wise convolution shortcuts (Zhang et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BackboneMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BackboneOutput
from transformers.utils import ModelOutput

from .configuration_dwswin import DWSwinConfig
from .configuration_dwvit import to_pair
from .dw_layers import (
    DropPath,
    RemoteCodeSaveMixin,
    add_shortcut,
    block_groups,
    depthwise_shortcuts,
    drop_path_rates,
    image_classification_loss,
    init_shortcut_weights,
    interpolate_grid_positions,
)


@dataclass
class DWSwinEncoderOutput(ModelOutput):
    """Encoder outputs; `reshaped_hidden_states` hold the stem and every stage as `(batch, channels, height, width)`."""

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class DWSwinModelOutput(ModelOutput):
    """`BaseModelOutputWithPooling` plus Swin's `reshaped_hidden_states`; `pooler_output` is the mean token."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class DWSwinImageClassifierOutput(ModelOutput):
    """`ImageClassifierOutput` plus Swin's `reshaped_hidden_states`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    reshaped_hidden_states: tuple[torch.Tensor, ...] | None = None


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

        dropout = self.attention_dropout if self.training else 0.0
        if output_attentions or self.config._attn_implementation == "eager":
            attn_weights = torch.matmul(query, key.transpose(-2, -1)) * self.scaling + bias
            attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
            attn_weights = F.dropout(attn_weights, p=dropout, training=self.training)
            attn_output = torch.matmul(attn_weights, value)
        else:
            attn_output = F.scaled_dot_product_attention(
                query, key, value, attn_mask=bias, dropout_p=dropout, is_causal=self.is_causal, scale=self.scaling
            )
            attn_weights = None
        attn_output = attn_output.transpose(1, 2).reshape(num_windows_total, area, dim)
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


class DWSwinLayer(nn.Module):
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

    def forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], output_attentions: bool = False):
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
        hidden_states = self.drop_path(self.mlp(self.layernorm_after(hidden_states))) + hidden_states
        return hidden_states, attn_weights


class DWSwinStage(nn.Module):
    """The blocks of one resolution, a depth-wise shortcut beside every group of `dw_block_span` of them, then
    patch merging. Groups are cut per stage, so a shortcut never reaches across a patch merging."""

    def __init__(
        self,
        config: DWSwinConfig,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        drop_path: list[float],
        downsample: bool,
    ):
        super().__init__()
        window_size, shift_size = stage_window_and_shift(config, resolution)
        self.blocks = nn.ModuleList(
            DWSwinLayer(config, dim, num_heads, window_size, shift_size if index % 2 else 0, drop_path[index])
            for index in range(depth)
        )
        self.groups = block_groups(depth, config.dw_block_span)
        self.shortcuts = depthwise_shortcuts(config, dim, len(self.groups))
        self.downsample = DWSwinPatchMerging(dim, config.layer_norm_eps) if downsample else None
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], output_attentions: bool = False):
        """Returns (output tokens, tokens before patch merging, output grid size, attention weights per block)."""
        attentions = ()
        for group_index, (start, end) in enumerate(self.groups):
            group_input = hidden_states
            for block in self.blocks[start:end]:
                if self.gradient_checkpointing and self.training:
                    # The block is checkpointed here; the shortcut checkpoints itself without moving BatchNorm twice.
                    hidden_states, attn_weights = self._gradient_checkpointing_func(
                        block.__call__, hidden_states, input_dimensions, output_attentions
                    )
                else:
                    hidden_states, attn_weights = block(hidden_states, input_dimensions, output_attentions)
                attentions = attentions + (attn_weights,)
            if self.shortcuts is not None:
                shortcut = self.shortcuts[group_index](group_input, *input_dimensions)
                hidden_states = add_shortcut(hidden_states, shortcut, num_prefix_tokens=0)

        before_downsampling = hidden_states
        output_dimensions = tuple(input_dimensions)
        if self.downsample is not None:
            hidden_states = self.downsample(hidden_states, input_dimensions)
            output_dimensions = ((input_dimensions[0] + 1) // 2, (input_dimensions[1] + 1) // 2)
        return hidden_states, before_downsampling, output_dimensions, attentions


def _tokens_to_map(tokens: torch.Tensor, dimensions: tuple[int, int]) -> torch.Tensor:
    batch_size, _, channels = tokens.shape
    return tokens.view(batch_size, dimensions[0], dimensions[1], channels).permute(0, 3, 1, 2).contiguous()


class DWSwinEncoder(nn.Module):
    """The stages of DWSwin: the width doubles and the grid halves from one stage to the next."""

    def __init__(self, config: DWSwinConfig, grid_size: tuple[int, int]):
        super().__init__()
        num_stages = len(config.depths)
        rates = drop_path_rates(config.drop_path_rate, sum(config.depths))
        stages = []
        resolution = tuple(grid_size)
        for index, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
            start = sum(config.depths[:index])
            stages.append(
                DWSwinStage(
                    config,
                    dim=int(config.embed_dim * 2**index),
                    resolution=resolution,
                    depth=depth,
                    num_heads=heads,
                    drop_path=rates[start : start + depth],
                    downsample=index < num_stages - 1,
                )
            )
            resolution = ((resolution[0] + 1) // 2, (resolution[1] + 1) // 2)
        self.layers = nn.ModuleList(stages)

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_dimensions: tuple[int, int],
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_hidden_states_before_downsampling: bool = False,
    ) -> DWSwinEncoderOutput:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_reshaped = (_tokens_to_map(hidden_states, input_dimensions),) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for stage in self.layers:
            hidden_states, before_downsampling, output_dimensions, attentions = stage(
                hidden_states, input_dimensions, output_attentions
            )
            if output_hidden_states:
                if output_hidden_states_before_downsampling:
                    state, dimensions = before_downsampling, input_dimensions
                else:
                    state, dimensions = hidden_states, output_dimensions
                all_hidden_states = all_hidden_states + (state,)
                all_reshaped = all_reshaped + (_tokens_to_map(state, dimensions),)
            if output_attentions:
                all_attentions = all_attentions + attentions
            input_dimensions = output_dimensions
        return DWSwinEncoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            reshaped_hidden_states=all_reshaped,
        )


class DWSwinPreTrainedModel(RemoteCodeSaveMixin, PreTrainedModel):
    """Weight initialisation and the common interface of the DWSwin models."""

    config_class = DWSwinConfig
    config: DWSwinConfig
    base_model_prefix = "dwswin"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DWSwinStage"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if init_shortcut_weights(module, self.config.dw_init):
            return
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DWSwinAttention):
            init.trunc_normal_(module.relative_position_bias_table, mean=0.0, std=std)
            # A non-persistent buffer is not restored by loading: rebuild it in case the model was made on meta.
            init.copy_(module.relative_position_index, module.build_relative_position_index())
        elif isinstance(module, DWSwinEmbeddings) and module.position_embeddings is not None:
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)

    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters weight decay must skip (timm's convention): every relative position bias
        table and the absolute position embeddings, if any. Optimizer groups usually exempt every 1-D parameter
        (norm scales, biases) on top."""
        suffixes = ("relative_position_bias_table", "embeddings.position_embeddings")
        return {name for name, _ in self.named_parameters() if name.endswith(suffixes)}


class DWSwinModel(DWSwinPreTrainedModel):
    """The bare DWSwin encoder: patch embeddings, stages with depth-wise shortcuts, final LayerNorm, mean pooling."""

    def __init__(self, config: DWSwinConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.num_layers = len(config.depths)
        self.num_features = int(config.embed_dim * 2 ** (self.num_layers - 1))
        self.embeddings = DWSwinEmbeddings(config)
        self.encoder = DWSwinEncoder(config, self.embeddings.patch_embeddings.grid_size)
        self.layernorm = nn.LayerNorm(self.num_features, eps=config.layer_norm_eps)
        self.pooler = nn.AdaptiveAvgPool1d(1) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> DWSwinPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        output_hidden_states_before_downsampling: bool = False,
        **kwargs,
    ) -> DWSwinModelOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images. Sizes that are not a multiple of the patch or window are padded, as in Swin.
        interpolate_pos_encoding (`bool`, *optional*):
            With absolute position embeddings, accept a resolution other than `config.image_size` by resizing them.
        output_hidden_states_before_downsampling (`bool`, defaults to `False`):
            Report each stage's hidden states before its patch merging (the backbone's feature maps).
        """
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values.")
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)
        embedding_output, grid_size = self.embeddings(pixel_values, bool(interpolate_pos_encoding))
        encoder_outputs = self.encoder(
            embedding_output,
            grid_size,
            output_attentions=bool(output_attentions),
            output_hidden_states=bool(output_hidden_states),
            output_hidden_states_before_downsampling=output_hidden_states_before_downsampling,
        )
        sequence_output = self.layernorm(encoder_outputs.last_hidden_state)
        pooled_output = None
        if self.pooler is not None:
            pooled_output = self.pooler(sequence_output.transpose(1, 2)).flatten(1)

        if not return_dict:
            extras = (
                encoder_outputs.hidden_states,
                encoder_outputs.attentions,
                encoder_outputs.reshaped_hidden_states,
            )
            head = (sequence_output,) if pooled_output is None else (sequence_output, pooled_output)
            return head + tuple(v for v in extras if v is not None)
        return DWSwinModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
            reshaped_hidden_states=encoder_outputs.reshaped_hidden_states,
        )


class DWSwinForImageClassification(DWSwinPreTrainedModel):
    """DWSwin with a linear classifier on the mean of the final tokens."""

    def __init__(self, config: DWSwinConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dwswin = DWSwinModel(config)
        self.classifier = (
            nn.Linear(self.dwswin.num_features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DWSwinImageClassifierOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)` or `torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Class indices, or class probabilities (soft labels from Mixup/CutMix or label smoothing).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.dwswin(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = image_classification_loss(logits, labels, self.config) if labels is not None else None

        if not return_dict:
            extras = (outputs.hidden_states, outputs.attentions, outputs.reshaped_hidden_states)
            output = (logits,) + tuple(v for v in extras if v is not None)
            return ((loss,) + output) if loss is not None else output
        return DWSwinImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            reshaped_hidden_states=outputs.reshaped_hidden_states,
        )


class DWSwinBackbone(BackboneMixin, DWSwinPreTrainedModel):
    """DWSwin as a backbone for detection and segmentation heads: LayerNorm-ed `(B, C, H, W)` maps of the stages
    named in `config.out_features` (among "stem", "stage1", ...), taken before each stage's patch merging."""

    # The backbone normalises each feature map itself; the classification model's final LayerNorm goes unused.
    _keys_to_ignore_on_load_missing = [r"dwswin\.layernorm\..*"]

    def __init__(self, config: DWSwinConfig):
        super().__init__(config)
        self.num_features = [config.embed_dim] + [int(config.embed_dim * 2**i) for i in range(len(config.depths))]
        self.dwswin = DWSwinModel(config, add_pooling_layer=False)
        self.hidden_states_norms = nn.ModuleDict(
            {
                stage: nn.LayerNorm(channels, eps=config.layer_norm_eps)
                for stage, channels in zip(self.out_features, self.channels)
            }
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images of any size; each stage's map is `ceil(size / (patch_size * 2^(stage - 1)))` wide.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        outputs = self.dwswin(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=True,
            output_hidden_states_before_downsampling=True,
            interpolate_pos_encoding=self.config.use_absolute_embeddings,
            return_dict=True,
        )
        feature_maps = ()
        for stage, feature_map in zip(self.stage_names, outputs.reshaped_hidden_states):
            if stage in self.out_features:
                normed = self.hidden_states_norms[stage](feature_map.permute(0, 2, 3, 1))
                feature_maps = feature_maps + (normed.permute(0, 3, 1, 2).contiguous(),)

        hidden_states = outputs.reshaped_hidden_states if output_hidden_states else None
        attentions = outputs.attentions if output_attentions else None
        if not return_dict:
            return (feature_maps,) + tuple(v for v in (hidden_states, attentions) if v is not None)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=attentions)


__all__ = ["DWSwinBackbone", "DWSwinForImageClassification", "DWSwinModel", "DWSwinPreTrainedModel"]
