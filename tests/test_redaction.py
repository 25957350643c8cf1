"""No Hub token reaches a file the training job or the uploader writes (issue #9 item 4)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import pickle
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import hub_upload  # noqa: E402
import run_image_classification as ric  # noqa: E402
from dwvit.training.arguments import ImageClassificationTrainingArguments  # noqa: E402
from dwvit.training.redaction import (  # noqa: E402
    REDACTED,
    file_token_shapes,
    find_token_shapes,
    redact_arguments_file_text,
    redact_argv,
    redact_mapping,
    redact_text,
)

# Fake tokens in the Hub's shape (hf_ + 34 alphanumerics); distinct, so a leak says which argument leaked.
TOKEN = "hf_" + "A" * 34
HUB_TOKEN = "hf_" + "B" * 34
ORG_TOKEN = "api_org_" + "C" * 34
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"


def test_argv_token_values_are_redacted_in_every_spelling():
    argv = [
        "--token", TOKEN, "--hub_token=" + HUB_TOKEN, "--hub-token", "not-token-shaped", "--push_to_hub_token=x",
        "--dataset_name", f"https://user:{ORG_TOKEN}@example.org/data", "--tokenizer_name", "keep-me",
        "--max_tokens", "7", "--token",
    ]
    assert redact_argv(argv) == [
        "--token", REDACTED, f"--hub_token={REDACTED}", "--hub-token", REDACTED, f"--push_to_hub_token={REDACTED}",
        "--dataset_name", f"https://user:{REDACTED}@example.org/data", "--tokenizer_name", "keep-me",
        "--max_tokens", "7", "--token",
    ]
    # An option without a value is not followed by a value to redact.
    assert redact_argv(["--token", "--do_train"]) == ["--token", "--do_train"]


def test_token_shapes_are_redacted_anywhere_and_short_hf_words_are_not():
    assert redact_text(f"a {TOKEN}, b {ORG_TOKEN}.") == f"a {REDACTED}, b {REDACTED}."
    assert redact_text("hf_hub and hf_transfer and hf_" + "x" * 29) == "hf_hub and hf_transfer and hf_" + "x" * 29
    assert find_token_shapes(b"\x00\x01" + TOKEN.encode() + b"\xff") == ["hf_AAAA..."]
    assert find_token_shapes("nothing here") == []


def test_argument_file_token_fields_are_redacted():
    as_json = json.dumps({"token": "secret one", "hub_token": HUB_TOKEN, "model_name": "vit-tiny", "n": 1})
    redacted = json.loads(redact_arguments_file_text(as_json))
    assert redacted == {"token": REDACTED, "hub_token": REDACTED, "model_name": "vit-tiny", "n": 1}
    as_yaml = "model_name: vit-tiny\ntoken: secret one  # mine\nhub_token: 'quoted'\nnote: " + TOKEN + "\n"
    assert redact_arguments_file_text(as_yaml) == (
        f"model_name: vit-tiny\ntoken: {REDACTED}  # mine\nhub_token: {REDACTED}\nnote: {REDACTED}\n"
    )
    assert redact_mapping({"token": "x", "hub_token": None, "nested": [{"hf_token": "y"}, TOKEN], "k": 3}) == {
        "token": REDACTED, "hub_token": None, "nested": [{"hf_token": REDACTED}, REDACTED], "k": 3,
    }


def test_pickled_training_arguments_hold_no_token_but_the_live_ones_do(tmp_path):
    args = ImageClassificationTrainingArguments(output_dir=str(tmp_path), hub_token=HUB_TOKEN, report_to="none")
    blob = pickle.dumps(args)
    assert HUB_TOKEN.encode() not in blob
    assert pickle.loads(blob).hub_token is None and pickle.loads(blob).learning_rate == args.learning_rate
    assert args.hub_token == HUB_TOKEN  # the Trainer pushes with the object it holds
    assert copy.deepcopy(args).hub_token == HUB_TOKEN and copy.copy(args).hub_token == HUB_TOKEN


def files_holding(folder: Path, secrets) -> dict[str, list[str]]:
    """Every file under `folder` (any depth, read as bytes) that contains one of `secrets`."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            hits = [secret[:6] for secret in secrets if secret.encode() in data]
            if hits:
                found[str(path.relative_to(folder))] = hits
    return found


class RecordHubToken:
    """A callback that records the `hub_token` the live Trainer holds at the end of training."""

    def __new__(cls, record):
        from transformers import TrainerCallback

        class _Record(TrainerCallback):
            def on_train_end(self, args, state, control, **kwargs):
                record.append(args.hub_token)

        return _Record()


