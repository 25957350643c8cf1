#!/usr/bin/env python
"""Ship a study's trained model: the checkpoint folder users load, its pipeline accuracy, and example images.

    python studies/ship_checkpoint.py                       # the CIFAR-10 hour's DW model -> checkpoints/dwvit-cifar10

1. Stages the run's saved model with `hub_upload.py`'s dry run (safetensors, config with class names, image
   processor, remote code, the run's results and the model card) and moves it into place whole.
2. Classifies the full test split with `pipeline("image-classification")` on the shipped folder and writes the
   accuracy beside the study's results (`<run>-pipeline.json`), so the stated number is the one users get.
3. Saves, for each class, the first test image (in split order) that the model classifies correctly as a PNG
   under `examples/<dataset>/`, named `<label>_<test index>.png`, and records how many of the first image of each
   class it got right (the examples are picked, the accuracy above is not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from run_study import write_json  # noqa: E402  (beside this script)

MAX_MEGABYTES = 10


def stage_checkpoint(model_dir: Path, destination: Path) -> list[Path]:
    import hub_upload

    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=destination.parent))
    try:
        hub_upload.stage(model_dir, staging, repo_id=str(destination.relative_to(REPO_ROOT)))
        size = sum(path.stat().st_size for path in staging.iterdir()) / 2**20
        if size > MAX_MEGABYTES:
            raise SystemExit(f"{model_dir} stages to {size:.1f} MB; a shipped checkpoint must stay under {MAX_MEGABYTES} MB.")
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(destination.iterdir())


def classify_split(checkpoint: Path, split, image_column: str, batch_size: int = 250) -> list[str]:
    """Top-1 label names from the pipeline (after `import dwvit`) for every image of `split`, in order."""
    from transformers import pipeline

    import dwvit  # noqa: F401  (registers the classes)

    classifier = pipeline("image-classification", model=str(checkpoint), device="cpu")
    predictions = []
    for start in range(0, len(split), batch_size):
        images = [image.convert("RGB") for image in split[start:start + batch_size][image_column]]
        predictions += [result[0]["label"] for result in classifier(images, top_k=1, batch_size=batch_size)]
    return predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=str(REPO_ROOT / "studies/results/cifar10-hour/dw-model"))
    parser.add_argument("--result", default=str(REPO_ROOT / "studies/results/cifar10-hour/dw.json"))
    parser.add_argument("--dataset", default=str(REPO_ROOT.parent / "shared/data/cifar10"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--destination", default=str(REPO_ROOT / "checkpoints/dwvit-cifar10"))
    parser.add_argument("--examples", default=str(REPO_ROOT / "examples/cifar10"))
    args = parser.parse_args()

    import datasets

    destination = Path(args.destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    for path in stage_checkpoint(Path(args.model_dir), destination):
        print(f"  {path.name:<32} {path.stat().st_size:>12,} bytes")

    split = datasets.load_dataset(args.dataset, split=args.split)
    image_column = next(name for name, feature in split.features.items() if isinstance(feature, datasets.Image))
    label_column = next(name for name, feature in split.features.items() if isinstance(feature, datasets.ClassLabel))
    names = split.features[label_column].names
    truth = [names[label] for label in split[label_column]]
    predictions = classify_split(destination, split, image_column)
    correct = [predicted == expected for predicted, expected in zip(predictions, truth)]
    accuracy = sum(correct) / len(correct)
    stated = json.loads(Path(args.result).read_text())["final"]["eval_accuracy"]
    print(f"pipeline top-1 on the full {args.split} split ({len(correct)} images): {accuracy:.4f} (Trainer: {stated:.4f})")

    examples = Path(args.examples)
    if examples.exists():
        shutil.rmtree(examples)
    examples.mkdir(parents=True)
    first_of_class_right = 0
    for name in names:
        indices = [index for index, label in enumerate(truth) if label == name]
        first_of_class_right += correct[indices[0]]
        index = next(index for index in indices if correct[index])
        split[index][image_column].convert("RGB").save(examples / f"{name}_{index:05d}.png")
    report = {
        "checkpoint": str(destination.relative_to(REPO_ROOT)), "dataset": Path(args.dataset).name, "split": args.split,
        "images": len(correct), "pipeline_accuracy": accuracy, "trainer_eval_accuracy": stated,
        "first_image_of_each_class_correct": f"{first_of_class_right}/{len(names)}",
        "examples": sorted(path.name for path in examples.iterdir()),
        "command": "python studies/ship_checkpoint.py " + " ".join(sys.argv[1:]),
    }
    write_json(Path(args.result).with_name(Path(args.result).stem + "-pipeline.json"), report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
