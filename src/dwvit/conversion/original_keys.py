"""Key maps from the original code's state dicts to the DW models' (one converter per `MODEL.TYPE`).

Each converter reads the sizes it needs off the weights' shapes, checks them against whatever the original config
or the command line gave, and hands every original tensor to a named DW tensor; a tensor no rule consumes is an
error (`_StateDictReader.finish`). Reading the checkpoint file itself is `original_checkpoint.py`'s job.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

ORIGINAL_MODEL_TYPES = ("vit", "vit_s", "cait_xxs", "swin")

# MODEL.TYPE -> the config section that holds its sizes.
_SIZE_SECTIONS = {"vit": "ViT", "vit_s": "ViT_S", "cait_xxs": "CaiT_XXS", "swin": "SWIN"}

# Original LayerNorm and BatchNorm layers are PyTorch defaults.
_ORIGINAL_NORM_EPS = 1e-5


class _StateDictReader:
    """Hands out the original tensors by name and reports any that no rule consumed."""

    # Swin's derived buffers: recomputed by the model, never weights.
    _DERIVED = re.compile(r"(^|\.)(relative_position_index|attn_mask)$")

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self._remaining = dict(state_dict)
        self._all = state_dict

    def has(self, key: str) -> bool:
        return key in self._all

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._require(key).shape)

    def _require(self, key: str) -> torch.Tensor:
        if key not in self._all:
            raise ValueError(f"The original state dict has no {key!r}; it does not match the expected layout.")
        return self._all[key]

    def take(self, key: str) -> torch.Tensor:
        tensor = self._require(key)
        self._remaining.pop(key, None)
        return tensor

    def count(self, pattern: str) -> int:
        """How many consecutive indices `i` give a key `pattern.format(i)`."""
        index = 0
        while pattern.format(index) in self._all:
            index += 1
        return index

    def finish(self) -> None:
        unused = sorted(key for key in self._remaining if not self._DERIVED.search(key))
        if unused:
            shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
            raise ValueError(
                f"The original state dict has {len(unused)} tensor(s) that no conversion rule maps: {shown}. "
                f"The checkpoint was written by a model this converter does not know how to represent."
            )


def _settle(settings: dict, name: str, from_weights, flag: str) -> Any:
    """Fill `settings[name]` from the weights when the config and flags left it open; otherwise check it."""
    given = settings.get(name)
    if given is None:
        settings[name] = from_weights
    elif given != from_weights:
        raise ValueError(
            f"{name} is {given!r} (from the checkpoint's config or {flag}) but the weights say {from_weights!r}."
        )
    return settings[name]


def _require(settings: dict, name: str, flag: str, config_key: str):
    value = settings.get(name)
    if value is None:
        raise ValueError(
            f"{name} cannot be read off the weights and the checkpoint has no readable config: pass {flag} "
            f"(the original config's {config_key})."
        )
    return value


def _linear_patch_embedding_to_conv(weight: torch.Tensor, patch_size: int, num_channels: int) -> torch.Tensor:
    """The original's patch embedding is a Linear over patches flattened as (row-in-patch, column-in-patch,
    channel); a Conv2d kernel indexes (out, channel, row, column)."""
    out_features = weight.shape[0]
    return weight.reshape(out_features, patch_size, patch_size, num_channels).permute(0, 3, 1, 2).contiguous()


def _patch_geometry(reader: _StateDictReader, settings: dict, num_patches: int | None) -> tuple[int, int]:
    """Patch size, channels and image size of a ViT/CaiT checkpoint, checked against the weights.

    `num_patches` is the length of the position embeddings, or None when the model has none (the image size
    must then be given)."""
    patch_dim = reader.shape("to_patch_embedding.1.weight")[1]
    if reader.has("to_patch_embedding.0.weight"):
        raise ValueError(
            "The original patch embedding has a LayerNorm before its Linear (to_patch_embedding.0); the paper's "
            "code has none and DW models cannot represent it."
        )
    num_channels = settings.get("in_chans") or 3
    patch_size = settings.get("patch_size")
    if patch_size is None:
        patch_size = math.isqrt(patch_dim // num_channels)
    if num_channels * patch_size * patch_size != patch_dim:
        raise ValueError(
            f"to_patch_embedding.1 takes {patch_dim} inputs, which is not {num_channels} channels x a "
            f"{patch_size}x{patch_size} patch; check --patch_size."
        )
    settings["patch_size"] = patch_size
    if num_patches is None:
        _require(settings, "image_size", "--image_size", "DATA.IMG_SIZE")
    elif settings.get("image_size") is None:
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(f"{num_patches} position embeddings do not form a square grid: pass --image_size.")
        settings["image_size"] = grid * patch_size
    image_size = settings["image_size"]
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch_size}.")
    expected = (image_size // patch_size) ** 2
    if num_patches is not None and expected != num_patches:
        raise ValueError(
            f"image_size {image_size} with patch_size {patch_size} gives {expected} patches, but the position "
            f"embeddings hold {num_patches}."
        )
    return patch_size, num_channels


def _head_count(settings: dict, dim: int, section: str) -> int:
    heads = _require(settings, "heads", "--heads", f"MODEL.{section}.NUM_HEADS")
    if dim % heads:
        raise ValueError(f"The width {dim} is not divisible by heads={heads}.")
    dim_head = settings.get("dim_head")
    if dim_head is not None and dim_head * heads != dim:
        raise ValueError(
            f"MODEL.{section}.DIM_HEAD is {dim_head}, so attention is {dim_head * heads} wide, but DW models "
            f"use head_dim = width / heads = {dim // heads}; this checkpoint cannot be represented exactly."
        )
    return heads


def _convert_vit(reader: _StateDictReader, settings: dict):
    from ..models.configuration_dwvit import DWViTConfig

    section = _SIZE_SECTIONS[settings["model_type"]]
    dim = _settle(settings, "dim", reader.shape("cls_token")[-1], "--dim")
    depth = _settle(settings, "depth", reader.count("transformer.layers.{}.0.norm.weight"), "--depth")
    mlp_dim = _settle(settings, "mlp_dim", reader.shape("transformer.layers.0.1.fn.net.0.weight")[0], "--mlp_dim")
    num_labels = _settle(settings, "num_labels", reader.shape("mlp_head.1.weight")[0], "--num_labels")
    patch_size, num_channels = _patch_geometry(reader, settings, reader.shape("pos_embedding")[1] - 1)
    heads = _head_count(settings, dim, section)
    if reader.has("transformer.layers.0.0.fn.to_qkv.bias"):
        raise ValueError("The original ViT attention has no qkv bias, but this checkpoint has one (to_qkv.bias).")

    config = DWViTConfig(
        image_size=settings["image_size"],
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=mlp_dim,
        hidden_act="gelu",
        layer_norm_eps=_ORIGINAL_NORM_EPS,
        qkv_bias=False,
        use_dw_shortcut=True,
        dw_kernel_sizes=[3],
        dw_block_span=1,
        dw_batch_norm_eps=_ORIGINAL_NORM_EPS,
        use_position_embeddings=True,
        pooling="cls",
        num_labels=num_labels,
    )

    weights = {
        "dwvit.embeddings.cls_token": reader.take("cls_token"),
        "dwvit.embeddings.position_embeddings": reader.take("pos_embedding"),
        "dwvit.embeddings.patch_embeddings.projection.weight": _linear_patch_embedding_to_conv(
            reader.take("to_patch_embedding.1.weight"), patch_size, num_channels
        ),
        "dwvit.embeddings.patch_embeddings.projection.bias": reader.take("to_patch_embedding.1.bias"),
    }
    pairs = {
        "0.norm": "layernorm_before",
        "0.fn.to_qkv": "attention.qkv",
        "0.fn.to_out.0": "attention.out_proj",
        "1.norm": "layernorm_after",
        "1.fn.net.0": "mlp.fc1",
        "1.fn.net.3": "mlp.fc2",
    }
    for index in range(depth):
        for source, target in pairs.items():
            _take_module(
                reader, weights, f"transformer.layers.{index}.{source}", f"dwvit.encoder.layers.{index}.{target}"
            )
        _take_shortcut(reader, weights, "transformer", index, f"dwvit.encoder.shortcuts.{index}")
    _take_module(reader, weights, "mlp_head.0", "dwvit.layernorm")
    _take_module(reader, weights, "mlp_head.1", "classifier")
    return config, weights


_MODULE_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _take_module(reader: _StateDictReader, weights: dict, source: str, target: str) -> None:
    """Copy every tensor of one module (Linear, LayerNorm, BatchNorm, Conv) under its new name."""
    found = False
    for name in _MODULE_TENSORS:
        key = f"{source}.{name}"
        if reader.has(key):
            weights[f"{target}.{name}"] = reader.take(key)
            found = True
    if not found:
        raise ValueError(f"The original state dict has no tensors under {source!r}; it does not match the layout.")


def _take_shortcut(reader: _StateDictReader, weights: dict, prefix: str, index: int, target: str) -> None:
    """The original shortcut is `{prefix}.batchnorms.i` then `{prefix}.convs.i` (3x3 depth-wise); DW models hold
    it as branch 0 of a `DepthwiseShortcut`."""
    kernel = reader.shape(f"{prefix}.convs.{index}.weight")
    if kernel[1] != 1 or kernel[2] != kernel[3] or kernel[2] % 2 == 0:
        raise ValueError(f"{prefix}.convs.{index} is not a depth-wise odd square kernel (shape {kernel}).")
    _take_module(reader, weights, f"{prefix}.batchnorms.{index}", f"{target}.branches.0.norm")
    _take_module(reader, weights, f"{prefix}.convs.{index}", f"{target}.branches.0.conv")


def _convert_cait(reader: _StateDictReader, settings: dict):
    """CaiT: a patch stage (self-attention with talking heads, LayerScale, a shortcut per block) and a class stage
    whose attention takes queries from the class token and keys/values from [LayerNorm(class token), patches]."""
    from ..models.configuration_dwcait import DWCaiTConfig

    # Every residual branch is `LayerScale(PreNorm(fn))` (keys `.scale`, `.fn.norm`, `.fn.fn`), or `PreNorm(fn)`
    # (keys `.norm`, `.fn`) where the original was trained without LayerScale.
    layer_scale = reader.has("patch_transformer.layers.0.0.scale")
    inner = ".fn" if layer_scale else ""
    talking_heads = reader.has(f"patch_transformer.layers.0.0{inner}.fn.mix_heads_pre_attn")
    position_embeddings = reader.has("pos_embedding")

    dim = _settle(settings, "dim", reader.shape("cls_token")[-1], "--dim")
    depth = _settle(
        settings, "depth", reader.count("patch_transformer.layers.{}" + f".0{inner}.norm.weight"), "--depth"
    )
    cls_depth = _settle(
        settings, "cls_depth", reader.count("cls_transformer.layers.{}" + f".0{inner}.norm.weight"), "--cls_depth"
    )
    mlp_dim = _settle(
        settings, "mlp_dim", reader.shape(f"patch_transformer.layers.0.1{inner}.fn.net.0.weight")[0], "--mlp_dim"
    )
    num_labels = _settle(settings, "num_labels", reader.shape("mlp_head.1.weight")[0], "--num_labels")
    if talking_heads:
        _settle(
            settings, "heads", reader.shape(f"patch_transformer.layers.0.0{inner}.fn.mix_heads_pre_attn")[0], "--heads"
        )
    heads = _head_count(settings, dim, "CaiT_XXS")
    num_patches = reader.shape("pos_embedding")[1] if position_embeddings else None
    patch_size, num_channels = _patch_geometry(reader, settings, num_patches)
    if reader.has(f"patch_transformer.layers.0.0{inner}.fn.to_q.bias"):
        raise ValueError("The original CaiT attention has no query/key/value bias, but this checkpoint has one.")

    config = DWCaiTConfig(
        image_size=settings["image_size"],
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=dim,
        num_hidden_layers=depth,
        num_class_attention_layers=cls_depth,
        num_attention_heads=heads,
        intermediate_size=mlp_dim,
        hidden_act="gelu",
        layer_norm_eps=_ORIGINAL_NORM_EPS,
        qkv_bias=False,
        use_layer_scale=layer_scale,
        # The original initialises LayerScale at 0.1 for networks of at most 18 blocks, 1e-5 up to 24, then 1e-6.
        layer_scale_init_value=0.1 if depth <= 18 else (1e-5 if depth <= 24 else 1e-6),
        use_talking_heads=talking_heads,
        use_class_attention_talking_heads=talking_heads,
        class_attention_norm_patches=False,
        use_position_embeddings=position_embeddings,
        use_dw_shortcut=True,
        dw_kernel_sizes=[3],
        dw_block_span=1,
        dw_batch_norm_eps=_ORIGINAL_NORM_EPS,
        num_labels=num_labels,
    )

    weights = {
        "dwcait.embeddings.cls_token": reader.take("cls_token"),
        "dwcait.embeddings.patch_embeddings.projection.weight": _linear_patch_embedding_to_conv(
            reader.take("to_patch_embedding.1.weight"), patch_size, num_channels
        ),
        "dwcait.embeddings.patch_embeddings.projection.bias": reader.take("to_patch_embedding.1.bias"),
    }
    if position_embeddings:
        weights["dwcait.embeddings.position_embeddings"] = reader.take("pos_embedding")

    def branch(source: str, target: str, attention: str, class_attention: bool) -> None:
        # source: `{stage}.layers.i.{0|1}`; target: the DW layer; attention: "attention" or None for the MLP.
        if layer_scale:
            weights[f"{target}.layer_scale{1 if attention else 2}.lambda1"] = reader.take(f"{source}.scale").reshape(
                dim
            )
        norm = "layernorm_before" if attention else "layernorm_after"
        _take_module(reader, weights, f"{source}{inner}.norm", f"{target}.{norm}")
        fn = f"{source}{inner}.fn"
        if not attention:
            _take_module(reader, weights, f"{fn}.net.0", f"{target}.mlp.fc1")
            _take_module(reader, weights, f"{fn}.net.3", f"{target}.mlp.fc2")
            return
        query, key_value = reader.take(f"{fn}.to_q.weight"), reader.take(f"{fn}.to_kv.weight")
        key, value = key_value.chunk(2, dim=0)
        if class_attention:
            weights[f"{target}.attention.query.weight"] = query
            weights[f"{target}.attention.key.weight"] = key
            weights[f"{target}.attention.value.weight"] = value
        else:
            weights[f"{target}.attention.qkv.weight"] = torch.cat([query, key, value], dim=0)
        _take_module(reader, weights, f"{fn}.to_out.0", f"{target}.attention.out_proj")
        if talking_heads:
            # The original computes scores @ M over the head axis; a Linear computes scores @ weight.T + bias.
            for original, mixing in (("mix_heads_pre_attn", "pre"), ("mix_heads_post_attn", "post")):
                matrix = reader.take(f"{fn}.{original}")
                weights[f"{target}.attention.talking_heads_{mixing}_softmax.weight"] = matrix.t().contiguous()
                weights[f"{target}.attention.talking_heads_{mixing}_softmax.bias"] = matrix.new_zeros(heads)

    for index in range(depth):
        target = f"dwcait.encoder.layers.{index}"
        branch(f"patch_transformer.layers.{index}.0", target, "attention", class_attention=False)
        branch(f"patch_transformer.layers.{index}.1", target, None, class_attention=False)
        _take_shortcut(reader, weights, "patch_transformer", index, f"dwcait.encoder.shortcuts.{index}")
    for index in range(cls_depth):
        target = f"dwcait.encoder.class_attention_layers.{index}"
        branch(f"cls_transformer.layers.{index}.0", target, "attention", class_attention=True)
        branch(f"cls_transformer.layers.{index}.1", target, None, class_attention=True)
    _take_module(reader, weights, "mlp_head.0", "dwcait.layernorm")
    _take_module(reader, weights, "mlp_head.1", "classifier")
    return config, weights


def _swin_stage_window(window_size: int, resolution: int) -> int:
    # Swin gives a stage whose grid is no larger than the window one window covering the grid.
    return resolution if resolution <= window_size else window_size


def _convert_swin(reader: _StateDictReader, settings: dict):
    """Swin in the layout of Microsoft's code, with `layers.s.batchnorms.b` / `layers.s.convs.b` beside block b."""
    from ..models.configuration_dwswin import DWSwinConfig

    proj = reader.shape("patch_embed.proj.weight")
    embed_dim = _settle(settings, "dim", proj[0], "--dim")
    num_channels = _settle(settings, "in_chans", proj[1], "MODEL.SWIN.IN_CHANS")
    if proj[2] != proj[3]:
        raise ValueError(
            f"patch_embed.proj has a non-square kernel {proj[2:]}; the original Swin's patches are square."
        )
    patch_size = _settle(settings, "patch_size", proj[2], "--patch_size")
    num_stages = reader.count("layers.{}.blocks.0.norm1.weight")
    depths = _settle(
        settings,
        "depth",
        [reader.count(f"layers.{s}.blocks." + "{}.norm1.weight") for s in range(num_stages)],
        "--depth",
    )
    heads = _settle(
        settings,
        "heads",
        [reader.shape(f"layers.{s}.blocks.0.attn.relative_position_bias_table")[1] for s in range(num_stages)],
        "--heads",
    )
    num_labels = _settle(settings, "num_labels", reader.shape("head.weight")[0], "--num_labels")
    image_size = _require(settings, "image_size", "--image_size", "DATA.IMG_SIZE")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch_size}.")
    resolutions = [image_size // patch_size // 2**stage for stage in range(num_stages)]
    tables = [reader.shape(f"layers.{s}.blocks.0.attn.relative_position_bias_table")[0] for s in range(num_stages)]
    if settings.get("window_size") is None:
        # A window larger than the first grid behaves like one the grid's size, so stage 0 tells all that matters.
        settings["window_size"] = (math.isqrt(tables[0]) + 1) // 2
    window_size = settings["window_size"]
    for stage, (resolution, rows) in enumerate(zip(resolutions, tables)):
        window = _swin_stage_window(window_size, resolution)
        if rows != (2 * window - 1) ** 2:
            raise ValueError(
                f"Stage {stage} has a relative position bias table of {rows} rows, but window_size {window_size} "
                f"at image_size {image_size} gives a {window}x{window} window ({(2 * window - 1) ** 2} rows); "
                f"check --image_size and --window_size."
            )
        # Shifted blocks save their mask, (windows, area, area): it pins the grid where tables cannot.
        for block in range(depths[stage]):
            key = f"layers.{stage}.blocks.{block}.attn_mask"
            expected = ((resolution // window) ** 2, window * window, window * window)
            if reader.has(key) and reader.shape(key) != expected:
                raise ValueError(
                    f"{key} has shape {reader.shape(key)}, but image_size {image_size} gives a {resolution}x"
                    f"{resolution} grid of {window}x{window} windows, i.e. {expected}; check --image_size."
                )
    mlp_hidden = reader.shape("layers.0.blocks.0.mlp.fc1.weight")[0]
    mlp_ratio = _settle(settings, "mlp_ratio", mlp_hidden / embed_dim, "--mlp_ratio")
    qkv_bias = _settle(settings, "qkv_bias", reader.has("layers.0.blocks.0.attn.qkv.bias"), "MODEL.SWIN.QKV_BIAS")
    patch_norm = _settle(settings, "patch_norm", reader.has("patch_embed.norm.weight"), "MODEL.SWIN.PATCH_NORM")
    ape = _settle(settings, "ape", reader.has("absolute_pos_embed"), "MODEL.SWIN.APE")
    if settings.get("qk_scale") is not None:
        raise ValueError(
            f"MODEL.SWIN.QK_SCALE is {settings['qk_scale']}; DW models scale attention by head_dim^-0.5 "
            f"(QK_SCALE None)."
        )

    use_shortcuts = not settings.get("shortcuts_disabled", False)
    if not use_shortcuts:
        logger.warning(
            "TRAIN.USE_CHECKPOINT is set: the original Swin stages skipped their depth-wise shortcuts, so the "
            "converted model has none (use_dw_shortcut=False) and their untrained weights are dropped."
        )
    config = DWSwinConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        window_size=window_size,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        hidden_act="gelu",
        use_absolute_embeddings=ape,
        patch_norm=patch_norm,
        layer_norm_eps=_ORIGINAL_NORM_EPS,
        drop_path_rate=settings.get("drop_path_rate") or 0.0,
        use_shifted_windows=True,
        use_dw_shortcut=use_shortcuts,
        dw_kernel_sizes=[3],
        dw_block_span=1,
        dw_batch_norm_eps=_ORIGINAL_NORM_EPS,
        num_labels=num_labels,
    )

    weights: dict[str, torch.Tensor] = {}
    _take_module(reader, weights, "patch_embed.proj", "dwswin.embeddings.patch_embeddings.projection")
    if patch_norm:
        _take_module(reader, weights, "patch_embed.norm", "dwswin.embeddings.norm")
    if ape:
        weights["dwswin.embeddings.position_embeddings"] = reader.take("absolute_pos_embed")
    pairs = {
        "norm1": "layernorm_before",
        "attn.qkv": "attention.qkv",
        "attn.proj": "attention.out_proj",
        "norm2": "layernorm_after",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for stage, depth in enumerate(depths):
        target_stage = f"dwswin.encoder.layers.{stage}"
        for block in range(depth):
            source, target = f"layers.{stage}.blocks.{block}", f"{target_stage}.blocks.{block}"
            for original, renamed in pairs.items():
                _take_module(reader, weights, f"{source}.{original}", f"{target}.{renamed}")
            weights[f"{target}.attention.relative_position_bias_table"] = reader.take(
                f"{source}.attn.relative_position_bias_table"
            )
            if use_shortcuts:
                _take_shortcut(reader, weights, f"layers.{stage}", block, f"{target_stage}.shortcuts.{block}")
            else:
                _take_shortcut(reader, {}, f"layers.{stage}", block, "unused")
        if stage < num_stages - 1:
            _take_module(
                reader, weights, f"layers.{stage}.downsample.reduction", f"{target_stage}.downsample.reduction"
            )
            _take_module(reader, weights, f"layers.{stage}.downsample.norm", f"{target_stage}.downsample.norm")
    _take_module(reader, weights, "norm", "dwswin.layernorm")
    _take_module(reader, weights, "head", "classifier")
    return config, weights


_CONVERTERS = {
    "vit": _convert_vit,
    "vit_s": _convert_vit,
    "cait_xxs": _convert_cait,
    "swin": _convert_swin,
}


def convert_original_state_dict(
    state_dict: dict[str, torch.Tensor], settings: dict[str, Any]
) -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    """Map an original state dict to a DW model's config and state dict.

    `settings` holds `model_type` and whatever sizes are known (from the original config or the command line:
    `image_size`, `num_labels`, `patch_size`, `dim`, `depth`, `heads`, `mlp_dim`, `cls_depth`, `window_size`,
    ...); the rest is read off the weights' shapes, and everything given is checked against them.
    """
    settings = dict(settings)
    model_type = settings.get("model_type")
    if model_type not in _CONVERTERS:
        available = ", ".join(t for t in ORIGINAL_MODEL_TYPES if t in _CONVERTERS)
        raise ValueError(
            f"model_type must be one of {available} (the original config's MODEL.TYPE); got {model_type!r}."
        )
    reader = _StateDictReader(state_dict)
    config, weights = _CONVERTERS[model_type](reader, settings)
    reader.finish()
    return config, weights
