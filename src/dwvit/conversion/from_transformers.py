"""Start a DW model from a `transformers` ViT or Swin checkpoint: same sizes, every weight mapped, new shortcuts.

```python
import dwvit

model = dwvit.from_transformers("google/vit-base-patch16-224", dw_init="zeros")  # a DWViTForImageClassification
```

The key map below is a table of name patterns, kept apart from the model code (as `transformers` keeps its
conversion scripts apart from its models). Every tensor of the source must match a row, and every tensor of the DW
model other than the new depth-wise shortcuts must be filled by one; anything else is an error that lists the names.
Two source tensors have no DW counterpart and are dropped with a warning (see `DROPPED_REASONS`): the dense+tanh
pooler of `ViTModel` and the mask token that only masked image modelling uses.

With `dw_init="zeros"` the shortcuts start at exactly zero, so the DW model computes what the source computes
(same logits and `last_hidden_state`) and fine-tuning starts from the pretrained function; with the default
`"paper"` the shortcuts get the paper's initialisation and change the outputs from the first step.
"""

from __future__ import annotations

import inspect
import os

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.utils import logging

from .transformers_keys import (
    _DW_MODEL_TYPES,
    DROPPED,
    DROPPED_REASONS,
    FAMILIES,
    _compile,
    SHORTCUT_KEYS,
    SUPPORTED_CLASSES,
    SUPPORTED_MODEL_TYPES,
    SWIN_HEAD_KEY_MAP,
    SWIN_KEY_MAP,
    VIT_HEAD_KEY_MAP,
    VIT_KEY_MAP,
    _Family,
    _shorten,
    _supported_text,
    map_state_dict,
)

logger = logging.get_logger(__name__)



def _source_spec(model) -> tuple[_Family, str]:
    import transformers

    name = type(model).__name__
    for family in FAMILIES.values():
        if name in family.classes and type(model) is getattr(transformers, name, None):
            return family, name
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _DW_MODEL_TYPES:
        raise ValueError(f"{name} is already a DW model ({model_type}); there is nothing to convert.")
    described = f"{name} (model_type {model_type!r})" if model_type else name
    raise ValueError(f"dwvit.from_transformers converts {_supported_text()}; got {described}.")


def _base_prefix(model: PreTrainedModel) -> str | None:
    prefix = model.base_model_prefix
    return prefix if prefix and isinstance(getattr(model, prefix, None), torch.nn.Module) else None


def _warn_dropped(dropped: dict[str, list[str]]) -> None:
    for pattern, names in dropped.items():
        logger.warning("Dropping %s: %s.", ", ".join(sorted(names)), DROPPED_REASONS[pattern])


