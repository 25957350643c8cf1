"""`--torch_compile` on the CPU: the inductor layout setting that keeps the depth-wise conv's backward fast."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

import run_image_classification as job
from dwvit.training.trainer import prepare_torch_compile


@pytest.fixture
def inductor_config():
    from torch._inductor import config

    saved = config.force_layout_optimization
    config.force_layout_optimization = False
    yield config
    config.force_layout_optimization = saved


def _arguments(tmp_path, **fields) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **fields)


def _affected_torch() -> bool:
    """Inductor with the conv-backward lowering (PyTorch >= 2.13) and mkldnn: the per-graph layout choice applies."""
    import torch._inductor.kernel.conv as inductor_conv

    return hasattr(inductor_conv, "convolution_backward_lowering") and torch.backends.mkldnn.is_available()


def test_nothing_changes_without_torch_compile(tmp_path, inductor_config):
    assert prepare_torch_compile(_arguments(tmp_path)) is False
    assert inductor_config.force_layout_optimization is False


def test_other_backends_are_left_alone(tmp_path, inductor_config):
    arguments = _arguments(tmp_path, torch_compile=True, torch_compile_backend="aot_eager")
    assert prepare_torch_compile(arguments) is False
    assert inductor_config.force_layout_optimization is False


def test_cpu_inductor_gets_channels_last_backward(tmp_path, inductor_config, caplog):
    with caplog.at_level(logging.INFO, logger="dwvit.training.trainer"):
        applied = prepare_torch_compile(_arguments(tmp_path, torch_compile=True))
    assert applied is _affected_torch()
    assert inductor_config.force_layout_optimization is applied
    assert ("189239" in caplog.text) is applied


def test_the_script_sets_it_before_the_trainer_compiles(tmp_path, inductor_config, monkeypatch):
    """The Trainer compiles the model when it is built, so the setting must be in place by then."""
    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for item in range(4):
            Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)).save(root / name / f"{item}.png")

    class TrainerBuilt(Exception):
        pass

    seen = {}

    def trainer_stand_in(*args, **kwargs):
        seen["force_layout_optimization"] = inductor_config.force_layout_optimization
        raise TrainerBuilt

    monkeypatch.setattr(job, "DWTrainer", trainer_stand_in)
    with pytest.raises(TrainerBuilt):
        job.main([
            "--model_name", "vit-tiny-cifar", "--train_dir", str(root), "--output_dir", str(tmp_path / "out"),
            "--do_train", "--torch_compile", "true", "--use_cpu", "true", "--report_to", "none",
        ])
    assert seen["force_layout_optimization"] is _affected_torch()
