"""End-to-end tests of run_image_classification.py on real data slices, built datasets and image folders."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import run_image_classification as ric  # noqa: E402
from dwvit.models.image_processing import DATASET_STATISTICS  # noqa: E402
from dwvit.training.arguments import parse_config_overrides  # noqa: E402
from dwvit.training.augmentation import ImageBatchCollator  # noqa: E402
from dwvit.training.data import decode_image  # noqa: E402
from dwvit.training.metrics import load_accuracy_metric  # noqa: E402

TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]


def tiny_args(output_dir, *extra, model="vit-tiny-cifar", overrides=TINY):
    return [
        "--model_name", model, "--config_overrides", overrides, "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64", "--num_train_epochs", "1",
        "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "1", *QUIET, *extra,
    ]


def random_image(rng, size=32, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cifar10_run(cifar10_dir, tmp_path_factory):
    """One short run on a real CIFAR-10 slice, with arguments given as a JSON file."""
    output_dir = tmp_path_factory.mktemp("cifar10_run")
    arguments = {
        "dataset_name": str(cifar10_dir), "model_name": "vit-tiny-cifar",
        "config_overrides": TINY, "output_dir": str(output_dir / "out"),
        "max_train_samples": 96, "max_eval_samples": 48, "num_train_epochs": 2,
        "per_device_train_batch_size": 16, "per_device_eval_batch_size": 48, "learning_rate": 1e-3,
        "save_strategy": "epoch", "eval_strategy": "no", "report_to": "tensorboard", "disable_tqdm": True,
        "dataloader_pin_memory": False, "do_train": True, "do_eval": True, "do_predict": True,
    }
    args_file = output_dir / "args.json"
    args_file.write_text(json.dumps(arguments))
    metrics = ric.main([str(args_file)])
    return output_dir / "out", metrics


def test_cifar10_run_saves_a_complete_loadable_folder(cifar10_run, cifar10_dir):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out, metrics = cifar10_run
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "all_results.json",
                 "configuration_dwvit.py", "modeling_dwvit.py", "dw_layers.py", "predictions.csv", "run_info.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]  # 96 / 16 per epoch
    assert list((out / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs are missing"
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"].endswith("DWViTForImageClassification")
    assert [config["id2label"][str(i)] for i in range(10)][:3] == ["airplane", "automobile", "bird"]
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == pytest.approx(list(DATASET_STATISTICS["cifar10"][0]))
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_samples"] == 96 and results["eval_samples"] == 48
    assert results["train_skipped_images"] == 0

    # Recompute top-1/top-5 from the reloaded model with torch ops on the same seeded slice of the test split.
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    image_processor = AutoImageProcessor.from_pretrained(out)
    images = datasets.load_dataset(str(cifar10_dir), split="test").shuffle(seed=42).select(range(48))
    inputs = image_processor([im.convert("RGB") for im in images["img"]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    labels = torch.tensor(images["label"])
    top5 = logits.topk(5, dim=-1).indices
    assert results["eval_accuracy"] == pytest.approx((top5[:, 0] == labels).float().mean().item())
    assert results["eval_top5_accuracy"] == pytest.approx((top5 == labels[:, None]).any(-1).float().mean().item())

    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 48
    names = model.config.id2label
    assert [row["predicted_label"] for row in rows] == [names[int(i)] for i in top5[:, 0]]
    assert [row["label"] for row in rows] == [names[int(i)] for i in labels]
    assert metrics["eval_accuracy"] == results["eval_accuracy"]


def test_cifar10_output_works_with_pipeline_with_and_without_dwvit(cifar10_run, cifar10_test_slice, run_without_dwvit):
    from transformers import pipeline

    out, _ = cifar10_run
    image = cifar10_test_slice[0]["img"]
    local = pipeline("image-classification", model=str(out), top_k=3)(image)
    class_names = set(cifar10_test_slice.features["label"].names)
    assert len(local) == 3 and {item["label"] for item in local} <= class_names
    image_path = out.parent / "sample.png"
    image.save(image_path)
    result = run_without_dwvit(
        f"""
        import json
        from transformers import pipeline
        classifier = pipeline("image-classification", model={str(out)!r}, trust_remote_code=True, top_k=3)
        print(json.dumps(classifier({str(image_path)!r})))
        """
    )
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert [item["label"] for item in remote] == [item["label"] for item in local]
    assert [item["score"] for item in remote] == pytest.approx([item["score"] for item in local], abs=1e-5)


def test_tiny_imagenet_with_grayscale_images(tiny_imagenet_dir, tmp_path):
    valid = datasets.load_dataset(str(tiny_imagenet_dir), split="valid").shuffle(seed=42).select(range(160))
    assert any(image.mode != "RGB" for image in valid["image"]), "the slice should hold grayscale images"
    metrics = ric.main(
        tiny_args(
            tmp_path / "out", "--dataset_name", str(tiny_imagenet_dir), "--max_train_samples", "32",
            "--max_eval_samples", "160", "--do_train", "--do_eval", "--do_predict",
            overrides=TINY + ",image_size=64,patch_size=8",
        )
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert len(config["id2label"]) == 200 and config["image_size"] == 64
    assert metrics["eval_samples"] == 160 and metrics["eval_skipped_images"] == 0
    assert 0.0 <= metrics["eval_top5_accuracy"] <= 1.0
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == pytest.approx(list(DATASET_STATISTICS["imagenet"][0]))
    with open(tmp_path / "out" / "predictions.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 160


@pytest.mark.parametrize(
    "model_name,overrides,model_class",
    [
        ("cait-xxs12-cifar", "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64",
         "DWCaiTForImageClassification"),
        ("swin-tiny-cifar", "embed_dim=16,depths=[2,2],num_heads=[2,4],drop_path_rate=0.0",
         "DWSwinForImageClassification"),
    ],
)
def test_every_family_trains_by_name_and_serves_the_pipeline(cifar10_dir, tmp_path, model_name, overrides, model_class):
    from transformers import pipeline

    out = tmp_path / "out"
    metrics = ric.main(
        tiny_args(out, "--dataset_name", str(cifar10_dir), "--max_train_samples", "32", "--max_eval_samples", "16",
                  "--do_train", "--do_eval", model=model_name, overrides=overrides)
    )
    assert metrics["eval_samples"] == 16 and 0.0 <= metrics["eval_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [model_class]
    assert config["auto_map"]["AutoModelForImageClassification"].endswith(model_class)
    image = datasets.load_dataset(str(cifar10_dir), split="test[:1]")[0]["img"]
    predictions = pipeline("image-classification", model=str(out), device="cpu")(image, top_k=10)
    assert sorted(p["label"] for p in predictions) == sorted(json.loads((out / "config.json").read_text())["id2label"].values())
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)


def build_cifar100_schema(root: Path, rng) -> Path:
    """A dataset in CIFAR-100's schema (img, fine_label, coarse_label) with RGB, grayscale and RGBA images."""
    fine = [f"fine{i}" for i in range(6)]
    coarse = ["coarse0", "coarse1"]
    features = datasets.Features(
        {"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=fine),
         "coarse_label": datasets.ClassLabel(names=coarse)}
    )
    folder = root / "cifar100"
    for split, count in (("train", 36), ("test", 18)):
        modes = ["RGB", "L", "RGBA"]
        rows = {
            "img": [random_image(rng, mode=modes[i % 3]) for i in range(count)],
            "fine_label": [i % 6 for i in range(count)],
            "coarse_label": [(i % 6) // 3 for i in range(count)],
        }
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(folder / "data" / f"{split}-00000-of-00001.parquet")
        )
    return folder


