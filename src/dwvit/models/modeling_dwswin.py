"""PyTorch DWSwin: a Swin Transformer with depth-wise convolution shortcuts (Zhang et al., 2024).

The stages, the models and the backbone; the blocks they are made of are in `dwswin_layers.py`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import BackboneMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BackboneOutput
from transformers.utils import ModelOutput

from .configuration_dwswin import DWSwinConfig
from .dw_layers import (
    RemoteCodeSaveMixin,
    block_groups,
    depthwise_shortcuts,
    drop_path_rates,
    image_classification_loss,
    init_shortcut_weights,
)
from .dwswin_layers import (
    DWSwinAttention,
    DWSwinEmbeddings,
    DWSwinLayer,
    DWSwinPatchEmbeddings,
    DWSwinPatchMerging,
    stage_window_and_shift,
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
        # Toggled with the rest by `activation_checkpointing_enable()`. Unlike transformers' SwinStage, the stage is
        # not checkpointed as a whole: recomputing it would run the shortcuts' BatchNorm again. Its blocks and
        # shortcuts checkpoint themselves instead.
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], output_attentions: bool = False):
        """Returns (output tokens, tokens before patch merging, output grid size, attention weights per block)."""
        attentions = ()
        for group_index, (start, end) in enumerate(self.groups):
            group_input, residual = hidden_states, None
            shortcut = self.shortcuts[group_index] if self.shortcuts is not None else None
            for index in range(start, end):
                block = self.blocks[index]
                if index == end - 1 and shortcut is not None and shortcut.takes_residual_add(block):
                    (hidden_states, residual), attn_weights = block(
                        hidden_states, input_dimensions, output_attentions, defer_residual_add=True
                    )
                else:
                    hidden_states, attn_weights = block(hidden_states, input_dimensions, output_attentions)
                attentions = attentions + (attn_weights,)
            if shortcut is not None:
                hidden_states = shortcut.add_to(hidden_states, group_input, *input_dimensions, residual=residual)

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
        self.config = config

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
                # Swin's convention: one map per stage, its last block's; `attentions_per_block` keeps them all.
                all_attentions = all_attentions + (attentions if self.config.attentions_per_block else attentions[-1:])
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
