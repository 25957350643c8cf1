"""Named model sizes from the paper, reachable by one name from Python and from the command line."""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel

from .configuration_dwvit import DWViTConfig

_VIT_TINY = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)
_VIT_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)

# name -> (config class, fields). "-cifar" sizes run natively on 32x32 images with 4x4 patches (an 8x8 grid),
# far cheaper than the paper's upsampling to 224 with 16x16 patches (a 14x14 grid).
NAMED_SIZES: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "vit-tiny": (DWViTConfig, dict(image_size=224, patch_size=16, **_VIT_TINY)),
    "vit-small": (DWViTConfig, dict(image_size=224, patch_size=16, **_VIT_SMALL)),
    "vit-tiny-cifar": (DWViTConfig, dict(image_size=32, patch_size=4, **_VIT_TINY)),
    "vit-small-cifar": (DWViTConfig, dict(image_size=32, patch_size=4, **_VIT_SMALL)),
}


def named_config(name: str, **overrides) -> PretrainedConfig:
    """The config of a named size, with any field overridden (e.g. `num_labels=10, use_dw_shortcut=False`)."""
    if name not in NAMED_SIZES:
        raise ValueError(f"Unknown model size {name!r}; choose one of: {', '.join(NAMED_SIZES)}.")
    config_class, fields = NAMED_SIZES[name]
    return config_class(**{**fields, **overrides})


def create_model(name: str, **overrides) -> PreTrainedModel:
    """A freshly initialised image-classification model of a named size."""
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_config(named_config(name, **overrides))
