"""Conversion of the original training code's checkpoints.

Checkpoints are built here in the original format from its documented layout (random weights, a yacs-style
config pickled under the name `yacs.config.CfgNode`), and every converted model is compared with a forward pass
written below in plain torch functional ops straight from the original state dict.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModelForImageClassification

from dwvit.conversion.original_checkpoint import (
    UnsafeCheckpointError,
    build_converted_model,
    convert_original_checkpoint,
    convert_original_state_dict,
    load_original_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-5
# Both sides run in float64; the bound leaves room only for attention softmaxes that the models compute in float32.
# A conversion error (a transposed mixing matrix, a permuted patch kernel) moves logits by O(1).
TOL = dict(rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# A config object pickled the way the original code's yacs CfgNode is
# --------------------------------------------------------------------------------------------------------------


class _FakeCfgNode(dict):
    """Pickles byte-for-byte like `yacs.config.CfgNode`: a dict subclass with the same bookkeeping attributes."""

    def __init__(self, items=None):
        super().__init__(items or {})
        self.__dict__.update(
            {"__immutable__": False, "__deprecated_keys__": set(), "__renamed_keys__": {}, "__new_allowed__": False}
        )

    def __getattr__(self, name):
        if name in self:
            return self[name]
        raise AttributeError(name)

    def __setattr__(self, name, value):
        self[name] = value


_FakeCfgNode.__module__ = "yacs.config"
_FakeCfgNode.__name__ = _FakeCfgNode.__qualname__ = "CfgNode"


@pytest.fixture
def cfg_node(monkeypatch):
    """A CfgNode class whose pickles name `yacs.config.CfgNode`, as the original training code's do."""
    package = types.ModuleType("yacs")
    module = types.ModuleType("yacs.config")
    module.CfgNode = _FakeCfgNode
    package.config = module
    monkeypatch.setitem(sys.modules, "yacs", package)
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    return _FakeCfgNode


def make_config(node, model_type: str, image_size: int, num_classes: int, section: dict, dataset="cifar10"):
    """The parts of the original config.py that conversion reads, plus some it does not."""
    cfg = node()
    cfg.DATA = node({"DATASET": dataset, "IMG_SIZE": image_size, "INTERPOLATION": "bicubic", "BATCH_SIZE": 128})
    cfg.MODEL = node({"TYPE": model_type, "NAME": f"{model_type}_test", "NUM_CLASSES": num_classes, "DROP_RATE": 0.0})
    name = {"vit": "ViT", "vit_s": "ViT_S", "cait_xxs": "CaiT_XXS", "swin": "SWIN"}[model_type]
    cfg.MODEL[name] = node(section)
    cfg.TRAIN = node({"EPOCHS": 300, "OPTIMIZER": node({"NAME": "adamw", "BETAS": (0.9, 0.999)})})
    cfg.__dict__["__immutable__"] = True  # the training code freezes its config
    return cfg


