"""`dwvit.from_transformers`: a transformers ViT or Swin becomes the DW model of the same size with every weight,
plus new shortcuts; exact with `dw_init="zeros"`, fine-tunable, and usable from run_image_classification.py."""

from __future__ import annotations

import json
import logging
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageClassification,
    BertConfig,
    DeiTConfig,
    DeiTModel,
    SwinBackbone,
    SwinConfig,
    SwinForImageClassification,
    SwinModel,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTModel,
)

import dwvit
from dwvit import (
    DWSwinBackbone,
    DWSwinForImageClassification,
    DWSwinModel,
    DWViTForImageClassification,
    DWViTModel,
)
from dwvit.conversion.from_transformers import SUPPORTED_CLASSES, convert_state_dict, map_state_dict
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
import run_image_classification as ric  # noqa: E402

LOGGER = "dwvit.from_transformers"
NAMES = ["cat", "dog", "fox"]
LABELS = dict(id2label=dict(enumerate(NAMES)), label2id={name: i for i, name in enumerate(NAMES)})


def vit_config(**overrides) -> ViTConfig:
    fields = dict(
        image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=96, hidden_act="gelu_new", layer_norm_eps=1e-6, **LABELS,
    )
    return ViTConfig(**{**fields, **overrides})


def swin_config(**overrides) -> SwinConfig:
    # A 16x16 then 8x8 grid, both larger than the 4x4 window, so every second block shifts.
    fields = dict(
        image_size=32, patch_size=2, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], mlp_ratio=2.0,
        drop_path_rate=0.0, use_absolute_embeddings=True, out_features=["stem", "stage1", "stage2"], **LABELS,
    )
    return SwinConfig(**{**fields, **overrides})


SOURCES = {
    "ViTForImageClassification": (ViTForImageClassification, vit_config, DWViTForImageClassification),
    "ViTModel": (ViTModel, vit_config, DWViTModel),
    "SwinForImageClassification": (SwinForImageClassification, swin_config, DWSwinForImageClassification),
    "SwinModel": (SwinModel, swin_config, DWSwinModel),
    "SwinBackbone": (SwinBackbone, swin_config, DWSwinBackbone),
}


