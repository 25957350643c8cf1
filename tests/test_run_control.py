"""Runs you can trust with your data (issue #19): what a reused output folder does, locks, finished runs, NaNs.

Every run here is tiny: 16 real CIFAR-10 images, batch 8, a two-block 32-wide ViT, a few steps.
"""

from __future__ import annotations

import json
import re
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import run_image_classification as ric  # noqa: E402
from dwvit.training import run_control  # noqa: E402

TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"


def run_args(output_dir, cifar10_dir, *extra):
    return [
        "--model_name", "vit-tiny-cifar", "--config_overrides", TINY, "--output_dir", str(output_dir),
        "--dataset_name", str(cifar10_dir), "--max_train_samples", "16", "--per_device_train_batch_size", "8",
        "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "no",
        "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
        "--rand_augment", "false", "--do_train", *extra,
    ]


def callback(**hooks):
    from transformers import TrainerCallback

    return type("Hooks", (TrainerCallback,), {name: staticmethod(hook) for name, hook in hooks.items()})()


def run(output_dir, cifar10_dir, *extra, callbacks=()):
    """Run the job; return (the step it started training from or None, its metrics)."""
    started = []
    metrics = ric.main(
        run_args(output_dir, cifar10_dir, *extra),
        callbacks=[callback(on_train_begin=lambda args, state, control, **kw: started.append(state.global_step)),
                   *callbacks],
    )
    return (started[0] if started else None), metrics


def snapshot(folder: Path) -> dict:
    """Every file's size and modification time: equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def final_step(folder: Path) -> int:
    return json.loads((folder / "trainer_state.json").read_text())["global_step"]


@pytest.fixture(scope="module")
def interrupted(cifar10_dir, tmp_path_factory):
    """A run of 4 steps interrupted after step 3: it holds checkpoint-2 and nothing else of its results."""
    out = tmp_path_factory.mktemp("interrupted") / "out"

    def stop(args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt("interrupted after step 3")

    with pytest.raises(KeyboardInterrupt):
        run(out, cifar10_dir, callbacks=[callback(on_step_end=stop)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    return out


@pytest.fixture(scope="module")
def finished(cifar10_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    run(out, cifar10_dir)
    assert final_step(out) == 4
    return out


@pytest.fixture
def copy_of(tmp_path):
    def copy(folder):
        target = tmp_path / "out"
        shutil.copytree(folder, target)
        return target

    return copy


# ---- 1. Resuming with other arguments ----


def test_resuming_with_other_arguments_is_refused_naming_each_difference(interrupted, copy_of, cifar10_dir):
    out = copy_of(interrupted)
    before = snapshot(out)
    with pytest.raises(ValueError) as error:
        run(out, cifar10_dir, "--learning_rate", "1e-3", "--seed", "7", "--rand_augment", "true")
    message = str(error.value)
    assert str(out) in message and "3 differ" in message, message
    assert "--learning_rate: 0.0005 -> 0.001" in message
    assert "--seed: 42 -> 7" in message
    assert "--rand_augment: False -> True" in message
    assert "--overwrite_output_dir" in message and "--resume_changed_arguments" in message
    assert snapshot(out) == before, "a refused run must leave the folder as it was"


def test_output_only_options_may_differ_on_resume(interrupted, copy_of, cifar10_dir):
    out = copy_of(interrupted)
    started, _ = run(out, cifar10_dir, "--logging_steps", "3", "--per_device_eval_batch_size", "5",
                     "--dataloader_num_workers", "0", "--max_train_minutes", "100", "--save_total_limit", "3",
                     "--report_to", "none")
    assert started == 2 and final_step(out) == 4


def test_resume_changed_arguments_continues_with_a_longer_schedule_and_records_it(interrupted, copy_of, cifar10_dir):
    out = copy_of(interrupted)
    started, _ = run(out, cifar10_dir, "--max_steps", "6", "--resume_changed_arguments")
    assert started == 2 and final_step(out) == 6
    record = json.loads((out / run_control.RECORD_NAME).read_text())
    assert record["arguments"]["max_steps"] == 6
    assert record["changes"][-1]["changed"] == {"max_steps": {"old": 4, "new": 6}}
    assert record["finished"]["global_step"] == 6


def test_a_changed_run_that_fails_before_training_leaves_the_old_record(interrupted, copy_of, cifar10_dir, monkeypatch):
    """The record must keep describing the checkpoints in the folder, which are still the old run's."""
    out = copy_of(interrupted)
    before = (out / run_control.RECORD_NAME).read_text()

    def fail(*args, **kwargs):
        raise RuntimeError("the model could not be built")

    monkeypatch.setattr(ric, "build_model", fail)
    with pytest.raises(RuntimeError, match="could not be built"):
        run(out, cifar10_dir, "--max_steps", "6", "--resume_changed_arguments")
    assert (out / run_control.RECORD_NAME).read_text() == before


