"""Killed at any moment, resumed with nothing lost (issue #10 item 6).

One tiny real run (16 CIFAR-10 images, batch 4, 2 epochs = 8 steps, checkpoints at steps 3 and 6, the paper's
random augmentation and stochastic depth) is the reference. A copy of the same run interrupted after step 7
holds checkpoint-3 and checkpoint-6; every file of checkpoint-6 is truncated or removed in turn, and the
automatic resume must pass over checkpoint-6 with a warning naming it, resume from checkpoint-3 and end with
weights bit-identical to the reference.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import run_image_classification as ric  # noqa: E402
from dwvit.training.checkpointing import (  # noqa: E402
    MANIFEST_NAME,
    checkpoint_problems,
    latest_complete_checkpoint,
    remove_incomplete_saves,
    rotate_checkpoints,
)

TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,drop_path_rate=0.2"
TOTAL_STEPS = 8
# Every file of a checkpoint of this run; test_the_parametrized_files_are_every_file_of_a_checkpoint keeps it true.
CHECKPOINT_FILES = [
    "checkpoint_manifest.json", "config.json", "configuration_dwvit.py", "dw_layers.py", "dw_shortcut_autograd.py",
    "dw_shortcut_kernel.py",
    "model.safetensors",
    "modeling_dwvit.py", "optimizer.pt", "preprocessor_config.json", "rng_state.pth", "scheduler.pt",
    "trainer_state.json", "training_args.bin",
]


def run_args(output_dir, cifar10_dir, *extra):
    return [
        "--model_name", "vit-tiny-cifar", "--config_overrides", TINY, "--output_dir", str(output_dir),
        "--dataset_name", str(cifar10_dir), "--max_train_samples", "16", "--per_device_train_batch_size", "4",
        "--num_train_epochs", "2", "--save_strategy", "steps", "--save_steps", "3", "--eval_strategy", "no",
        "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
        "--do_train", *extra,
    ]


def callback(**hooks):
    """A TrainerCallback from keyword hooks, e.g. callback(on_step_end=function)."""
    from transformers import TrainerCallback

    return type("Hooks", (TrainerCallback,), {name: staticmethod(hook) for name, hook in hooks.items()})()


def stop_after(step):
    def on_step_end(args, state, control, **kwargs):
        if state.global_step == step:
            raise KeyboardInterrupt(f"interrupted after step {step}")

    return callback(on_step_end=on_step_end)


def resume(output_dir, cifar10_dir, *extra, callbacks=()):
    """Run the script on `output_dir` (it resumes by itself); return the step it started from."""
    started = []
    ric.main(
        run_args(output_dir, cifar10_dir, *extra),
        callbacks=[
            callback(on_train_begin=lambda args, state, control, **kw: started.append(state.global_step)), *callbacks
        ],
    )
    return started[0]


def assert_same_weights(output_dir, reference):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == TOTAL_STEPS
    actual = load_file(output_dir / "model.safetensors")
    assert set(actual) == set(reference)
    for name in reference:
        torch.testing.assert_close(actual[name], reference[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def reference(cifar10_dir, tmp_path_factory):
    """The final weights of the uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    ric.main(run_args(out, cifar10_dir))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]  # limit 2
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def interrupted(cifar10_dir, tmp_path_factory):
    """An output folder of the same run interrupted after step 7: checkpoint-3 and checkpoint-6, no final model."""
    out = tmp_path_factory.mktemp("interrupted") / "out"
    with pytest.raises(KeyboardInterrupt):
        ric.main(run_args(out, cifar10_dir), callbacks=[stop_after(7)])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", "_tmp"))) == [
        "checkpoint-3", "checkpoint-6"
    ]
    return out


