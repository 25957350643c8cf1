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


@pytest.fixture(scope="session")
def cifar10_test_slice(cifar10_dir):
    """The first 256 real CIFAR-10 test images as a `datasets.Dataset`."""
    import datasets

    return datasets.load_dataset(str(cifar10_dir), split="test[:256]")


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