def test_overwrite_output_dir_starts_over_without_the_old_checkpoints(interrupted, copy_of, cifar10_dir):
    out = copy_of(interrupted)
    seen = []

    def on_save(args, state, control, **kwargs):
        seen.append(sorted(p.name for p in out.glob("checkpoint-*")))

    started, _ = run(out, cifar10_dir, "--learning_rate", "1e-3", "--overwrite_output_dir",
                     callbacks=[callback(on_save=on_save)])
    assert started == 0 and final_step(out) == 4
    assert seen[0] == ["checkpoint-2"]  # the new run's own checkpoint-2; the old one was deleted before
    record = json.loads((out / run_control.RECORD_NAME).read_text())
    assert record["arguments"]["learning_rate"] == 1e-3 and record["changes"] == []


def test_auto_resume_false_refuses_a_folder_holding_another_runs_checkpoints(interrupted, copy_of, cifar10_dir):
    """Training from scratch beside them would mix two runs' checkpoints, and a later resume could take an old one."""
    out = copy_of(interrupted)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match=r"--auto_resume false: .* holds checkpoints of an earlier run \(checkpoint-2"):
        run(out, cifar10_dir, "--auto_resume", "false")
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_folder_from_before_the_record_resumes_with_a_warning(interrupted, copy_of, cifar10_dir, caplog):
    out = copy_of(interrupted)
    (out / run_control.RECORD_NAME).unlink()  # as the runs started before this change
    with caplog.at_level(logging.WARNING):
        started, _ = run(out, cifar10_dir)
    assert started == 2 and final_step(out) == 4
    assert any("without a record of its arguments" in r.getMessage() for r in caplog.records)
    assert json.loads((out / run_control.RECORD_NAME).read_text())["arguments"]["max_steps"] == 4


def test_a_folder_from_before_the_record_is_compared_with_its_run_info_command(interrupted, copy_of, cifar10_dir):
    out = copy_of(interrupted)
    (out / run_control.RECORD_NAME).unlink()
    command = "python run_image_classification.py " + " ".join(run_args(out, cifar10_dir, "--learning_rate", "2e-3"))
    (out / "run_info.json").write_text(json.dumps({"command": command}))
    with pytest.raises(ValueError, match=r"--learning_rate: 0\.002 -> 0\.0005"):
        run(out, cifar10_dir)


def test_fields_missing_from_an_older_record_compare_equal_to_their_default():
    from dwvit.training.arguments import parse_args

    current, defaults = run_control.compared_arguments(*parse_args(["--output_dir", "x", "--label_smoothing", "0.2"]))
    saved = {name: value for name, value in current.items() if name not in ("label_smoothing", "crop_scale_min")}
    assert defaults["label_smoothing"] == 0.1 and defaults["crop_scale_min"] == 0.08
    # crop_scale_min is missing and at its default: equal. label_smoothing is missing and not at its default.
    assert run_control.differences(saved, current, defaults) == {"label_smoothing": (0.1, 0.2)}
    # Output-only options are not compared at all.
    for name in ("logging_steps", "per_device_eval_batch_size", "dataloader_num_workers", "max_train_minutes",
                 "report_to", "output_dir", "eval_strategy"):
        assert name not in current