@pytest.fixture
def damaged_copy(interrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    return out


def truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def test_the_parametrized_files_are_every_file_of_a_checkpoint(interrupted):
    for name in ("checkpoint-3", "checkpoint-6"):
        assert sorted(p.name for p in (interrupted / name).iterdir()) == CHECKPOINT_FILES
        assert checkpoint_problems(interrupted / name) == []
    manifest = json.loads((interrupted / "checkpoint-6" / MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == [name for name in CHECKPOINT_FILES if name != MANIFEST_NAME]


@pytest.mark.parametrize("damage", ["truncated", "missing"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_resume_passes_over_a_damaged_newest_checkpoint(damaged_copy, cifar10_dir, reference, caplog, name, damage):
    target = damaged_copy / "checkpoint-6" / name
    truncate(target) if damage == "truncated" else target.unlink()

    with caplog.at_level(logging.WARNING):
        started = resume(damaged_copy, cifar10_dir)
    skipped = [r.getMessage() for r in caplog.records if "Skipping incomplete or unreadable checkpoint" in r.getMessage()]
    if name == MANIFEST_NAME and damage == "missing":
        # Without its manifest the checkpoint gets the structural checks only (as one written by a plain
        # Trainer), and every file of it is whole: resuming from it is right.
        assert started == 6 and skipped == []
    else:
        assert started == 3
        assert len(skipped) == 1 and str(damaged_copy / "checkpoint-6") in skipped[0] and name in skipped[0], skipped
    assert_same_weights(damaged_copy, reference)
    # The damaged checkpoint was replaced by a complete one when the resumed run saved step 6 again.
    assert checkpoint_problems(damaged_copy / "checkpoint-6") == []
    assert not list(damaged_copy.glob("_tmp*"))


def test_a_kill_during_a_save_leaves_no_checkpoint_folder(interrupted, cifar10_dir, reference, tmp_path, monkeypatch):
    """A save that dies half-way (model and optimizer written, RNG state not) is invisible to every reader."""
    from transformers import Trainer
    from transformers.trainer_utils import get_last_checkpoint

    out = tmp_path / "out"
    save_rng_state = Trainer._save_rng_state

    def dying_save_rng_state(self, output_dir):
        if self.state.global_step == 6:
            raise KeyboardInterrupt("killed during the save of step 6")
        save_rng_state(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dying_save_rng_state)
    with pytest.raises(KeyboardInterrupt):
        ric.main(run_args(out, cifar10_dir))
    monkeypatch.undo()
    assert not (out / "checkpoint-6").exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-3")
    leftovers = [p.name for p in out.iterdir() if p.name.startswith("_tmp")]
    assert leftovers == ["_tmp-checkpoint-6"] and (out / "_tmp-checkpoint-6" / "checkpoint-6" / "optimizer.pt").is_file()

    assert resume(out, cifar10_dir) == 3
    assert_same_weights(out, reference)
    assert not list(out.glob("_tmp*")), "the leftover of the killed save is removed"


def test_rotation_never_deletes_the_only_complete_checkpoint(damaged_copy, cifar10_dir, reference, caplog):
    """save_total_limit=1 with a damaged checkpoint from a later step (an abandoned run) still in the folder."""
    (damaged_copy / "checkpoint-6").rename(damaged_copy / "checkpoint-9")  # step 9 > anything this run saves
    truncate(damaged_copy / "checkpoint-9" / "model.safetensors")
    after_each_save = []

    def on_save(args, state, control, **kwargs):
        after_each_save.append(sorted(p.name for p in damaged_copy.glob("checkpoint-*")))

    with caplog.at_level(logging.WARNING):
        assert resume(damaged_copy, cifar10_dir, "--save_total_limit", "1", callbacks=[callback(on_save=on_save)]) == 3
    assert any("checkpoint-9" in r.getMessage() for r in caplog.records)
    # The checkpoint just written is kept; the stale damaged one from a later step goes first.
    assert after_each_save == [["checkpoint-6"], ["checkpoint-8"]]
    assert_same_weights(damaged_copy, reference)
    assert latest_complete_checkpoint(damaged_copy) == str(damaged_copy / "checkpoint-8")


def test_rotation_order(tmp_path):
    for step in (3, 6, 9, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    # At step 6, checkpoints 9 and 12 are from an abandoned run: they go first; the one just written stays.
    deleted = rotate_checkpoints(tmp_path, 2, current_step=6, protected=[str(tmp_path / "checkpoint-6"), None])
    assert [Path(p).name for p in deleted] == ["checkpoint-9", "checkpoint-12"]
    deleted = rotate_checkpoints(tmp_path, 1, current_step=6, protected=[str(tmp_path / "checkpoint-3")])
    assert [Path(p).name for p in deleted] == ["checkpoint-6"]  # a protected (best) checkpoint is kept instead
    assert rotate_checkpoints(tmp_path, None, current_step=6, protected=[]) == []


def test_a_kill_during_rotation_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    import dwvit.training.checkpointing as checkpointing

    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x")

    def killed_rmtree(path, *args, **kwargs):
        raise KeyboardInterrupt(f"killed while deleting {path}")

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt, match="_tmp-old-checkpoint-3"):
        rotate_checkpoints(tmp_path, 1, current_step=6, protected=[str(tmp_path / "checkpoint-6")])
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_tmp-old-checkpoint-3", "checkpoint-6"]
    assert remove_incomplete_saves(tmp_path) == [str(tmp_path / "_tmp-old-checkpoint-3")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]


@pytest.mark.parametrize("name", [n for n in CHECKPOINT_FILES if n != MANIFEST_NAME and not n.endswith(".py")])
def test_structural_checks_catch_truncation_without_a_manifest(interrupted, tmp_path, name):
    """Checkpoints written by a plain Trainer have no manifest; a truncated file is still caught by its format.

    (Python files are only compiled: a cut that ends a function can leave valid code. The manifest catches it.)
    """
    folder = tmp_path / "checkpoint-6"
    shutil.copytree(interrupted / "checkpoint-6", folder)
    (folder / MANIFEST_NAME).unlink()
    assert checkpoint_problems(folder) == []
    truncate(folder / name)
    problems = checkpoint_problems(folder)
    assert problems and all(problem.startswith(name) for problem in problems), problems


def test_unreadable_checkpoints_are_skipped_with_a_warning_naming_them(interrupted, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    (out / "checkpoint-6" / "optimizer.pt").write_bytes(b"not a torch file")
    os.remove(out / "checkpoint-3" / "rng_state.pth")
    with caplog.at_level(logging.WARNING, logger="dwvit.training.checkpointing"):
        assert latest_complete_checkpoint(out) is None
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert str(out / "checkpoint-6") in messages[0] and "optimizer.pt" in messages[0]
    assert str(out / "checkpoint-3") in messages[1] and "rng_state.pth: missing" in messages[1]


def test_save_only_model_checkpoints_need_no_optimizer_state(interrupted, tmp_path):
    folder = tmp_path / "checkpoint-6"
    shutil.copytree(interrupted / "checkpoint-6", folder)
    for name in (MANIFEST_NAME, "optimizer.pt", "scheduler.pt", "rng_state.pth"):  # as save_only_model writes it
        (folder / name).unlink()
    assert checkpoint_problems(folder, full_state=False) == []
    assert sorted(checkpoint_problems(folder)) == [
        "optimizer.pt: missing", "rng_state.pth: missing (no rng_state*.pth)", "scheduler.pt: missing"
    ]


def test_two_process_checkpoints_hold_every_process_rng_state(cifar10_dir, tmp_path):
    """Under torchrun every process writes its rng_state_<rank>.pth into the staging folder before the rename."""
    import socket
    import subprocess

    out = tmp_path / "ddp"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        str(REPO_ROOT / "run_image_classification.py"),
        *run_args(out, cifar10_dir, "--max_steps", "4", "--save_steps", "2", "--ddp_backend", "gloo"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for name in ("checkpoint-2", "checkpoint-4"):
        files = sorted(p.name for p in (out / name).iterdir())
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(files) and "rng_state.pth" not in files, files
        assert checkpoint_problems(out / name) == []
    assert not list(out.glob("_tmp*"))


def test_best_model_checkpoint_points_at_the_published_folder(cifar10_dir, tmp_path):
    """The Trainer records the best checkpoint while it is still staged; the state must name its final place."""
    out = tmp_path / "out"
    ric.main(run_args(out, cifar10_dir, "--max_steps", "6", "--eval_strategy", "steps", "--eval_steps", "3",
                      "--do_eval", "--max_eval_samples", "8", "--load_best_model_at_end", "true",
                      "--metric_for_best_model", "eval_loss", "--save_total_limit", "1"))
    for state_file in (out / "trainer_state.json", *out.glob("checkpoint-*/trainer_state.json")):
        best = json.loads(state_file.read_text())["best_model_checkpoint"]
        assert best is not None and Path(best).parent == out and Path(best).name.startswith("checkpoint-"), best
    best = Path(json.loads((out / "trainer_state.json").read_text())["best_model_checkpoint"])
    assert best.is_dir() and checkpoint_problems(best) == []
