"""PyTorch DWViT: a Vision Transformer with depth-wise convolution shortcuts (Zhang et al., 2024)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_dwvit import DWViTConfig, to_pair
from .dw_layers import (
    DropPath,
    RemoteCodeSaveMixin,
    block_groups,
    depthwise_shortcuts,
    drop_path_rates,
    eager_attention_forward,
    image_classification_loss,
    init_shortcut_weights,
    interpolate_grid_positions,
)


class DWViTPatchEmbeddings(nn.Module):
    """Split the image into non-overlapping patches and project each one to `hidden_size`."""

    def __init__(self, config: DWViTConfig):
        super().__init__()
        self.image_size = to_pair(config.image_size)
        self.patch_size = to_pair(config.patch_size)
        self.num_channels = config.num_channels
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=self.patch_size, stride=self.patch_size
        )

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False):
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be a 4-D tensor (batch, channels, height, width); got shape {tuple(pixel_values.shape)}."
            )
        _, num_channels, height, width = pixel_values.shape
        if num_channels != self.num_channels:
            raise ValueError(
                f"pixel_values has {num_channels} channels but the model expects num_channels={self.num_channels}."
            )
        if not interpolate_pos_encoding and (height, width) != self.image_size:
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model's image_size "
                f"({self.image_size[0]}x{self.image_size[1]}); resize the input or pass interpolate_pos_encoding=True."
            )
        if height < self.patch_size[0] or width < self.patch_size[1]:
            raise ValueError(
                f"Input image size ({height}x{width}) is smaller than one patch ({self.patch_size[0]}x{self.patch_size[1]})."
            )
        embeddings = self.projection(pixel_values)
        grid_size = (embeddings.shape[2], embeddings.shape[3])
        return embeddings.flatten(2).transpose(1, 2), grid_size


class DWViTEmbeddings(nn.Module):
    """Class token, patch embeddings and (optional) learned position embeddings."""

    def __init__(self, config: DWViTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = DWViTPatchEmbeddings(config)
        num_patches = self.patch_embeddings.num_patches
        if config.use_position_embeddings:
            self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches + 1, config.hidden_size))
        else:
            self.position_embeddings = None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Resize the patch position embeddings bicubically to `grid_size`; the class position is kept."""
        patch_positions = interpolate_grid_positions(
            self.position_embeddings[:, 1:], self.patch_embeddings.grid_size, grid_size
        )
        return torch.cat((self.position_embeddings[:, :1], patch_positions), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False):
        embeddings, grid_size = self.patch_embeddings(pixel_values, interpolate_pos_encoding)
        cls_tokens = self.cls_token.expand(embeddings.shape[0], -1, -1)
        embeddings = torch.cat((cls_tokens, embeddings), dim=1)
        if self.position_embeddings is not None:
            if interpolate_pos_encoding:
                embeddings = embeddings + self.interpolate_pos_encoding(grid_size)
            else:
                embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings), grid_size


class DWViTAttention(nn.Module):
    """Multi-head self-attention with a fused query/key/value projection; SDPA unless eager is asked for."""

    def __init__(self, config: DWViTConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        # Every patch attends to every other: SDPA must never apply a causal mask here.
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        batch_size, seq_length, hidden_size = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch_size, seq_length, 3, self.num_attention_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
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
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=self.is_causal,
        )
        attn_output = attn_output.reshape(batch_size, seq_length, hidden_size)
        return self.out_proj(attn_output), attn_weights