# ---- 2. Finished runs ----


def test_rerunning_a_finished_run_does_nothing_and_says_so(finished, copy_of, cifar10_dir, capsys):
    out = copy_of(finished)
    before = snapshot(out)
    started, metrics = run(out, cifar10_dir)
    assert started is None, "no training at all"
    assert snapshot(out) == before and final_step(out) == 4
    assert "already finished" in capsys.readouterr().err
    assert metrics == json.loads((out / "all_results.json").read_text())


def test_a_run_stopped_at_its_time_budget_continues_only_with_a_larger_budget(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    run(out, cifar10_dir, "--max_train_minutes", "0.00001")  # stops after its first step, with a checkpoint
    assert final_step(out) == 1
    before = snapshot(out)
    assert run(out, cifar10_dir, "--max_train_minutes", "0.00001")[0] is None
    assert snapshot(out) == before and final_step(out) == 1
    assert run(out, cifar10_dir, "--max_train_minutes", "1000")[0] == 1
    assert final_step(out) == 4


# ---- 3. The lock ----


def test_a_live_lock_is_refused_naming_its_holder(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out.mkdir()
        (out / run_control.LOCK_NAME).write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
             "command": "python run_image_classification.py --output_dir out"}))
        with pytest.raises(RuntimeError) as error:
            run(out, cifar10_dir)
    finally:
        holder.kill()
        holder.wait()
    message = str(error.value)
    assert f"process {holder.pid} on host {socket.gethostname()}" in message and "2026-01-01" in message, message
    assert sorted(p.name for p in out.iterdir()) == [run_control.LOCK_NAME], "the refused run wrote nothing"


def test_a_stale_lock_is_taken_over_and_the_lock_lives_as_long_as_the_run(cifar10_dir, tmp_path, caplog):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.mkdir()
    (out / run_control.LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                         "started": "2026-01-01T00:00:00+00:00"}))
    during = []

    def on_step_end(args, state, control, **kwargs):
        during.append(json.loads((out / run_control.LOCK_NAME).read_text()))

    with caplog.at_level(logging.WARNING):
        run(out, cifar10_dir, callbacks=[callback(on_step_end=on_step_end)])
    assert any(f"process {dead.pid}" in r.getMessage() and "no longer exists" in r.getMessage()
               for r in caplog.records)
    assert len(during) == 4 and all(entry["pid"] == os.getpid() for entry in during)
    assert during[0]["host"] == socket.gethostname() and during[0]["started"]
    assert not (out / run_control.LOCK_NAME).exists(), "released at the end"


def test_a_second_process_is_refused_while_a_run_holds_the_folder(tmp_path):
    out = tmp_path / "out"
    path = run_control.acquire_lock(out, "first run")
    try:
        result = subprocess.run(
            [sys.executable, "-c", f"from dwvit.training.run_control import acquire_lock; acquire_lock({str(out)!r})"],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode != 0 and f"process {os.getpid()}" in result.stderr, result.stderr[-2000:]
        assert "first run" in result.stderr
    finally:
        run_control.release_lock(path)
    assert not path.exists()


# ---- 4. NaN ----


def test_a_zero_std_is_refused_before_anything_runs(cifar10_dir, tmp_path):
    with pytest.raises(ValueError, match=r"image_std.*> 0.*\(0\.0, 0\.0, 0\.0\)"):
        run(tmp_path / "out", cifar10_dir, "--image_std", "0,0,0")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_non_finite_loss_stops_the_run_without_a_checkpoint_of_it(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    # A std this small overflows float32 in the patch embedding: the very first loss is not finite.
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan|non-finite training loss \(inf"):
        run(out, cifar10_dir, "--image_std", "1e-30,1e-30,1e-30", "--save_steps", "1")
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()
    assert not (out / run_control.LOCK_NAME).exists()


def test_non_finite_gradients_under_a_finite_loss_stop_the_run_before_the_optimizer_step(cifar10_dir, tmp_path):
    """A gradient that becomes NaN while the loss is finite would make every weight NaN at the optimizer step,
    and the checkpoint of that step would hold them."""
    out = tmp_path / "out"

    def poison_from_step_2(args, state, control, model=None, **kwargs):
        parameter = next(model.parameters())
        parameter.register_hook(lambda grad: grad * float("nan") if state.global_step >= 1 else grad)

    with pytest.raises(FloatingPointError, match=r"non-finite gradients \(the loss was finite\) at step 2"):
        run(out, cifar10_dir, "--save_steps", "1", callbacks=[callback(on_train_begin=poison_from_step_2)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


# ---- 6. Evaluation splits the job cannot score ----


def labelled_dataset(root: Path, eval_labels, eval_names=None) -> Path:
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]

    def split(labels, label_names):
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=label_names)})
        images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in labels]
        return datasets.Dataset.from_dict({"image": images, "label": list(labels)}, features=features)

    folder = root / "data"
    datasets.DatasetDict({"train": split([0, 1, 2] * 4, names),
                          "test": split(eval_labels, eval_names or names)}).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("labels,names,bad", [([0, 1, -1, 2, -1], None, "-1"), ([0, 4, 5, 1], list("abcdef"), "4, 5")])
