"""The arguments of `run_image_classification.py`: model, data and training dataclasses for `HfArgumentParser`,
with the paper's recipe as defaults, and the parser that reads a recipe file followed by overrides."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

from .argument_files import arguments_from_file, is_argument_file
from .augmentation import AugmentationConfig
from .distributed import decide_mixed_precision, runs_on_cpu
from ..models.image_processing import DATASET_STATISTICS
from .redaction import TokenFreePickle
from ..models.sizes import NAMED_SIZES

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name: str = field(
        default="vit-tiny",
        metadata={"help": f"A named size to train from scratch; one of: {', '.join(NAMED_SIZES)}."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A saved model folder or Hub id to fine-tune instead of a fresh named size."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": 'Config fields to override, e.g. "use_dw_shortcut=false,dw_kernel_sizes=[3,5]".'},
    )
    ignore_mismatched_sizes: bool | None = field(
        default=None,
        metadata={"help": "Re-initialise the classifier when its size differs (default: when the label set changes)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model folder / Hub repo."})
    sync_batch_norm: bool = field(
        default=False,
        metadata={
            "help": "Convert the shortcut's BatchNorm to SyncBatchNorm under data parallelism (GPUs only). Default "
            "off: each process normalises with its own batch statistics."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub downloads."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN or your login)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Short name (cifar10, cifar100, tiny-imagenet, digits), any Hub image-classification dataset, "
            "or a local dataset folder such as ../shared/data/cifar10."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "An image folder (one sub-folder per class)."})
    validation_dir: str | None = field(default=None, metadata={"help": "An image folder for evaluation."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (detected by default)."})
    label_column_name: str | None = field(
        default=None, metadata={"help": "Label column (detected by default; CIFAR-100 uses fine_label)."}
    )
    train_split: str = field(default="train", metadata={"help": "The training split."})
    eval_split: str | None = field(
        default=None, metadata={"help": "The evaluation split (default: the known one, else validation/valid/val/test)."}
    )
    train_val_split: float = field(
        default=0.1, metadata={"help": "Fraction of train held out (with --seed) when there is no evaluation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a seeded random subset."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a seeded random subset."})
    corrupt_images: str = field(
        default="skip",
        metadata={"help": "Unreadable images: 'skip' (leave out, count and report) or 'error' (stop, listing them)."},
    )
    dataset_statistics: str | None = field(
        default=None,
        metadata={"help": f"Normalisation statistics by name ({', '.join(DATASET_STATISTICS)}); default: the dataset's."},
    )
    image_mean: str | None = field(default=None, metadata={"help": 'Normalisation mean, e.g. "0.5,0.5,0.5".'})
    image_std: str | None = field(default=None, metadata={"help": 'Normalisation std, e.g. "0.5,0.5,0.5".'})
    decoded_image_cache: bool = field(
        default=True,
        metadata={
            "help": "Decode each split once and keep it decoded (a memory-mapped file in the datasets cache, reused "
            "by later runs) when its images share one size; off: decode every sample as it is read."
        },
    )
    # The paper's augmentation.
    crop_scale_min: float = field(default=0.08, metadata={"help": "RandomResizedCrop's smallest area (1 = resize only)."})
    horizontal_flip_prob: float = field(default=0.5, metadata={"help": "Horizontal flip probability (0 = off)."})
    rand_augment: bool = field(default=True, metadata={"help": "RandAugment (2 ops, magnitude 9)."})
    rand_augment_num_ops: int = field(default=2)
    rand_augment_magnitude: int = field(default=9)
    color_jitter: float = field(default=0.4, metadata={"help": "Brightness/contrast/saturation jitter (0 = off)."})
    random_erasing_prob: float = field(default=0.25, metadata={"help": "Random erasing probability (0 = off)."})
    mixup_alpha: float = field(default=0.8, metadata={"help": "Mixup alpha (0 = off)."})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "CutMix alpha (0 = off)."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of CutMix rather than Mixup."})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the (mixed) targets."})
    eval_crop_ratio: float | None = field(
        default=None,
        metadata={"help": "Evaluation center-crop ratio (default 0.875, the paper's 256 -> 224; 1.0 below 64 pixels)."},
    )

    def augmentation(self) -> AugmentationConfig:
        return AugmentationConfig(
            crop_scale_min=self.crop_scale_min,
            horizontal_flip_prob=self.horizontal_flip_prob,
            rand_augment=self.rand_augment,
            rand_augment_num_ops=self.rand_augment_num_ops,
            rand_augment_magnitude=self.rand_augment_magnitude,
            color_jitter=self.color_jitter,
            random_erasing_prob=self.random_erasing_prob,
        )


@dataclass
class ImageClassificationTrainingArguments(TokenFreePickle, TrainingArguments):
    """`TrainingArguments` with the paper's recipe as defaults (AdamW, lr 5e-4, wd 0.05, cosine, clip 5).

    Pickled (`training_args.bin`) without `hub_token`: see `dwvit.training.redaction.TokenFreePickle`.
    """

    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate (paper: 5e-4; Swin 2.5e-4)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    num_train_epochs: float = field(default=300.0, metadata={"help": "Epochs (paper: 300)."})
    warmup_steps: float = field(default=20 / 300, metadata={"help": "Warmup steps, or a ratio in [0, 1) (paper: 20 of 300 epochs)."})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "Learning-rate schedule."})
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=lambda: {"min_lr": 5e-6}, metadata={"help": "Schedule arguments (paper: cosine to 5e-6)."}
    )
    max_grad_norm: float = field(default=5.0, metadata={"help": "Gradient clipping norm."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Batch per device (paper: 128 x 4 GPUs)."})
    per_device_eval_batch_size: int = field(default=256)
    eval_strategy: str = field(default="epoch")
    save_strategy: str = field(default="epoch")
    save_total_limit: int | None = field(default=2)
    logging_steps: float = field(default=50)
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Loggers ('none' for none)."})
    remove_unused_columns: bool = field(default=False)
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "'auto': bf16 where the GPU has it, else fp16 on GPUs; float32 on CPUs (bf16 measured slower "
            "there, see docs/distributed.md); or 'no', 'bf16', 'fp16' (GPUs)."
        },
    )
    max_train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Stop training once the training loop (evaluations included) has run this many minutes, summed "
            "over resumes; the schedule still follows the epochs or max_steps given."
        },
    )
    auto_resume: bool = field(
        default=True, metadata={"help": "Resume from the last checkpoint in output_dir when there is one."}
    )
    # Run control (dwvit.training.run_control, docs/reliability.md).
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output_dir holding a run: its checkpoints are deleted, its record replaced."},
    )
    resume_changed_arguments: bool = field(
        default=False,
        metadata={
            "help": "Resume a run in output_dir although arguments that change what is computed differ from its "
            "saved ones (e.g. a longer --num_train_epochs); the differences are logged and recorded."
        },
    )

    def __post_init__(self):
        # Both decisions must be made before transformers sets up the process group (in its __post_init__), and
        # it overwrites `mixed_precision` there (from ACCELERATE_MIXED_PRECISION, else "no"), so the flag is read
        # first and written back after.
        self.use_cpu = runs_on_cpu(self.use_cpu)
        requested = self.mixed_precision
        env_choice = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if self.bf16 or self.fp16:
            explicit = "bf16" if self.bf16 else "fp16"
            if requested not in ("auto", explicit):
                raise ValueError(f"--{explicit} contradicts --mixed_precision {requested}; give one of them.")
            requested = explicit
        resolved = decide_mixed_precision(requested, self.use_cpu, env_choice)
        self.bf16, self.fp16 = resolved == "bf16", resolved == "fp16"
        super().__post_init__()
        if env_choice not in (None, "no", resolved) and requested != "auto":
            logger.warning("ACCELERATE_MIXED_PRECISION=%s is overridden by --mixed_precision %s.", env_choice, resolved)
        self.mixed_precision = resolved
        self.requested_mixed_precision = requested


def parse_args(args: list[str] | None = None):
    """Parse command-line arguments; the first may be a .yaml/.yml/.json file of arguments (a recipe).

    A file's entries become `--key=value` arguments placed before the rest of the command line, so the command
    line overrides the file and every value is parsed exactly as on the command line (`true`/`false` for flags,
    `5e-4` for floats). Lists go to list fields as several values; dicts (`lr_scheduler_kwargs`) go as JSON. A null,
    or a list for a field that takes one value (`report_to: [tensorboard, wandb]`), becomes that field's default
    instead. A key that is no argument is an error naming the key and the file.
    """
    parser = HfArgumentParser((ModelArguments, DataArguments, ImageClassificationTrainingArguments))
    args = sys.argv[1:] if args is None else list(args)
    if args and is_argument_file(args[0]):
        file_args, defaults = arguments_from_file(parser, args[0])
        parser.set_defaults(**defaults)
        args = file_args + args[1:]
    return parser.parse_args_into_dataclasses(args=args)


def parse_config_overrides(text: str | None) -> dict:
    """`"use_dw_shortcut=false,dw_kernel_sizes=[3,5]"` -> `{"use_dw_shortcut": False, "dw_kernel_sizes": [3, 5]}`.

    Values are JSON (also `True`/`False`/`None`); anything else stays a string. Commas inside brackets belong
    to the value.
    """
    if not text:
        return {}
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{(" and 1 or 0
        depth -= char in "]})" and 1 or 0
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    overrides = {}
    for item in (item.strip() for item in items):
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"config_overrides entries must look like key=value; got {item!r} in {text!r}.")
        key, raw = (part.strip() for part in item.split("=", 1))
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"config_overrides key {key!r} is not a valid field name.")
        literal = {"True": "true", "False": "false", "None": "null"}.get(raw, raw)
        try:
            value = json.loads(literal.replace("(", "[").replace(")", "]"))
        except json.JSONDecodeError:
            value = raw
        overrides[key] = value
    return overrides


def parse_floats(text: str | None, count: int = 3, name: str = "value"):
    if text is None:
        return None
    values = [float(part) for part in str(text).replace("[", "").replace("]", "").split(",") if part.strip()]
    if len(values) != count:
        raise ValueError(f"{name} needs {count} comma-separated numbers; got {text!r}.")
    return tuple(values)


__all__ = [
    "DataArguments",
    "ImageClassificationTrainingArguments",
    "ModelArguments",
    "parse_args",
    "parse_config_overrides",
    "parse_floats",
]
