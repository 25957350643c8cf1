#!/usr/bin/env python
"""Train and evaluate a dwvit image classifier on a `datasets` dataset with the `transformers` Trainer.

One CPU:        python run_image_classification.py --dataset_name cifar10 --model_name vit-tiny-cifar --output_dir out
Several GPUs:   accelerate launch run_image_classification.py ...   or   torchrun --nproc_per_node 4 run_image_classification.py ...
From a recipe:  python run_image_classification.py recipes/paper/vit-tiny_cifar10.yaml [--overrides ...]   (YAML or JSON)

Defaults follow the paper's recipe for training from scratch (see docs/training.md); every part has a flag.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shlex
import sys
import time

import numpy as np
import torch
import transformers
from torchvision.transforms import v2
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
)

import dwvit
from dwvit.training.augmentation import (
    BatchAugmentation,
    ImageBatchCollator,
    build_eval_transform,
    sample_crop_steps,
)
from dwvit.training import run_control
from dwvit.training.checkpointing import latest_complete_checkpoint
from dwvit.models.configuration_dwvit import to_pair
from dwvit.training.data import (
    ImageClassificationDataset,
    apply_unreadable_policy,
    detect_columns,
    known_dataset,
    label_names,
    load_raw_datasets,
    scan_images,
    split_train_eval,
    without_decoding,
)
from dwvit.models.image_processing import DATASET_STATISTICS
from dwvit.training.distributed import same_on_every_rank
from dwvit.training.redaction import redact_argv, redact_mapping
from dwvit.training.arguments import (
    DataArguments,
    ModelArguments,
    parse_args,
)
from dwvit.training.trainer import DWTrainer, prepare_torch_compile
from dwvit.training.arguments import parse_config_overrides, parse_floats
from dwvit.training.callbacks import SetEpochCallback, TrainingClock
from dwvit.training.metrics import make_compute_metrics
from dwvit.training.validation import check_arguments, check_eval_labels, check_overrides_of_saved_model

logger = logging.getLogger("run_image_classification")


def build_model(model_args: ModelArguments, labels: list[str]):
    """A fresh named size, or a saved model with the dataset's label set (new head if the set changed).

    A transformers ViT or Swin checkpoint (model_type "vit" or "swin", a folder or Hub id) is converted on load
    into the DW model of the same size with new depth-wise shortcuts (`dwvit.from_transformers`, with
    --config_overrides applied, e.g. dw_init=zeros), then loaded like a saved DW model.
    """
    import tempfile

    from dwvit.conversion.from_transformers import SUPPORTED_MODEL_TYPES

    id2label = dict(enumerate(labels))
    label2id = {name: index for index, name in id2label.items()}
    overrides = parse_config_overrides(model_args.config_overrides)
    if model_args.model_name_or_path is None:
        config = dwvit.named_config(
            model_args.model_name, num_labels=len(labels), id2label=id2label, label2id=label2id, **overrides
        )
        return AutoModelForImageClassification.from_config(config)
    hub_kwargs = dict(cache_dir=model_args.cache_dir, token=model_args.token, trust_remote_code=model_args.trust_remote_code)
    saved = AutoConfig.from_pretrained(model_args.model_name_or_path, **hub_kwargs)
    if not os.path.isdir(model_args.model_name_or_path):  # a local folder was checked up front (check_arguments)
        check_overrides_of_saved_model(saved, overrides)
    with tempfile.TemporaryDirectory(prefix="dwvit-converted-") as converted_dir:
        path = model_args.model_name_or_path
        if saved.model_type in SUPPORTED_MODEL_TYPES:
            converted = dwvit.from_transformers(
                path, pretrained_kwargs=dict(cache_dir=model_args.cache_dir, token=model_args.token), **overrides
            )
            converted.save_pretrained(converted_dir)
            logger.info(
                "Converted the transformers %s checkpoint %s into %s with new depth-wise shortcuts (dw_init=%s).",
                saved.model_type, path, type(converted).__name__, converted.config.dw_init,
            )
            del converted
            path = converted_dir
            saved = AutoConfig.from_pretrained(path)
        same_labels = [saved.id2label[i] for i in sorted(saved.id2label)] == list(labels)
        config = AutoConfig.from_pretrained(
            path, num_labels=len(labels), id2label=id2label, label2id=label2id, **overrides, **hub_kwargs,
        )
        ignore = model_args.ignore_mismatched_sizes
        if ignore is None:
            ignore = not same_labels
        if not same_labels:
            logger.info("New label set (%d classes): the classifier is re-initialised.", len(labels))
        return AutoModelForImageClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=ignore, **hub_kwargs
        )


def apply_sync_batch_norm(model, training_args) -> torch.nn.Module:
    if training_args.world_size <= 1:
        logger.warning("--sync_batch_norm has no effect with one process.")
        return model
    if training_args.device.type == "cpu":
        raise ValueError(
            "--sync_batch_norm needs GPUs: torch.nn.SyncBatchNorm only synchronises CUDA/XPU tensors and raises on "
            "CPU tensors. On CPUs, train without it (each process keeps its own BatchNorm statistics)."
        )
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def normalisation(data_args: DataArguments, spec):
    name = data_args.dataset_statistics or (spec.statistics if spec is not None else None) or "imagenet"
    if name not in DATASET_STATISTICS:
        raise ValueError(f"dataset_statistics must be one of {', '.join(DATASET_STATISTICS)}; got {name!r}.")
    mean, std = DATASET_STATISTICS[name]
    mean = parse_floats(data_args.image_mean, name="image_mean") or mean
    std = parse_floats(data_args.image_std, name="image_std") or std
    return mean, std


def scan_split(dataset, image_column: str, data_args, training_args, cache_dir):
    """Decode a split once (or read the cached result): its unreadable images and, if kept, its decoded images."""
    started = time.perf_counter()
    # Several processes: each machine's first one decodes and caches, the others read its cache; all must then
    # leave out the same images, or their samplers would shard different datasets.
    with training_args.main_process_first(local=True, desc="decoding images"):
        scan = scan_images(dataset, image_column, cache_dir=cache_dir, keep_images=data_args.decoded_image_cache)
    same_on_every_rank([index for index, _, _ in scan.unreadable], "which images are unreadable")
    logger.info(
        "Images of %d rows %s in %.1f s%s.", len(dataset), "read from the decoding cache" if scan.from_cache else "decoded",
        time.perf_counter() - started, " (kept decoded)" if scan.images is not None else "",
    )
    return scan


def write_predictions(path, trainer, dataset, raw, image_column, id2label):
    # Labels from the split itself: an unlabelled split (-1) is predicted without labels, loss or accuracy.
    labels = dataset.labels[np.asarray(dataset.indices, dtype=np.int64)]
    compute_metrics = trainer.compute_metrics
    trainer.compute_metrics = None if (labels < 0).any() else compute_metrics
    try:
        output = trainer.predict(dataset, metric_key_prefix="predict")
    finally:
        trainer.compute_metrics = compute_metrics
    logits = torch.from_numpy(output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions)
    probabilities = logits.float().softmax(-1)
    scores, predicted = probabilities.max(-1)
    if not trainer.is_world_process_zero():
        return output.metrics  # every process holds the gathered predictions; one writes them
    paths = raw[image_column]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "path", "label", "predicted_label", "score"])
        for index, (label, prediction, score) in enumerate(zip(labels, predicted, scores)):
            cell = paths[index] if index < len(paths) else None
            image_path = cell.get("path") if isinstance(cell, dict) else None
            name = id2label[int(label)] if label >= 0 else ""
            writer.writerow([index, image_path or "", name, id2label[int(prediction)], f"{score:.6f}"])
    return output.metrics


def print_summary(metrics: dict, num_parameters: int, output_dir: str, model_type: str) -> None:
    lines = [
        "",
        "=" * 64,
        f"  {model_type} image classifier -> {output_dir}",
        f"  {'parameters':<24} {num_parameters:,}",
    ]
    for key, label, fmt in (
        ("eval_accuracy", "top-1 accuracy (eval)", "{:.2%}"),
        ("eval_top5_accuracy", "top-5 accuracy (eval)", "{:.2%}"),
        ("eval_loss", "loss (eval)", "{:.4f}"),
        ("train_loss", "loss (train, mean)", "{:.4f}"),
        ("train_samples_per_second", "train images/s", "{:.1f}"),
        ("eval_samples_per_second", "eval images/s", "{:.1f}"),
        ("train_runtime", "train time (s)", "{:.1f}"),
        ("train_skipped_images", "unreadable train images", "{}"),
        ("eval_skipped_images", "unreadable eval images", "{}"),
    ):
        if key in metrics:
            lines.append(f"  {label:<24} {fmt.format(metrics[key])}")
    lines.append("=" * 64)
    print("\n".join(lines))


@run_control.releases_run_locks
def main(args: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Run the job; `args` as on the command line (or one JSON/YAML file), `callbacks` extra TrainerCallbacks."""
    model_args, data_args, training_args = parse_args(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.set_seed(training_args.seed)
    command = "python run_image_classification.py " + shlex.join(redact_argv(sys.argv[1:] if args is None else args))
    logger.info("Command: %s", command)
    check_arguments(model_args, data_args, training_args)
    # Lock the output folder; refuse to resume a run with other arguments; a finished run is not trained again.
    run = run_control.begin(model_args, data_args, training_args, command)
    if run.finished_metrics is not None:
        return run.finished_metrics

    # Data: resolve, pick columns and splits, drop or refuse unreadable images.
    spec = known_dataset(data_args.dataset_name)
    raw = load_raw_datasets(
        data_args.dataset_name, data_args.dataset_config_name, data_args.train_dir, data_args.validation_dir,
        cache_dir=model_args.cache_dir, token=model_args.token,
    )
    train_raw, eval_raw, eval_split = split_train_eval(
        raw, data_args.train_split, data_args.eval_split, spec, data_args.train_val_split, training_args.seed
    )
    image_column, label_column = detect_columns(
        train_raw.features, data_args.image_column_name, data_args.label_column_name, spec
    )
    labels = label_names(train_raw, label_column)
    if data_args.max_train_samples is not None and data_args.max_train_samples < len(train_raw):
        train_raw = train_raw.shuffle(seed=training_args.seed).select(range(data_args.max_train_samples))
    if data_args.max_eval_samples is not None and data_args.max_eval_samples < len(eval_raw):
        eval_raw = eval_raw.shuffle(seed=training_args.seed).select(range(data_args.max_eval_samples))
    if training_args.do_eval or training_args.do_predict:  # before training, not at its first evaluation
        check_eval_labels(eval_raw, label_column, labels, eval_split, scored=training_args.do_eval)
    train_raw = without_decoding(train_raw, image_column)
    eval_raw = without_decoding(eval_raw, image_column)
    # One decoding pass per split (cached by fingerprint) finds unreadable images and keeps the decoded ones.
    skipped, train_scan, eval_scan = {}, None, None
    train_indices = eval_indices = None
    if training_args.do_train:
        train_scan = scan_split(train_raw, image_column, data_args, training_args, model_args.cache_dir)
        train_indices = apply_unreadable_policy(train_scan, len(train_raw), "train", data_args.corrupt_images)
        skipped["train_skipped_images"] = len(train_scan.unreadable)
    if training_args.do_eval or training_args.do_predict:
        eval_scan = scan_split(eval_raw, image_column, data_args, training_args, model_args.cache_dir)
        eval_indices = apply_unreadable_policy(eval_scan, len(eval_raw), eval_split, data_args.corrupt_images)
        skipped["eval_skipped_images"] = len(eval_scan.unreadable)

    # Model.
    model = build_model(model_args, labels)
    if model_args.sync_batch_norm:
        model = apply_sync_batch_norm(model, training_args)
    config = model.config
    num_parameters = sum(parameter.numel() for parameter in model.parameters())

    # Transforms and the image processor saved beside the model (used by `pipeline`).
    image_mean, image_std = normalisation(data_args, spec)
    image_processor = dwvit.make_image_processor(config.image_size, image_mean=image_mean, image_std=image_std)
    image_size = config.image_size
    crop_ratio = data_args.eval_crop_ratio
    if crop_ratio is None:
        crop_ratio = 0.875 if min(to_pair(image_size)) >= 64 else 1.0
    # Images of one size are cropped with the rest of the augmentation, batch-wise; mixed sizes per sample.
    train_images = train_scan.images if train_scan is not None else None
    augmentation = data_args.augmentation()
    train_dataset = ImageClassificationDataset(
        train_raw, image_column, label_column, None if train_images is not None else v2.Compose(
            [v2.ToImage(), *sample_crop_steps(image_size, augmentation)]
        ), seed=training_args.seed, images=train_images, indices=train_indices,
    )
    eval_images = eval_scan.images if eval_scan is not None else None
    eval_transform = build_eval_transform(image_size, crop_ratio)
    if eval_images is not None and tuple(eval_images.shape[1:3]) == to_pair(image_size) and crop_ratio == 1.0:
        eval_transform = None  # already the model's size: resize and crop are the identity
    eval_dataset = ImageClassificationDataset(
        eval_raw, image_column, label_column, eval_transform, images=eval_images, indices=eval_indices
    )
    collator = ImageBatchCollator(
        len(labels), image_mean, image_std,
        BatchAugmentation(image_size, image_mean, image_std, augmentation, crop=train_images is not None),
        data_args.mixup_alpha, data_args.cutmix_alpha, data_args.mixup_prob, data_args.mixup_switch_prob,
        data_args.label_smoothing,
    )

    prepare_torch_compile(training_args)  # before the Trainer compiles the model
    trainer = DWTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        data_collator=collator,
        compute_metrics=make_compute_metrics(),
        processing_class=image_processor,
        callbacks=[SetEpochCallback(train_dataset), TrainingClock(training_args.max_train_minutes), *(callbacks or [])],
    )

    metrics: dict = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint is None and training_args.auto_resume and os.path.isdir(training_args.output_dir):
            # The newest complete checkpoint; incomplete or unreadable ones are skipped with a warning.
            checkpoint = latest_complete_checkpoint(training_args.output_dir, full_state=not training_args.save_only_model)
            if checkpoint is not None:
                logger.info("Resuming from %s (pass --overwrite_output_dir to start over).", checkpoint)
        run.commit_record()
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        train_metrics = dict(result.metrics, train_samples=len(train_dataset), **{k: v for k, v in skipped.items() if k.startswith("train")})
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(eval_dataset)
        if "eval_skipped_images" in skipped:
            eval_metrics["eval_skipped_images"] = skipped["eval_skipped_images"]
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if training_args.do_predict:
        path = os.path.join(training_args.output_dir, "predictions.csv")
        predict_metrics = write_predictions(
            path, trainer, eval_dataset, eval_raw.select(eval_dataset.indices), image_column, config.id2label
        )
        trainer.log_metrics("predict", predict_metrics)
        trainer.save_metrics("predict", predict_metrics)
        metrics.update(predict_metrics)

    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        if not training_args.do_train and not run.keeps_model:
            trainer.save_model()
        run_info = {
            "command": command,  # token values redacted
            "model_name": model_args.model_name_or_path or model_args.model_name,
            "model_type": config.model_type,
            "dataset_name": data_args.dataset_name or data_args.train_dir,
            "hub_dataset_id": spec.hub_id if spec is not None else None,
            "eval_split": eval_split,
            "num_parameters": num_parameters,
            "num_labels": len(labels),
            "image_size": image_size,
            "world_size": training_args.world_size,
            "transformers_version": transformers.__version__,
            "dwvit_version": dwvit.__version__,
        }
        if not run.keeps_model:  # evaluated in place: the folder keeps the record of the run that trained it
            with open(os.path.join(training_args.output_dir, "run_info.json"), "w") as handle:
                json.dump(redact_mapping(run_info), handle, indent=2)
        metrics["num_parameters"] = num_parameters
        print_summary(metrics, num_parameters, training_args.output_dir, config.model_type)
    run.finish(trainer)
    return metrics


if __name__ == "__main__":
    main()