def test_an_evaluation_split_with_unknown_labels_is_refused_before_training(tmp_path, labels, names, bad):
    folder = labelled_dataset(tmp_path, labels, names)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        ric.main(run_args(out, folder, "--do_eval"))
    message = str(error.value)
    assert "'test'" in message and f"labels {bad}" in message and "0..2" in message, message
    assert not list(out.glob("checkpoint-*"))


def test_an_unlabelled_split_can_still_be_predicted(tmp_path):
    import csv

    folder = labelled_dataset(tmp_path, [-1] * 5)
    out = tmp_path / "out"
    ric.main(run_args(out, folder, "--do_predict"))
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 and all(row["label"] == "" and row["predicted_label"] in "abc" for row in rows)


# ---- 7. Validation holes ----


@pytest.mark.parametrize("flags,expected", [
    (["--per_device_train_batch_size", "0"], r"--per_device_train_batch_size must be a whole number >= 1; got 0"),
    (["--max_train_samples", "0"], r"--max_train_samples must be >= 1 .*got 0"),
    (["--config_overrides", TINY + ",use_dw_shortcutt=false"],
     r"'use_dw_shortcutt' \(did you mean 'use_dw_shortcut'\?\)"),
])
def test_arguments_that_would_train_nothing_are_refused_up_front(cifar10_dir, tmp_path, flags, expected):
    with pytest.raises(ValueError, match=expected):
        ric.main(run_args(tmp_path / "out", cifar10_dir, *flags))
    assert not (tmp_path / "out").exists(), "refused before the output folder is touched"


@pytest.mark.parametrize("build", ["named_config", "create_model"])
@pytest.mark.parametrize("field,suggestion", [
    ("dw_kernel_size", "dw_kernel_sizes"), ("hiden_dropout_prob", "hidden_dropout_prob"),
])
def test_misspelt_fields_in_python_are_refused_with_a_suggestion(build, field, suggestion):
    import dwvit

    with pytest.raises(ValueError, match=rf"'{field}' \(did you mean '{suggestion}'"):
        getattr(dwvit, build)("vit-tiny-cifar", **{field: 0.1, "num_labels": 3})
    # Fields of the config class and of PretrainedConfig itself pass.
    config = dwvit.named_config("swin-tiny-cifar", **{"num_labels": 3, "dw_kernel_sizes": [3, 5], "output_hidden_states": True})
    assert config.dw_kernel_sizes == [3, 5] and config.output_hidden_states


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_weights_to_fine_tune_are_refused_naming_the_file(cifar10_dir, tmp_path, damage):
    import dwvit

    model_dir = tmp_path / "model"
    dwvit.create_model("vit-tiny-cifar", num_labels=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64).save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2 if damage == "truncated" else 0)
    with pytest.raises(ValueError, match=rf"{weights}.*(truncated|0 bytes)"):
        ric.main(run_args(tmp_path / "out", cifar10_dir, "--model_name_or_path", str(model_dir),
                          "--config_overrides", ""))


