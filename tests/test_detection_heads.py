"""DWSwinBackbone under transformers' detection and segmentation heads, built through the public
`backbone_config` route: UperNet (semantic segmentation), DETR (object detection, which swaps every BatchNorm2d
of its backbone for a frozen `DetrFrozenBatchNorm2d`, the shortcut's included) and Mask2Former. Also runs the
snippet of docs/swin.md's "Detection and segmentation heads" section."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForSemanticSegmentation,
    DetrConfig,
    DetrForObjectDetection,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)
from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d

import dwvit  # noqa: F401  (registers "dwswin" with AutoConfig / AutoBackbone, which the heads build through)
from dwvit import DepthwiseShortcut, DWSwinBackbone, DWSwinConfig, DWSwinForImageClassification
from conftest import REPO_ROOT, randomise_shortcut_statistics

# 64x64 / patch 2 = a 32x32 grid, then 16 and 8, each a multiple of the 4x4 window.
TINY = dict(image_size=64, patch_size=2, window_size=4, embed_dim=16, drop_path_rate=0.0, dw_kernel_sizes=[3, 5])


def tiny_dwswin(**overrides) -> DWSwinConfig:
    return DWSwinConfig(**{**TINY, "depths": [1, 1, 1], "num_heads": [1, 2, 4], **overrides})


def shortcuts(module: nn.Module) -> list[DepthwiseShortcut]:
    found = [m for m in module.modules() if isinstance(m, DepthwiseShortcut)]
    assert found, "the backbone has no depth-wise shortcut"
    return found


def shortcut_conv_weights(module: nn.Module) -> list[torch.Tensor]:
    return [branch.conv.weight for shortcut in shortcuts(module) for branch in shortcut.branches]


def assert_grads_reach_the_shortcuts(backbone: nn.Module) -> None:
    for weight in shortcut_conv_weights(backbone):
        assert weight.grad is not None and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------
# UperNet


def tiny_upernet(backbone_config: DWSwinConfig | None = None, **overrides) -> UperNetForSemanticSegmentation:
    config = UperNetConfig(
        backbone_config=backbone_config or tiny_dwswin(out_features=["stage1", "stage2", "stage3"]),
        hidden_size=32, auxiliary_channels=16, pool_scales=[1, 2], num_labels=4, **overrides,
    )
    return UperNetForSemanticSegmentation(config)


def test_upernet_forward_loss_backward():
    torch.manual_seed(0)
    model = tiny_upernet().train()
    assert isinstance(model.backbone, DWSwinBackbone)
    assert model.backbone.channels == [16, 32, 64] and model.backbone.out_indices == [1, 2, 3]
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 4, (2, 64, 64))
    labels[0, :8] = 255  # UperNet's loss_ignore_index
    features = model.backbone(pixel_values).feature_maps
    assert [tuple(f.shape) for f in features] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]

    out = model(pixel_values, labels=labels, output_hidden_states=True)
    assert out.logits.shape == (2, 4, 64, 64)
    assert torch.isfinite(out.loss) and out.loss > 0
    # The backbone's hidden states (stem + every stage, before patch merging) come back as (B, C, H, W).
    assert [tuple(h.shape) for h in out.hidden_states] == [
        (2, 16, 32, 32), (2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)
    ]
    out.loss.backward()
    assert_grads_reach_the_shortcuts(model.backbone)
    assert model.decode_head.classifier.weight.grad.abs().sum() > 0
    assert model.auxiliary_head.classifier.weight.grad.abs().sum() > 0

    # Inference without autograd takes the shortcut's in-place path; it must match the autograd path.
    model.eval()
    with torch.no_grad():
        no_grad_logits = model(pixel_values).logits
    torch.testing.assert_close(no_grad_logits, model(pixel_values).logits.detach(), atol=1e-5, rtol=0)


def test_upernet_save_and_reload(tmp_path):
    torch.manual_seed(1)
    model = tiny_upernet()
    randomise_shortcut_statistics(model, torch.Generator().manual_seed(1))  # BatchNorm statistics must survive
    model.eval()
    model.save_pretrained(tmp_path)
    # Reloading needs `import dwvit` (done above): it registers the "dwswin" model type and DWSwinBackbone with
    # AutoConfig / AutoBackbone. A head model's folder holds no dwvit code files, so there is no remote-code route.
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    auto = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    for other in (reloaded, auto):
        assert isinstance(other.backbone, DWSwinBackbone)
        assert other.config.backbone_config.out_features == ["stage1", "stage2", "stage3"]
        assert other.config.backbone_config.dw_kernel_sizes == [3, 5]
        theirs = other.state_dict()
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(theirs[name], tensor, atol=0, rtol=0, msg=name)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values).logits
        torch.testing.assert_close(reloaded(pixel_values).logits, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(auto(pixel_values).logits, expected, atol=1e-6, rtol=0)


def test_upernet_backbone_from_a_trained_classifier(tmp_path):
    """A DWSwin classifier's encoder weights fill the head's backbone (the docs' route for pretrained weights;
    `use_pretrained_backbone` is ignored by transformers 5 and `AutoBackbone.from_pretrained` rejects a local
    folder)."""
    torch.manual_seed(2)
    classifier = DWSwinForImageClassification(tiny_dwswin(num_labels=7))
    randomise_shortcut_statistics(classifier, torch.Generator().manual_seed(2))
    classifier.save_pretrained(tmp_path / "classifier")

    backbone = DWSwinBackbone.from_pretrained(tmp_path / "classifier", out_features=["stage1", "stage2", "stage3"])
    assert backbone.out_features == ["stage1", "stage2", "stage3"] and backbone.channels == [16, 32, 64]
    model = tiny_upernet(backbone.config)
    model.backbone.load_state_dict(backbone.state_dict())
    for name, tensor in classifier.dwswin.state_dict().items():
        torch.testing.assert_close(model.backbone.dwswin.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64)).logits).all()


# --------------------------------------------------------------------------------------------------------------
# DETR: its frozen BatchNorm replaces the shortcut's BatchNorm2d.


def tiny_detr() -> DetrForObjectDetection:
    config = DetrConfig(
        backbone_config=tiny_dwswin(depths=[1, 1], num_heads=[1, 2], out_features=["stage2"]),
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=5, num_labels=3,
    )
    model = DetrForObjectDetection(config)
    # Give the frozen norms (built from fresh BatchNorm2d, so identities) non-trivial statistics and affines.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DetrFrozenBatchNorm2d):
                n = module.weight.numel()
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator))
    return model


def detr_targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])},
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]


def detr_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    # 70x54 is not a multiple of patch and window, so the backbone pads; the second image is padded like DETR's
    # image processor pads a batch (pixel_mask 0 outside it).
    pixel_values = torch.randn(2, 3, 70, 54)
    pixel_mask = torch.ones(2, 70, 54, dtype=torch.long)
    pixel_mask[1, 60:] = 0
    pixel_mask[1, :, 40:] = 0
    return pixel_values, pixel_mask


def frozen_norms_of_the_shortcuts(model: DetrForObjectDetection) -> list[DetrFrozenBatchNorm2d]:
    backbone = model.model.backbone.model
    assert isinstance(backbone, DWSwinBackbone)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    norms = [branch.norm for shortcut in shortcuts(backbone) for branch in shortcut.branches]
    assert len(norms) == 4 and all(type(norm) is DetrFrozenBatchNorm2d for norm in norms)
    return norms


def detr_train_step(model: DetrForObjectDetection) -> None:
    pixel_values, pixel_mask = detr_inputs()
    norms = frozen_norms_of_the_shortcuts(model)
    frozen_before = [{name: b.clone() for name, b in norm.named_buffers()} for norm in norms]
    weights_before = [w.detach().clone() for w in shortcut_conv_weights(model.model.backbone.model)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    out = model(pixel_values, pixel_mask=pixel_mask, labels=detr_targets())
    assert torch.isfinite(out.loss) and out.loss > 0
    assert {"loss_ce", "loss_bbox", "loss_giou"} <= set(out.loss_dict)
    out.loss.backward()
    assert_grads_reach_the_shortcuts(model.model.backbone.model)
    optimizer.step()
    for before, weight in zip(weights_before, shortcut_conv_weights(model.model.backbone.model)):
        assert not torch.equal(before, weight)
    # Frozen means frozen: training leaves the shortcut's norm statistics and affine where they were.
    for before, norm in zip(frozen_before, norms):
        for name, buffer in norm.named_buffers():
            torch.testing.assert_close(buffer, before[name], atol=0, rtol=0)


def test_detr_replaces_the_shortcut_batchnorm_and_trains_then_evaluates():
    torch.manual_seed(4)
    model = tiny_detr()
    frozen_norms_of_the_shortcuts(model)  # the replacement reached the shortcuts: the path that used to crash
    detr_train_step(model)

    model.eval()
    pixel_values, pixel_mask = detr_inputs()
    feature_map, mask = model.model.backbone(pixel_values, pixel_mask)[-1]
    # 70x54 / patch 2 = 35x27, then ceil halves to 18x14 at stage 2 (32 channels).
    assert feature_map.shape == (2, 32, 18, 14) and mask.shape == (2, 18, 14)
    # Inference without autograd: the shortcut's in-place path with DETR's frozen norm in the norm slot. Before
    # the fix this raised AttributeError: 'DetrFrozenBatchNorm2d' object has no attribute 'eps'.
    with torch.no_grad():
        out = model(pixel_values, pixel_mask=pixel_mask)
    assert out.logits.shape == (2, 5, 4) and out.pred_boxes.shape == (2, 5, 4)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.pred_boxes).all()
    assert ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()
    # ... and it computes what the autograd path computes.
    with_grad = model(pixel_values, pixel_mask=pixel_mask)
    torch.testing.assert_close(out.logits, with_grad.logits.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pred_boxes, with_grad.pred_boxes.detach(), atol=1e-5, rtol=0)


def test_detr_fused_shortcuts_with_frozen_batchnorm_match_unfused():
    torch.manual_seed(5)
    model = tiny_detr().eval()
    pixel_values, pixel_mask = detr_inputs()
    reference = model(pixel_values, pixel_mask=pixel_mask)  # autograd path: the plain branch forward
    backbone = model.model.backbone.model
    backbone.fuse_dw_shortcuts()
    assert backbone.dw_shortcuts_fused
    with torch.no_grad():
        fused = model(pixel_values, pixel_mask=pixel_mask)
    torch.testing.assert_close(fused.logits, reference.logits.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(fused.pred_boxes, reference.pred_boxes.detach(), atol=1e-5, rtol=0)


def test_detr_trains_with_gradient_checkpointing():
    torch.manual_seed(6)
    model = tiny_detr()
    model.activation_checkpointing_enable()
    assert all(shortcut.gradient_checkpointing for shortcut in shortcuts(model.model.backbone.model))
    detr_train_step(model)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "transformers 5.24's DetrModel checkpoint mapping renames every 'out_proj' key under model.* to 'o_proj', "
        "the DWSwin backbone's attention.out_proj included, so on reload those weights come back missing "
        "(re-initialised) and the checkpoint's copies unexpected."
    ),
)
def test_detr_save_and_reload(tmp_path):
    torch.manual_seed(7)
    model = tiny_detr().eval()
    model.save_pretrained(tmp_path)
    reloaded = DetrForObjectDetection.from_pretrained(tmp_path).eval()
    theirs = reloaded.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(theirs[name], tensor, atol=0, rtol=0, msg=name)
    pixel_values, pixel_mask = detr_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values, pixel_mask=pixel_mask).logits, model(pixel_values, pixel_mask=pixel_mask).logits,
            atol=1e-6, rtol=0,
        )


def test_detr_reload_workaround_restores_the_backbone_from_the_file(tmp_path):
    """Until the renaming above is fixed: reload, then load the backbone's own keys straight from the file
    (docs/swin.md shows the same)."""
    from safetensors.torch import load_file

    torch.manual_seed(7)
    model = tiny_detr().eval()
    model.save_pretrained(tmp_path)
    reloaded = DetrForObjectDetection.from_pretrained(tmp_path).eval()
    # DETR saves its backbone under the checkpoint name model.backbone.conv_encoder.
    prefix = "model.backbone.conv_encoder.model."
    state = load_file(tmp_path / "model.safetensors")
    backbone_state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    reloaded.model.backbone.model.load_state_dict(backbone_state)
    theirs = reloaded.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(theirs[name], tensor, atol=0, rtol=0, msg=name)
    pixel_values, pixel_mask = detr_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values, pixel_mask=pixel_mask).logits, model(pixel_values, pixel_mask=pixel_mask).logits,
            atol=1e-6, rtol=0,
        )


# --------------------------------------------------------------------------------------------------------------
# Mask2Former


def test_mask2former_forward_and_loss():
    torch.manual_seed(8)
    # Patch 4 on 128x128: stage grids 32, 16, 8, 4, i.e. strides 4, 8, 16, 32 as Mask2Former's feature_strides.
    backbone_config = DWSwinConfig(
        **{**TINY, "image_size": 128, "patch_size": 4}, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone_config, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32,
        num_queries=5, num_labels=3, train_num_points=64,
    )
    model = Mask2FormerForUniversalSegmentation(config)
    assert isinstance(model.model.pixel_level_module.encoder, DWSwinBackbone)
    assert model.model.pixel_level_module.encoder.channels == [16, 32, 64, 128]
    pixel_values = torch.randn(2, 3, 128, 128)

    model.eval()
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
    assert out.class_queries_logits.shape == (2, 5, 4)
    assert out.masks_queries_logits.shape == (2, 5, 32, 32)
    assert [tuple(h.shape) for h in out.encoder_hidden_states] == [
        (2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4)
    ]
    for tensor in (out.class_queries_logits, out.masks_queries_logits, *out.encoder_hidden_states):
        assert torch.isfinite(tensor).all()

    model.train()
    mask_labels = [(torch.rand(2, 128, 128) > 0.5).float(), (torch.rand(1, 128, 128) > 0.5).float()]
    class_labels = [torch.tensor([0, 2]), torch.tensor([1])]
    loss = model(pixel_values, mask_labels=mask_labels, class_labels=class_labels).loss
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert_grads_reach_the_shortcuts(model.model.pixel_level_module.encoder)


# --------------------------------------------------------------------------------------------------------------
# docs/swin.md's snippet runs as written.

DOC = REPO_ROOT / "docs" / "swin.md"
SECTION = "### Detection and segmentation heads"


def heads_section_python_blocks() -> list[str]:
    text = DOC.read_text()
    assert SECTION in text, f"{DOC} has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1]
    section = re.split(r"^#{2,3} ", section, maxsplit=1, flags=re.M)[0]  # up to the next (sub)section heading
    # As in tests/test_readme.py: only blocks fenced exactly as ```python run.
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)


def test_docs_heads_snippet_runs(tmp_path):
    blocks = heads_section_python_blocks()
    assert blocks
    joined = "\n".join(blocks)
    for usage in ("UperNetForSemanticSegmentation", "DetrForObjectDetection", "backbone_config", "from_pretrained"):
        assert usage in joined
    script = tmp_path / "swin_heads_snippet.py"
    script.write_text("\n\n".join(blocks))
    # In a scratch folder: the snippet saves models under relative paths.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"docs/swin.md snippet failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert "torch.Size([2, 5, 64, 64])" in result.stdout
