"""Checks of the job's inputs made before anything is trained, each naming the problem and the expected value."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from .arguments import parse_floats

logger = logging.getLogger(__name__)


def check_arguments(model_args, data_args, training_args) -> None:
    """Refuse values that would train nothing or train on NaNs, rather than failing (or not) much later."""
    from ..models.sizes import NAMED_SIZES, check_config_fields
    from .arguments import parse_config_overrides

    if model_args.model_name_or_path is None and model_args.model_name in NAMED_SIZES:
        check_config_fields(NAMED_SIZES[model_args.model_name][0], parse_config_overrides(model_args.config_overrides),
                            where="--config_overrides")
    elif model_args.model_name_or_path is not None and os.path.isdir(model_args.model_name_or_path):
        check_weight_files(model_args.model_name_or_path)
        if model_args.config_overrides and os.path.isfile(os.path.join(model_args.model_name_or_path, "config.json")):
            from transformers import AutoConfig

            saved = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
            check_overrides_of_saved_model(saved, parse_config_overrides(model_args.config_overrides))
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(training_args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a whole number >= 1; got {value}.")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(data_args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1 (or left out for the whole split); got {value}.")
    std = parse_floats(data_args.image_std, name="image_std")
    if std is not None and not all(math.isfinite(value) and value > 0 for value in std):
        raise ValueError(
            f"--image_std must be three finite numbers > 0 (images are divided by it; e.g. 0.5,0.5,0.5); got {std}."
        )
    mean = parse_floats(data_args.image_mean, name="image_mean")
    if mean is not None and not all(math.isfinite(value) for value in mean):
        raise ValueError(f"--image_mean must be three finite numbers (e.g. 0.5,0.5,0.5); got {mean}.")
    advice = cpu_bf16_advice(training_args, model_args.config_overrides)
    if advice:
        logger.warning(advice)


def check_overrides_of_saved_model(saved_config, overrides: dict) -> None:
    """Refuse misspelt `--config_overrides` fields for a saved model: checked against its config class, or for a
    transformers ViT/Swin checkpoint (converted on load) against the DW config it becomes."""
    from ..conversion.transformers_keys import FAMILIES, SUPPORTED_MODEL_TYPES
    from ..models.sizes import check_config_fields

    if not overrides:
        return
    config_class = type(saved_config)
    if saved_config.model_type in SUPPORTED_MODEL_TYPES:
        from .. import models

        config_class = getattr(models, FAMILIES[saved_config.model_type].dw_config_class)
    check_config_fields(config_class, overrides, where="--config_overrides")


def cpu_bf16_advice(training_args, config_overrides: str | None) -> str | None:
    """What bf16 autocast costs on this CPU when a run asks for it (measured in docs/distributed.md); None when
    the run is not bf16 on a CPU or takes the fast path."""
    from .distributed import cpu_has_native_bf16

    if not (getattr(training_args, "bf16", False) and getattr(training_args, "use_cpu", False)):
        return None
    if not cpu_has_native_bf16():
        return (
            "bf16 on this CPU is emulated (it has neither AVX512-BF16 nor AMX): expect the training step several "
            "times slower than in float32 (--mixed_precision no)."
        )
    if "_attn_implementation=eager" not in (config_overrides or "").replace(" ", ""):
        return (
            "bf16 on a CPU with SDPA attention measured 1.37x slower than float32 (its CPU flash-attention backward "
            "in bf16); add _attn_implementation=eager to --config_overrides for the fast path (0.60x the float32 "
            "step, same accuracy in the pilots of docs/distributed.md)."
        )
    return None


def check_eval_labels(dataset, label_column: str, label_names: list[str], split: str, scored: bool) -> None:
    """Every label of the evaluation split must be one of the training labels (0..N-1), checked before training.

    Unlabelled rows (-1, as `datasets` marks a missing ClassLabel) can be predicted (--do_predict) but not
    scored (--do_eval).
    """
    values = np.unique(np.asarray(dataset[label_column], dtype=np.int64))
    allowed = (values >= 0) & (values < len(label_names))
    if not scored:
        allowed |= values == -1
    bad = values[~allowed]
    if bad.size:
        shown = ", ".join(str(value) for value in bad[:20]) + (", ..." if bad.size > 20 else "")
        unlabelled = " (-1: unlabelled; such a split can be predicted with --do_predict, not evaluated)" if (bad == -1).any() else ""
        raise ValueError(
            f"The evaluation split {split!r} holds labels {shown} in column {label_column!r}, outside the training "
            f"label set 0..{len(label_names) - 1} ({len(label_names)} classes){unlabelled}. Evaluate on a split "
            "with the training set's labels, or name another with --eval_split."
        )


def check_weight_files(folder) -> None:
    """Refuse a model folder whose safetensors weights are truncated or empty, naming each file (safetensors
    itself says only "header too small" or "file not fully covered", without the file)."""
    from .checkpointing import safetensors_problems

    problems = [f"{path}: {problem.split(': ', 1)[-1]}" for path in sorted(Path(folder).glob("*.safetensors"))
                for problem in safetensors_problems(path)]
    if problems:
        raise ValueError(f"The model folder {folder} holds damaged weights: {'; '.join(problems)}.")
