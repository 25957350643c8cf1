"""The key map from `transformers` ViT and Swin state dicts to the DW models', and the code that applies it.

A table of name patterns, kept apart from the model code as `transformers` keeps its conversion scripts apart
from its models; `from_transformers.py` builds the DW model and loads what `map_state_dict` returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

# --------------------------------------------------------------------------------------------------------------
# The key map: transformers name pattern -> DW name pattern.
#
# Patterns name the tensors of the bare models (`ViTModel` -> `DWViTModel`, `SwinModel` -> `DWSwinModel`); in the
# models with a head the same names sit under `vit.` / `swin.` and become `dwvit.` / `dwswin.`, and the head's own
# tensors follow the HEAD maps. Placeholders:
#   {i}, {s}, {b}  a layer, stage or block index
#   {w}            weight or bias
#   {stage}        a backbone stage name (stem, stage1, ...)
#   {qkv}          q_proj, k_proj and v_proj: their tensors are concatenated (rows, in that order) into one target
# DROPPED: the tensor has no DW counterpart; it is left out with a warning giving DROPPED_REASONS' reason.

DROPPED = None

VIT_KEY_MAP = (
    # transformers ViTModel                               DWViTModel
    ("embeddings.cls_token",                              "embeddings.cls_token"),
    ("embeddings.position_embeddings",                    "embeddings.position_embeddings"),
    ("embeddings.patch_embeddings.projection.{w}",        "embeddings.patch_embeddings.projection.{w}"),
    ("layers.{i}.layernorm_before.{w}",                   "encoder.layers.{i}.layernorm_before.{w}"),
    ("layers.{i}.attention.{qkv}.{w}",                    "encoder.layers.{i}.attention.qkv.{w}"),
    ("layers.{i}.attention.o_proj.{w}",                   "encoder.layers.{i}.attention.out_proj.{w}"),
    ("layers.{i}.layernorm_after.{w}",                    "encoder.layers.{i}.layernorm_after.{w}"),
    ("layers.{i}.mlp.fc1.{w}",                            "encoder.layers.{i}.mlp.fc1.{w}"),
    ("layers.{i}.mlp.fc2.{w}",                            "encoder.layers.{i}.mlp.fc2.{w}"),
    ("layernorm.{w}",                                     "layernorm.{w}"),
    ("pooler.dense.{w}",                                  DROPPED),
    ("embeddings.mask_token",                             DROPPED),
)

VIT_HEAD_KEY_MAP = (
    # ViTForImageClassification (outside `vit.`)          DWViTForImageClassification (outside `dwvit.`)
    ("classifier.{w}",                                    "classifier.{w}"),
)

_BLOCK = "encoder.layers.{s}.blocks.{b}."  # the same prefix on both sides

SWIN_KEY_MAP = (
    # transformers SwinModel                                            DWSwinModel
    ("embeddings.patch_embeddings.projection.{w}",                      "embeddings.patch_embeddings.projection.{w}"),
    ("embeddings.norm.{w}",                                             "embeddings.norm.{w}"),
    ("embeddings.position_embeddings",                                  "embeddings.position_embeddings"),
    (_BLOCK + "layernorm_before.{w}",                                   _BLOCK + "layernorm_before.{w}"),
    (_BLOCK + "attention.{qkv}.{w}",                                    _BLOCK + "attention.qkv.{w}"),
    (_BLOCK + "attention.o_proj.{w}",                                   _BLOCK + "attention.out_proj.{w}"),
    (_BLOCK + "attention.relative_position_bias.relative_position_bias_table",  # (the table keeps its values)
        _BLOCK + "attention.relative_position_bias_table"),
    (_BLOCK + "layernorm_after.{w}",                                    _BLOCK + "layernorm_after.{w}"),
    (_BLOCK + "mlp.fc1.{w}",                                            _BLOCK + "mlp.fc1.{w}"),
    (_BLOCK + "mlp.fc2.{w}",                                            _BLOCK + "mlp.fc2.{w}"),
    ("encoder.layers.{s}.downsample.reduction.{w}",                     "encoder.layers.{s}.downsample.reduction.{w}"),
    ("encoder.layers.{s}.downsample.norm.{w}",                          "encoder.layers.{s}.downsample.norm.{w}"),
    ("layernorm.{w}",                                                   "layernorm.{w}"),
    ("embeddings.mask_token",                                           DROPPED),
)

SWIN_HEAD_KEY_MAP = (
    # SwinForImageClassification / SwinBackbone (outside `swin.`)   DWSwin... (outside `dwswin.`)
    ("classifier.{w}",                                              "classifier.{w}"),
    ("hidden_states_norms.{stage}.{w}",                             "hidden_states_norms.{stage}.{w}"),
)

DROPPED_REASONS = {
    "pooler.dense.{w}": (
        "ViTModel's pooler (a dense layer and tanh over the class token) has no DW counterpart; DWViTModel's "
        "pooler_output is the class token after the final LayerNorm. Image classification (ViTForImageClassification "
        "and DWViTForImageClassification alike) never uses that pooler"
    ),
    "embeddings.mask_token": "the mask token is used only for masked image modelling (bool_masked_pos)",
}

# DW tensors that the source cannot fill: the new depth-wise shortcuts (BatchNorm and depth-wise conv per branch).
SHORTCUT_KEYS = re.compile(r"(^|\.)shortcuts\.\d+\.")

# --------------------------------------------------------------------------------------------------------------
# The config map: fields copied by name, and what the transformers model always does that a DW config can switch.

VIT_CONFIG_FIELDS = (
    "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range",
    "layer_norm_eps", "qkv_bias",
)
# Not copied: encoder_stride (the masked-image-modelling decoder), pooler_output_size and pooler_act (the pooler).
VIT_FIXED_FIELDS = {"use_position_embeddings": True, "pooling": "cls"}

SWIN_CONFIG_FIELDS = (
    "image_size", "patch_size", "num_channels", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio",
    "qkv_bias", "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate", "hidden_act",
    "use_absolute_embeddings", "initializer_range", "layer_norm_eps", "out_features",
)
# Not copied: encoder_stride (the masked-image-modelling decoder).
SWIN_FIXED_FIELDS = {"patch_norm": True, "use_shifted_windows": True}

LABEL_FIELDS = ("id2label", "label2id", "problem_type")


@dataclass(frozen=True)
class _Family:
    model_type: str
    dw_config_class: str
    key_map: tuple
    head_key_map: tuple
    config_fields: tuple
    fixed_fields: dict
    classes: dict = field(default_factory=dict)  # transformers class name -> DW class name
    base_class: str = ""


FAMILIES = {
    "vit": _Family(
        "vit", "DWViTConfig", VIT_KEY_MAP, VIT_HEAD_KEY_MAP, VIT_CONFIG_FIELDS, VIT_FIXED_FIELDS,
        {"ViTForImageClassification": "DWViTForImageClassification", "ViTModel": "DWViTModel"},
        base_class="ViTModel",
    ),
    "swin": _Family(
        "swin", "DWSwinConfig", SWIN_KEY_MAP, SWIN_HEAD_KEY_MAP, SWIN_CONFIG_FIELDS, SWIN_FIXED_FIELDS,
        {
            "SwinForImageClassification": "DWSwinForImageClassification",
            "SwinModel": "DWSwinModel",
            "SwinBackbone": "DWSwinBackbone",
        },
        base_class="SwinModel",
    ),
}

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
SUPPORTED_CLASSES = tuple(name for family in FAMILIES.values() for name in family.classes)
_DW_MODEL_TYPES = ("dwvit", "dwcait", "dwswin")


def _supported_text() -> str:
    model_types = " or ".join(repr(model_type) for model_type in SUPPORTED_MODEL_TYPES)
    return f"transformers {', '.join(SUPPORTED_CLASSES)} (model_type {model_types})"


# --------------------------------------------------------------------------------------------------------------
# Applying the key map.

_PLACEHOLDERS = {"w": r"weight|bias", "qkv": r"q_proj|k_proj|v_proj", "stage": r"stem|stage\d+"}
_FUSED_ORDER = ("q_proj", "k_proj", "v_proj")


def _compile(pattern: str) -> re.Pattern:
    pieces = re.split(r"\{(\w+)\}", pattern)
    regex = "".join(
        re.escape(piece) if index % 2 == 0 else f"(?P<{piece}>{_PLACEHOLDERS.get(piece, r'[0-9]+')})"
        for index, piece in enumerate(pieces)
    )
    return re.compile(regex)


@dataclass
class MappedWeights:
    """The DW tensors a source state dict gives (`weights`), where each came from (`sources`), and what was dropped."""

    weights: dict[str, torch.Tensor]
    sources: dict[str, str]
    dropped: dict[str, list[str]]  # dropped-row pattern -> the source names it dropped


def _shorten(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def map_state_dict(
    state_dict: dict[str, torch.Tensor], model_type: str, *, base_prefix: str | None
) -> MappedWeights:
    """Rename a transformers ViT/Swin state dict into DW names with the key map (the shortcuts are not included).

    `base_prefix` is the source's prefix of the bare model's tensors (`"vit"` / `"swin"` in the models with a head,
    None for the bare model); they move under `dwvit.` / `dwswin.`, and the other tensors follow the head map.
    Raises ValueError listing every tensor that no row of the map matches.
    """
    family = FAMILIES[model_type]
    body = [(_compile(source), source, target) for source, target in family.key_map]
    head = [(_compile(source), source, target) for source, target in family.head_key_map]
    dw_prefix = f"dw{model_type}." if base_prefix else ""
    weights: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    fused: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    dropped: dict[str, list[str]] = {}
    unmapped = []
    for name, tensor in state_dict.items():
        if base_prefix and name.startswith(base_prefix + "."):
            rules, key, prefix = body, name[len(base_prefix) + 1 :], dw_prefix
        elif base_prefix:
            rules, key, prefix = head, name, ""
        else:
            rules, key, prefix = body, name, ""
        for regex, source_pattern, target_pattern in rules:
            match = regex.fullmatch(key)
            if match is None:
                continue
            if target_pattern is DROPPED:
                dropped.setdefault(source_pattern, []).append(name)
                break
            groups = match.groupdict()
            part = groups.pop("qkv", None)
            target = prefix + target_pattern.format(**groups)
            if part is not None:
                fused.setdefault(target, {})[part] = (name, tensor)
            else:
                if target in weights:
                    raise ValueError(f"Both {sources[target]!r} and {name!r} map to {target!r}.")
                weights[target], sources[target] = tensor, name
            break
        else:
            unmapped.append(name)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} tensor(s) of the transformers {model_type} model have no row in the key map of "
            f"dwvit.from_transformers: {_shorten(unmapped)}. Only the plain {_supported_text()} layouts convert; "
            f"this model holds weights that a DW model cannot represent, and they are not dropped silently."
        )
    for target, parts in fused.items():
        absent = [part for part in _FUSED_ORDER if part not in parts]
        if absent:
            present = ", ".join(name for name, _ in parts.values())
            raise ValueError(f"{present} need(s) {', '.join(absent)} beside it to form the fused {target!r}.")
        weights[target] = torch.cat([parts[part][1] for part in _FUSED_ORDER], dim=0)
        sources[target] = " + ".join(parts[part][0] for part in _FUSED_ORDER)
    return MappedWeights(weights, sources, dropped)