def test_cifar100_schema_uses_fine_labels_and_its_statistics(tmp_path):
    folder = build_cifar100_schema(tmp_path, np.random.default_rng(0))
    metrics = ric.main(tiny_args(tmp_path / "out", "--dataset_name", str(folder), "--do_train", "--do_eval"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(6)] == [f"fine{i}" for i in range(6)]
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["image_std"] == pytest.approx(list(DATASET_STATISTICS["cifar100"][1]))
    assert metrics["train_samples"] == 36 and metrics["eval_samples"] == 18

    coarse = ric.main(
        tiny_args(tmp_path / "coarse", "--dataset_name", str(folder), "--label_column_name", "coarse_label",
                  "--do_eval")
    )
    assert len(json.loads((tmp_path / "coarse" / "config.json").read_text())["id2label"]) == 2
    assert coarse["eval_samples"] == 18

    with pytest.raises(ValueError, match=r"'fine'.*columns are: \['img', 'fine_label', 'coarse_label'\]"):
        ric.main(tiny_args(tmp_path / "bad", "--dataset_name", str(folder), "--label_column_name", "fine", "--do_eval"))


def test_images_become_rgb():
    gray = Image.fromarray(np.array([[0, 128], [255, 7]], dtype=np.uint8), mode="L")
    assert np.array_equal(np.asarray(decode_image(gray)), np.repeat(np.asarray(gray)[..., None], 3, axis=-1))
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)  # opaque: kept
    rgba[0, 1] = (200, 100, 50, 0)  # transparent: white background
    rgba[1, 0] = (100, 0, 0, 128)  # half: alpha-blended over white
    converted = np.asarray(decode_image({"bytes": png_bytes(Image.fromarray(rgba, mode="RGBA")), "path": None}))
    assert converted.shape == (2, 2, 3)
    assert tuple(converted[0, 0]) == (200, 100, 50)
    assert tuple(converted[0, 1]) == (255, 255, 255)
    expected = [round(c * 128 / 255 + 255 * (1 - 128 / 255)) for c in (100, 0, 0)]
    assert np.abs(converted[1, 0].astype(int) - expected).max() <= 1