def run_with_tokens_given(route, cifar10_dir, root):
    """A two-step run with checkpoints, TensorBoard logs, --token and --hub_token.

    `route` "command_line" gives the tokens as `--token X` and `--hub_token=X`, "argument_file" in a JSON file.
    Returns (output_dir, every log message and printed line, route, the hub_token the live Trainer held).
    """
    out = root / "out"
    arguments = {
        "dataset_name": str(cifar10_dir), "model_name": "vit-tiny-cifar", "config_overrides": TINY,
        "output_dir": str(out), "max_train_samples": 16, "max_eval_samples": 8, "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8, "max_steps": 2, "save_strategy": "steps", "save_steps": 1,
        "eval_strategy": "no", "logging_steps": 1, "report_to": "tensorboard", "disable_tqdm": True,
        "dataloader_pin_memory": False, "do_train": True, "do_eval": True, "log_level": "info",
        "token": TOKEN, "hub_token": HUB_TOKEN,
    }
    if route == "command_line":
        argv = []
        for key, value in arguments.items():
            if key == "hub_token":
                argv.append(f"--hub_token={value}")
            else:
                argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    else:
        args_file = root / "args.json"
        args_file.write_text(json.dumps(arguments))
        argv = [str(args_file)]

    hub_tokens: list = []
    records = []  # every log message (root and transformers loggers) and everything printed
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            ric.main(argv, callbacks=[RecordHubToken(hub_tokens)])
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    records.append(printed.getvalue())
    return out, records, route, hub_tokens


@pytest.fixture(scope="module")
def token_runs(cifar10_dir, tmp_path_factory):
    runs = {}

    def get(route):
        if route not in runs:
            runs[route] = run_with_tokens_given(route, cifar10_dir, tmp_path_factory.mktemp(f"tokens_{route}"))
        return runs[route]

    return get


@pytest.fixture(params=["command_line", "argument_file"])
def run_with_tokens(request, token_runs):
    return token_runs(request.param)


@pytest.fixture
def command_line_run(token_runs):
    return token_runs("command_line")


def test_no_token_in_any_file_the_run_writes(run_with_tokens):
    out, records, route, hub_tokens = run_with_tokens
    assert (out / "checkpoint-1" / "training_args.bin").is_file() and (out / "training_args.bin").is_file()
    assert list((out / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs should be part of the check"
    assert files_holding(out, [TOKEN, HUB_TOKEN]) == {}
    assert any("Command: python run_image_classification.py" in message for message in records)
    assert not any(TOKEN in message or HUB_TOKEN in message for message in records)
    assert hub_tokens == [HUB_TOKEN], "the live Trainer must keep the token it would push with"
    command = json.loads((out / "run_info.json").read_text())["command"]
    if route == "command_line":
        assert f"--token {REDACTED}" in command and f"--hub_token={REDACTED}" in command, command
    import torch

    pickled = torch.load(out / "training_args.bin", weights_only=False)
    assert pickled.hub_token is None and pickled.max_steps == 2


def test_no_token_in_what_hub_upload_stages(run_with_tokens, tmp_path):
    out, _, route, _ = run_with_tokens
    staging = hub_upload.main([str(out), "--repo_id", "someone/dwvit-test", "--dry_run", "--token", TOKEN,
                               "--staging_dir", str(tmp_path / "staged")])
    assert (staging / "README.md").is_file() and (staging / "run_info.json").is_file()
    assert files_holding(staging, [TOKEN, HUB_TOKEN]) == {}
    if route == "command_line":
        assert f"--token {REDACTED}" in (staging / "README.md").read_text()


@pytest.mark.parametrize("name", ["all_results.json", "trainer_state.json", "config.json"])
def test_hub_upload_refuses_a_folder_with_a_planted_token(command_line_run, tmp_path, name):
    out, *_ = command_line_run
    folder = tmp_path / "planted"
    shutil.copytree(out, folder)
    data = json.loads((folder / name).read_text())
    data["note"] = f"pasted by mistake: {TOKEN}"
    (folder / name).write_text(json.dumps(data))
    staging = tmp_path / "staged"
    with pytest.raises(ValueError, match=rf"Hub token: {name.replace('.', '[.]')} \(hf_AAAA\.\.\.\)\. ") as error:
        hub_upload.main([str(folder), "--repo_id", "a/b", "--dry_run", "--staging_dir", str(staging)])
    assert "README.md" not in str(error.value), "the card itself is redacted; only the source file is named"
    assert not staging.exists() or not any(staging.iterdir()), "nothing may stay staged"


def test_model_card_redacts_a_token_left_in_an_older_run_info(command_line_run, tmp_path):
    out, *_ = command_line_run
    folder = tmp_path / "old"
    shutil.copytree(out, folder)
    run_info = json.loads((folder / "run_info.json").read_text())
    run_info["command"] = f"python run_image_classification.py --token {TOKEN} --do_train"
    (folder / "run_info.json").write_text(json.dumps(run_info))
    card = hub_upload.model_card(folder, "a/b", json.loads((folder / "config.json").read_text()))
    assert TOKEN not in card and f"--token {REDACTED} --do_train" in card
    # run_info.json itself is published, so staging that folder is refused (naming the file) rather than leaking.
    with pytest.raises(ValueError, match=r"run_info\.json \(hf_AAAA\.\.\.\)"):
        hub_upload.main([str(folder), "--repo_id", "a/b", "--dry_run", "--staging_dir", str(tmp_path / "s")])


def test_file_token_shapes_reads_binary_files(tmp_path):
    import torch

    torch.save({"note": ORG_TOKEN, "w": torch.zeros(3)}, tmp_path / "blob.pt")
    assert file_token_shapes(tmp_path / "blob.pt") == ["api_org..."]
    torch.save({"w": torch.zeros(3)}, tmp_path / "clean.pt")
    assert file_token_shapes(tmp_path / "clean.pt") == []
