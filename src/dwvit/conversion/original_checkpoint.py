"""Convert checkpoints written by the paper's original training code into `save_pretrained` folders.

The original code (built on Microsoft's Swin Transformer training code) saves
`torch.save({"model": state_dict, "optimizer": ..., "lr_scheduler": ..., "max_accuracy": ..., "scaler": ...,
"epoch": ..., "config": yacs CfgNode})`. Its `MODEL.TYPE` is one of `vit`, `vit_s`, `cait_xxs` or `swin`.

The file is read with `torch.load(weights_only=True)`: only tensors and plain containers are rebuilt, and the
pickled `yacs.config.CfgNode` is received by a plain `dict` subclass, so nothing named in the file is ever
imported or called. A checkpoint whose pickle names any other global is refused with `UnsafeCheckpointError`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ..folders import save_folder_whole
from .original_keys import _SIZE_SECTIONS, ORIGINAL_MODEL_TYPES, convert_original_state_dict

# DATA.DATASET of the original code -> the normalisation statistics its evaluation transform used.
_DATASET_STATISTICS = {
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "tiny-imagenet": "imagenet",
    "imagenet": "imagenet",
    "imagenet22K": "imagenet",
}

# Original config keys (per size section) -> the settings names used here; Swin's names differ from ViT's.
_CONFIG_KEYS = {
    "PATCH_SIZE": "patch_size",
    "DIM": "dim",
    "EMBED_DIM": "dim",
    "DEPTHS": "depth",
    "NUM_HEADS": "heads",
    "MLP_DIM": "mlp_dim",
    "DIM_HEAD": "dim_head",
    "CLS_DEPTHS": "cls_depth",
    "IN_CHANS": "in_chans",
    "WINDOW_SIZE": "window_size",
    "MLP_RATIO": "mlp_ratio",
    "QKV_BIAS": "qkv_bias",
    "QK_SCALE": "qk_scale",
    "APE": "ape",
    "PATCH_NORM": "patch_norm",
}

class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle asks for code to be imported or run, so it is refused before anything is built."""


# A pickled `yacs.config.CfgNode` is a dict subclass built by NEWOBJ, SETITEMS and BUILD. The weights-only
# unpickler only fills exact dict types, so the node is received by an OrderedDict (already on torch's allowlist):
# yacs is never imported and no method named by the file runs.
_CONFIG_NODE_GLOBAL = (OrderedDict, "yacs.config.CfgNode")


@dataclass
class OriginalCheckpoint:
    """What a checkpoint of the original code holds that conversion uses."""

    state_dict: dict[str, torch.Tensor]
    config: dict | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _to_plain(value):
    if isinstance(value, dict):
        return {key: _to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(item) for item in value)
    return value


def _disallowed_globals(path: Path, error: Exception) -> list[str]:
    with torch.serialization.safe_globals([_CONFIG_NODE_GLOBAL]):
        try:
            return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # a legacy (non-zip) file cannot be scanned: fall back to the unpickler's own words
            pass
    return re.findall(r"GLOBAL ([\w.]+)", str(error))


def _unpickler_reason(error: Exception) -> str:
    """The line of torch's message that says what was refused, without its advice to load unsafely."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [
        line for line in lines if "weights_only" not in line and not line.startswith("Weights only load failed")
    ]
    return (reasons or lines or [type(error).__name__])[-1]


def _file_damage(path: Path) -> str | None:
    """What makes `path` unreadable as a `torch.save` file, before unpickling is tried: `torch.save` writes a zip
    archive (or, in the legacy format, a pickle, whose first byte is the protocol opcode 0x80)."""
    import zipfile

    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PK\x03\x04":
        if not zipfile.is_zipfile(path):
            return (
                f"is truncated or damaged: a zip archive (torch.save's format) whose directory is missing "
                f"({size} bytes; was the copy or download complete?)"
            )
        return None
    if head[:1] != b"\x80":
        return "is not a PyTorch checkpoint: neither torch.save's zip archive nor its legacy pickle format"
    return None


def load_original_checkpoint(path: str | os.PathLike) -> OriginalCheckpoint:
    """Read a checkpoint of the original training code without running any code from it.

    Accepts the full training checkpoint (`model`, `config`, optimizer state, ...) or a bare state dict.
    Raises `UnsafeCheckpointError` when the pickle names a global other than tensors, plain containers and
    `yacs.config.CfgNode`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    damage = _file_damage(path)
    if damage:
        raise ValueError(f"Cannot read {path}: it {damage}. Nothing was written.")
    try:
        with torch.serialization.safe_globals([_CONFIG_NODE_GLOBAL]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as error:
        raise ValueError(
            f"Cannot read {path}: it is truncated or damaged ({type(error).__name__}: {str(error).splitlines()[0]}). "
            "Nothing was written."
        ) from error
    except pickle.UnpicklingError as error:
        names = _disallowed_globals(path, error)
        named = f"the disallowed global(s) {', '.join(names)}" if names else "a disallowed pickle instruction"
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: its pickle contains {named}, so unpickling it would import and execute "
            f"code from the file. A checkpoint of the original training code holds only tensors, plain Python "
            f"containers and a yacs.config.CfgNode (read here as plain data). Nothing was loaded or written. "
            f"(weights-only unpickler: {_unpickler_reason(error)})"
        ) from error

    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}; expected the dict that torch.save wrote.")
    if "model" in checkpoint:
        state_dict = checkpoint["model"]
        config = checkpoint.get("config")
        extras = {key: checkpoint[key] for key in ("epoch", "max_accuracy") if key in checkpoint}
    else:
        state_dict, config, extras = checkpoint, None, {}
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(
            f"{path}: expected `model` to be a state dict (parameter name -> tensor) as the original code saves it."
        )
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"{path}: expected `config` to be a yacs CfgNode; got {type(config).__name__}.")
    # DistributedDataParallel wraps the model as `module.`; the original saves the unwrapped one, but be lenient.
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return OriginalCheckpoint(state_dict=dict(state_dict), config=_to_plain(config), extras=extras)