def build_image_folder(root: Path, rng, corrupt: bool = False) -> tuple[Path, Path]:
    train, validation = root / "train", root / "validation"
    for split, count in ((train, 8), (validation, 4)):
        for name in ("cat", "dog", "fox"):
            (split / name).mkdir(parents=True)
            for index in range(count):
                random_image(rng, size=40).save(split / name / f"{index}.png")
    if corrupt:
        (train / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    return train, validation


def test_image_folder(tmp_path):
    train, validation = build_image_folder(tmp_path, np.random.default_rng(1))
    metrics = ric.main(
        tiny_args(tmp_path / "out", "--train_dir", str(train), "--validation_dir", str(validation), "--do_train",
                  "--do_eval")
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["cat", "dog", "fox"]
    assert metrics["train_samples"] == 24 and metrics["eval_samples"] == 12


def test_missing_evaluation_split_is_carved_from_train_with_the_seed(tmp_path):
    train, _ = build_image_folder(tmp_path, np.random.default_rng(2))
    metrics = ric.main(
        tiny_args(tmp_path / "out", "--train_dir", str(train), "--train_val_split", "0.25", "--do_train", "--do_eval")
    )
    assert metrics["train_samples"] == 18 and metrics["eval_samples"] == 6


def test_corrupt_image_is_reported_then_skipped_or_stops_the_run(tmp_path):
    train, validation = build_image_folder(tmp_path, np.random.default_rng(3), corrupt=True)
    common = ["--train_dir", str(train), "--validation_dir", str(validation), "--do_train", "--do_eval"]
    with pytest.raises(ValueError, match=r"1 unreadable image.*train split: Unreadable image \d+ \(.*broken\.png\)"):
        ric.main(tiny_args(tmp_path / "stop", *common, "--corrupt_images", "error"))
    assert not (tmp_path / "stop" / "model.safetensors").exists()
    metrics = ric.main(tiny_args(tmp_path / "skip", *common, "--corrupt_images", "skip"))
    assert metrics["train_skipped_images"] == 1 and metrics["train_samples"] == 24
    results = json.loads((tmp_path / "skip" / "all_results.json").read_text())
    assert results["train_skipped_images"] == 1


def test_fine_tune_saved_model_on_a_new_label_set(cifar10_run, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out, _ = cifar10_run
    # A learnable three-class folder (each class has its own dominant colour), so that the loss has to fall.
    rng = np.random.default_rng(4)
    train, validation = tmp_path / "train", tmp_path / "validation"
    for split, count in ((train, 16), (validation, 4)):
        for index, name in enumerate(("cat", "dog", "fox")):
            (split / name).mkdir(parents=True)
            for item in range(count):
                pixels = rng.integers(0, 96, size=(40, 40, 3))
                pixels[..., index] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(split / name / f"{item}.png")
    ric.main(
        tiny_args(tmp_path / "ft", "--model_name_or_path", str(out), "--config_overrides", "", "--train_dir",
                  str(train), "--validation_dir", str(validation), "--do_train", "--num_train_epochs", "4",
                  "--learning_rate", "1e-3", "--warmup_steps", "0", "--crop_scale_min", "1.0", "--rand_augment",
                  "false", "--color_jitter", "0", "--random_erasing_prob", "0", "--mixup_alpha", "0",
                  "--cutmix_alpha", "0", "--label_smoothing", "0")
    )
    before, after = load_file(out / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    assert after["classifier.weight"].shape == (3, 32) and before["classifier.weight"].shape == (10, 32)
    assert set(before) == set(after)
    not_finite = [name for name, tensor in after.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    assert not not_finite, f"non-finite weights after fine-tuning: {not_finite}"

    # 48 images / 16 per batch x 4 epochs = 12 steps, each logged: the loss falls.
    history = json.loads((tmp_path / "ft" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses

    # The saved model gives finite logits on the held-out images, and mostly right ones.
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "ft").eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "ft")
    paths = sorted(validation.rglob("*.png"))
    with torch.no_grad():
        logits = model(**processor([Image.open(path).convert("RGB") for path in paths], return_tensors="pt")).logits
    assert logits.shape == (12, 3) and torch.isfinite(logits).all()
    labels = torch.tensor([model.config.label2id[path.parent.name] for path in paths])
    assert (logits.argmax(-1) == labels).float().mean() >= 0.75


class StopAfterStep:
    """Simulate an interruption: abort the run once `step` optimizer steps are done."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise KeyboardInterrupt(f"interrupted after step {step}")

        return _Stop()


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(cifar10_dir, tmp_path):
    # 40 images / batch 8 = 5 steps per epoch; the checkpoint at step 3 lies mid-epoch. The full paper recipe
    # (RandAugment, erasing, Mixup/CutMix) and stochastic depth make every step draw random numbers.
    def args(output_dir):
        return tiny_args(
            output_dir, "--dataset_name", str(cifar10_dir), "--max_train_samples", "40", "--max_eval_samples", "16",
            "--per_device_train_batch_size", "8", "--num_train_epochs", "2", "--save_strategy", "steps",
            "--save_steps", "3", "--do_train", "--do_eval", overrides=TINY + ",drop_path_rate=0.2",
        )

    full = ric.main(args(tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        ric.main(args(tmp_path / "resumed"), callbacks=[StopAfterStep(4)])
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-3"]
    resumed = ric.main(args(tmp_path / "resumed"))  # finds checkpoint-3 in output_dir by itself
    state = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())
    assert state["global_step"] == 10

    expected = load_file(tmp_path / "full" / "model.safetensors")
    actual = load_file(tmp_path / "resumed" / "model.safetensors")
    assert set(expected) == set(actual)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    for key in ("eval_accuracy", "eval_top5_accuracy", "eval_loss"):
        assert resumed[key] == full[key], key


def test_two_process_data_parallel_run_on_cpu(cifar10_dir, tmp_path):
    out = tmp_path / "ddp"
    with socket.socket() as probe:  # a free port, so no other rendezvous on this machine can be joined
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        str(REPO_ROOT / "run_image_classification.py"),
        *tiny_args(out, "--dataset_name", str(cifar10_dir), "--max_train_samples", "64", "--max_eval_samples", "32",
                   "--per_device_train_batch_size", "8", "--max_steps", "3", "--save_strategy", "steps",
                   "--save_steps", "3", "--do_train", "--do_eval", "--ddp_backend", "gloo"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3"], (checkpoints, result.stdout[-3000:], result.stderr[-3000:])
    assert (out / "checkpoint-3" / "model.safetensors").is_file()
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["world_size"] == 2
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["train_batch_size"] == 8
    # Two processes of 8 images per step: 3 steps see 48 images.
    assert json.loads((out / "all_results.json").read_text())["eval_samples"] == 32


def test_sync_batch_norm_is_refused_on_cpu_with_a_clear_error(tmp_path):
    # torch itself refuses SyncBatchNorm on CPU tensors once a process group exists ...
    probe = (
        "import torch, torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/store', rank=0, world_size=1)\n"
        "bn = torch.nn.SyncBatchNorm(4).train()\n"
        "try:\n    bn(torch.randn(2, 4, 3, 3))\nexcept ValueError as error:\n    print('refused:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "refused: SyncBatchNorm expected input tensor to be on GPU" in result.stdout, result.stderr
    # ... so the script says so up front instead of failing inside the first training step.

    class Args:
        world_size, device = 2, torch.device("cpu")

    with pytest.raises(ValueError, match="--sync_batch_norm needs GPUs"):
        ric.apply_sync_batch_norm(torch.nn.BatchNorm2d(4), Args())


def test_config_overrides_parse_into_config_fields(tmp_path, cifar10_dir):
    assert parse_config_overrides("use_dw_shortcut=false,dw_kernel_sizes=[3,5], pooling=mean,drop_path_rate=0.1") == {
        "use_dw_shortcut": False, "dw_kernel_sizes": [3, 5], "pooling": "mean", "drop_path_rate": 0.1,
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_config_overrides("use_dw_shortcut")
    ric.main(
        tiny_args(tmp_path / "out", "--dataset_name", str(cifar10_dir), "--max_eval_samples", "8", "--do_eval",
                  overrides=TINY + ",use_dw_shortcut=false,dw_kernel_sizes=[3,5]")
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["use_dw_shortcut"] is False and config["dw_kernel_sizes"] == [3, 5]
    assert not any("shortcuts" in name for name in load_file(tmp_path / "out" / "model.safetensors"))


def test_accuracy_metric_matches_torch_topk():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(50, 12)).astype(np.float32)
    references = rng.integers(0, 12, size=50)
    result = load_accuracy_metric().compute(predictions=scores, references=references)
    top5 = torch.from_numpy(scores).topk(5, dim=-1).indices
    refs = torch.from_numpy(references)
    assert result["accuracy"] == pytest.approx((top5[:, 0] == refs).float().mean().item())
    assert result["top5_accuracy"] == pytest.approx((top5 == refs[:, None]).any(-1).float().mean().item())


def test_mixup_cutmix_collator_gives_smoothed_soft_labels():
    samples = [
        {"pixel_values": torch.full((3, 4, 4), 40 * i, dtype=torch.uint8), "labels": i % 3, "sample_seed": 100 + i}
        for i in range(4)
    ]
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    collator = ImageBatchCollator(3, mean, std, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    batch = collator(samples)
    assert batch["labels"].shape == (4, 3) and batch["labels"].dtype == torch.float32
    torch.testing.assert_close(batch["labels"].sum(-1), torch.ones(4))
    assert batch["labels"].min() >= 0.1 / 3 - 1e-6  # smoothing puts eps / classes on every class
    again = collator(samples)
    torch.testing.assert_close(again["pixel_values"], batch["pixel_values"])  # seeded by the samples
    # Smoothing alone: one-hot * 0.9 + 0.1 / 3, and the pixels only normalised.
    plain = ImageBatchCollator(3, mean, std, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.1)(samples)
    expected = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float() * 0.9 + 0.1 / 3
    torch.testing.assert_close(plain["labels"], expected)
    torch.testing.assert_close(plain["pixel_values"][:, 0, 0, 0], (torch.tensor([0.0, 40, 80, 120]) / 255 - 0.5) / 0.25)
    # Evaluation samples (no seed) keep integer labels.
    evaluation = collator([{k: v for k, v in s.items() if k != "sample_seed"} for s in samples])
    assert evaluation["labels"].tolist() == [0, 1, 2, 0]
