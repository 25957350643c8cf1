"""Weight-decay parameter groups (`dwvit.training.optim`, `DWTrainer.get_decay_parameter_names`) for the three families.

The rule of timm and of the original (Swin) training code: no weight decay on 1-D parameters (biases, LayerNorm and
BatchNorm scales, CaiT's LayerScale factors) and on what the model's `no_weight_decay()` names (position embeddings,
class tokens, Swin's relative-position bias tables); everything else (Linear and Conv2d weights, the depth-wise
shortcut kernels, the patch projection) decays. The expectations below are written out by name, not by shape.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageClassification, TrainingArguments

from dwvit import DWCaiTConfig, DWSwinConfig, DWViTConfig
from dwvit.training.optim import decay_parameter_names
from dwvit.training.trainer import DWTrainer

WEIGHT_DECAY = 0.05

# The small configurations of tests/test_dwvit.py, test_dwcait.py and test_dwswin.py.
VIT = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
           intermediate_size=96)
CAIT = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_class_attention_layers=2,
            num_attention_heads=4, intermediate_size=64)
SWIN = dict(image_size=32, patch_size=2, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
            drop_path_rate=0.0)


def shortcut_names(prefix: str, count: int, kernels: int = 1) -> tuple[list[str], list[str]]:
    """(decayed, not decayed) names of `count` shortcut modules with `kernels` branches each under `prefix`."""
    decayed, plain = [], []
    for index in range(count):
        for branch in range(kernels):
            base = f"{prefix}.shortcuts.{index}.branches.{branch}"
            decayed.append(f"{base}.conv.weight")  # the depth-wise kernel, (C, 1, k, k)
            plain += [f"{base}.conv.bias", f"{base}.norm.weight", f"{base}.norm.bias"]  # BatchNorm affine
    return decayed, plain


def vit_expectation(layers: int, kernels: int = 1) -> tuple[set[str], set[str]]:
    decayed = ["dwvit.embeddings.patch_embeddings.projection.weight", "classifier.weight"]
    plain = ["dwvit.embeddings.cls_token", "dwvit.embeddings.position_embeddings",
             "dwvit.embeddings.patch_embeddings.projection.bias", "dwvit.layernorm.weight", "dwvit.layernorm.bias",
             "classifier.bias"]
    for i in range(layers):
        block = f"dwvit.encoder.layers.{i}"
        decayed += [f"{block}.{name}.weight" for name in ("attention.qkv", "attention.out_proj", "mlp.fc1", "mlp.fc2")]
        plain += [f"{block}.{name}.bias" for name in ("attention.qkv", "attention.out_proj", "mlp.fc1", "mlp.fc2")]
        plain += [f"{block}.{norm}.{p}" for norm in ("layernorm_before", "layernorm_after") for p in ("weight", "bias")]
    more_decayed, more_plain = shortcut_names("dwvit.encoder", layers, kernels)
    return set(decayed + more_decayed), set(plain + more_plain)


def cait_expectation(layers: int, class_layers: int, layer_scale: bool, talking_heads: bool, position: bool):
    decayed = ["dwcait.embeddings.patch_embeddings.projection.weight", "classifier.weight"]
    plain = ["dwcait.embeddings.cls_token", "dwcait.embeddings.patch_embeddings.projection.bias",
             "dwcait.layernorm.weight", "dwcait.layernorm.bias", "classifier.bias"]
    if position:
        plain.append("dwcait.embeddings.position_embeddings")

    def block(base: str, linears: list[str]):
        nonlocal decayed, plain
        decayed += [f"{base}.{name}.weight" for name in linears]
        plain += [f"{base}.{name}.bias" for name in linears]
        plain += [f"{base}.{norm}.{p}" for norm in ("layernorm_before", "layernorm_after") for p in ("weight", "bias")]
        if layer_scale:  # LayerScale factors (timm's gamma_1/gamma_2): 1-D, not decayed
            plain += [f"{base}.layer_scale1.lambda1", f"{base}.layer_scale2.lambda1"]

    for i in range(layers):
        linears = ["attention.qkv", "attention.out_proj", "mlp.fc1", "mlp.fc2"]
        if talking_heads:  # heads x heads Linear layers: their weights decay (as in timm), their biases do not
            linears += ["attention.talking_heads_pre_softmax", "attention.talking_heads_post_softmax"]
        block(f"dwcait.encoder.layers.{i}", linears)
    for i in range(class_layers):
        block(f"dwcait.encoder.class_attention_layers.{i}",
              ["attention.query", "attention.key", "attention.value", "attention.out_proj", "mlp.fc1", "mlp.fc2"])
    more_decayed, more_plain = shortcut_names("dwcait.encoder", layers)
    return set(decayed + more_decayed), set(plain + more_plain)


def swin_expectation(depths: list[int], absolute: bool = False):
    decayed = ["dwswin.embeddings.patch_embeddings.projection.weight", "classifier.weight"]
    plain = ["dwswin.embeddings.patch_embeddings.projection.bias", "dwswin.embeddings.norm.weight",
             "dwswin.embeddings.norm.bias", "dwswin.layernorm.weight", "dwswin.layernorm.bias", "classifier.bias"]
    if absolute:
        plain.append("dwswin.embeddings.position_embeddings")
    for stage, depth in enumerate(depths):
        prefix = f"dwswin.encoder.layers.{stage}"
        for i in range(depth):
            base = f"{prefix}.blocks.{i}"
            linears = ("attention.qkv", "attention.out_proj", "mlp.fc1", "mlp.fc2")
            decayed += [f"{base}.{name}.weight" for name in linears]
            plain += [f"{base}.{name}.bias" for name in linears]
            plain += [f"{base}.{n}.{p}" for n in ("layernorm_before", "layernorm_after") for p in ("weight", "bias")]
            plain.append(f"{base}.attention.relative_position_bias_table")  # 2-D, but never decayed
        more_decayed, more_plain = shortcut_names(prefix, depth)
        decayed += more_decayed
        plain += more_plain
        if stage < len(depths) - 1:  # patch merging: a bias-free Linear and a LayerNorm
            decayed.append(f"{prefix}.downsample.reduction.weight")
            plain += [f"{prefix}.downsample.norm.weight", f"{prefix}.downsample.norm.bias"]
    return set(decayed), set(plain)


CASES = {
    "dwvit": (DWViTConfig(**VIT, num_labels=5), vit_expectation(4)),
    "dwvit-kernels-3-5-no-position": (
        DWViTConfig(**VIT, num_labels=5, dw_kernel_sizes=[3, 5], use_position_embeddings=False),
        tuple(s - {"dwvit.embeddings.position_embeddings"} for s in vit_expectation(4, kernels=2)),
    ),
    "dwcait-paper-small-data": (
        DWCaiTConfig(**CAIT, num_labels=5, use_layer_scale=False, use_talking_heads=False,
                     use_position_embeddings=False),
        cait_expectation(4, 2, layer_scale=False, talking_heads=False, position=False),
    ),
    "dwcait-full": (
        DWCaiTConfig(**CAIT, num_labels=5, use_layer_scale=True, use_talking_heads=True, use_position_embeddings=True),
        cait_expectation(4, 2, layer_scale=True, talking_heads=True, position=True),
    ),
    "dwswin": (DWSwinConfig(**SWIN, num_labels=5), swin_expectation([2, 2])),
    "dwswin-absolute-position": (
        DWSwinConfig(**SWIN, num_labels=5, use_absolute_embeddings=True), swin_expectation([2, 2], absolute=True)
    ),
}


def build(config):
    torch.manual_seed(0)
    return AutoModelForImageClassification.from_config(config)


@pytest.mark.parametrize("case", sorted(CASES))
def test_decay_parameter_names_are_the_expected_ones(case):
    config, (decayed, plain) = CASES[case]
    model = build(config)
    names = {name for name, _ in model.named_parameters()}
    assert not decayed & plain
    assert decayed | plain == names, (sorted(names - decayed - plain), sorted((decayed | plain) - names))
    assert set(decay_parameter_names(model)) == decayed
    # Every decayed parameter is a matrix or a kernel; the shortcut's depth-wise kernels are 4-D.
    parameters = dict(model.named_parameters())
    assert all(parameters[name].ndim >= 2 for name in decayed)
    assert any(parameters[name].ndim == 4 and ".shortcuts." in name for name in decayed)


@pytest.mark.parametrize("case", ["dwvit", "dwcait-full", "dwswin-absolute-position"])
def test_no_weight_decay_names_the_embeddings_tokens_and_tables(case):
    config, (_, plain) = CASES[case]
    model = build(config)
    parameters = dict(model.named_parameters())
    skip = set(model.no_weight_decay())
    assert skip <= plain and skip <= set(parameters)
    # Every multi-dimensional parameter that is not decayed must come from no_weight_decay().
    assert {name for name in plain if parameters[name].ndim >= 2} <= skip


def test_wrapped_models_keep_their_prefix():
    config, (decayed, _) = CASES["dwswin"]
    model = build(config)
    compiled = torch.compile(model)  # compiles lazily: nothing runs here
    assert set(decay_parameter_names(compiled)) == {f"_orig_mod.{name}" for name in decayed}
    parallel = nn.DataParallel(model)  # on a machine without GPUs it only holds the model
    assert set(decay_parameter_names(parallel)) == {f"module.{name}" for name in decayed}


def test_a_wrong_no_weight_decay_name_is_an_error():
    model = build(CASES["dwvit"][0])
    model.no_weight_decay = lambda: {"embeddings.cls_token"}  # missing the base-model prefix
    with pytest.raises(ValueError, match="embeddings.cls_token"):
        decay_parameter_names(model)


@pytest.mark.parametrize("case", ["dwvit", "dwcait-full", "dwswin"])
def test_trainer_optimizer_has_the_groups(case, tmp_path):
    config, (decayed, plain) = CASES[case]
    model = build(config)
    frozen = "classifier.bias"
    model.get_parameter(frozen).requires_grad_(False)
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=WEIGHT_DECAY, learning_rate=1e-3, use_cpu=True,
                             report_to=[], optim="adamw_torch")
    trainer = DWTrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    groups = {}
    for group in optimizer.param_groups:
        groups.setdefault(group["weight_decay"], set()).update(names[id(p)] for p in group["params"])
    assert set(groups) == {WEIGHT_DECAY, 0.0}
    assert groups[WEIGHT_DECAY] == decayed
    assert groups[0.0] == plain - {frozen}  # frozen parameters are in neither group
