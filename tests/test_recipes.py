"""Recipe files (`recipes/**/*.yaml`): they parse, hold the paper's settings, override from the command line, and train.

Every recipe under `recipes/` is parsed (a glob, so new ones are covered). Those under `recipes/paper/` are checked
against the paper's recipe as `../shared/paper.md` states it, written out by hand below.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
import run_image_classification as ric  # noqa: E402

import dwvit  # noqa: E402
from dwvit.training.optim import decay_parameter_names  # noqa: E402
from dwvit.training.data import KNOWN_DATASETS  # noqa: E402

RECIPES_DIR = REPO_ROOT / "recipes"
RECIPES = sorted(p for pattern in ("*.yaml", "*.yml", "*.json") for p in RECIPES_DIR.rglob(pattern))
PAPER_RECIPES = [p for p in RECIPES if p.parent == RECIPES_DIR / "paper"]

# The paper's recipe (paper.md, "Training recipe (small datasets)"): AdamW, weight decay 0.05, lr 5e-4 (Swin 2.5e-4),
# 300 epochs with 20 of warmup, cosine to 5e-6 (Swin: 2.5e-6, its original config's MIN_LR), clip 5, batch 128 per
# GPU on 4 GPUs, seed 0, images at 224, Swin-T drop path 0.2.
MODELS = {  # model: (lr, min lr, drop path, image size, patch size)
    "vit-tiny": (5e-4, 5e-6, 0.0, 224, 16),
    "vit-small": (5e-4, 5e-6, 0.0, 224, 16),
    "cait-xxs12": (5e-4, 5e-6, 0.0, 224, 16),
    "cait-xxs24": (5e-4, 5e-6, 0.0, 224, 16),
    "swin-tiny": (2.5e-4, 2.5e-6, 0.2, 224, 4),
}
DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "tiny-imagenet": "imagenet"}  # name: statistics
PAPER = {f"{model}_{dataset}": (model, dataset) for model in MODELS for dataset in DATASETS}


def test_there_is_a_paper_recipe_for_each_model_and_dataset():
    assert sorted(p.stem for p in PAPER_RECIPES) == sorted(PAPER)
    assert all(p.suffix == ".yaml" for p in PAPER_RECIPES)


def test_recipes_are_documented_in_the_readme():
    readme = (RECIPES_DIR / "README.md").read_text()
    for path in RECIPES:
        assert str(path.relative_to(RECIPES_DIR)) in readme, f"{path} is not in recipes/README.md"
    assert (RECIPES_DIR / "cpu" / "README.md").is_file()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_every_recipe_parses(path):
    model_args, data_args, training_args = ric.parse_args([str(path)])
    assert model_args.model_name in dwvit.NAMED_SIZES or model_args.model_name_or_path
    dataset = data_args.dataset_name or data_args.train_dir
    assert dataset, f"{path} names no dataset"
    assert training_args.do_train or training_args.do_eval
    assert training_args.output_dir


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=lambda p: p.stem)
def test_paper_recipe_matches_the_paper(path):
    model, dataset = PAPER[path.stem]
    lr, min_lr, drop_path, image_size, patch_size = MODELS[model]
    model_args, data_args, args = ric.parse_args([str(path)])

    assert model_args.model_name == model and model_args.model_name_or_path is None
    assert model_args.config_overrides is None  # the named size is the paper's model
    config = dwvit.named_config(model)
    assert (config.image_size, config.patch_size, config.drop_path_rate) == (image_size, patch_size, drop_path)
    assert data_args.dataset_name == dataset and dataset in KNOWN_DATASETS
    assert data_args.dataset_statistics == DATASETS[dataset]

    assert args.learning_rate == lr
    assert args.weight_decay == 0.05
    assert args.num_train_epochs == 300
    assert math.isclose(args.warmup_steps, 20 / 300)
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr": min_lr}
    assert args.max_grad_norm == 5.0
    assert args.per_device_train_batch_size == 128  # x 4 GPUs = 512 per step
    assert args.gradient_accumulation_steps == 1
    assert args.seed == 0
    assert "adamw" in str(args.optim).lower()
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)

    # Augmentation: RandomResizedCrop, flip, RandAugment m9, erasing 0.25, Mixup 0.8 / CutMix 1.0, smoothing 0.1.
    assert (data_args.crop_scale_min, data_args.horizontal_flip_prob) == (0.08, 0.5)
    assert (data_args.rand_augment, data_args.rand_augment_num_ops, data_args.rand_augment_magnitude) == (True, 2, 9)
    assert data_args.random_erasing_prob == 0.25
    assert (data_args.mixup_alpha, data_args.cutmix_alpha, data_args.mixup_prob, data_args.mixup_switch_prob) == (
        0.8, 1.0, 1.0, 0.5)
    assert data_args.label_smoothing == 0.1
    assert data_args.eval_crop_ratio == 0.875  # resize 256, center crop 224


# --------------------------------------------------------------------------------------------------------------
# Argument files and command-line overrides.

RECIPE = RECIPES_DIR / "paper" / "vit-tiny_cifar10.yaml"


def test_command_line_overrides_the_file():
    _, data_args, args = ric.parse_args([str(RECIPE)])
    assert (args.learning_rate, args.num_train_epochs, data_args.rand_augment, args.do_train) == (5e-4, 300, True, True)

    model_args, data_args, args = ric.parse_args([
        str(RECIPE), "--learning_rate", "1e-3", "--num_train_epochs", "2", "--rand_augment", "false",
        "--do_train=false", "--lr_scheduler_kwargs", '{"min_lr": 1e-7}', "--model_name", "vit-tiny-cifar",
    ])
    assert (args.learning_rate, args.num_train_epochs, data_args.rand_augment, args.do_train) == (1e-3, 2, False, False)
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-7}
    assert model_args.model_name == "vit-tiny-cifar"
    assert args.weight_decay == 0.05  # untouched values stay the file's

    # Bool flags as on the command line: bare flag, --no_ form.
    _, data_args, _ = ric.parse_args([str(RECIPE), "--no_rand_augment"])
    assert data_args.rand_augment is False
    _, data_args, _ = ric.parse_args([str(RECIPE), "--rand_augment", "false", "--rand_augment"])
    assert data_args.rand_augment is True


def test_file_values_are_parsed_as_on_the_command_line(tmp_path):
    recipe = tmp_path / "args.yaml"
    recipe.write_text(
        "model_name: vit-tiny-cifar\n"
        "learning-rate: 5e-4\n"  # YAML 1.1 would read a string; dashes work as on the command line
        "num_train_epochs: 3\n"
        "rand_augment: no\n"
        "do_train: yes\n"
        "lr_scheduler_kwargs: {min_lr: 1e-6}\n"
        "report_to: [tensorboard]\n"
        "label_names: [labels]\n"
        "save_total_limit: null\n"
        "mixup_alpha: 0\n"
    )
    as_file = ric.parse_args([str(recipe)])
    as_cli = ric.parse_args([
        "--model_name", "vit-tiny-cifar", "--learning_rate", "5e-4", "--num_train_epochs", "3",
        "--rand_augment", "false", "--do_train", "--lr_scheduler_kwargs", '{"min_lr": 1e-6}', "--report_to",
        "tensorboard", "--label_names", "labels", "--mixup_alpha", "0",
    ])
    (model_args, data_args, args), (cli_model, cli_data, cli_args) = as_file, as_cli
    assert model_args == cli_model and data_args == cli_data
    assert type(args.learning_rate) is float and args.learning_rate == 5e-4
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-6} and args.report_to == ["tensorboard"]
    assert args.label_names == ["labels"] and args.save_total_limit is None and cli_args.save_total_limit == 2
    for name in ("learning_rate", "num_train_epochs", "do_train", "lr_scheduler_kwargs", "report_to", "label_names"):
        assert getattr(args, name) == getattr(cli_args, name), name

    # A null default in the file is still overridden by the command line.
    _, _, args = ric.parse_args([str(recipe), "--save_total_limit", "4"])
    assert args.save_total_limit == 4


def test_json_file_with_overrides(tmp_path):
    recipe = tmp_path / "args.json"
    recipe.write_text(json.dumps({"model_name": "cait-xxs12", "learning_rate": 2e-4, "rand_augment": False}))
    model_args, data_args, args = ric.parse_args([str(recipe), "--learning_rate", "3e-4"])
    assert (model_args.model_name, data_args.rand_augment, args.learning_rate) == ("cait-xxs12", False, 3e-4)


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model_name: vit-tiny\nlearning_rat: 1e-3\n")
    with pytest.raises(ValueError) as error:
        ric.parse_args([str(recipe)])
    message = str(error.value)
    assert "'learning_rat'" in message and str(recipe) in message and "'learning_rate'" in message

    recipe.write_text("- model_name\n- vit-tiny\n")
    with pytest.raises(ValueError, match="mapping"):
        ric.parse_args([str(recipe)])


def test_unknown_command_line_argument_after_a_file_is_refused():
    with pytest.raises(ValueError, match="not_an_argument"):
        ric.parse_args([str(RECIPE), "--not_an_argument", "1"])


# --------------------------------------------------------------------------------------------------------------
# One training step of each family from its recipe, shrunk to a tiny model on real CIFAR-10 images.

TINY = {
    "vit-tiny_cifar10": "image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,"
                        "intermediate_size=64",
    "cait-xxs12_cifar10": "image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_class_attention_layers=1,"
                          "num_attention_heads=2,intermediate_size=64",
    "swin-tiny_cifar10": "image_size=32,patch_size=4,window_size=4,embed_dim=16,depths=[1,1],num_heads=[1,2]",
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_one_training_step_from_a_recipe(name, tmp_path, cifar10_dir):
    import torch
    from transformers import TrainerCallback

    seen = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, model=None, **kwargs):
            names = {id(parameter): name for name, parameter in model.named_parameters()}
            seen["args"] = args
            seen["groups"] = {
                group["weight_decay"]: {names[id(p)] for p in group["params"]} for group in optimizer.param_groups
            }
            seen["names"] = set(names.values())
            seen["decay"] = set(decay_parameter_names(model))

    metrics = ric.main([
        str(RECIPES_DIR / "paper" / f"{name}.yaml"),
        "--dataset_name", str(cifar10_dir), "--output_dir", str(tmp_path / "out"),
        "--config_overrides", TINY[name],
        "--max_steps", "1", "--max_train_samples", "8", "--max_eval_samples", "8",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--dataloader_num_workers", "0", "--dataloader_pin_memory", "false", "--use_cpu", "true",
        "--mixed_precision", "no", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true",
    ], callbacks=[Record()])

    assert math.isfinite(metrics["train_loss"]) and "eval_accuracy" in metrics
    args = seen["args"]
    model, _ = PAPER[name]
    lr, min_lr, *_ = MODELS[model]
    # The recipe's values reached the Trainer, the overrides too.
    assert (args.learning_rate, args.weight_decay, args.max_grad_norm) == (lr, 0.05, 5.0)
    assert args.lr_scheduler_kwargs == {"min_lr": min_lr} and args.seed == 0
    assert (args.max_steps, args.per_device_train_batch_size) == (1, 4)
    # DWTrainer's AdamW groups: weight decay 0.05 on dwvit.training.optim's decay set, 0 on the rest (biases, norms, tokens).
    groups = seen["groups"]
    assert set(groups) == {0.0, 0.05}
    assert groups[0.05] == seen["decay"] and groups[0.0] == seen["names"] - seen["decay"]
    skipped = "relative_position_bias_table" if model == "swin-tiny" else "embeddings.cls_token"
    assert any(name.endswith(skipped) for name in groups[0.0])

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == {"vit": "dwvit", "cait": "dwcait", "swin": "dwswin"}[model.split("-")[0]]
    assert config["image_size"] in (32, [32, 32]) and len(config["id2label"]) == 10
    assert config["drop_path_rate"] == (0.2 if model == "swin-tiny" else 0.0)
    run_info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert run_info["command"].startswith(f"python run_image_classification.py {RECIPES_DIR / 'paper' / name}.yaml")
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