class DWViTMLP(nn.Module):
    """Two-layer feed-forward network."""

    def __init__(self, config: DWViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        return self.dropout(self.fc2(hidden_states))


class DWViTLayer(GradientCheckpointingLayer):
    """A pre-norm Transformer block (attention and MLP, each in a residual branch with stochastic depth)."""

    def __init__(self, config: DWViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DWViTAttention(config)
        self.attention_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DWViTMLP(config)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False, defer_residual_add: bool = False):
        """With `defer_residual_add`, returns `(mlp branch, residual)` in place of their sum, for the encoder's
        depth-wise shortcut to add in its own pass (`DepthwiseShortcut.takes_residual_add`)."""
        attention_output, attn_weights = self.attention(self.layernorm_before(hidden_states), output_attentions)
        hidden_states = self.drop_path(self.attention_dropout(attention_output)) + hidden_states
        branch = self.drop_path(self.mlp(self.layernorm_after(hidden_states)))
        if defer_residual_add:
            return (branch, hidden_states), attn_weights
        return branch + hidden_states, attn_weights


class DWViTEncoder(nn.Module):
    """Transformer blocks with a depth-wise shortcut beside every group of `dw_block_span` blocks.

    Each shortcut reads the group's input and is added to the group's output:
    `x_next = Blocks(x) + DW(x)`, with the class token left out of the convolution.
    """

    def __init__(self, config: DWViTConfig):
        super().__init__()
        rates = drop_path_rates(config.drop_path_rate, config.num_hidden_layers)
        self.layers = nn.ModuleList(DWViTLayer(config, rate) for rate in rates)
        self.groups = block_groups(config.num_hidden_layers, config.dw_block_span)
        self.shortcuts = depthwise_shortcuts(config, config.hidden_size, len(self.groups))
        # Toggled with the rest by `activation_checkpointing_enable()`; the blocks and the shortcuts checkpoint
        # themselves, so that forward hooks stay outside the recompute and BatchNorm statistics move once.
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        grid_size: tuple[int, int],
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        num_prefix_tokens: int = 1,
    ) -> BaseModelOutput:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for group_index, (start, end) in enumerate(self.groups):
            group_input, residual = hidden_states, None
            shortcut = self.shortcuts[group_index] if self.shortcuts is not None else None
            for index in range(start, end):
                layer = self.layers[index]
                if index == end - 1 and shortcut is not None and shortcut.takes_residual_add(layer):
                    (hidden_states, residual), attn_weights = layer(
                        hidden_states, output_attentions, defer_residual_add=True
                    )
                else:
                    hidden_states, attn_weights = layer(hidden_states, output_attentions)
                if all_attentions is not None:
                    all_attentions = all_attentions + (attn_weights,)
                if output_hidden_states and index != end - 1:
                    all_hidden_states = all_hidden_states + (hidden_states,)
            if shortcut is not None:
                hidden_states = shortcut.add_to(
                    hidden_states, group_input, *grid_size, num_prefix_tokens, residual=residual
                )
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


class DWViTPreTrainedModel(RemoteCodeSaveMixin, PreTrainedModel):
    """Weight initialisation and the common interface of the DWViT models."""

    config_class = DWViTConfig
    config: DWViTConfig
    base_model_prefix = "dwvit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DWViTEmbeddings", "DWViTLayer"]
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
        elif isinstance(module, DWViTEmbeddings):
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            if module.position_embeddings is not None:
                init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)

    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters weight decay must skip (timm's convention): the class token and the position
        embeddings. Optimizer groups usually exempt every 1-D parameter (norm scales, biases) on top."""
        suffixes = ("embeddings.cls_token", "embeddings.position_embeddings")
        return {name for name, _ in self.named_parameters() if name.endswith(suffixes)}


class DWViTModel(DWViTPreTrainedModel):
    """The bare DWViT encoder: embeddings, blocks with depth-wise shortcuts and a final LayerNorm."""

    def __init__(self, config: DWViTConfig):
        super().__init__(config)
        self.embeddings = DWViTEmbeddings(config)
        self.encoder = DWViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> DWViTPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images, e.g. from `ViTImageProcessor`.
        interpolate_pos_encoding (`bool`, *optional*):
            Accept a resolution other than `config.image_size`, resizing the position embeddings to its grid.
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
        )
        sequence_output = self.layernorm(encoder_outputs.last_hidden_state)
        if self.config.pooling == "mean":
            pooled_output = sequence_output[:, 1:].mean(dim=1)
        else:
            pooled_output = sequence_output[:, 0]

        if not return_dict:
            extras = tuple(v for v in (encoder_outputs.hidden_states, encoder_outputs.attentions) if v is not None)
            return (sequence_output, pooled_output) + extras
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=encoder_outputs.hidden_states,
            attentions=encoder_outputs.attentions,
        )


class DWViTForImageClassification(DWViTPreTrainedModel):
    """DWViT with a linear classifier on the pooled output (class token or mean of the patch tokens)."""

    def __init__(self, config: DWViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dwvit = DWViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
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
    ) -> ImageClassifierOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)` or `torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Class indices, or class probabilities (soft labels from Mixup/CutMix or label smoothing).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.dwvit(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = image_classification_loss(logits, labels, self.config) if labels is not None else None

        if not return_dict:
            output = (logits,) + tuple(v for v in (outputs.hidden_states, outputs.attentions) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = ["DWViTForImageClassification", "DWViTModel", "DWViTPreTrainedModel"]