def source_model(name: str, seed: int = 0, **config_overrides):
    """A random transformers model with every parameter perturbed (biases, LayerNorms, the bias tables and the
    ViT pooler are otherwise at their plain initial values)."""
    model_class, make_config, _ = SOURCES[name]
    torch.manual_seed(seed)
    model = model_class(make_config(**config_overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def outputs(model, pixel_values) -> list[torch.Tensor]:
    """What the two models must agree on: logits, or last_hidden_state, or the backbone's feature maps."""
    with torch.no_grad():
        result = model(pixel_values)
    if hasattr(result, "feature_maps"):
        return list(result.feature_maps)
    return [result.logits] if hasattr(result, "logits") else [result.last_hidden_state]


def shortcut_convs(model) -> list[torch.nn.Conv2d]:
    return [module for module in model.modules() if isinstance(module, torch.nn.Conv2d) and module.groups > 1]


# --------------------------------------------------------------------------------------------------------------
# (a), (b): the same function with dw_init="zeros", a different (finite) one with "paper".


@pytest.mark.parametrize("given_as", ["instance", "folder"])
@pytest.mark.parametrize("name", list(SOURCES))
def test_zeros_init_computes_what_the_source_computes(name, given_as, tmp_path):
    source = source_model(name)
    expected_class = SOURCES[name][2]
    if given_as == "folder":
        source.save_pretrained(tmp_path / "source")
        model = dwvit.from_transformers(tmp_path / "source", dw_init="zeros")
    else:
        model = dwvit.from_transformers(source, dw_init="zeros")
    assert type(model) is expected_class and not model.training
    assert model.config.dw_init == "zeros" and model.config.use_dw_shortcut
    assert shortcut_convs(model) and all(not conv.weight.any() and not conv.bias.any() for conv in shortcut_convs(model))
    pixel_values = torch.randn(2, 3, 32, 32)
    ours, theirs = outputs(model, pixel_values), outputs(source, pixel_values)
    assert len(ours) == len(theirs)
    for our_output, their_output in zip(ours, theirs):
        assert our_output.shape == their_output.shape
        torch.testing.assert_close(our_output, their_output, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["ViTForImageClassification", "SwinForImageClassification", "ViTModel"])
def test_paper_init_differs_and_is_finite(name):
    source = source_model(name, seed=1)
    model = dwvit.from_transformers(source)  # dw_init="paper", the default
    assert model.config.dw_init == "paper"
    assert all(conv.weight.abs().sum() > 0 for conv in shortcut_convs(model))
    pixel_values = torch.randn(2, 3, 32, 32)
    (ours,), (theirs,) = outputs(model, pixel_values), outputs(source, pixel_values)
    assert torch.isfinite(ours).all()
    assert (ours - theirs).abs().max() > 1e-3


def test_config_is_copied_and_overrides_apply():
    vit = source_model("ViTForImageClassification", qkv_bias=False, hidden_dropout_prob=0.1)
    model = dwvit.from_transformers(vit, dw_init="zeros", dw_kernel_sizes=[3, 5], dw_block_span=2)
    config = model.config
    for field in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "hidden_act", "layer_norm_eps", "qkv_bias", "hidden_dropout_prob"):
        assert getattr(config, field) == getattr(vit.config, field), field
    assert config.qkv_bias is False and config.hidden_act == "gelu_new" and config.layer_norm_eps == 1e-6
    assert config.id2label == {0: "cat", 1: "dog", 2: "fox"} and config.label2id == {"cat": 0, "dog": 1, "fox": 2}
    assert config.pooling == "cls" and config.use_position_embeddings
    assert config.dw_kernel_sizes == [3, 5] and config.dw_block_span == 2
    # Two branches per shortcut, one shortcut per two blocks, still exact at the start.
    assert len(shortcut_convs(model)) == 2
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(outputs(model, pixel_values)[0], outputs(vit, pixel_values)[0], atol=1e-5, rtol=0)

    swin = source_model("SwinForImageClassification", qkv_bias=False, drop_path_rate=0.2)
    config = dwvit.from_transformers(swin).config
    for field in ("embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "qkv_bias", "drop_path_rate",
                  "use_absolute_embeddings", "layer_norm_eps"):
        assert getattr(config, field) == getattr(swin.config, field), field
    assert config.patch_norm and config.use_shifted_windows


def test_swin_with_another_layer_norm_eps_converts_with_a_warning(caplog):
    """transformers' Swin ignores layer_norm_eps in its patch-embedding and patch-merging norms; DWSwin does not."""
    source = source_model("SwinModel", layer_norm_eps=1e-6)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = dwvit.from_transformers(source, dw_init="zeros")
    assert "layer_norm_eps is 1e-06" in caplog.text and "differ slightly" in caplog.text
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(outputs(model, pixel_values)[0], outputs(source, pixel_values)[0], atol=1e-3, rtol=0)


def test_dtype_follows_the_source():
    source = source_model("ViTForImageClassification").to(torch.bfloat16)
    model = dwvit.from_transformers(source, dw_init="zeros")
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------------------------------------------------
# Checkpoints as they are on the Hub (the older transformers key format), the pooler, a new label set.


def legacy_key(name: str) -> str:
    """transformers' key names before the v5 rename (what `google/vit-*` and `microsoft/swin-*` hold)."""
    name = re.sub(r"(^|\.)layers\.(\d+)\.(?=(attention|layernorm|mlp))", r"\1encoder.layer.\2.", name)
    swin = ".blocks." in name
    for new, old in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        name = name.replace(f"attention.{new}", f"attention.{'self' if swin else 'attention'}.{old}")
    name = name.replace("attention.relative_position_bias.relative_position_bias_table",
                        "attention.self.relative_position_bias_table")
    name = name.replace("attention.o_proj", "attention.output.dense")
    return name.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")


@pytest.mark.parametrize("name", ["ViTForImageClassification", "ViTModel", "SwinForImageClassification"])
def test_folders_in_the_older_key_format_convert(name, tmp_path, caplog):
    source = source_model(name, seed=2)
    source.save_pretrained(tmp_path)
    weights = {legacy_key(key): tensor for key, tensor in load_file(tmp_path / "model.safetensors").items()}
    assert any(".attention.attention.query." in key or ".attention.self.query." in key for key in weights)
    if name.startswith("Swin"):  # older Swin checkpoints also hold the (derived) relative position index
        for key in [key for key in weights if key.endswith("relative_position_bias_table")]:
            weights[key.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(
                16 * 16, dtype=torch.long
            )
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = dwvit.from_transformers(tmp_path, dw_init="zeros")
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(outputs(model, pixel_values)[0], outputs(source, pixel_values)[0], atol=1e-5, rtol=0)
    # The ViTModel checkpoint holds a trained pooler: dropped, and said so.
    assert ("pooler.dense.weight" in caplog.text) == (name == "ViTModel")


def test_vit_pooler_is_dropped_with_a_warning_only_when_present(tmp_path, caplog):
    with_pooler = source_model("ViTModel", seed=3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = dwvit.from_transformers(with_pooler, dw_init="zeros")
    assert "Dropping pooler.dense.bias, pooler.dense.weight" in caplog.text and "no DW counterpart" in caplog.text
    assert not any("pooler" in key for key in model.state_dict())
    caplog.clear()

    torch.manual_seed(3)
    ViTModel(vit_config(), add_pooling_layer=False).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dwvit.from_transformers(tmp_path, dw_init="zeros")
    assert "pooler" not in caplog.text


def test_a_new_label_set_gets_a_new_classifier(caplog):
    source = source_model("ViTForImageClassification", seed=4)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model = dwvit.from_transformers(source, dw_init="zeros", id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    assert "label set changes (3 -> 2 classes)" in caplog.text
    assert model.classifier.weight.shape == (2, 48) and model.config.id2label == {0: "a", 1: "b"}
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.dwvit(pixel_values).last_hidden_state
        theirs = source.vit(pixel_values).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# (e) and the other errors: nothing unsupported, unmapped or unfilled passes quietly.


def test_unsupported_models_name_the_supported_types(tmp_path):
    supported = "ViTForImageClassification, ViTModel, SwinForImageClassification, SwinModel"
    deit = DeiTModel(DeiTConfig(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=1,
                                num_attention_heads=3, intermediate_size=96))
    with pytest.raises(ValueError, match=f"converts transformers {supported}.*got DeiTModel \\(model_type 'deit'\\)"):
        dwvit.from_transformers(deit)

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ValueError, match=f"{supported}.*holds a 'bert' model"):
        dwvit.from_transformers(tmp_path / "bert")

    ViTForMaskedImageModeling(vit_config()).save_pretrained(tmp_path / "mim")
    with pytest.raises(ValueError, match=f"{supported}.*saved from ViTForMaskedImageModeling"):
        dwvit.from_transformers(tmp_path / "mim")

    dw = dwvit.from_transformers(source_model("ViTModel"))
    with pytest.raises(ValueError, match="already a DW model"):
        dwvit.from_transformers(dw)
    dw.save_pretrained(tmp_path / "dw")
    with pytest.raises(ValueError, match="already holds a DW model"):
        dwvit.from_transformers(tmp_path / "dw")
    with pytest.raises(TypeError, match="must be a transformers model"):
        dwvit.from_transformers(12)
    assert set(SUPPORTED_CLASSES) == set(SOURCES)


def test_a_tensor_outside_the_key_map_is_an_error_not_dropped():
    source = source_model("ViTForImageClassification")
    source.vit.extra_scale = torch.nn.Parameter(torch.ones(48))
    with pytest.raises(ValueError, match=r"1 tensor\(s\) .* no row in the key map.*vit\.extra_scale"):
        dwvit.from_transformers(source)
    with pytest.raises(ValueError, match="no row in the key map.*encoder.layer.0.attention.attention.query.weight"):
        map_state_dict({"encoder.layer.0.attention.attention.query.weight": torch.zeros(1)}, "vit", base_prefix=None)


def test_overrides_the_weights_cannot_fill_are_errors():
    vit = source_model("ViTForImageClassification", qkv_bias=False)
    with pytest.raises(ValueError, match=r"nothing fills dwvit\.encoder\.layers\.0\.attention\.qkv\.bias"):
        dwvit.from_transformers(vit, qkv_bias=True)
    with pytest.raises(ValueError, match=r"shapes differ for .*hidden_size|shapes differ"):
        dwvit.from_transformers(vit, hidden_size=96, num_attention_heads=3)
    with pytest.raises(ValueError, match=r"the model has no dwvit\.embeddings\.position_embeddings"):
        dwvit.from_transformers(vit, use_position_embeddings=False)
    with pytest.raises(ValueError, match="Unknown DWViTConfig field.*dw_int"):
        dwvit.from_transformers(vit, dw_int="zeros")
    with pytest.raises(ValueError, match="dw_init must be one of"):
        dwvit.from_transformers(vit, dw_init="ones")


def test_convert_state_dict_fills_every_tensor_but_the_shortcuts():
    """The function the faithfulness tests (tests/test_dwvit.py, tests/test_dwswin.py) load transformers' weights with."""
    for name in ("ViTForImageClassification", "SwinModel"):
        source = source_model(name)
        target = dwvit.from_transformers(source).state_dict()
        assert set(convert_state_dict(source)) == {key for key in target if ".shortcuts." not in key}


# --------------------------------------------------------------------------------------------------------------
# (c) the converted model fine-tunes with the Trainer.


class ColourDataset(torch.utils.data.Dataset):
    """Learnable synthetic images: class k is noise with a brighter channel k."""

    def __init__(self, count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(count) % 3
        self.images = torch.randn(count, 3, 32, 32, generator=generator) * 0.5
        self.images[torch.arange(count), self.labels] += 1.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


@pytest.mark.parametrize("name", ["ViTForImageClassification", "SwinForImageClassification"])
def test_trainer_fine_tunes_the_converted_model(name, tmp_path):
    torch.manual_seed(5)
    model = dwvit.from_transformers(source_model(name, seed=5), dw_init="zeros")
    train, held_out = ColourDataset(48, seed=0), ColourDataset(24, seed=1)
    arguments = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=12, num_train_epochs=4, learning_rate=2e-3,
        warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=False, use_cpu=True, seed=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=train, eval_dataset=held_out)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert after < 0.7 * before, (before, after)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    # The shortcuts, started at zero, learn too; all but ViT's last, which feeds only patch tokens that the
    # class-token classifier never reads (so it gets no gradient in any DWViT classifier with pooling="cls").
    learned = [bool(conv.weight.any()) for conv in shortcut_convs(model)]
    assert learned == ([True] * (len(learned) - 1) + [name.startswith("Swin")])


# --------------------------------------------------------------------------------------------------------------
# (d) run_image_classification.py converts a transformers folder on load.


def image_folder(root, per_class: int, seed: int):
    """Class folders of 32x32 images, each class a colour with noise."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(NAMES):
        (root / name).mkdir(parents=True)
        for item in range(per_class):
            pixels = rng.integers(0, 96, size=(32, 32, 3))
            pixels[..., index] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{item}.png")
    return root


QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--log_level", "info"]


def test_script_fine_tunes_a_transformers_vit_folder(tmp_path, caplog):
    source = source_model("ViTForImageClassification", seed=6, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    source.save_pretrained(tmp_path / "vit")
    train = image_folder(tmp_path / "train", per_class=8, seed=0)
    output_dir = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        metrics = ric.main([
            "--model_name_or_path", str(tmp_path / "vit"), "--config_overrides", "dw_init=zeros",
            "--train_dir", str(train), "--output_dir", str(output_dir), "--do_train",
            "--per_device_train_batch_size", "12", "--num_train_epochs", "1", "--logging_steps", "1",
            "--save_strategy", "no", *QUIET,
        ])
    assert "Converted the transformers vit checkpoint" in caplog.text
    assert "New label set (3 classes)" in caplog.text
    assert np.isfinite(metrics["train_loss"])
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == "dwvit" and config["dw_init"] == "zeros"
    assert config["architectures"] == ["DWViTForImageClassification"]
    assert sorted(config["id2label"].values()) == NAMES
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    assert type(model) is DWViTForImageClassification
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32)).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert all(torch.isfinite(tensor).all() for tensor in model.state_dict().values() if tensor.is_floating_point())


@pytest.mark.parametrize("name", ["SwinForImageClassification", "ViTModel"])
def test_script_keeps_the_pretrained_weights(name, tmp_path):
    """Without training, the saved DW model is the converted one: with dw_init=zeros it computes what the source
    computes (the logits, when the labels match the folder's; a ViTModel's last_hidden_state under a new head)."""
    source = source_model(name, seed=7)  # labelled cat, dog, fox like the folder
    source.save_pretrained(tmp_path / "source")
    folder = image_folder(tmp_path / "images", per_class=2, seed=1)
    ric.main([
        "--model_name_or_path", str(tmp_path / "source"), "--config_overrides", "dw_init=zeros,dw_kernel_sizes=[3,5]",
        "--train_dir", str(folder), "--validation_dir", str(folder), "--output_dir", str(tmp_path / "out"),
        "--do_eval", *QUIET,
    ])
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert model.config.dw_kernel_sizes == [3, 5] and model.config.dw_init == "zeros"
    pixel_values = torch.randn(2, 3, 32, 32)
    if name == "ViTModel":
        assert type(model) is DWViTForImageClassification
        ours, theirs = outputs(model.dwvit, pixel_values), outputs(source, pixel_values)
    else:
        assert type(model) is DWSwinForImageClassification
        ours, theirs = outputs(model, pixel_values), outputs(source, pixel_values)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# The documentation's example runs.


def test_docs_snippet_runs(tmp_path, monkeypatch, capsys):
    text = (REPO_ROOT / "docs" / "conversion.md").read_text()
    section = text.split("## From a transformers checkpoint", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/conversion.md", "exec"), {})
    assert "DWViTForImageClassification dwvit True" in capsys.readouterr().out
    assert (tmp_path / "vit-small-dw" / "config.json").is_file()
