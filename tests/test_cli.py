"""`dwvit create`: never replaces a folder unasked, writes a whole model folder or nothing, refuses unknown fields."""

from __future__ import annotations

import json

import pytest

from dwvit import cli

SMALL = ["--set", "hidden_size=32", "--set", "num_hidden_layers=1", "--set", "num_attention_heads=2",
         "--set", "intermediate_size=64"]


def create(output_dir, *extra):
    return cli.main(["create", "vit-tiny-cifar", str(output_dir), *SMALL, *extra])


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_create_refuses_a_folder_holding_a_model_without_overwrite(tmp_path, capsys):
    out = tmp_path / "model"
    assert create(out, "--num-labels", "3") == 0
    before = snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        create(out, "--num-labels", "5")
    assert exit_info.value.code != 0
    assert "already holds" in capsys.readouterr().err
    assert snapshot(out) == before

    assert create(out, "--num-labels", "5", "--overwrite") == 0
    assert len(json.loads((out / "config.json").read_text())["id2label"]) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no staging folder left beside it"


def test_create_refusal_names_the_folder_and_the_flag(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        create(out)
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_create_with_an_unknown_dataset_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "model"
    with pytest.raises(SystemExit):
        create(out, "--dataset", "cifar11")
    err = capsys.readouterr().err
    assert "cifar11" in err and "cifar10" in err, err
    assert list(tmp_path.iterdir()) == []


def test_create_refuses_a_misspelt_config_field_with_a_suggestion(tmp_path, capsys):
    out = tmp_path / "model"
    with pytest.raises(SystemExit):
        create(out, "--set", "use_dw_shortcutt=false")
    err = capsys.readouterr().err
    assert "'use_dw_shortcutt'" in err and "did you mean 'use_dw_shortcut'" in err.lower(), err
    assert list(tmp_path.iterdir()) == []