def save_original_checkpoint(path: Path, state_dict: dict, config) -> Path:
    """`torch.save` of the dict the original training code writes, with real optimizer/scheduler/scaler state."""
    params = [torch.nn.Parameter(t.clone()) for t in state_dict.values() if t.is_floating_point()][:3]
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.05)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    checkpoint = {
        "model": state_dict,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "max_accuracy": 91.25,
        "scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 7,
        },
        "epoch": 299,
    }
    if config is not None:
        checkpoint["config"] = config
    torch.save(checkpoint, path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Original-format state dicts with random weights
# --------------------------------------------------------------------------------------------------------------


def _linear(sd, name, out_features, in_features, bias=True, scale=None):
    scale = scale if scale is not None else in_features**-0.5
    sd[f"{name}.weight"] = torch.randn(out_features, in_features) * scale
    if bias:
        sd[f"{name}.bias"] = torch.randn(out_features) * 0.1


def _layer_norm(sd, name, width):
    sd[f"{name}.weight"] = 1.0 + 0.2 * torch.randn(width)
    sd[f"{name}.bias"] = 0.1 * torch.randn(width)


def _shortcut(sd, prefix, index, width):
    sd[f"{prefix}.batchnorms.{index}.weight"] = 1.0 + 0.2 * torch.randn(width)
    sd[f"{prefix}.batchnorms.{index}.bias"] = 0.1 * torch.randn(width)
    sd[f"{prefix}.batchnorms.{index}.running_mean"] = 0.1 * torch.randn(width)
    sd[f"{prefix}.batchnorms.{index}.running_var"] = 0.5 + torch.rand(width)
    sd[f"{prefix}.batchnorms.{index}.num_batches_tracked"] = torch.tensor(1234)
    sd[f"{prefix}.convs.{index}.weight"] = 0.3 * torch.randn(width, 1, 3, 3)
    sd[f"{prefix}.convs.{index}.bias"] = 0.1 * torch.randn(width)


def original_vit_state_dict(dim=32, depth=2, heads=4, mlp_dim=64, patch=4, image=16, num_classes=5, channels=3):
    num_patches = (image // patch) ** 2
    sd = {"cls_token": torch.randn(1, 1, dim), "pos_embedding": torch.randn(1, 1 + num_patches, dim)}
    _linear(sd, "to_patch_embedding.1", dim, patch * patch * channels)
    for i in range(depth):
        _layer_norm(sd, f"transformer.layers.{i}.0.norm", dim)
        _linear(sd, f"transformer.layers.{i}.0.fn.to_qkv", 3 * dim, dim, bias=False)
        _linear(sd, f"transformer.layers.{i}.0.fn.to_out.0", dim, dim)
        _layer_norm(sd, f"transformer.layers.{i}.1.norm", dim)
        _linear(sd, f"transformer.layers.{i}.1.fn.net.0", mlp_dim, dim)
        _linear(sd, f"transformer.layers.{i}.1.fn.net.3", dim, mlp_dim)
        _shortcut(sd, "transformer", i, dim)
    _layer_norm(sd, "mlp_head.0", dim)
    _linear(sd, "mlp_head.1", num_classes, dim)
    return sd


# --------------------------------------------------------------------------------------------------------------
# Reference forward passes of the original models, in plain functional ops
# --------------------------------------------------------------------------------------------------------------


def _patchify(images, patch):
    """`b c (h p1) (w p2) -> b (h w) (p1 p2 c)`."""
    b, c, height, width = images.shape
    grid = images.reshape(b, c, height // patch, patch, width // patch, patch)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(b, (height // patch) * (width // patch), patch * patch * c)


def _ln(sd, name, x):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], EPS)


def _lin(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _split_heads(t, heads):
    b, n, width = t.shape
    return t.reshape(b, n, heads, width // heads).transpose(1, 2)


def _merge_heads(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _dw_shortcut(sd, prefix, index, tokens, height, width):
    """GELU -> BatchNorm (running statistics) -> 3x3 depth-wise conv on the tokens' grid."""
    b, n, c = tokens.shape
    grid = tokens.transpose(1, 2).reshape(b, c, height, width)
    grid = F.gelu(grid)
    bn = f"{prefix}.batchnorms.{index}"
    grid = F.batch_norm(
        grid, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"], False, 0.0, EPS
    )
    conv = f"{prefix}.convs.{index}"
    grid = F.conv2d(grid, sd[f"{conv}.weight"], sd[f"{conv}.bias"], padding=1, groups=c)
    return grid.reshape(b, c, n).transpose(1, 2)


def reference_vit_logits(sd, images, heads, patch):
    x = _lin(sd, "to_patch_embedding.1", _patchify(images, patch))
    b, _, dim = x.shape
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1) + sd["pos_embedding"]
    height, width = images.shape[2] // patch, images.shape[3] // patch
    depth = len([k for k in sd if k.endswith(".0.fn.to_qkv.weight")])
    for i in range(depth):
        block = f"transformer.layers.{i}"
        shortcut = _dw_shortcut(sd, "transformer", i, x[:, 1:], height, width)
        q, k, v = (
            _split_heads(t, heads)
            for t in _lin(sd, f"{block}.0.fn.to_qkv", _ln(sd, f"{block}.0.norm", x)).chunk(3, -1)
        )
        attn = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5, dim=-1)
        x = x + _lin(sd, f"{block}.0.fn.to_out.0", _merge_heads(attn @ v))
        x = x + _lin(sd, f"{block}.1.fn.net.3", F.gelu(_lin(sd, f"{block}.1.fn.net.0", _ln(sd, f"{block}.1.norm", x))))
        x = x + torch.cat([torch.zeros_like(x[:, :1]), shortcut], dim=1)
    return _lin(sd, "mlp_head.1", _ln(sd, "mlp_head.0", x[:, 0]))


def _double(sd):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}


def _converted_logits(model, images):
    with torch.no_grad():
        return model.double()(pixel_values=images.double()).logits


# --------------------------------------------------------------------------------------------------------------
# ViT
# --------------------------------------------------------------------------------------------------------------

VIT_SIZES = dict(dim=32, depth=2, heads=4, mlp_dim=64, patch=4, image=16, num_classes=5)


def _vit_section(sizes):
    return {
        "PATCH_SIZE": sizes["patch"],
        "DIM": sizes["dim"],
        "DEPTHS": sizes["depth"],
        "NUM_HEADS": sizes["heads"],
        "MLP_DIM": sizes["mlp_dim"],
        "DIM_HEAD": sizes["dim"] // sizes["heads"],
    }


@pytest.mark.parametrize("model_type", ["vit", "vit_s"])
def test_vit_checkpoint_converts_to_the_same_function(tmp_path, cfg_node, model_type):
    torch.manual_seed(0)
    sd = original_vit_state_dict(**VIT_SIZES)
    config = make_config(cfg_node, model_type, VIT_SIZES["image"], VIT_SIZES["num_classes"], _vit_section(VIT_SIZES))
    path = save_original_checkpoint(tmp_path / "ckpt_epoch_299.pth", sd, config)

    checkpoint = load_original_checkpoint(path)
    assert checkpoint.config["MODEL"]["TYPE"] == model_type
    assert checkpoint.extras == {"epoch": 299, "max_accuracy": 91.25}
    model = build_converted_model(checkpoint)
    assert type(model).__name__ == "DWViTForImageClassification"
    assert model.config.num_attention_heads == 4 and model.config.qkv_bias is False
    assert model.config.layer_norm_eps == EPS

    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    expected = reference_vit_logits(_double(sd), images, heads=4, patch=4)
    torch.testing.assert_close(_converted_logits(model, images), expected, **TOL)


def test_converted_folder_loads_with_processor_and_labels(tmp_path, cfg_node):
    torch.manual_seed(1)
    sd = original_vit_state_dict(**VIT_SIZES)
    config = make_config(cfg_node, "vit", 16, 5, _vit_section(VIT_SIZES), dataset="cifar100")
    path = save_original_checkpoint(tmp_path / "ckpt.pth", sd, config)
    names = ["apple", "bee", "cat", "dog", "eel"]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")

    out = convert_original_checkpoint(path, tmp_path / "converted", labels=tmp_path / "labels.txt")

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert {"configuration_dwvit.py", "modeling_dwvit.py", "dw_layers.py"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")]
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == dict(enumerate(names))
    assert "AutoModelForImageClassification" in model.config.auto_map
    processor = AutoImageProcessor.from_pretrained(out)
    # DATA.DATASET is cifar100, so its statistics are used when no flag says otherwise.
    assert processor.image_mean == pytest.approx([0.5070, 0.4865, 0.4409])
    assert processor.size == {"height": 16, "width": 16}

    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = reference_vit_logits(_double(sd), images, heads=4, patch=4)
    torch.testing.assert_close(_converted_logits(model, images), expected, **TOL)


def test_genuine_yacs_config_is_read_as_plain_data(tmp_path):
    yacs_config = pytest.importorskip("yacs.config")
    torch.manual_seed(2)
    sd = original_vit_state_dict(**VIT_SIZES)
    config = make_config(yacs_config.CfgNode, "vit", 16, 5, _vit_section(VIT_SIZES))
    config.freeze()
    path = save_original_checkpoint(tmp_path / "ckpt.pth", sd, config)
    checkpoint = load_original_checkpoint(path)
    assert type(checkpoint.config) is dict and type(checkpoint.config["MODEL"]["ViT"]) is dict
    assert checkpoint.config["MODEL"]["ViT"]["NUM_HEADS"] == 4
    assert checkpoint.config["TRAIN"]["OPTIMIZER"]["BETAS"] == (0.9, 0.999)


def test_sizes_from_flags_when_the_checkpoint_has_no_config(tmp_path):
    torch.manual_seed(3)
    sd = original_vit_state_dict(**VIT_SIZES)
    path = save_original_checkpoint(tmp_path / "ckpt.pth", sd, config=None)

    with pytest.raises(ValueError, match="--heads"):
        convert_original_checkpoint(path, tmp_path / "no_heads", model_type="vit")
    with pytest.raises(ValueError, match="model_type"):
        convert_original_checkpoint(path, tmp_path / "no_type", heads=4)
    # A size contradicting the weights is refused, not silently used.
    with pytest.raises(ValueError, match="dim is 48"):
        convert_original_checkpoint(path, tmp_path / "bad_dim", model_type="vit", heads=4, dim=48)
    with pytest.raises(ValueError, match="image_size 32"):
        convert_original_checkpoint(path, tmp_path / "bad_size", model_type="vit", heads=4, image_size=32)
    assert not any(tmp_path.glob("*no_*")) and not any(tmp_path.glob("*bad_*"))

    out = convert_original_checkpoint(path, tmp_path / "converted", model_type="vit", heads=4, dataset="imagenet")
    model = AutoModelForImageClassification.from_pretrained(out)
    assert (model.config.image_size, model.config.patch_size, model.config.num_hidden_layers) == (16, 4, 2)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(
        _converted_logits(model, images), reference_vit_logits(_double(sd), images, 4, 4), **TOL
    )
    # A bare state dict (no training wrapper) converts the same way.
    torch.save(sd, tmp_path / "bare.pth")
    bare = build_converted_model(load_original_checkpoint(tmp_path / "bare.pth"), {"model_type": "vit", "heads": 4})
    torch.testing.assert_close(_converted_logits(bare, images), _converted_logits(model, images))


def test_unmapped_or_missing_tensors_are_reported(tmp_path, cfg_node):
    sd = original_vit_state_dict(**VIT_SIZES)
    config = make_config(cfg_node, "vit", 16, 5, _vit_section(VIT_SIZES))
    extra = dict(sd, **{"transformer.layers.0.0.fn.to_qkv.bias": torch.zeros(96)})
    with pytest.raises(ValueError, match="qkv bias"):
        build_converted_model(load_original_checkpoint(save_original_checkpoint(tmp_path / "a.pth", extra, config)))
    stray = dict(sd, **{"transformer.extra_norm.weight": torch.ones(32)})
    with pytest.raises(ValueError, match="transformer.extra_norm.weight"):
        build_converted_model(load_original_checkpoint(save_original_checkpoint(tmp_path / "b.pth", stray, config)))
    missing = {k: v for k, v in sd.items() if not k.startswith("transformer.convs.1")}
    with pytest.raises(ValueError, match="transformer.convs.1.weight"):
        build_converted_model(load_original_checkpoint(save_original_checkpoint(tmp_path / "c.pth", missing, config)))


# --------------------------------------------------------------------------------------------------------------
# CaiT
# --------------------------------------------------------------------------------------------------------------

CAIT_SIZES = dict(dim=32, depth=2, cls_depth=2, heads=4, mlp_dim=64, patch=4, image=16, num_classes=6)


def original_cait_state_dict(
    layer_scale, talking_heads, position_embeddings, dim, depth, cls_depth, heads, mlp_dim, patch, image, num_classes
):
    num_patches = (image // patch) ** 2
    sd = {"cls_token": torch.randn(1, 1, dim)}
    if position_embeddings:
        sd["pos_embedding"] = torch.randn(1, num_patches, dim)
    _linear(sd, "to_patch_embedding.1", dim, patch * patch * 3)
    inner = ".fn" if layer_scale else ""
    for stage, count in (("patch_transformer", depth), ("cls_transformer", cls_depth)):
        for i in range(count):
            attention, mlp = f"{stage}.layers.{i}.0", f"{stage}.layers.{i}.1"
            for branch in (attention, mlp):
                if layer_scale:
                    sd[f"{branch}.scale"] = 0.1 + 0.5 * torch.rand(1, 1, dim)
                _layer_norm(sd, f"{branch}{inner}.norm", dim)
            fn = f"{attention}{inner}.fn"
            _linear(sd, f"{fn}.to_q", dim, dim, bias=False)
            _linear(sd, f"{fn}.to_kv", 2 * dim, dim, bias=False)
            if talking_heads:
                sd[f"{fn}.mix_heads_pre_attn"] = torch.randn(heads, heads) * 0.5
                sd[f"{fn}.mix_heads_post_attn"] = torch.randn(heads, heads) * 0.5
            _linear(sd, f"{fn}.to_out.0", dim, dim)
            _linear(sd, f"{mlp}{inner}.fn.net.0", mlp_dim, dim)
            _linear(sd, f"{mlp}{inner}.fn.net.3", dim, mlp_dim)
    for i in range(depth):
        _shortcut(sd, "patch_transformer", i, dim)
    _layer_norm(sd, "mlp_head.0", dim)
    _linear(sd, "mlp_head.1", num_classes, dim)
    return sd


def reference_cait_logits(sd, images, heads, patch):
    layer_scale = "patch_transformer.layers.0.0.scale" in sd
    inner = ".fn" if layer_scale else ""
    x = _lin(sd, "to_patch_embedding.1", _patchify(images, patch))
    if "pos_embedding" in sd:
        x = x + sd["pos_embedding"]
    b, _, dim = x.shape
    height, width = images.shape[2] // patch, images.shape[3] // patch

    def attention(fn, queries, context=None):
        # Keys and values come from the (normalised) queries' own tokens, then the unnormalised context.
        tokens = queries if context is None else torch.cat([queries, context], dim=1)
        q = _split_heads(_lin(sd, f"{fn}.to_q", queries), heads)
        k, v = (_split_heads(t, heads) for t in _lin(sd, f"{fn}.to_kv", tokens).chunk(2, dim=-1))
        scores = q @ k.transpose(-1, -2) * (dim // heads) ** -0.5
        if f"{fn}.mix_heads_pre_attn" in sd:  # out[:, g] = sum_h in[:, h] * M[h, g]
            scores = torch.einsum("bhij,hg->bgij", scores, sd[f"{fn}.mix_heads_pre_attn"])
        weights = torch.softmax(scores, dim=-1)
        if f"{fn}.mix_heads_post_attn" in sd:
            weights = torch.einsum("bhij,hg->bgij", weights, sd[f"{fn}.mix_heads_post_attn"])
        return _lin(sd, f"{fn}.to_out.0", _merge_heads(weights @ v))

    def mlp(fn, y):
        return _lin(sd, f"{fn}.net.3", F.gelu(_lin(sd, f"{fn}.net.0", y)))

    def residual(branch, y, fn):
        out = fn(_ln(sd, f"{branch}{inner}.norm", y))
        return out * sd[f"{branch}.scale"] if layer_scale else out

    depth = len([k for k in sd if k.startswith("patch_transformer.convs.") and k.endswith(".weight")])
    for i in range(depth):
        block = f"patch_transformer.layers.{i}"
        shortcut = _dw_shortcut(sd, "patch_transformer", i, x, height, width)
        x = x + residual(f"{block}.0", x, lambda y: attention(f"{block}.0{inner}.fn", y))
        x = x + residual(f"{block}.1", x, lambda y: mlp(f"{block}.1{inner}.fn", y))
        x = x + shortcut
    cls = sd["cls_token"].expand(b, -1, -1)
    cls_depth = len({k.split(".")[2] for k in sd if k.startswith("cls_transformer.layers.")})
    for i in range(cls_depth):
        block = f"cls_transformer.layers.{i}"
        cls = cls + residual(f"{block}.0", cls, lambda y: attention(f"{block}.0{inner}.fn", y, context=x))
        cls = cls + residual(f"{block}.1", cls, lambda y: mlp(f"{block}.1{inner}.fn", y))
    return _lin(sd, "mlp_head.1", _ln(sd, "mlp_head.0", cls[:, 0]))


@pytest.mark.parametrize(
    "layer_scale, talking_heads, position_embeddings",
    [(True, True, True), (False, False, False)],
    ids=["original-code", "paper-small-data"],
)
def test_cait_checkpoint_converts_to_the_same_function(
    tmp_path, cfg_node, layer_scale, talking_heads, position_embeddings
):
    torch.manual_seed(5)
    sizes = CAIT_SIZES
    sd = original_cait_state_dict(layer_scale, talking_heads, position_embeddings, **{k: v for k, v in sizes.items()})
    section = {
        "PATCH_SIZE": sizes["patch"],
        "DIM": sizes["dim"],
        "DEPTHS": sizes["depth"],
        "CLS_DEPTHS": sizes["cls_depth"],
        "NUM_HEADS": sizes["heads"],
        "MLP_DIM": sizes["mlp_dim"],
        "DIM_HEAD": sizes["dim"] // sizes["heads"],
    }
    config = make_config(cfg_node, "cait_xxs", sizes["image"], sizes["num_classes"], section)
    path = save_original_checkpoint(tmp_path / "ckpt.pth", sd, config)

    out = convert_original_checkpoint(path, tmp_path / "converted", dataset="cifar10")
    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "DWCaiTForImageClassification"
    assert model.config.use_layer_scale is layer_scale and model.config.use_talking_heads is talking_heads
    assert model.config.use_position_embeddings is position_embeddings
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    expected = reference_cait_logits(_double(sd), images, heads=sizes["heads"], patch=sizes["patch"])
    torch.testing.assert_close(_converted_logits(model, images), expected, **TOL)


# --------------------------------------------------------------------------------------------------------------
# Swin
# --------------------------------------------------------------------------------------------------------------

# A 16x16 grid with 4x4 windows, then 8x8 (shifted), then 4x4 (one window, no shift): every Swin case occurs.
SWIN_SIZES = dict(embed_dim=16, depths=[2, 2, 2], heads=[2, 2, 4], window=4, patch=2, image=32, num_classes=7)


def _swin_stage_window(window, resolution):
    return (resolution, 0) if resolution <= window else (window, window // 2)


def original_swin_state_dict(embed_dim, depths, heads, window, patch, image, num_classes):
    sd = {
        "patch_embed.proj.weight": torch.randn(embed_dim, 3, patch, patch) * 0.3,
        "patch_embed.proj.bias": torch.randn(embed_dim) * 0.1,
    }
    _layer_norm(sd, "patch_embed.norm", embed_dim)
    resolution = image // patch
    for s, (depth, num_heads) in enumerate(zip(depths, heads)):
        dim = embed_dim * 2**s
        stage_window, shift = _swin_stage_window(window, resolution)
        for b in range(depth):
            block = f"layers.{s}.blocks.{b}"
            _layer_norm(sd, f"{block}.norm1", dim)
            _linear(sd, f"{block}.attn.qkv", 3 * dim, dim)
            _linear(sd, f"{block}.attn.proj", dim, dim)
            sd[f"{block}.attn.relative_position_bias_table"] = torch.randn((2 * stage_window - 1) ** 2, num_heads)
            # Derived buffers the original saves too; conversion must ignore them (garbage here proves it).
            sd[f"{block}.attn.relative_position_index"] = torch.randint(0, 5, (stage_window**2, stage_window**2))
            if b % 2 and shift:
                sd[f"{block}.attn_mask"] = torch.randn(
                    (resolution // stage_window) ** 2, stage_window**2, stage_window**2
                )
            _layer_norm(sd, f"{block}.norm2", dim)
            _linear(sd, f"{block}.mlp.fc1", 4 * dim, dim)
            _linear(sd, f"{block}.mlp.fc2", dim, 4 * dim)
            _shortcut(sd, f"layers.{s}", b, dim)
        if s < len(depths) - 1:
            _linear(sd, f"layers.{s}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
            _layer_norm(sd, f"layers.{s}.downsample.norm", 4 * dim)
            resolution //= 2
    final = embed_dim * 2 ** (len(depths) - 1)
    _layer_norm(sd, "norm", final)
    _linear(sd, "head", num_classes, final)
    return sd


def _swin_attention_layout(resolution, window, shift):
    """For every pair of grid tokens: may they attend to each other, and which bias-table row applies.

    Works on the whole grid at once: a token at (r, c) sits at ((r - shift) mod H, (c - shift) mod W) after the
    cyclic roll; tokens attend within the same window of the rolled grid, and for a shifted layout only within the
    same region of the roll (slices [0, H - window), [H - window, H - shift), [H - shift, H) on each axis).
    """
    rows, cols = torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")
    rows, cols = (rows.flatten() - shift) % resolution, (cols.flatten() - shift) % resolution
    same_window = (rows[:, None] // window == rows[None, :] // window) & (
        cols[:, None] // window == cols[None, :] // window
    )
    if shift:

        def region(t):
            return (t >= resolution - window).long() + (t >= resolution - shift).long()

        same_window &= (region(rows)[:, None] == region(rows)[None, :]) & (
            region(cols)[:, None] == region(cols)[None, :]
        )
    dy = (rows % window)[:, None] - (rows % window)[None, :] + window - 1
    dx = (cols % window)[:, None] - (cols % window)[None, :] + window - 1
    return same_window, dy * (2 * window - 1) + dx


def reference_swin_logits(sd, images, depths, heads, window, patch, shortcuts=True):
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    b, _, resolution, _ = x.shape
    x = _ln(sd, "patch_embed.norm", x.flatten(2).transpose(1, 2))
    for s, (depth, num_heads) in enumerate(zip(depths, heads)):
        dim = x.shape[-1]
        for i in range(depth):
            block = f"layers.{s}.blocks.{i}"
            stage_window, shift = _swin_stage_window(window, resolution)
            allowed, table_rows = _swin_attention_layout(resolution, stage_window, shift if i % 2 else 0)
            shortcut = _dw_shortcut(sd, f"layers.{s}", i, x, resolution, resolution)
            q, k, v = (
                _split_heads(t, num_heads)
                for t in _lin(sd, f"{block}.attn.qkv", _ln(sd, f"{block}.norm1", x)).chunk(3, -1)
            )
            bias = sd[f"{block}.attn.relative_position_bias_table"][table_rows].permute(2, 0, 1)
            scores = (q * (dim // num_heads) ** -0.5) @ k.transpose(-1, -2) + bias
            weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            x = x + _lin(sd, f"{block}.attn.proj", _merge_heads(weights @ v))
            x = x + _lin(sd, f"{block}.mlp.fc2", F.gelu(_lin(sd, f"{block}.mlp.fc1", _ln(sd, f"{block}.norm2", x))))
            if shortcuts:
                x = x + shortcut
        if s < len(depths) - 1:
            grid = x.reshape(b, resolution, resolution, dim)
            merged = torch.cat(
                [grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], -1
            )
            x = _lin(
                sd,
                f"layers.{s}.downsample.reduction",
                _ln(sd, f"layers.{s}.downsample.norm", merged.reshape(b, -1, 4 * dim)),
            )
            resolution //= 2
    return _lin(sd, "head", _ln(sd, "norm", x).mean(dim=1))


def _swin_section(sizes):
    return {
        "PATCH_SIZE": sizes["patch"],
        "IN_CHANS": 3,
        "EMBED_DIM": sizes["embed_dim"],
        "DEPTHS": list(sizes["depths"]),
        "NUM_HEADS": list(sizes["heads"]),
        "WINDOW_SIZE": sizes["window"],
        "MLP_RATIO": 4.0,
        "QKV_BIAS": True,
        "QK_SCALE": None,
        "APE": False,
        "PATCH_NORM": True,
    }


def test_swin_checkpoint_converts_to_the_same_function(tmp_path, cfg_node):
    torch.manual_seed(6)
    sizes = SWIN_SIZES
    sd = original_swin_state_dict(**sizes)
    config = make_config(
        cfg_node, "swin", sizes["image"], sizes["num_classes"], _swin_section(sizes), dataset="tiny-imagenet"
    )
    path = save_original_checkpoint(tmp_path / "ckpt.pth", sd, config)

    out = convert_original_checkpoint(path, tmp_path / "converted")
    model = AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "DWSwinForImageClassification"
    assert (model.config.depths, model.config.num_heads, model.config.window_size) == ([2, 2, 2], [2, 2, 4], 4)
    assert AutoImageProcessor.from_pretrained(out).image_mean == pytest.approx([0.485, 0.456, 0.406])
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = reference_swin_logits(
        _double(sd), images, sizes["depths"], sizes["heads"], sizes["window"], sizes["patch"]
    )
    torch.testing.assert_close(_converted_logits(model, images), expected, **TOL)

    # Without a config, the image size is the one size the weights cannot tell; the window comes from the tables.
    torch.save({"model": sd}, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="--image_size"):
        build_converted_model(load_original_checkpoint(tmp_path / "bare.pth"), {"model_type": "swin"})
    bare = load_original_checkpoint(tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="attn_mask"):
        build_converted_model(bare, {"model_type": "swin", "image_size": 64})
    without_masks = {k: v for k, v in sd.items() if not k.endswith("attn_mask")}
    with pytest.raises(ValueError, match="relative position bias table"):
        convert_original_state_dict(without_masks, {"model_type": "swin", "image_size": 16})
    from_flags = build_converted_model(
        load_original_checkpoint(tmp_path / "bare.pth"), {"model_type": "swin", "image_size": 32}
    )
    assert from_flags.config.window_size == 4
    torch.testing.assert_close(_converted_logits(from_flags, images), expected, **TOL)


# --------------------------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------------------------


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Unknown:
    """An arbitrary class: unpickling it would import this test module."""

    def __init__(self):
        self.value = 1


def test_checkpoint_that_runs_code_is_refused_and_nothing_is_written(tmp_path, cfg_node):
    sd = original_vit_state_dict(**VIT_SIZES)
    config = make_config(cfg_node, "vit", 16, 5, _vit_section(VIT_SIZES))
    marker = tmp_path / "payload_ran"
    path = save_original_checkpoint(tmp_path / "ckpt.pth", sd, config)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["optimizer"]["state"][0]["hook"] = _RunsShell(marker)
    torch.save(checkpoint, path)

    with pytest.raises(UnsafeCheckpointError, match=r"disallowed global\(s\) \w+\.system.*execute code") as raised:
        convert_original_checkpoint(path, tmp_path / "converted")
    assert "weights_only=False" not in str(raised.value)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]

    # Any class outside the allowlist is refused too, wherever it hides, and the message names it.
    checkpoint["optimizer"]["state"][0] = {"step": torch.tensor(1.0)}
    checkpoint["scaler"] = _Unknown()
    torch.save(checkpoint, path)
    with pytest.raises(UnsafeCheckpointError, match=r"_Unknown"):
        load_original_checkpoint(path)


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_legacy_format_checkpoint_that_calls_eval_is_refused(tmp_path):
    """The pre-zip `torch.save` format cannot be scanned statically; the unpickler's refusal is still reported."""
    torch.save(
        {"model": {"w": torch.zeros(1)}, "epoch": _CallsEval()},
        tmp_path / "legacy.pth",
        _use_new_zipfile_serialization=False,
    )
    with pytest.raises(UnsafeCheckpointError, match="eval"):
        load_original_checkpoint(tmp_path / "legacy.pth")
    torch.save(
        {"model": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "legacy_ok.pth", _use_new_zipfile_serialization=False
    )
    assert load_original_checkpoint(tmp_path / "legacy_ok.pth").extras == {"epoch": 3}


# --------------------------------------------------------------------------------------------------------------
# Atomic output and the command line
# --------------------------------------------------------------------------------------------------------------


def test_failure_while_writing_leaves_nothing(tmp_path, cfg_node, monkeypatch):
    from transformers import ViTImageProcessor

    sd = original_vit_state_dict(**VIT_SIZES)
    path = save_original_checkpoint(
        tmp_path / "ckpt.pth", sd, make_config(cfg_node, "vit", 16, 5, _vit_section(VIT_SIZES))
    )

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ViTImageProcessor, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_original_checkpoint(path, tmp_path / "converted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]

    # Replacing an existing folder keeps the old one when the new one cannot be written.
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_original_checkpoint(path, tmp_path / "converted")
    with pytest.raises(OSError, match="disk full"):
        convert_original_checkpoint(path, tmp_path / "converted", overwrite=True)
    assert [p.name for p in (tmp_path / "converted").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth", "converted"]


def test_command_line_end_to_end(tmp_path, cfg_node, capsys):
    torch.manual_seed(4)
    sd = original_vit_state_dict(**VIT_SIZES)
    path = save_original_checkpoint(
        tmp_path / "ckpt.pth", sd, make_config(cfg_node, "vit", 16, 5, _vit_section(VIT_SIZES))
    )
    out = tmp_path / "converted"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "convert_original_checkpoint.py"),
            str(path),
            str(out),
            "--labels",
            "a,b,c,d,e",
            "--image_mean",
            "0.5,0.5,0.5",
            "--image_std",
            "0.25,0.25,0.25",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "DWViTForImageClassification" in result.stdout
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.label2id == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
    assert list(AutoImageProcessor.from_pretrained(out).image_std) == [0.25, 0.25, 0.25]
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(
        _converted_logits(model, images), reference_vit_logits(_double(sd), images, 4, 4), **TOL
    )

    # The same script in-process: an existing folder is refused with a message and exit status 2.
    spec = importlib.util.spec_from_file_location(
        "convert_original_checkpoint", REPO_ROOT / "convert_original_checkpoint.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(path), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([str(path), str(tmp_path / "other"), "--image_mean", "0.5,0.5"])
    assert "three comma separated numbers" in capsys.readouterr().err


def test_swin_trained_with_gradient_checkpointing_converts_without_shortcuts(tmp_path, cfg_node):
    """The original Swin stage skips its shortcuts when TRAIN.USE_CHECKPOINT is set; the converted model must too."""
    torch.manual_seed(7)
    sizes = SWIN_SIZES
    sd = original_swin_state_dict(**sizes)
    config = make_config(cfg_node, "swin", sizes["image"], sizes["num_classes"], _swin_section(sizes))
    config.TRAIN.USE_CHECKPOINT = True
    model = build_converted_model(load_original_checkpoint(save_original_checkpoint(tmp_path / "c.pth", sd, config)))
    assert model.config.use_dw_shortcut is False
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    args = (sizes["depths"], sizes["heads"], sizes["window"], sizes["patch"])
    expected = reference_swin_logits(_double(sd), images, *args, shortcuts=False)
    torch.testing.assert_close(_converted_logits(model, images), expected, **TOL)
    assert not torch.allclose(expected, reference_swin_logits(_double(sd), images, *args), atol=1e-3)


@pytest.mark.parametrize(
    "model_type, build, settings, named, overrides, paper_millions",
    [
        (
            "vit",
            lambda: original_vit_state_dict(
                dim=192, depth=12, heads=3, mlp_dim=768, patch=16, image=224, num_classes=10
            ),
            {"heads": 3},
            "vit-tiny",
            {"qkv_bias": False},
            5.5,
        ),
        (
            "cait_xxs",
            lambda: original_cait_state_dict(
                True,
                True,
                True,
                dim=192,
                depth=12,
                cls_depth=2,
                heads=4,
                mlp_dim=768,
                patch=16,
                image=224,
                num_classes=10,
            ),
            {},
            "cait-xxs12",
            dict(
                qkv_bias=False,
                use_layer_scale=True,
                use_talking_heads=True,
                use_class_attention_talking_heads=True,
                use_position_embeddings=True,
            ),
            6.4,
        ),
        (
            "swin",
            lambda: original_swin_state_dict(
                embed_dim=96, depths=[2, 2, 6, 2], heads=[3, 6, 12, 24], window=7, patch=4, image=224, num_classes=10
            ),
            {"image_size": 224},
            "swin-tiny",
            {},
            27.6,
        ),
    ],
    ids=["vit-tiny", "cait-xxs12", "swin-tiny"],
)
def test_paper_sizes_convert_to_the_named_sizes(model_type, build, settings, named, overrides, paper_millions):
    """Full-size original layouts (meta tensors: shapes only) map onto the named sizes' models, every tensor used."""
    from dwvit import named_config

    with torch.device("meta"):
        state_dict = build()
    config, weights = convert_original_state_dict(state_dict, {"model_type": model_type, **settings})
    with torch.device("meta"):
        model = AutoModelForImageClassification.from_config(config)
        reference = AutoModelForImageClassification.from_config(named_config(named, num_labels=10, **overrides))
    model.load_state_dict(weights, strict=True, assign=True)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e6, 1) == paper_millions


@pytest.mark.parametrize("damage,message", [
    ("empty", r"is empty \(0 bytes\)"),
    ("truncated", r"is truncated or damaged: a zip archive"),
    ("garbage", r"is not a PyTorch checkpoint"),
])
def test_a_damaged_checkpoint_file_is_refused_naming_it_and_what_is_wrong(tmp_path, damage, message):
    """torch says "PytorchStreamReader failed reading zip archive" or raises a bare EOFError, without the file."""
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": bytes(range(7, 107))}[damage])
    with pytest.raises(ValueError, match=rf"Cannot read {re.escape(str(path))}: it {message}"):
        load_original_checkpoint(path)
