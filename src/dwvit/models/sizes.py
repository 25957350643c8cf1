"""Named model sizes from the paper, reachable by one name from Python and from the command line."""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel

from .configuration_dwvit import DWViTConfig
from .configuration_dwcait import DWCaiTConfig
from .configuration_dwswin import DWSwinConfig

_SWIN_TINY = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], drop_path_rate=0.2)

# CaiT-XXS in the paper's best small-data setting: LayerScale, talking heads and position embeddings all off
# (pass use_talking_heads=True, use_position_embeddings=True for its ImageNet setting).
_CAIT_XXS = dict(
    hidden_size=192,
    num_attention_heads=4,
    intermediate_size=768,
    num_class_attention_layers=2,
    use_layer_scale=False,
    use_talking_heads=False,
    use_position_embeddings=False,
)

_VIT_TINY = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)
_VIT_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)

# name -> (config class, fields). "-cifar" sizes run natively on 32x32 images with 4x4 patches (an 8x8 grid),
# far cheaper than the paper's upsampling to 224 with 16x16 patches (a 14x14 grid).
NAMED_SIZES: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "vit-tiny": (DWViTConfig, dict(image_size=224, patch_size=16, **_VIT_TINY)),
    "vit-small": (DWViTConfig, dict(image_size=224, patch_size=16, **_VIT_SMALL)),
    "vit-tiny-cifar": (DWViTConfig, dict(image_size=32, patch_size=4, **_VIT_TINY)),
    "vit-small-cifar": (DWViTConfig, dict(image_size=32, patch_size=4, **_VIT_SMALL)),
    "cait-xxs12": (DWCaiTConfig, dict(image_size=224, patch_size=16, num_hidden_layers=12, **_CAIT_XXS)),
    "cait-xxs24": (DWCaiTConfig, dict(image_size=224, patch_size=16, num_hidden_layers=24, **_CAIT_XXS)),
    "cait-xxs12-cifar": (DWCaiTConfig, dict(image_size=32, patch_size=4, num_hidden_layers=12, **_CAIT_XXS)),
    "cait-xxs24-cifar": (DWCaiTConfig, dict(image_size=32, patch_size=4, num_hidden_layers=24, **_CAIT_XXS)),
    # Swin-T: 224 / patch 4 gives stage grids 56, 28, 14, 7 with 7x7 windows (the last stage is one window, unshifted).
    "swin-tiny": (DWSwinConfig, dict(image_size=224, patch_size=4, window_size=7, **_SWIN_TINY)),
    # 32 / patch 2 gives stage grids 16, 8, 4, 2 with 4x4 windows: stages 1-2 shift windows, stage 3 is one window
    # and stage 4 one 2x2 window (both unshifted), as Swin does whenever a grid is no larger than the window.
    "swin-tiny-cifar": (DWSwinConfig, dict(image_size=32, patch_size=2, window_size=4, **_SWIN_TINY)),
}


def named_config(name: str, **overrides) -> PretrainedConfig:
    """The config of a named size, with any field overridden (e.g. `num_labels=10, use_dw_shortcut=False`); a name
    that is no field of the config (a misspelling a config would store unused) raises a `ValueError`."""
    if name not in NAMED_SIZES:
        raise ValueError(f"Unknown model size {name!r}; choose one of: {', '.join(NAMED_SIZES)}.")
    config_class, fields = NAMED_SIZES[name]
    check_config_fields(config_class, overrides, where=f"{name!r} override")
    return config_class(**{**fields, **overrides})


def create_model(name: str, **overrides) -> PreTrainedModel:
    """A freshly initialised image-classification model of a named size."""
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_config(named_config(name, **overrides))


def check_config_fields(config_class, overrides: dict, where: str = "config override") -> None:
    """Refuse override keys that are no field of `config_class` (a config would silently store them), suggesting
    the closest field names."""
    import difflib
    import inspect

    from transformers import PretrainedConfig

    known = set(config_class().to_dict())
    known |= {name for name in dir(config_class) if isinstance(getattr(config_class, name, None), property)}
    for cls in (config_class, PretrainedConfig):
        known |= {name for name, parameter in inspect.signature(cls.__init__).parameters.items()
                  if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) and name != "self"}
    unknown = [name for name in overrides if name not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hints.append(f"{name!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
        raise ValueError(
            f"Unknown {where} field(s) for {config_class.__name__}: {', '.join(hints)}; a config would store "
            "them unused. See the config class's documentation for its fields."
        )