# ---- 8. Errors that name the input ----


def image_folder(root, classes, files_per_class=3, content=None):
    from PIL import Image

    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(files_per_class):
            path = root / name / f"{index}.png"
            if content is None:
                Image.new("RGB", (8, 8), (40 * index, 0, 0)).save(path)
            else:
                path.write_bytes(content)
    return root


@pytest.mark.parametrize("case,message", [
    ("missing", r"--train_dir \S+ does not exist; expected an image folder: one sub-folder per class"),
    ("empty", r"--train_dir \S+ holds no image files; expected one sub-folder per class"),
    ("one-class", r"--train_dir \S+ has images of 1 class only \('cat'\); classification needs at least 2"),
    ("unreadable", r"Every image of the train split \(\d+\) is unreadable: Unreadable image \d+ \(\S+\.png\)"),
])
def test_an_image_folder_that_cannot_train_is_refused_naming_it(tmp_path, case, message):
    folder = tmp_path / "images"
    if case == "empty":
        folder.mkdir()
    elif case == "one-class":
        image_folder(folder, ["cat"])
    elif case == "unreadable":
        image_folder(folder, ["cat", "dog"], content=b"not an image")
    args = [
        "--model_name", "vit-tiny-cifar", "--config_overrides", TINY, "--output_dir", str(tmp_path / "out"),
        "--train_dir", str(folder), "--max_steps", "1", "--report_to", "none", "--do_train",
    ]
    with pytest.raises(ValueError, match=message):
        ric.main(args)


@pytest.mark.parametrize("source", ["dw-folder", "transformers-vit-folder"])
def test_misspelt_overrides_for_a_saved_model_are_refused_before_training(cifar10_dir, tmp_path, source):
    import dwvit
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path / "model"
    if source == "dw-folder":
        dwvit.create_model("vit-tiny-cifar", num_labels=10, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64).save_pretrained(folder)
    else:
        ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64, num_labels=10)).save_pretrained(folder)
    args = run_args(tmp_path / "out", cifar10_dir)
    args[args.index("--config_overrides") + 1] = "dw_kernel_size=[3,5]"
    args[args.index("--model_name"):args.index("--model_name") + 2] = ["--model_name_or_path", str(folder)]
    with pytest.raises(ValueError, match=r"'dw_kernel_size' \(did you mean 'dw_kernel_sizes'"):
        ric.main(args)
    assert not (tmp_path / "out").exists()


def test_an_evaluation_only_run_evaluates_in_place_or_refuses_another_models_folder(cifar10_dir, tmp_path):
    out = tmp_path / "out"
    ric.main(run_args(out, cifar10_dir, "--save_strategy", "no"))
    weights, run_info = (out / "model.safetensors").read_bytes(), (out / "run_info.json").read_text()

    # A fresh named model evaluated into the trained folder would be saved over it.
    evaluate = run_args(out, cifar10_dir, "--max_eval_samples", "16", "--do_eval")
    evaluate.remove("--do_train")
    with pytest.raises(ValueError, match=rf"{re.escape(str(out))} holds another model .*--overwrite_output_dir"):
        ric.main(evaluate)
    assert (out / "model.safetensors").read_bytes() == weights and (out / "run_info.json").read_text() == run_info

    # The trained model evaluated in place: metrics written, the model and the record of its training kept.
    in_place = [arg for arg in evaluate if arg != "--config_overrides" and arg != TINY]
    in_place[in_place.index("--model_name"):in_place.index("--model_name") + 2] = ["--model_name_or_path", str(out)]
    metrics = ric.main(in_place)
    assert "eval_accuracy" in metrics
    assert json.loads((out / "eval_results.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]
    assert (out / "model.safetensors").read_bytes() == weights and (out / "run_info.json").read_text() == run_info
