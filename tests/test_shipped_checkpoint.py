"""The trained model shipped in `checkpoints/dwvit-cifar10`: it loads the ways users load it and gives what it states.

The example images under `examples/cifar10` are real CIFAR-10 test images named `<true label>_<test index>.png`;
the true label in the name is the expectation. The stated accuracy is checked against the pipeline on the whole
real test split when `../shared/data/cifar10` is present.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import CIFAR10_NAMES, REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "studies"))
CHECKPOINT = REPO_ROOT / "checkpoints" / "dwvit-cifar10"
EXAMPLES = sorted((REPO_ROOT / "examples" / "cifar10").glob("*.png"))


def true_label(path: Path) -> str:
    return path.stem.rsplit("_", 1)[0]


def test_the_folder_is_what_users_download():
    files = {path.name for path in CHECKPOINT.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert sum(path.stat().st_size for path in CHECKPOINT.iterdir()) <= 10 * 2**20
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert [config["id2label"][str(index)] for index in range(10)] == CIFAR10_NAMES
    assert config["use_dw_shortcut"] is True and config["auto_map"]
    stated = json.loads((CHECKPOINT / "all_results.json").read_text())["eval_accuracy"]
    card = (CHECKPOINT / "README.md").read_text()
    assert f"{stated:.4f}" in card and "run_image_classification.py" in card
    # Ten classes, one real test image each.
    assert sorted(true_label(path) for path in EXAMPLES) == CIFAR10_NAMES


def test_pipeline_after_import_dwvit_classifies_the_examples():
    from transformers import pipeline

    import dwvit  # noqa: F401

    classifier = pipeline("image-classification", model=str(CHECKPOINT), device="cpu")
    predictions = [result[0]["label"] for result in classifier([str(path) for path in EXAMPLES], top_k=1)]
    assert predictions == [true_label(path) for path in EXAMPLES]


def test_pipeline_with_remote_code_only_classifies_the_examples(run_without_dwvit):
    result = run_without_dwvit(f"""
        import json
        from transformers import pipeline

        classifier = pipeline("image-classification", model={str(CHECKPOINT)!r}, trust_remote_code=True, device="cpu")
        paths = {[str(path) for path in EXAMPLES]!r}
        print(json.dumps([result[0]["label"] for result in classifier(paths, top_k=1)]))
    """)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [true_label(path) for path in EXAMPLES]


def test_the_remote_code_is_what_the_package_saves_today(tmp_path):
    """`trust_remote_code=True` runs the folder's `.py` files even where dwvit is installed: they must be the ones
    `save_pretrained` writes from the package now (the fused kernel's loader and the autograd nodes included), not
    a snapshot of the code the model was trained with."""
    from transformers import AutoModelForImageClassification

    import dwvit  # noqa: F401

    AutoModelForImageClassification.from_pretrained(CHECKPOINT).save_pretrained(tmp_path)
    saved = {path.name: path.read_text() for path in tmp_path.glob("*.py")}
    shipped = {path.name: path.read_text() for path in CHECKPOINT.glob("*.py")}
    assert sorted(shipped) == sorted(saved)
    stale = [name for name in saved if shipped[name] != saved[name]]
    assert stale == [], f"refresh them: cp {' '.join(f'src/dwvit/models/{name}' for name in stale)} {CHECKPOINT}/"


def test_stated_accuracy_is_what_the_pipeline_gives_on_the_full_test_split(cifar10_dir):
    import datasets
    from ship_checkpoint import classify_split

    split = datasets.load_dataset(str(cifar10_dir), split="test")
    assert len(split) == 10_000
    names = split.features["label"].names
    predictions = classify_split(CHECKPOINT, split, "img", batch_size=500)
    correct = sum(predicted == names[label] for predicted, label in zip(predictions, split["label"]))
    stated = json.loads((CHECKPOINT / "all_results.json").read_text())["eval_accuracy"]
    # The Trainer evaluated the same 10,000 images from the decoded uint8 pixels; allow a few float-rounding flips.
    assert abs(correct / len(split) - stated) <= 5e-4, (correct / len(split), stated)


def test_examples_are_real_cifar10_test_images(cifar10_dir):
    import datasets
    import numpy as np
    from PIL import Image

    split = datasets.load_dataset(str(cifar10_dir), split="test")
    for path in EXAMPLES:
        index = int(path.stem.rsplit("_", 1)[1])
        row = split[index]
        assert split.features["label"].names[row["label"]] == true_label(path)
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(row["img"].convert("RGB")))
