#!/usr/bin/env python
"""Publish a trained dwvit output folder to the Hugging Face Hub.

    python hub_upload.py outputs/cifar10 --repo_id you/dwvit-tiny-cifar10 [--private]
    python hub_upload.py outputs/cifar10 --repo_id you/dwvit-tiny-cifar10 --dry_run   # stage and list, no network

Only safe files are published: safetensors weights, config.json (with auto_map), the remote code files it
names, the image processor, the run's results and a model card. A folder without safetensors weights, or with
pickle weights, is refused. Token values are redacted from the training command shown in the card, and staging
stops with an error naming the file if any staged file still holds something shaped like a Hub token.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from dwvit.training.redaction import file_token_shapes, redact_text

PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Pickle files a Trainer writes that are not weights: never published, but no reason to refuse the folder.
PICKLE_NON_WEIGHTS = {"training_args.bin"}
PUBLISHED_FILES = (
    "config.json",
    "preprocessor_config.json",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "predict_results.json",
    "run_info.json",
    "trainer_state.json",
)

CITATION = """@article{zhang2025depthwise,
  title   = {Depth-Wise Convolutions in Vision Transformers for Efficient Training on Small Datasets},
  author  = {Zhang and Xu and Luo and Wang},
  journal = {Neurocomputing},
  volume  = {617},
  pages   = {128998},
  year    = {2025},
  note    = {arXiv:2407.19394}
}"""


def check_folder(folder: Path) -> list[Path]:
    """The weight files of `folder`; a ValueError if it holds pickle weights or no safetensors weights."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; give the output_dir of run_image_classification.py.")
    pickles = sorted(
        path.name for path in folder.iterdir()
        if path.is_file() and path.suffix in PICKLE_WEIGHT_SUFFIXES and path.name not in PICKLE_NON_WEIGHTS
    )
    if pickles:
        raise ValueError(
            f"{folder} holds pickle weights ({', '.join(pickles)}), which run code when loaded; refusing to publish. "
            f"Re-save the model with save_pretrained(..., safe_serialization=True) to get model.safetensors."
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{folder} holds no model weights (*.safetensors); nothing to publish.")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json; it is not a saved model folder.")
    from dwvit.training.validation import check_weight_files

    check_weight_files(folder)  # a truncated or empty weights file would publish a model nobody can load
    return weights


def code_files(folder: Path, config: dict) -> list[Path]:
    """The remote code files `auto_map` points to, plus the modules they import relatively."""
    auto_map = config.get("auto_map") or {}
    if not auto_map:
        raise ValueError(
            f"{folder}/config.json has no auto_map, so the model would not load with trust_remote_code=True. "
            f"Save it with `import dwvit` done first (dwvit registers its classes for remote code)."
        )
    files = {path for path in folder.glob("*.py")}
    for reference in auto_map.values():
        module = str(reference).split("--")[-1].split(".")[0]
        if not (folder / f"{module}.py").is_file():
            raise ValueError(f"auto_map names {reference!r} but {module}.py is missing from {folder}.")
    return sorted(files)


def model_card(folder: Path, repo_id: str, config: dict) -> str:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = _read_json(folder / "all_results.json")
    run_info = _read_json(folder / "run_info.json")
    dataset_id = run_info.get("hub_dataset_id") or run_info.get("dataset_name")
    dataset_name = run_info.get("dataset_name") or dataset_id or "unknown"
    eval_results = []
    for key, metric_name in (("eval_accuracy", "accuracy"), ("eval_top5_accuracy", "top5_accuracy")):
        if key in results:
            eval_results.append(
                EvalResult(
                    task_type="image-classification",
                    dataset_type=dataset_id or dataset_name,
                    dataset_name=dataset_name,
                    dataset_split=run_info.get("eval_split"),
                    metric_type=metric_name,
                    metric_name=metric_name.replace("_", " "),
                    metric_value=round(float(results[key]), 4),
                )
            )
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license="apache-2.0",
        tags=list(dict.fromkeys(["dwvit", config.get("model_type", "dwvit"), "vision", "image-classification", "custom_code"])),
        datasets=[dataset_id] if dataset_id and "/" in str(dataset_id) else None,
        metrics=["accuracy"],
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    rows = "\n".join(f"| {key} | {_fmt(value)} |" for key, value in sorted(results.items()))
    labels = config.get("id2label") or {}
    label_list = ", ".join(str(labels[k]) for k in sorted(labels, key=int)[:20]) + (" ..." if len(labels) > 20 else "")
    command = redact_text(run_info.get("command", "(not recorded)"))  # run_info of older runs held tokens verbatim
    content = f"""---
{card_data.to_yaml()}
---

# {repo_id.split("/")[-1]}

A Vision Transformer with depth-wise convolution shortcuts (Zhang et al., 2024), trained with
`dwvit` (Hugging Face-native DW-ViT) on `{dataset_name}` ({len(labels)} classes: {label_list}).
Model type `{config.get("model_type")}`, image size {config.get("image_size")}, patch size {config.get("patch_size")},
depth-wise shortcut {"on, kernels " + str(config.get("dw_kernel_sizes")) if config.get("use_dw_shortcut", True) else "off"},
{parameter_count(folder, run_info):,} parameters.

## Results

| metric | value |
| --- | --- |
{rows}

## Usage

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{repo_id}", trust_remote_code=True)
print(classifier("path/to/image.png"))
```

With `pip install dwvit`, `import dwvit` registers the classes and `trust_remote_code` is not needed.

## Training

```bash
{command}
```

## Citation

```bibtex
{CITATION}
```
"""
    return redact_text(str(ModelCard(content)))  # values read from the folder could hold a pasted token


