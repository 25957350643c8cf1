#!/usr/bin/env python
"""Offline: the shipped CIFAR-10 model on real photos, then the main job end to end (train, evaluate, save, classify).

    python examples/demo.py                                  # scikit-learn's handwritten digits (no network)
    python examples/demo.py --dataset ../shared/data/cifar10 # any dataset folder (or Hub id) by path

Run by `make demo`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def show_shipped_model() -> None:
    """The trained checkpoint in `checkpoints/dwvit-cifar10` on the real CIFAR-10 test images in `examples/cifar10`."""
    from transformers import pipeline

    import dwvit  # noqa: F401  (registers the classes; without it, pass trust_remote_code=True)

    checkpoint = REPO_ROOT / "checkpoints" / "dwvit-cifar10"
    images = sorted((REPO_ROOT / "examples" / "cifar10").glob("*.png"))
    classifier = pipeline("image-classification", model=str(checkpoint), device="cpu")
    print(f"pipeline('image-classification', model={str(checkpoint.relative_to(REPO_ROOT))!r}) on real CIFAR-10 "
          f"test images ({checkpoint.name}/README.md has its accuracy and training command):")
    for path, result in zip(images, classifier([str(path) for path in images], top_k=2)):
        truth = path.stem.rsplit("_", 1)[0]
        guesses = ", ".join(f"{guess['label']} {guess['score']:.2f}" for guess in result)
        print(f"  {path.name:<22} true {truth:<11} predicted {guesses}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help="'digits' (default), a dataset folder, or a Hub id.")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "demo"))
    parser.add_argument("--epochs", default="10")
    parser.add_argument("--max_train_samples", default="2000")
    parser.add_argument("--skip_shipped_model", action="store_true", help="Do not show the shipped CIFAR-10 model.")
    args = parser.parse_args()
    if not args.skip_shipped_model:
        show_shipped_model()

    import run_image_classification

    start = time.time()
    # A small DW-ViT at native 32x32 (patch 4); light augmentation suits a short CPU run on small images.
    metrics = run_image_classification.main(
        [
            "--dataset_name", args.dataset, "--model_name", "vit-tiny-cifar",
            "--config_overrides", "hidden_size=64,num_hidden_layers=4,num_attention_heads=2,intermediate_size=128",
            "--output_dir", args.output_dir, "--auto_resume", "false",
            "--max_train_samples", args.max_train_samples, "--max_eval_samples", "500",
            "--num_train_epochs", args.epochs, "--per_device_train_batch_size", "64", "--learning_rate", "2e-3",
            "--warmup_steps", "0.1", "--horizontal_flip_prob", "0", "--crop_scale_min", "0.6",
            "--rand_augment", "false", "--color_jitter", "0", "--random_erasing_prob", "0",
            "--mixup_alpha", "0", "--cutmix_alpha", "0", "--save_strategy", "no", "--eval_strategy", "no",
            "--logging_steps", "20", "--report_to", "tensorboard", "--dataloader_pin_memory", "false",
            "--do_train", "--do_eval", "--do_predict",
        ]
    )

    from transformers import pipeline

    from dwvit.training.data import known_dataset, load_raw_datasets, split_train_eval

    raw = load_raw_datasets(args.dataset)
    _, evaluation, _ = split_train_eval(raw, spec=known_dataset(args.dataset))
    image_column = next(name for name, feature in evaluation.features.items() if type(feature).__name__ == "Image")
    label_column = next(n for n, f in evaluation.features.items() if type(f).__name__ == "ClassLabel")
    example = evaluation[0]
    image_path = Path(args.output_dir) / "example.png"
    example[image_column].convert("RGB").save(image_path)

    classifier = pipeline("image-classification", model=args.output_dir)
    predictions = classifier(str(image_path), top_k=3)
    truth = evaluation.features[label_column].int2str(example[label_column])
    print(f"\npipeline('image-classification', model={args.output_dir!r}) on {image_path} (true class {truth}):")
    for prediction in predictions:
        print(f"  {prediction['label']:<12} {prediction['score']:.3f}")
    print(f"\nDemo: top-1 accuracy {metrics['eval_accuracy']:.2%} on {int(metrics['eval_samples'])} held-out images; "
          f"wall time {time.time() - start:.0f} s.")


if __name__ == "__main__":
    main()
