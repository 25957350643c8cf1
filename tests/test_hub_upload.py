"""hub_upload.py: the staged folder, its model card, and the refusals; no network."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import hub_upload  # noqa: E402
import run_image_classification as ric  # noqa: E402


@pytest.fixture(scope="module")
def trained_folder(cifar10_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "out"
    ric.main(
        [
            "--dataset_name", str(cifar10_dir), "--model_name", "vit-tiny-cifar", "--config_overrides",
            "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64",
            "--output_dir", str(out), "--max_train_samples", "32", "--max_eval_samples", "32",
            "--per_device_train_batch_size", "16", "--num_train_epochs", "1", "--save_strategy", "no",
            "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
            "--do_train", "--do_eval",
        ]
    )
    return out


def test_dry_run_stages_a_folder_that_loads_without_dwvit(trained_folder, tmp_path, run_without_dwvit, capsys):
    staging = hub_upload.main([str(trained_folder), "--repo_id", "someone/dwvit-test", "--dry_run",
                               "--staging_dir", str(tmp_path / "staged")])
    listed = capsys.readouterr().out
    names = sorted(path.name for path in staging.iterdir())
    for name in ("README.md", "config.json", "model.safetensors", "preprocessor_config.json", "all_results.json",
                 "configuration_dwvit.py", "modeling_dwvit.py", "dw_layers.py"):
        assert name in names and name in listed, name
    assert "training_args.bin" not in names  # a pickle, never published
    assert "Dry run: nothing uploaded." in listed

    result = run_without_dwvit(
        f"""
        import json, torch
        from transformers import AutoModelForImageClassification, pipeline
        from PIL import Image
        model = AutoModelForImageClassification.from_pretrained({str(staging)!r}, trust_remote_code=True).eval()
        torch.manual_seed(0)
        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            logits = model(pixel_values=pixels).logits
        torch.save(pixels, "pixels.pt")
        classifier = pipeline("image-classification", model={str(staging)!r}, trust_remote_code=True)
        image = Image.new("RGB", (32, 32), (120, 30, 200))
        print(json.dumps({{"logits": logits.tolist(), "class": type(model).__name__,
                          "labels": [r["label"] for r in classifier(image)]}}))
        """
    )
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["class"] == "DWViTForImageClassification"
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    local = AutoModelForImageClassification.from_pretrained(trained_folder).eval()
    with torch.no_grad():
        expected = local(pixel_values=pixels).logits
    torch.testing.assert_close(torch.tensor(payload["logits"]), expected, rtol=1e-5, atol=1e-5)
    assert set(payload["labels"]) <= set(local.config.id2label.values())


def test_model_card_holds_the_runs_metrics_and_metadata(trained_folder, tmp_path):
    from huggingface_hub import ModelCard

    staging = hub_upload.main([str(trained_folder), "--repo_id", "someone/dwvit-test", "--dry_run",
                               "--staging_dir", str(tmp_path / "staged")])
    card = ModelCard.load(staging / "README.md")
    results = json.loads((trained_folder / "all_results.json").read_text())
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.datasets == ["uoft-cs/cifar10"]
    values = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert values["accuracy"] == pytest.approx(results["eval_accuracy"], abs=1e-4)
    assert values["top5_accuracy"] == pytest.approx(results["eval_top5_accuracy"], abs=1e-4)
    run_info = json.loads((trained_folder / "run_info.json").read_text())
    assert run_info["command"] in card.text
    assert "2407.19394" in card.text and 'pipeline("image-classification"' in card.text


def test_refuses_folder_without_weights(trained_folder, tmp_path):
    folder = tmp_path / "no_weights"
    shutil.copytree(trained_folder, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no model weights \(\*\.safetensors\)"):
        hub_upload.main([str(folder), "--repo_id", "a/b", "--dry_run", "--staging_dir", str(tmp_path / "s")])


def test_refuses_folder_with_pickle_weights(trained_folder, tmp_path):
    folder = tmp_path / "pickle"
    shutil.copytree(trained_folder, folder)
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle weights \(pytorch_model\.bin\)"):
        hub_upload.main([str(folder), "--repo_id", "a/b", "--dry_run", "--staging_dir", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_weights_are_refused_naming_the_file(trained_folder, tmp_path, damage):
    folder = tmp_path / "damaged"
    shutil.copytree(trained_folder, folder, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2 if damage == "truncated" else 0)
    with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|0 bytes)"):
        hub_upload.main([str(folder), "--repo_id", "someone/dwvit-test", "--dry_run",
                         "--staging_dir", str(tmp_path / "staged")])
    assert not (tmp_path / "staged").exists() or not any((tmp_path / "staged").iterdir())


def test_a_dwvit_create_folder_stages_with_its_parameter_count(tmp_path):
    """A folder from `dwvit create` has no run_info.json; the card's count is the saved model's own."""
    from huggingface_hub import ModelCard
    from transformers import AutoModelForImageClassification

    from dwvit import cli

    folder = tmp_path / "created"
    cli.main(["create", "vit-tiny-cifar", str(folder), "--set", "hidden_size=32", "--set", "num_hidden_layers=2",
              "--set", "num_attention_heads=2", "--set", "intermediate_size=64"])
    assert not (folder / "run_info.json").exists()
    staging = hub_upload.main([str(folder), "--repo_id", "someone/created", "--dry_run",
                               "--staging_dir", str(tmp_path / "staged")])
    expected = sum(p.numel() for p in AutoModelForImageClassification.from_pretrained(folder).parameters())
    assert f"{expected:,} parameters." in ModelCard.load(staging / "README.md").text


def test_invalid_json_in_the_folder_is_refused_naming_the_file(tmp_path):
    import dwvit

    folder = tmp_path / "model"
    dwvit.create_model("vit-tiny-cifar", num_labels=3, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64).save_pretrained(folder)
    (folder / "config.json").write_text("{broken")
    staging = tmp_path / "staging"
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder / 'config.json'))} is not valid JSON"):
        hub_upload.main([str(folder), "--repo_id", "someone/model", "--dry_run", "--staging_dir", str(staging)])