def parameter_count(folder: Path, run_info: dict) -> int:
    """The run's recorded parameter count, else the count of the model its config builds.

    A folder from `dwvit create` has no run_info.json; the model is built on the meta device, so no memory is
    spent on weights and the count is the model's own (BatchNorm statistics and other buffers excluded).
    """
    if "num_parameters" in run_info:
        return int(run_info["num_parameters"])
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    import dwvit  # noqa: F401  (registers the families with the Auto classes)

    with torch.device("meta"):
        model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(folder))
    return sum(parameter.numel() for parameter in model.parameters())


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); fix or remove it before uploading.") from error


def stage(folder: Path, staging: Path, repo_id: str) -> list[Path]:
    """Copy exactly what would be uploaded into `staging` and write the model card; return the files."""
    weights = check_folder(folder)
    config = _read_json(folder / "config.json")
    files = weights + code_files(folder, config)
    files += [folder / name for name in ("model.safetensors.index.json",) if (folder / name).is_file()]
    files += [folder / name for name in PUBLISHED_FILES if (folder / name).is_file()]
    if not (folder / "preprocessor_config.json").is_file():
        print(f"warning: {folder} has no preprocessor_config.json; pipeline() will need an image processor.")
    staging.mkdir(parents=True, exist_ok=True)
    if any(staging.iterdir()):
        raise ValueError(f"Staging folder {staging} is not empty; give an empty or new folder.")
    for path in files:
        shutil.copy2(path, staging / path.name)
    (staging / "README.md").write_text(model_card(folder, repo_id, config))
    staged = sorted(staging.iterdir())
    leaks = {path.name: file_token_shapes(path) for path in staged}
    leaks = {name: shapes for name, shapes in leaks.items() if shapes}
    if leaks:
        for path in staged:
            path.unlink()
        described = "; ".join(f"{name} ({', '.join(shapes)})" for name, shapes in sorted(leaks.items()))
        raise ValueError(
            f"Refusing to publish: staged files still hold what looks like a Hub token: {described}. Remove the "
            f"token from {folder} (the source of each file named) and revoke it at "
            f"https://huggingface.co/settings/tokens if it was ever shared. Nothing was staged."
        )
    return staged


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="The output_dir of run_image_classification.py.")
    parser.add_argument("--repo_id", required=True, help="Hub repository, e.g. your-name/dwvit-tiny-cifar10.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the login of `hf auth login`).")
    parser.add_argument("--commit_message", default="Upload dwvit image classifier")
    parser.add_argument("--dry_run", action="store_true", help="Stage the folder and list it; no network.")
    parser.add_argument("--staging_dir", default=None, help="Where to stage (default: a new temporary folder).")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    folder = Path(args.folder)
    staging = Path(args.staging_dir) if args.staging_dir else Path(tempfile.mkdtemp(prefix="dwvit-hub-"))
    files = stage(folder, staging, args.repo_id)
    print(f"Staged {len(files)} files for {args.repo_id} in {staging}:")
    for path in files:
        print(f"  {path.name:<32} {path.stat().st_size:>12,} bytes")
    if args.dry_run:
        print("Dry run: nothing uploaded.")
        return staging
    from huggingface_hub import HfApi

    api = HfApi(token=args.token or os.environ.get("HF_TOKEN"))
    url = api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(staging), repo_id=args.repo_id, commit_message=args.commit_message)
    print(f"Uploaded to {url}")
    return staging


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