def settings_from_original_config(config: dict) -> dict[str, Any]:
    """The model settings recorded in the original yacs config (as nested dicts): type, sizes, classes, data."""
    model = config.get("MODEL") or {}
    data = config.get("DATA") or {}
    model_type = model.get("TYPE")
    settings: dict[str, Any] = {"model_type": model_type}
    if "NUM_CLASSES" in model:
        settings["num_labels"] = model["NUM_CLASSES"]
    if "IMG_SIZE" in data:
        settings["image_size"] = data["IMG_SIZE"]
    if model_type == "swin":
        if model.get("DROP_PATH_RATE") is not None:
            settings["drop_path_rate"] = model["DROP_PATH_RATE"]
        # The original Swin stage skips its shortcuts altogether when trained with gradient checkpointing.
        settings["shortcuts_disabled"] = bool((config.get("TRAIN") or {}).get("USE_CHECKPOINT", False))
    section = model.get(_SIZE_SECTIONS.get(model_type, ""), None) or {}
    for key, value in section.items():
        if key in _CONFIG_KEYS:
            settings[_CONFIG_KEYS[key]] = list(value) if isinstance(value, tuple) else value
    return settings


def _label_names(labels, num_labels: int) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        candidate = Path(labels)
        if candidate.is_file():
            names = [line.strip() for line in candidate.read_text().splitlines() if line.strip()]
        else:
            names = [name.strip() for name in str(labels).split(",")]
    else:
        names = [str(name) for name in labels]
    if len(names) != num_labels:
        raise ValueError(f"Got {len(names)} label names but the classifier has {num_labels} classes.")
    if len(set(names)) != len(names):
        raise ValueError("Label names must be unique.")
    return names


def build_converted_model(checkpoint: OriginalCheckpoint, overrides: dict[str, Any] | None = None) -> PreTrainedModel:
    """The DW image-classification model holding the checkpoint's weights (in eval mode)."""
    from transformers import AutoModelForImageClassification

    settings = settings_from_original_config(checkpoint.config) if checkpoint.config is not None else {}
    settings.update({key: value for key, value in (overrides or {}).items() if value is not None})
    config, weights = convert_original_state_dict(checkpoint.state_dict, settings)
    model = AutoModelForImageClassification.from_config(config)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def convert_original_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model_type: str | None = None,
    image_size: int | None = None,
    num_labels: int | None = None,
    patch_size: int | None = None,
    dim: int | None = None,
    depth: int | list[int] | None = None,
    heads: int | list[int] | None = None,
    mlp_dim: int | None = None,
    cls_depth: int | None = None,
    window_size: int | None = None,
    labels: str | os.PathLike | list[str] | None = None,
    dataset: str | None = None,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a checkpoint of the original training code into a `save_pretrained` folder at `output_dir`.

    Sizes come from the checkpoint's config; keyword arguments override it (and are required when the config
    cannot be read). The folder holds the model (safetensors, config with `auto_map`, code files), an image
    processor (`dataset` statistics: cifar10, cifar100 or imagenet; or `image_mean`/`image_std`; by default those
    of the config's DATA.DATASET) and label names when `labels` (a file with one name per line, a comma
    separated string or a list) is given. It is built in a temporary folder beside `output_dir` and renamed into
    place, so a failure leaves nothing behind.
    """
    from ..models.image_processing import make_image_processor

    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass overwrite=True (--overwrite) to replace it.")
    checkpoint = load_original_checkpoint(checkpoint_path)
    overrides = dict(
        model_type=model_type,
        image_size=image_size,
        num_labels=num_labels,
        patch_size=patch_size,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_dim=mlp_dim,
        cls_depth=cls_depth,
        window_size=window_size,
    )
    model = build_converted_model(checkpoint, overrides)
    names = _label_names(labels, model.config.num_labels)
    if names is not None:
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {name: index for index, name in enumerate(names)}

    if dataset is None and image_mean is None and image_std is None and checkpoint.config is not None:
        dataset = _DATASET_STATISTICS.get((checkpoint.config.get("DATA") or {}).get("DATASET"))
    image_processor = make_image_processor(
        model.config.image_size, image_mean=image_mean, image_std=image_std, dataset=dataset
    )

    return save_folder_whole(output_dir, model, image_processor, purpose="converting")


__all__ = [
    "ORIGINAL_MODEL_TYPES",
    "OriginalCheckpoint",
    "UnsafeCheckpointError",
    "build_converted_model",
    "convert_original_checkpoint",
    "convert_original_state_dict",
    "load_original_checkpoint",
    "settings_from_original_config",
]
