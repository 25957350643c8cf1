"""Shared fixtures: offline mode, the real datasets beside the checkout, and a process where `dwvit` is blocked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Config keyword arguments that give a classifier CIFAR-10's class names.
CIFAR10_LABELS = dict(id2label=dict(enumerate(CIFAR10_NAMES)), label2id={name: i for i, name in enumerate(CIFAR10_NAMES)})


def warm_up_batchnorm(model, steps: int = 3) -> None:
    """Forward a few 32x32 batches in training mode so BatchNorm running statistics leave their defaults."""
    import torch

    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(4, 3, 32, 32) * 2 + 0.5)
    model.eval()


@pytest.fixture(params=["kernel", "pytorch-ops"])
def shortcut_path(request, monkeypatch):
    """Run a shortcut test through the fused CPU kernel and through the PyTorch ops it falls back to (no compiler,
    `DWVIT_CPU_KERNEL=0`)."""
    if request.param == "pytorch-ops":
        from dwvit.models import dw_shortcut_kernel

        monkeypatch.setattr(dw_shortcut_kernel, "load_library", lambda: None)
    return request.param


def randomise_shortcut_statistics(model, generator) -> None:
    """Give every shortcut BatchNorm non-trivial statistics and affine parameters, so it is not an identity."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(module.num_features, generator=generator))
                module.bias.copy_(torch.randn(module.num_features, generator=generator))


def hand_shortcut(tokens, grid, branches, training, num_prefix_tokens=0):
    """The paper's shortcut written with functional ops: GELU -> BatchNorm -> depth-wise conv per branch, summed.

    `tokens` is `(batch, prefix + H*W, C)`; the result has the same shape, with zeros in the prefix (class) slots.
    """
    import torch
    import torch.nn.functional as F

    batch, length, channels = tokens.shape
    height, width = grid
    assert length - num_prefix_tokens == height * width
    patch_grid = tokens[:, num_prefix_tokens:].transpose(1, 2).reshape(batch, channels, height, width)
    activated = F.gelu(patch_grid)
    total = torch.zeros_like(patch_grid)
    for norm, conv in branches:
        normalised = F.batch_norm(
            activated, norm.running_mean.clone(), norm.running_var.clone(), norm.weight, norm.bias,
            training=training, eps=norm.eps,
        )
        kernel = conv.weight.shape[-1]
        total = total + F.conv2d(normalised, conv.weight, conv.bias, padding=kernel // 2, groups=channels)
    patches = total.reshape(batch, channels, height * width).transpose(1, 2)
    return torch.cat([patches.new_zeros(batch, num_prefix_tokens, channels), patches], dim=1)


def _shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is not present (the real datasets live in ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """`../shared/data/cifar10`: the real CIFAR-10 in the Hub's layout (img, label)."""
    return _shared_dataset("cifar10")


@pytest.fixture(scope="session")
def tiny_imagenet_dir() -> Path:
    """`../shared/data/tiny-imagenet`: the real Tiny-ImageNet in the Hub's layout (image, label; some grayscale)."""
    return _shared_dataset("tiny-imagenet")


def balanced_subset(dataset, per_class: int, label_column: str = "label"):
    """`per_class` rows of every class, interleaved (class 0, 1, ..., 0, 1, ...).

    The stored CIFAR-10 splits are sorted by label, so a plain slice like `test[:256]` is a single class.
    """
    rows_by_class: dict[int, list[int]] = {}
    for index, label in enumerate(dataset[label_column]):
        rows = rows_by_class.setdefault(label, [])
        if len(rows) < per_class:
            rows.append(index)
    order = [rows[i] for i in range(per_class) for _, rows in sorted(rows_by_class.items()) if i < len(rows)]
    return dataset.select(order)


@pytest.fixture(scope="session")
def cifar10_test_slice(cifar10_dir):
    """250 real CIFAR-10 test images, 25 of each class, interleaved, as a `datasets.Dataset`."""
    import datasets

    return balanced_subset(datasets.load_dataset(str(cifar10_dir), split="test"), per_class=25)


@pytest.fixture(scope="session")
def cifar10_train_balanced(cifar10_dir):
    """400 real CIFAR-10 training images, 40 of each class, interleaved."""
    import datasets

    return balanced_subset(datasets.load_dataset(str(cifar10_dir), split="train"), per_class=40)


BLOCK_DWVIT = textwrap.dedent(
    """
    import sys

    class _BlockDwvit:
        def find_spec(self, name, path=None, target=None):
            if name == "dwvit" or name.startswith("dwvit."):
                raise ImportError("dwvit is blocked in this process")

    sys.meta_path.insert(0, _BlockDwvit())
    for _name in [n for n in sys.modules if n == "dwvit" or n.startswith("dwvit.")]:
        del sys.modules[_name]
    """
)


@pytest.fixture
def run_without_dwvit(tmp_path):
    """Run Python source in a fresh process where `import dwvit` fails; returns the CompletedProcess.

    The process starts in an empty folder, so only remote code saved beside a model can supply the classes.
    """

    def run(source: str, timeout: float = 300) -> subprocess.CompletedProcess:
        workdir = tmp_path / "isolated"
        workdir.mkdir(exist_ok=True)
        script = workdir / "script.py"
        script.write_text(BLOCK_DWVIT + "\n" + textwrap.dedent(source))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        result = subprocess.run(
            [sys.executable, str(script)], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise AssertionError(f"isolated process failed:\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}")
        return result

    return run


@pytest.fixture
def fine_tune_on_cifar10(tmp_path, cifar10_train_balanced, cifar10_test_slice):
    """Fine-tune a 32x32 image classifier with `Trainer` on real, class-balanced CIFAR-10 images and check it.

    Checks that the logged training loss falls, that evaluation runs, and that the saved model reloads through
    the Auto class with identical logits. Returns the `Trainer`.
    """

    def fine_tune(model, *, train_size=200, learning_rate=2e-3, epochs=4, batch_size=16, seed=0):
        import numpy as np
        import torch
        from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

        import dwvit

        train = cifar10_train_balanced.select(range(train_size))
        evaluation = cifar10_test_slice.select(range(40))
        assert len(set(train["label"])) == 10 and len(set(evaluation["label"])) == 10
        processor = dwvit.make_image_processor(32, dataset="cifar10")

        def transform(batch):
            images = [image.convert("RGB") for image in batch["img"]]
            return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"],
                    "labels": torch.tensor(batch["label"])}

        train.set_transform(transform)
        evaluation.set_transform(transform)
        args = TrainingArguments(
            output_dir=str(tmp_path / "run"),
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size,
            learning_rate=learning_rate,
            num_train_epochs=epochs,
            logging_steps=4,
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
            use_cpu=True,
            seed=seed,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation)
        trainer.train()
        assert trainer.state.global_step == epochs * -(-train_size // batch_size)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) >= 6
        assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses
        assert np.isfinite(trainer.evaluate()["eval_loss"])

        trainer.save_model(str(tmp_path / "final"))
        reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "final").eval()
        model.eval()
        batch = torch.stack([evaluation[i]["pixel_values"] for i in range(4)])
        with torch.no_grad():
            torch.testing.assert_close(reloaded(batch).logits, model(batch).logits, atol=1e-6, rtol=0)
        return trainer

    return fine_tune