def convert_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The DW state dict (shortcuts excepted) holding the weights of a supported transformers model.

    Loads with `strict=True` into the matching DW class built with `use_dw_shortcut=False`; the tensors in
    DROPPED rows are left out with a warning, any tensor outside the map raises ValueError.
    """
    family, _ = _source_spec(model)
    mapped = map_state_dict(model.state_dict(), family.model_type, base_prefix=_base_prefix(model))
    _warn_dropped(mapped.dropped)
    return mapped.weights


# --------------------------------------------------------------------------------------------------------------
# The config.


def _config_class(family: _Family):
    from ..models import configuration_dwswin, configuration_dwvit

    module = configuration_dwvit if family.model_type == "vit" else configuration_dwswin
    return getattr(module, family.dw_config_class)


def _known_fields(config_class) -> set[str]:
    names = set(config_class().to_dict())
    names |= {name for name in inspect.signature(config_class.__init__).parameters if name not in ("self", "kwargs")}
    return names | {"num_labels", "attn_implementation"}


def _labels(config: PretrainedConfig) -> list[str]:
    return [str(config.id2label[index]) for index in sorted(config.id2label)]


def dw_config_from_transformers(source_config: PretrainedConfig, **config_overrides) -> PretrainedConfig:
    """The DW config of the same size as a transformers ViT/Swin config, with `config_overrides` on top.

    Copies the fields of VIT_CONFIG_FIELDS / SWIN_CONFIG_FIELDS by name, the label maps and problem type, and sets
    what the transformers model always does (VIT_FIXED_FIELDS / SWIN_FIXED_FIELDS). An override that names no field
    of the DW config raises ValueError (a typo would otherwise be stored and ignored).
    """
    model_type = getattr(source_config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"dwvit.from_transformers converts {_supported_text()}; got a config of model_type {model_type!r} "
            f"({type(source_config).__name__})."
        )
    family = FAMILIES[model_type]
    config_class = _config_class(family)
    unknown = sorted(set(config_overrides) - _known_fields(config_class))
    if unknown:
        raise ValueError(
            f"Unknown {config_class.__name__} field(s) in the config overrides: {', '.join(unknown)}. "
            f"Known fields: {', '.join(sorted(_known_fields(config_class)))}."
        )
    fields = {name: getattr(source_config, name) for name in family.config_fields if hasattr(source_config, name)}
    for name in ("depths", "num_heads", "out_features"):
        if isinstance(fields.get(name), tuple):
            fields[name] = list(fields[name])
    fields.update(family.fixed_fields)
    if not {"id2label", "label2id", "num_labels"} & set(config_overrides):
        fields.update(id2label=dict(source_config.id2label), label2id=dict(source_config.label2id))
    fields["problem_type"] = source_config.problem_type
    fields.update(config_overrides)
    if family.model_type == "swin" and float(source_config.layer_norm_eps) != 1e-5:
        logger.warning(
            "layer_norm_eps is %s: transformers' Swin uses it in its blocks and final LayerNorm but 1e-5 in the "
            "patch-embedding and patch-merging LayerNorms, while DWSwin uses layer_norm_eps in all of them; the "
            "converted model's outputs differ slightly from the source's.",
            source_config.layer_norm_eps,
        )
    return config_class(**fields)


# --------------------------------------------------------------------------------------------------------------
# Loading a path or Hub id.


def _load_source(path, pretrained_kwargs: dict) -> tuple[PreTrainedModel, dict[str, list[str]]]:
    """The transformers model saved at `path` (a folder or Hub id), and the dropped tensors that were not loaded."""
    import transformers

    config = AutoConfig.from_pretrained(path, **pretrained_kwargs)
    model_type = config.model_type
    if model_type in _DW_MODEL_TYPES:
        raise ValueError(
            f"{path} already holds a DW model ({model_type}); load it with from_pretrained instead of converting it."
        )
    if model_type not in FAMILIES:
        raise ValueError(
            f"dwvit.from_transformers converts {_supported_text()}; {path} holds a {model_type!r} model "
            f"({type(config).__name__}, architectures {getattr(config, 'architectures', None)})."
        )
    family = FAMILIES[model_type]
    architectures = list(getattr(config, "architectures", None) or [])
    supported = [name for name in architectures if name in family.classes]
    if architectures and not supported:
        raise ValueError(
            f"dwvit.from_transformers converts {_supported_text()}; {path} was saved from "
            f"{', '.join(architectures)}."
        )
    class_name = supported[0] if supported else family.base_class
    model_kwargs = {"add_pooling_layer": False} if class_name == "ViTModel" else {}
    source, info = getattr(transformers, class_name).from_pretrained(
        path, config=config, output_loading_info=True, **model_kwargs, **pretrained_kwargs
    )
    # Loaded without its pooler, a ViTModel reports the checkpoint's pooler tensors (if any) as unexpected.
    dropped_rows = [(_compile(s), s) for s, t in family.key_map if t is DROPPED]
    dropped: dict[str, list[str]] = {}
    unexpected = []
    for name in sorted(info.get("unexpected_keys") or []):
        row = next((pattern for regex, pattern in dropped_rows if regex.fullmatch(name)), None)
        if row is None:
            unexpected.append(name)
        else:
            dropped.setdefault(row, []).append(name)
    problems = []
    if unexpected:
        problems.append(f"tensors that {class_name} does not have: {_shorten(unexpected)}")
    if info.get("missing_keys"):
        problems.append(f"no tensors for {_shorten(info['missing_keys'])} (they would be random)")
    if info.get("mismatched_keys"):
        problems.append(f"tensors of the wrong shape: {_shorten(str(k) for k in info['mismatched_keys'])}")
    if info.get("error_msgs"):
        problems.append("; ".join(str(message) for message in info["error_msgs"]))
    if problems:
        raise ValueError(
            f"The checkpoint at {path} does not load exactly into transformers' {class_name}: "
            f"{'; '.join(problems)}. Nothing was converted."
        )
    return source, dropped


# --------------------------------------------------------------------------------------------------------------
# The entry point.


def from_transformers(
    model_or_path: PreTrainedModel | str | os.PathLike,
    *,
    pretrained_kwargs: dict | None = None,
    **config_overrides,
) -> PreTrainedModel:
    """The DW model of the same size as a transformers ViT or Swin, holding all its weights, with new shortcuts.

    Args:
        model_or_path: a `ViTForImageClassification`, `ViTModel`, `SwinForImageClassification`, `SwinModel` or
            `SwinBackbone` instance, or a folder or Hub id holding one (loaded with `from_pretrained`; the class is
            the one its config's `architectures` names).
        pretrained_kwargs: keyword arguments for `from_pretrained` when `model_or_path` is a path or Hub id
            (`cache_dir`, `token`, `revision`, `dtype`, ...).
        **config_overrides: DW config fields set on top of the copied ones, e.g. `dw_init="zeros"` (the shortcuts
            start at zero, so the DW model's outputs equal the source's), `dw_kernel_sizes=[3, 5]`, or a new label
            set (`id2label=...` or `num_labels=...`), which gives a new, randomly initialised classifier.

    Returns:
        `DWViTForImageClassification`, `DWViTModel`, `DWSwinForImageClassification`, `DWSwinModel` or
        `DWSwinBackbone`, in eval mode, on the source's device and in its dtype.

    Raises:
        ValueError: the source is not one of those classes; a source tensor has no row in the key map; a DW
            tensor other than the shortcuts is left unfilled or gets the wrong shape (e.g. an override that changes
            a size); an override names no config field.

    `ViTModel`'s dense+tanh pooler and a mask token are dropped with a warning (DROPPED_REASONS).
    """
    from ..models import modeling_dwswin, modeling_dwvit

    dropped: dict[str, list[str]] = {}
    if isinstance(model_or_path, (str, os.PathLike)):
        source, dropped = _load_source(model_or_path, dict(pretrained_kwargs or {}))
        described = f"{type(source).__name__} from {model_or_path}"
    elif isinstance(model_or_path, torch.nn.Module):
        if pretrained_kwargs:
            raise ValueError("pretrained_kwargs applies only when model_or_path is a path or Hub id.")
        source, described = model_or_path, type(model_or_path).__name__
    else:
        raise TypeError(
            f"model_or_path must be a transformers model, a folder or a Hub id; got {type(model_or_path).__name__}."
        )
    family, class_name = _source_spec(source)

    config = dw_config_from_transformers(source.config, **config_overrides)
    module = modeling_dwvit if family.model_type == "vit" else modeling_dwswin
    dw_class = getattr(module, family.classes[class_name])
    mapped = map_state_dict(source.state_dict(), family.model_type, base_prefix=_base_prefix(source))
    for pattern, names in mapped.dropped.items():
        dropped.setdefault(pattern, []).extend(names)
    _warn_dropped(dropped)

    weights = dict(mapped.weights)
    new_labels = "classifier.weight" in weights and _labels(config) != _labels(source.config)
    if new_labels:
        for name in ("classifier.weight", "classifier.bias"):
            weights.pop(name, None)
        logger.warning(
            "The label set changes (%d -> %d classes): the classifier is new and randomly initialised.",
            len(_labels(source.config)), len(_labels(config)),
        )

    model = dw_class(config)
    expected = model.state_dict()
    not_in_model = sorted(name for name in weights if name not in expected)
    wrong_shape = sorted(
        f"{name} ({mapped.sources[name]}: {tuple(weights[name].shape)} vs {tuple(expected[name].shape)})"
        for name in weights
        if name in expected and weights[name].shape != expected[name].shape
    )
    new_head = ("classifier.weight", "classifier.bias") if new_labels else ()
    unfilled = sorted(
        name for name in expected if name not in weights and not SHORTCUT_KEYS.search(name) and name not in new_head
    )
    problems = []
    if not_in_model:
        problems.append(f"the model has no {_shorten(f'{n} (from {mapped.sources[n]})' for n in not_in_model)}")
    if wrong_shape:
        problems.append(f"shapes differ for {_shorten(wrong_shape)}")
    if unfilled:
        problems.append(f"nothing fills {_shorten(unfilled)}")
    if problems:
        overrides = f" with the overrides {config_overrides}" if config_overrides else ""
        raise ValueError(
            f"The weights of {described} do not fit {dw_class.__name__}{overrides}: {'; '.join(problems)}. "
            f"An override that changes a size or removes a part cannot keep the pretrained weights."
        )
    model.load_state_dict(weights, strict=False)

    reference = next((p for p in source.parameters() if p.is_floating_point()), None)
    if reference is not None:
        model.to(device=reference.device, dtype=reference.dtype)
    logger.info(
        "Converted %s into %s: %d tensors mapped, %d new shortcut tensors (dw_init=%s).",
        described, dw_class.__name__, len(weights), sum(1 for name in expected if SHORTCUT_KEYS.search(name)),
        config.dw_init,
    )
    return model.eval()


__all__ = [
    "DROPPED",
    "DROPPED_REASONS",
    "SUPPORTED_CLASSES",
    "SUPPORTED_MODEL_TYPES",
    "SWIN_HEAD_KEY_MAP",
    "SWIN_KEY_MAP",
    "VIT_HEAD_KEY_MAP",
    "VIT_KEY_MAP",
    "convert_state_dict",
    "dw_config_from_transformers",
    "from_transformers",
    "map_state_dict",
]
