"""PyTorch DWCaiT: CaiT (Touvron et al., 2021) with depth-wise convolution shortcuts (Zhang et al., 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_dwcait import DWCaiTConfig
from .dw_layers import (
    DropPath,
    RemoteCodeSaveMixin,
    block_groups,
    depthwise_shortcuts,
    eager_attention_forward,
    image_classification_loss,
    init_shortcut_weights,
    interpolate_grid_positions,
)
from .modeling_dwvit import DWViTPatchEmbeddings


class DWCaiTEmbeddings(nn.Module):
    """Patch embeddings with (optional) learned position embeddings, and the class token used later.

    CaiT keeps the class token out of the patch stage, so the position embeddings have no class slot.
    """

    def __init__(self, config: DWCaiTConfig):
        super().__init__()
        self.patch_embeddings = DWViTPatchEmbeddings(config)
        num_patches = self.patch_embeddings.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        if config.use_position_embeddings:
            self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches, config.hidden_size))
        else:
            self.position_embeddings = None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """Resize the position embeddings bicubically from the trained patch grid to `grid_size`."""
        return interpolate_grid_positions(self.position_embeddings, self.patch_embeddings.grid_size, grid_size)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False):
        embeddings, grid_size = self.patch_embeddings(pixel_values, interpolate_pos_encoding)
        if self.position_embeddings is not None:
            if interpolate_pos_encoding:
                embeddings = embeddings + self.interpolate_pos_encoding(grid_size)
            else:
                embeddings = embeddings + self.position_embeddings
        class_tokens = self.cls_token.expand(embeddings.shape[0], -1, -1)
        # The patch tokens are a transposed view of the conv output, and the sum keeps that layout. Row-major tokens
        # are what the blocks' LayerNorm reads without a copy and what the shortcut's CPU kernel takes (a transposed
        # input sent the first shortcut to the slower PyTorch ops).
        return self.dropout(embeddings.contiguous()), class_tokens, grid_size


def _talking_heads(num_heads: int) -> nn.Linear:
    # A Linear over the head axis: out[..., g] = sum_h in[..., h] * weight[g, h] + bias[g]. A bias-free mixing
    # matrix M applied as in[..., h] @ M (the paper's original code) is held exactly by weight = M.T, bias = 0.
    return nn.Linear(num_heads, num_heads)


def _mix_heads(mixing: nn.Linear, scores: torch.Tensor) -> torch.Tensor:
    """Apply a heads x heads mixing to `(batch, heads, queries, keys)` scores."""
    return mixing(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def talking_heads_attention_forward(
    module: nn.Module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs
):
    """Eager attention with the heads mixed before and after the softmax; same contract as `eager_attention_forward`."""
    attn_weights = torch.matmul(query, key.transpose(-2, -1)) * scaling
    attn_weights = _mix_heads(module.talking_heads_pre_softmax, attn_weights)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = _mix_heads(module.talking_heads_post_softmax, attn_weights)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    return torch.matmul(attn_weights, value).transpose(1, 2), attn_weights


def _attend(module: nn.Module, query, key, value, output_attentions: bool):
    """Attention of `(batch, heads, length, head_dim)` tensors; returns `(batch, length, heads, head_dim)` and the
    weights applied to the values (or `None`).

    Talking heads mix the heads between the matmul and the softmax, which no fused kernel can express, so they always
    run eagerly whatever `attn_implementation` says; returned maps need eager too. Otherwise the implementation is
    looked up at every call, so that `model.set_attn_implementation()` takes effect.
    """
    if module.talking_heads_pre_softmax is not None:
        attention_interface = talking_heads_attention_forward
    elif output_attentions:
        attention_interface = eager_attention_forward
    else:
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            module.config._attn_implementation, eager_attention_forward
        )
    return attention_interface(
        module,
        query,
        key,
        value,
        None,
        dropout=module.attention_dropout if module.training else 0.0,
        scaling=module.scaling,
        is_causal=module.is_causal,
    )


class DWCaiTSelfAttention(nn.Module):
    """Multi-head self-attention of the patch blocks, optionally with talking heads (CaiT's default)."""

    def __init__(self, config: DWCaiTConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        if config.use_talking_heads:
            self.talking_heads_pre_softmax = _talking_heads(config.num_attention_heads)
            self.talking_heads_post_softmax = _talking_heads(config.num_attention_heads)
        else:
            self.talking_heads_pre_softmax = self.talking_heads_post_softmax = None
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        batch_size, seq_length, hidden_size = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch_size, seq_length, 3, self.num_attention_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn_output, attn_weights = _attend(self, query, key, value, output_attentions)
        attn_output = attn_output.reshape(batch_size, seq_length, hidden_size)
        return self.dropout(self.out_proj(attn_output)), attn_weights


class DWCaiTClassAttention(nn.Module):
    """Class attention: the class token queries itself and the patch tokens; only the class token is updated."""

    def __init__(self, config: DWCaiTConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        if config.use_class_attention_talking_heads:
            self.talking_heads_pre_softmax = _talking_heads(config.num_attention_heads)
            self.talking_heads_post_softmax = _talking_heads(config.num_attention_heads)
        else:
            self.talking_heads_pre_softmax = self.talking_heads_post_softmax = None
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch_size, length, _ = states.shape
        return states.view(batch_size, length, self.num_attention_heads, self.head_dim).transpose(1, 2)

    def forward(self, class_token: torch.Tensor, tokens: torch.Tensor, output_attentions: bool = False):
        """`class_token` (batch, 1, C) gives the query; `tokens` (batch, 1 + N, C) the keys and values."""
        query = self._split_heads(self.query(class_token))
        key = self._split_heads(self.key(tokens))
        value = self._split_heads(self.value(tokens))
        attn_output, attn_weights = _attend(self, query, key, value, output_attentions)
        attn_output = attn_output.reshape(class_token.shape)
        return self.dropout(self.out_proj(attn_output)), attn_weights


class DWCaiTMLP(nn.Module):
    """Two-layer feed-forward network."""

    def __init__(self, config: DWCaiTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        return self.dropout(self.fc2(hidden_states))


class DWCaiTLayerScale(nn.Module):
    """LayerScale: a learned per-channel factor on a residual branch, initialised small."""

    def __init__(self, config: DWCaiTConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layer_scale_init_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


def _layer_scale(config: DWCaiTConfig) -> nn.Module:
    return DWCaiTLayerScale(config) if config.use_layer_scale else nn.Identity()


class DWCaiTLayer(GradientCheckpointingLayer):
    """A pre-norm patch block: self-attention and MLP residual branches with LayerScale and stochastic depth."""

    def __init__(self, config: DWCaiTConfig, drop_path: float = 0.0):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DWCaiTSelfAttention(config)
        self.layer_scale1 = _layer_scale(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DWCaiTMLP(config)
        self.layer_scale2 = _layer_scale(config)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False, defer_residual_add: bool = False):
        """With `defer_residual_add`, returns `(mlp branch, residual)` in place of their sum, for the encoder's
        depth-wise shortcut to add in its own pass (`DepthwiseShortcut.takes_residual_add`)."""
        attention_output, attn_weights = self.attention(self.layernorm_before(hidden_states), output_attentions)
        hidden_states = self.drop_path(self.layer_scale1(attention_output)) + hidden_states
        branch = self.drop_path(self.layer_scale2(self.mlp(self.layernorm_after(hidden_states))))
        if defer_residual_add:
            return (branch, hidden_states), attn_weights
        return branch + hidden_states, attn_weights


class DWCaiTClassAttentionLayer(GradientCheckpointingLayer):
    """A class-attention block: updates the class token from itself and the (fixed) patch tokens."""

    def __init__(self, config: DWCaiTConfig):
        super().__init__()
        self.norm_patches = config.class_attention_norm_patches
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DWCaiTClassAttention(config)
        self.layer_scale1 = _layer_scale(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DWCaiTMLP(config)
        self.layer_scale2 = _layer_scale(config)

    def forward(self, patch_tokens: torch.Tensor, class_token: torch.Tensor, output_attentions: bool = False):
        if self.norm_patches:
            tokens = self.layernorm_before(torch.cat((class_token, patch_tokens), dim=1))
            normed_class_token = tokens[:, :1]
        else:
            normed_class_token = self.layernorm_before(class_token)
            tokens = torch.cat((normed_class_token, patch_tokens), dim=1)
        attention_output, attn_weights = self.attention(normed_class_token, tokens, output_attentions)
        class_token = class_token + self.layer_scale1(attention_output)
        class_token = class_token + self.layer_scale2(self.mlp(self.layernorm_after(class_token)))
        return class_token, attn_weights


class DWCaiTEncoder(nn.Module):
    """Patch blocks with a depth-wise shortcut beside every group of `dw_block_span` blocks, then class attention.

    The patch stage has no class token, so every token goes through the shortcut: `x_next = Blocks(x) + DW(x)`.
    The class-attention blocks have no shortcut.
    """

    def __init__(self, config: DWCaiTConfig):
        super().__init__()
        # CaiT keeps the stochastic depth rate constant over the patch blocks.
        self.layers = nn.ModuleList(DWCaiTLayer(config, config.drop_path_rate) for _ in range(config.num_hidden_layers))
        self.groups = block_groups(config.num_hidden_layers, config.dw_block_span)
        self.shortcuts = depthwise_shortcuts(config, config.hidden_size, len(self.groups))
        self.class_attention_layers = nn.ModuleList(
            DWCaiTClassAttentionLayer(config) for _ in range(config.num_class_attention_layers)
        )
        # Toggled with the rest by `activation_checkpointing_enable()`; the blocks and the shortcuts checkpoint
        # themselves, so that forward hooks stay outside the recompute and BatchNorm statistics move once.
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        class_token: torch.Tensor,
        grid_size: tuple[int, int],
        output_attentions: bool = False,
        output_hidden_states: bool = False,
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
                hidden_states = shortcut.add_to(hidden_states, group_input, *grid_size, residual=residual)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)

        for layer in self.class_attention_layers:
            class_token, attn_weights = layer(hidden_states, class_token, output_attentions)
            if all_attentions is not None:
                all_attentions = all_attentions + (attn_weights,)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (torch.cat((class_token, hidden_states), dim=1),)
        return BaseModelOutput(
            last_hidden_state=torch.cat((class_token, hidden_states), dim=1),
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


class DWCaiTPreTrainedModel(RemoteCodeSaveMixin, PreTrainedModel):
    """Weight initialisation and the common interface of the DWCaiT models."""

    config_class = DWCaiTConfig
    config: DWCaiTConfig
    base_model_prefix = "dwcait"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DWCaiTEmbeddings", "DWCaiTLayer", "DWCaiTClassAttentionLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if init_shortcut_weights(module, self.config.dw_init):
            return
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            # Talking-heads mixings included, as CaiT initialises them.
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DWCaiTLayerScale):
            init.constant_(module.lambda1, self.config.layer_scale_init_value)
        elif isinstance(module, DWCaiTEmbeddings):
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            if module.position_embeddings is not None:
                init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)

    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters weight decay must skip (timm's convention): the class token and the position
        embeddings. Optimizer groups usually exempt every 1-D parameter (norm scales, biases) on top."""
        suffixes = ("embeddings.cls_token", "embeddings.position_embeddings")
        return {name for name, _ in self.named_parameters() if name.endswith(suffixes)}


class DWCaiTModel(DWCaiTPreTrainedModel):
    """The bare DWCaiT encoder: patch stage with depth-wise shortcuts, class attention and a final LayerNorm.

    `last_hidden_state` is `(batch, 1 + N, C)` with the class token first; `pooler_output` is the class token.
    `hidden_states` holds the patch stage's `(batch, N, C)` tokens (embeddings, then after every patch block,
    shortcut included), then `(batch, 1 + N, C)` after every class-attention block; `attentions` holds
    `(batch, heads, N, N)` per patch block, then `(batch, heads, 1, 1 + N)` per class-attention block.
    """

    def __init__(self, config: DWCaiTConfig):
        super().__init__(config)
        self.embeddings = DWCaiTEmbeddings(config)
        self.encoder = DWCaiTEncoder(config)
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
        embedding_output, class_tokens, grid_size = self.embeddings(pixel_values, bool(interpolate_pos_encoding))
        encoder_outputs = self.encoder(
            embedding_output,
            class_tokens,
            grid_size,
            output_attentions=bool(output_attentions),
            output_hidden_states=bool(output_hidden_states),
        )
        sequence_output = self.layernorm(encoder_outputs.last_hidden_state)
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


class DWCaiTForImageClassification(DWCaiTPreTrainedModel):
    """DWCaiT with a linear classifier on the class token."""

    def __init__(self, config: DWCaiTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dwcait = DWCaiTModel(config)
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
        outputs = self.dwcait(
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


__all__ = ["DWCaiTForImageClassification", "DWCaiTModel", "DWCaiTPreTrainedModel"]
