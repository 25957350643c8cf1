"""DWViT in the transformers ecosystem: save/load, Auto classes, remote code, pipeline, Trainer, the CLI."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    pipeline,
)

import dwvit
from dwvit import DWViTConfig, DWViTForImageClassification, DWViTModel
from conftest import CIFAR10_LABELS, CIFAR10_NAMES, warm_up_batchnorm

SMALL = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96)


def cifar_model(**overrides) -> DWViTForImageClassification:
    config = DWViTConfig(
        **{**SMALL, **overrides},
        **CIFAR10_LABELS,
    )
    return DWViTForImageClassification(config)




def test_auto_classes_know_dwvit():
    config = AutoConfig.for_model("dwvit", **SMALL)
    assert isinstance(config, DWViTConfig)
    assert isinstance(AutoModel.from_config(config), DWViTModel)
    assert isinstance(AutoModelForImageClassification.from_config(config), DWViTForImageClassification)


def test_save_and_load_round_trip_keeps_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    model = cifar_model(dw_kernel_sizes=[3, 5], dw_block_span=2)
    warm_up_batchnorm(model)
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert {"configuration_dwvit.py", "modeling_dwvit.py", "dw_layers.py"} <= set(files)
    saved = load_file(tmp_path / "model.safetensors")
    running_mean = model.dwvit.encoder.shortcuts[1].branches[1].norm.running_mean
    assert running_mean.abs().sum() > 0
    torch.testing.assert_close(saved["dwvit.encoder.shortcuts.1.branches.1.norm.running_mean"], running_mean)

    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, DWViTForImageClassification)
    assert reloaded.config.dw_kernel_sizes == [3, 5] and reloaded.config.id2label[3] == "cat"
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits, atol=0, rtol=0)
    for (name, a), (_, b) in zip(model.named_buffers(), reloaded.named_buffers()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_remote_code_loads_without_dwvit(tmp_path, run_without_dwvit):
    torch.manual_seed(1)
    model = cifar_model(dw_kernel_sizes=[3, 5, 7])
    warm_up_batchnorm(model)
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_dwvit.DWViTConfig",
        "AutoModel": "modeling_dwvit.DWViTModel",
        "AutoModelForImageClassification": "modeling_dwvit.DWViTForImageClassification",
    }
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected_logits = model(pixel_values).logits
        expected_features = model.dwvit(pixel_values).pooler_output

    result = run_without_dwvit(
        f"""
        import json, torch
        from transformers import AutoModel, AutoModelForImageClassification
        try:
            import dwvit
            raise SystemExit("dwvit should not be importable here")
        except ImportError:
            pass
        folder = {str(tmp_path / "model")!r}
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        pixels = torch.load({str(tmp_path / "pixels.pt")!r})
        with torch.no_grad():
            logits = model(pixels).logits
            features = base(pixels).pooler_output
        print(json.dumps({{"module": type(model).__module__, "base": type(base).__name__,
                           "logits": logits.tolist(), "features": features.tolist()}}))
        """
    )
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["module"].startswith("transformers_modules.") and payload["base"] == "DWViTModel"
    torch.testing.assert_close(torch.tensor(payload["logits"]), expected_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(payload["features"]), expected_features, atol=1e-5, rtol=0)


def test_pipeline_on_real_cifar10_images(tmp_path, cifar10_test_slice, run_without_dwvit):
    torch.manual_seed(2)
    model = cifar_model()
    warm_up_batchnorm(model)
    model.save_pretrained(tmp_path)
    dwvit.make_image_processor(32, dataset="cifar10").save_pretrained(tmp_path)
    images = [cifar10_test_slice[i]["img"] for i in range(6)]

    classifier = pipeline("image-classification", model=str(tmp_path), device="cpu")
    predictions = classifier(images, top_k=3)
    assert all(len(p) == 3 and all(entry["label"] in CIFAR10_NAMES for entry in p) for p in predictions)

    # Independent expectation: processor + model + softmax by hand.
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        probabilities = model(**processor(images, return_tensors="pt")).logits.softmax(-1)
    for prediction, row in zip(predictions, probabilities):
        top = row.topk(3)
        assert [entry["label"] for entry in prediction] == [CIFAR10_NAMES[i] for i in top.indices.tolist()]
        np.testing.assert_allclose([entry["score"] for entry in prediction], top.values.numpy(), atol=1e-5)

    # The same folder without dwvit: remote code gives the same answers.
    for index, image in enumerate(images):
        image.save(tmp_path / f"image{index}.png")
    result = run_without_dwvit(
        f"""
        import json
        from PIL import Image
        from transformers import pipeline
        classifier = pipeline("image-classification", model={str(tmp_path)!r}, trust_remote_code=True, device="cpu")
        images = [Image.open({str(tmp_path)!r} + f"/image{{i}}.png") for i in range(6)]
        print(json.dumps(classifier(images, top_k=3)))
        """
    )
    isolated = json.loads(result.stdout.strip().splitlines()[-1])
    for ours, theirs in zip(predictions, isolated):
        assert [e["label"] for e in ours] == [e["label"] for e in theirs]
        np.testing.assert_allclose([e["score"] for e in ours], [e["score"] for e in theirs], atol=1e-5)


def test_trainer_fine_tunes_on_real_cifar10(fine_tune_on_cifar10):
    torch.manual_seed(3)
    model = cifar_model(hidden_size=64, num_attention_heads=4, intermediate_size=128)
    fine_tune_on_cifar10(model, train_size=320, learning_rate=1e-3, batch_size=32, seed=3)


def test_cli_creates_a_named_model(tmp_path, capsys):
    from dwvit.cli import main

    assert main(["create", "vit-tiny-cifar", str(tmp_path), "--num-labels", "10", "--dataset", "cifar10",
                 "--set", "use_dw_shortcut=false", "--set", "dw_kernel_sizes=[3,5]"]) == 0
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.hidden_size, config.image_size, config.patch_size) == (192, 32, 4)
    assert config.use_dw_shortcut is False and config.dw_kernel_sizes == [3, 5]
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"height": 32, "width": 32}
    np.testing.assert_allclose(processor.image_mean, [0.4914, 0.4822, 0.4465])
    assert main(["sizes"]) == 0
    listing = capsys.readouterr().out
    assert "vit-tiny" in listing and "5.55M" in listing


def test_trainer_gradient_accumulation_matches_one_large_batch(tmp_path):
    """Two accumulated half-batches must give the update of one full batch (the loss is scaled correctly)."""
    from datasets import Dataset

    torch.manual_seed(4)
    data = Dataset.from_dict({"pixel_values": torch.randn(8, 3, 32, 32).tolist(), "labels": list(range(8))})
    data.set_format("torch")
    initial = cifar_model(use_dw_shortcut=False)  # BatchNorm statistics would differ between the batch shapes
    updated = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        model = cifar_model(use_dw_shortcut=False)
        model.load_state_dict(initial.state_dict())
        args = TrainingArguments(
            output_dir=str(tmp_path / f"run{accumulation}"), per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.1, optim="sgd",
            lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no",
            dataloader_num_workers=0,
        )
        Trainer(model=model, args=args, train_dataset=data).train()
        updated.append(model.classifier.weight.detach().clone())
    assert not torch.allclose(updated[0], initial.classifier.weight)
    torch.testing.assert_close(updated[1], updated[0], atol=1e-6, rtol=1e-5)
