"""DWSwin: faithfulness to transformers' Swin, the shortcut against a hand computation, sizes, the backbone,
and the ecosystem (save/load, remote code, pipeline, Trainer)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    SwinBackbone,
    SwinConfig,
    SwinForImageClassification,
    pipeline,
)

import dwvit
from dwvit import DWSwinBackbone, DWSwinConfig, DWSwinForImageClassification, DWSwinModel
from dwvit.conversion.from_transformers import convert_state_dict
from conftest import CIFAR10_LABELS, CIFAR10_NAMES, hand_shortcut, randomise_shortcut_statistics, warm_up_batchnorm

# 32x32 / patch 2 = a 16x16 grid, then 8x8; both larger than the 4x4 window, so odd blocks shift by 2.
SMALL = dict(image_size=32, patch_size=2, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4])


def small_config(**overrides) -> DWSwinConfig:
    return DWSwinConfig(**{**SMALL, "num_labels": 5, "drop_path_rate": 0.0, **overrides})


# --------------------------------------------------------------------------------------------------------------
# Faithfulness: with the shortcut off, DWSwin is transformers' Swin.


def hf_swin_config(config: DWSwinConfig, attn_implementation: str = "sdpa", **extra) -> SwinConfig:
    hf_config = SwinConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        embed_dim=config.embed_dim,
        depths=list(config.depths),
        num_heads=list(config.num_heads),
        window_size=config.window_size,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        drop_path_rate=0.0,
        use_absolute_embeddings=config.use_absolute_embeddings,
        layer_norm_eps=config.layer_norm_eps,
        num_labels=config.num_labels,
        **extra,
    )
    hf_config._attn_implementation = attn_implementation
    return hf_config


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Perturb every parameter (transformers zero-initialises the bias tables, LayerNorms are ones/zeros)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def faithful_pair(config: DWSwinConfig, seed: int, attn_implementation: str = "sdpa", shifted: bool = True):
    """A random transformers Swin and a DWSwin (shortcut off) holding the same weights."""
    torch.manual_seed(seed)
    reference = SwinForImageClassification(hf_swin_config(config, attn_implementation)).eval()
    randomise(reference, torch.Generator().manual_seed(seed))
    if not shifted:
        # transformers has no switch; the reference is its Swin with every block's shift forced to 0.
        for module in reference.modules():
            if hasattr(module, "shift_size"):
                module.shift_size = 0
    model = DWSwinForImageClassification(config).eval()
    model.load_state_dict(convert_state_dict(reference), strict=True)
    return model, reference


@pytest.mark.parametrize("shifted", [True, False], ids=["shifted", "unshifted"])
@pytest.mark.parametrize(
    "fields,input_size",
    [
        ({}, (32, 32)),
        ({}, (30, 26)),  # not a multiple of the patch or the window: both pad, as transformers does
        (dict(patch_size=4, qkv_bias=False, use_absolute_embeddings=True), (32, 32)),  # stage 2 is one window
        (dict(depths=[1, 3, 2], num_heads=[1, 2, 4], mlp_ratio=2.0), (32, 32)),
    ],
    ids=["small", "padded-30x26", "patch4-no-qkv-bias-abs-pos", "three-stages"],
)
def test_shortcut_off_matches_transformers_swin(fields, input_size, shifted):
    config = small_config(use_dw_shortcut=False, use_shifted_windows=shifted, **fields)
    model, reference = faithful_pair(config, seed=0, shifted=shifted)
    pixel_values = torch.randn(2, 3, *input_size)
    with torch.no_grad():
        ours = model(pixel_values, output_hidden_states=True)
        theirs = reference(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == len(config.depths) + 1
    for our_state, their_state in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(our_state, their_state, atol=1e-5, rtol=0)
    for our_state, their_state in zip(ours.reshaped_hidden_states, theirs.reshaped_hidden_states):
        torch.testing.assert_close(our_state, their_state, atol=1e-5, rtol=0)


def test_shifted_windows_matter():
    """The switch changes the computation (otherwise the two faithfulness cases above prove nothing)."""
    shifted, _ = faithful_pair(small_config(use_dw_shortcut=False), seed=1)
    plain = DWSwinForImageClassification(small_config(use_dw_shortcut=False, use_shifted_windows=False)).eval()
    plain.load_state_dict(shifted.state_dict())
    assert [b.shift_size for s in shifted.dwswin.encoder.layers for b in s.blocks] == [0, 2, 0, 2]
    assert [b.shift_size for s in plain.dwswin.encoder.layers for b in s.blocks] == [0, 0, 0, 0]
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (shifted(pixel_values).logits - plain(pixel_values).logits).abs().max() > 1e-3


def test_swin_tiny_matches_transformers_swin_tiny():
    """The real Swin-T layout at 224 (stage grids 56, 28, 14, 7; the last is one unshifted window)."""
    config = dwvit.named_config("swin-tiny", num_labels=10, use_dw_shortcut=False, drop_path_rate=0.0)
    model, reference = faithful_pair(config, seed=2)
    pixel_values = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, reference(pixel_values).logits, atol=1e-5, rtol=0)


def test_attentions_match_transformers_swin_eager():
    config = small_config(use_dw_shortcut=False)
    model, reference = faithful_pair(config, seed=3, attn_implementation="eager")
    # Every block's map (the default, one per stage as in Swin, is tested in test_transformers_conventions.py).
    model.config.attentions_per_block = True
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(pixel_values, output_attentions=True)
        theirs = reference(pixel_values, output_attentions=True)
    # One map per block here; transformers reports the last block of each stage.
    assert [tuple(a.shape) for a in ours.attentions] == [(32, 2, 16, 16)] * 2 + [(8, 4, 16, 16)] * 2
    last_of_each_stage = [ours.attentions[1], ours.attentions[3]]
    for our_weights, their_weights in zip(last_of_each_stage, theirs.attentions):
        torch.testing.assert_close(our_weights, their_weights, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)


def test_sdpa_is_default_and_matches_eager():
    torch.manual_seed(4)
    model = DWSwinForImageClassification(small_config()).eval()
    assert model.config._attn_implementation == "sdpa"
    assert all(not b.attention.is_causal for s in model.dwswin.encoder.layers for b in s.blocks)
    randomise(model, torch.Generator().manual_seed(4))
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        sdpa_logits = model(pixel_values).logits
        model.config._attn_implementation = "eager"
        eager_logits = model(pixel_values).logits
    torch.testing.assert_close(sdpa_logits, eager_logits, atol=1e-5, rtol=0)


def test_backbone_shortcut_off_matches_transformers_swin_backbone():
    config = small_config(use_dw_shortcut=False, out_features=["stem", "stage1", "stage2"])
    torch.manual_seed(5)
    reference = SwinBackbone(hf_swin_config(config, out_features=["stem", "stage1", "stage2"])).eval()
    randomise(reference, torch.Generator().manual_seed(5))
    backbone = DWSwinBackbone(config).eval()
    backbone.load_state_dict(convert_state_dict(reference), strict=True)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = backbone(pixel_values).feature_maps
        theirs = reference(pixel_values).feature_maps
    assert [tuple(m.shape) for m in ours] == [(2, 16, 16, 16), (2, 16, 16, 16), (2, 32, 8, 8)]
    for our_map, their_map in zip(ours, theirs):
        torch.testing.assert_close(our_map, their_map, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# The shortcut against a hand computation.


@pytest.mark.parametrize(
    "kernel_sizes,span,input_size,training",
    [
        ([3], 1, 32, False),
        ([3, 5, 7], 1, 32, False),
        ([3], 2, 32, False),  # stage 1 (3 blocks): groups {0,1}, {2}; stage 2: {0,1}
        ([3], 3, 32, False),  # stage 1: {0,1,2}; stage 2: {0,1} - a global grouping would cross the merge
        ([3, 5], 2, 32, True),
        ([3], 2, 28, False),  # a 14x14 then 7x7 grid: the shortcut uses the actual (unpadded) grid
    ],
    ids=["k3", "k3+5+7", "span2", "span3", "k3+5-span2-train", "k3-span2-input28"],
)
def test_shortcut_matches_hand_computation(kernel_sizes, span, input_size, training):
    torch.manual_seed(6)
    generator = torch.Generator().manual_seed(7)
    config = small_config(depths=[3, 2], dw_kernel_sizes=kernel_sizes, dw_block_span=span)
    model = DWSwinModel(config)
    randomise_shortcut_statistics(model, generator)
    model.train(training)
    pixel_values = torch.randn(2, 3, input_size, input_size)

    # Expected: the model's own blocks and patch merging (proven against transformers above), with the
    # hand-computed shortcut around each group of `span` blocks, groups restarting at every stage.
    with torch.no_grad():
        hidden, grid = model.embeddings(pixel_values)
        for stage, depth in zip(model.encoder.layers, config.depths):
            starts = list(range(0, depth, span))
            assert len(stage.shortcuts) == len(starts)
            for shortcut, start in zip(stage.shortcuts, starts):
                group_input = hidden
                for block in stage.blocks[start : min(start + span, depth)]:
                    hidden, _ = block(hidden, grid)
                branches = [(b.norm, b.conv) for b in shortcut.branches]
                assert [conv.kernel_size[0] for _, conv in branches] == kernel_sizes
                hidden = hidden + hand_shortcut(group_input, grid, branches, training)
            if stage.downsample is not None:
                hidden = stage.downsample(hidden, grid)
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        expected = model.layernorm(hidden)

    with torch.no_grad():  # the hand computation used copies of the running statistics: they are unchanged
        actual = model(pixel_values).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Sizes.


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(model_class=DWSwinForImageClassification, **fields):
    with torch.device("meta"):
        return model_class(DWSwinConfig(**fields))


def test_parameter_counts_match_the_paper():
    tiny = dict(dwvit.NAMED_SIZES["swin-tiny"][1], num_labels=10)
    with_shortcut = count(build_on_meta(**tiny))
    without = count(build_on_meta(**tiny, use_dw_shortcut=False))
    kernels_3_5 = count(build_on_meta(**tiny, dw_kernel_sizes=[3, 5]))
    # The paper gives 27.5M / 27.6M / 27.7M (Swin-T / + DW / + DW 3+5) to 0.1M, so each count lies within 0.05M.
    assert abs(without - 27.5e6) <= 0.05e6
    assert abs(with_shortcut - 27.6e6) <= 0.05e6
    assert abs(kernels_3_5 - 27.7e6) <= 0.05e6
    # Without the shortcut, exactly transformers' Swin-T.
    with torch.device("meta"):
        hf_tiny = SwinForImageClassification(SwinConfig(num_labels=10))
    assert without == count(hf_tiny)
    # One module per block: k*k*C + C conv weights and bias plus 2*C BatchNorm affine; 12*C for k = 3.
    widths_per_block = [96] * 2 + [192] * 2 + [384] * 6 + [768] * 2
    assert with_shortcut - without == sum(12 * c for c in widths_per_block) == 52_992
    assert kernels_3_5 - without == sum(12 * c + 28 * c for c in widths_per_block)
    # Span 3 groups each stage on its own: stages of 2, 2, 6, 2 blocks get 1, 1, 2, 1 modules.
    span3 = count(build_on_meta(**tiny, dw_block_span=3))
    assert span3 - without == 12 * (96 + 192 + 2 * 384 + 768)


def test_named_sizes():
    config = dwvit.named_config("swin-tiny", num_labels=10)
    assert (config.embed_dim, config.depths, config.num_heads, config.window_size) == (96, [2, 2, 6, 2], [3, 6, 12, 24], 7)
    assert (config.image_size, config.patch_size, config.drop_path_rate, config.use_dw_shortcut) == (224, 4, 0.2, True)
    assert config.hidden_size == 768 and config.num_hidden_layers == 4 and config.num_attention_heads == [3, 6, 12, 24]
    cifar = dwvit.named_config("swin-tiny-cifar")
    assert (cifar.image_size, cifar.patch_size, cifar.window_size) == (32, 2, 4)
    with torch.device("meta"):
        model = DWSwinModel(cifar)
    # Grids 16, 8, 4, 2: windows 4, 4, 4 (one per grid), 2 (clamped); shifts only where the grid exceeds the window.
    assert [s.blocks[0].window_size for s in model.encoder.layers] == [4, 4, 4, 2]
    assert [s.blocks[1].shift_size for s in model.encoder.layers] == [2, 2, 0, 0]


# --------------------------------------------------------------------------------------------------------------
# Model behaviour.


def test_labels_give_hard_and_soft_losses_and_tuples():
    torch.manual_seed(8)
    model = DWSwinForImageClassification(small_config()).eval()
    pixel_values = torch.randn(4, 3, 32, 32)
    hard = torch.tensor([0, 1, 4, 2])
    soft = torch.softmax(torch.randn(4, 5), dim=-1)
    with torch.no_grad():
        out = model(pixel_values, labels=hard, output_hidden_states=True)
        torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, hard))
        soft_out = model(pixel_values, labels=soft)
        torch.testing.assert_close(soft_out.loss, -(soft * torch.log_softmax(soft_out.logits, -1)).sum(-1).mean())
        as_tuple = model(pixel_values, labels=hard, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], out.logits)
    # Reshaped hidden states: the stem, then every stage after its patch merging, as (B, C, H, W).
    assert [tuple(h.shape) for h in out.reshaped_hidden_states] == [(4, 16, 16, 16), (4, 32, 8, 8), (4, 32, 8, 8)]
    torch.testing.assert_close(out.reshaped_hidden_states[1].flatten(2).transpose(1, 2), out.hidden_states[1])


def test_interpolate_pos_encoding_with_absolute_embeddings():
    torch.manual_seed(9)
    model = DWSwinForImageClassification(small_config(use_absolute_embeddings=True)).eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values, interpolate_pos_encoding=True).logits, model(pixel_values).logits)
        larger = model(torch.randn(2, 3, 48, 40), interpolate_pos_encoding=True, output_hidden_states=True)
    assert larger.logits.shape == (2, 5)
    assert larger.reshaped_hidden_states[0].shape == (2, 16, 24, 20)
    message = r"Input image size \(48x40\) doesn't match the model's image_size \(32x32\).*interpolate_pos_encoding=True"
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, 48, 40))


def test_gradient_checkpointing_keeps_the_shortcut_and_counts_batchnorm_once():
    torch.manual_seed(10)
    config = small_config()
    reference = DWSwinForImageClassification(config).train()
    checkpointed = DWSwinForImageClassification(config).train()
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(stage.gradient_checkpointing for stage in checkpointed.dwswin.encoder.layers)
    pixel_values, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    for model in (reference, checkpointed):
        model(pixel_values, labels=labels).loss.backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    shortcut_grad = checkpointed.dwswin.encoder.layers[1].shortcuts[0].branches[0].conv.weight.grad
    assert shortcut_grad is not None and shortcut_grad.abs().sum() > 0
    for (name, a), (_, b) in zip(reference.named_buffers(), checkpointed.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)  # includes num_batches_tracked: one update each


def test_drop_path_rises_over_all_blocks_and_is_stochastic_in_training_only():
    torch.manual_seed(11)
    model = DWSwinForImageClassification(small_config(drop_path_rate=0.3))
    blocks = [b for s in model.dwswin.encoder.layers for b in s.blocks]
    assert isinstance(blocks[0].drop_path, torch.nn.Identity)
    assert [b.drop_path.drop_prob for b in blocks[1:]] == pytest.approx([0.1, 0.2, 0.3])
    pixel_values = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, model(pixel_values).logits)
        model.train()
        assert not torch.equal(model(pixel_values).logits, model(pixel_values).logits)


def test_init_weights():
    torch.manual_seed(12)
    model = DWSwinForImageClassification(dwvit.named_config("swin-tiny", num_labels=10))
    block = model.dwswin.encoder.layers[2].blocks[1]
    assert abs(block.attention.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(block.attention.relative_position_bias_table.std().item() - 0.02) < 0.004
    conv = model.dwswin.encoder.layers[0].shortcuts[0].branches[0].conv.weight
    assert conv.abs().max() <= 1 / 3 + 1e-6 and conv.std() > 0.1  # PyTorch's Kaiming-uniform, fan_in 9
    index = block.attention.relative_position_index
    # Offsets (dy, dx) of query i and key j in a 7x7 window, flattened into a 13x13 table.
    assert index.shape == (49, 49) and index[0, 0] == 6 * 13 + 6 and index[0, 48] == 0 and index[48, 0] == 168


def test_bad_inputs_raise_clear_errors():
    model = DWSwinForImageClassification(small_config()).eval()
    with pytest.raises(ValueError, match="1 channels but the model expects num_channels=3"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D tensor"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="specify pixel_values"):
        model()


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(embed_dim=18, num_heads=[4, 4]), r"Stage 1 is 18 wide .* not divisible by its num_heads \(4\)"),
        (dict(embed_dim=16, num_heads=[2, 3]), r"Stage 2 is 32 wide .* not divisible by its num_heads \(3\)"),
        (dict(depths=[2, 2, 2]), r"depths and num_heads must have one entry per stage"),
        (dict(depths=[]), r"depths must be a non-empty list of positive ints"),
        (dict(dw_kernel_sizes=[4]), r"dw_kernel_sizes must hold positive odd ints.*got 4"),
        (dict(dw_kernel_sizes=[3, 6]), r"dw_kernel_sizes must hold positive odd ints.*got 6"),
        (dict(dw_block_span=0), r"dw_block_span must be an int >= 1"),
        (dict(dw_block_span=3), r"dw_block_span must be at most the number of blocks \(2\)"),
        (dict(window_size=0), r"window_size must be a positive int; got 0"),
        (dict(drop_path_rate=1.5), r"drop_path_rate must lie in \[0, 1\)"),
        (dict(image_size=1), r"image_size \(1\) must be at least one patch_size \(2\)"),
        (dict(out_features=["stage3"]), r"out_features must be a subset of stage_names"),
    ],
)
def test_invalid_config_values(fields, message):
    with pytest.raises(ValueError, match=message):
        small_config(**fields)


# --------------------------------------------------------------------------------------------------------------
# The backbone.


def test_backbone_feature_maps_and_channels():
    torch.manual_seed(13)
    config = small_config(depths=[2, 2, 2], num_heads=[1, 2, 4], out_features=["stage1", "stage2", "stage3"])
    backbone = AutoBackbone.from_config(config).eval()
    assert isinstance(backbone, DWSwinBackbone)
    assert backbone.stage_names == ["stem", "stage1", "stage2", "stage3"]
    assert backbone.channels == [16, 32, 64] and backbone.out_indices == [1, 2, 3]
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 36, 36), output_hidden_states=True)
    # 36 / patch 2 = 18, then ceil halves 9 and 5: stage maps are taken before each patch merging.
    assert [tuple(m.shape) for m in out.feature_maps] == [(2, 16, 18, 18), (2, 32, 9, 9), (2, 64, 5, 5)]
    # Each map is its stage's pre-merging state, LayerNorm-ed over channels by the backbone's own norm.
    for stage_index, feature_map in zip((1, 2, 3), out.feature_maps):
        state = out.hidden_states[stage_index]
        norm = backbone.hidden_states_norms[f"stage{stage_index}"]
        expected = F.layer_norm(state.permute(0, 2, 3, 1), (state.shape[1],), norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(feature_map, expected.permute(0, 3, 1, 2))
    assert out.attentions is None
    by_index = DWSwinBackbone(small_config(out_indices=[0, -1]))
    assert by_index.out_features == ["stem", "stage2"] and by_index.channels == [16, 32]
    default = DWSwinBackbone(small_config())
    assert default.out_features == ["stage2"]


# --------------------------------------------------------------------------------------------------------------
# The ecosystem: Auto classes, save/load, remote code, pipeline, Trainer.


def cifar_model(**overrides) -> DWSwinForImageClassification:
    config = DWSwinConfig(
        **{**SMALL, "drop_path_rate": 0.0, **overrides},
        **CIFAR10_LABELS,
    )
    return DWSwinForImageClassification(config)


def test_auto_classes_know_dwswin():
    config = AutoConfig.for_model("dwswin", **SMALL)
    assert isinstance(config, DWSwinConfig)
    assert isinstance(AutoModel.from_config(config), DWSwinModel)
    assert isinstance(AutoModelForImageClassification.from_config(config), DWSwinForImageClassification)


def test_save_and_load_round_trip_keeps_batchnorm_statistics(tmp_path):
    torch.manual_seed(14)
    model = cifar_model(dw_kernel_sizes=[3, 5], out_features=["stage1", "stage2"])
    warm_up_batchnorm(model)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert {"configuration_dwswin.py", "modeling_dwswin.py", "dw_layers.py", "configuration_dwvit.py"} <= files
    saved = load_file(tmp_path / "model.safetensors")
    assert not any("relative_position_index" in name for name in saved)  # derived, not a weight
    running_var = model.dwswin.encoder.layers[1].shortcuts[1].branches[1].norm.running_var
    assert (running_var - 1).abs().sum() > 0
    torch.testing.assert_close(saved["dwswin.encoder.layers.1.shortcuts.1.branches.1.norm.running_var"], running_var)

    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, DWSwinForImageClassification)
    assert reloaded.config.dw_kernel_sizes == [3, 5] and reloaded.config.id2label[3] == "cat"
    assert reloaded.config.out_features == ["stage1", "stage2"] and reloaded.config.depths == [2, 2]
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits, atol=0, rtol=0)
    for (name, a), (_, b) in zip(model.named_buffers(), reloaded.named_buffers()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_remote_code_loads_classifier_and_backbone_without_dwvit(tmp_path, run_without_dwvit):
    torch.manual_seed(15)
    model = cifar_model(dw_kernel_sizes=[3, 5, 7], dw_block_span=2)
    warm_up_batchnorm(model)
    model.save_pretrained(tmp_path / "classifier")
    backbone = DWSwinBackbone(small_config(out_features=["stage1", "stage2"]))
    warm_up_batchnorm(backbone)
    backbone.save_pretrained(tmp_path / "backbone")
    classifier_map = json.loads((tmp_path / "classifier" / "config.json").read_text())["auto_map"]
    assert classifier_map == {
        "AutoConfig": "configuration_dwswin.DWSwinConfig",
        "AutoModel": "modeling_dwswin.DWSwinModel",
        "AutoModelForImageClassification": "modeling_dwswin.DWSwinForImageClassification",
    }
    backbone_map = json.loads((tmp_path / "backbone" / "config.json").read_text())["auto_map"]
    assert backbone_map["AutoBackbone"] == "modeling_dwswin.DWSwinBackbone"

    pixel_values = torch.randn(2, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected_logits = model(pixel_values).logits
        expected_pooled = model.dwswin(pixel_values).pooler_output
        expected_maps = backbone(pixel_values).feature_maps

    result = run_without_dwvit(
        f"""
        import json, torch
        from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        try:
            import dwvit
            raise SystemExit("dwvit should not be importable here")
        except ImportError:
            pass
        root = {str(tmp_path)!r}
        model = AutoModelForImageClassification.from_pretrained(root + "/classifier", trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(root + "/classifier", trust_remote_code=True).eval()
        # AutoBackbone.from_pretrained asks the Hub whether a path is a repo before anything else (transformers
        # 5.24), so it rejects local folders; the auto_map entry resolves the same remote class instead.
        backbone_config = AutoConfig.from_pretrained(root + "/backbone", trust_remote_code=True)
        backbone_class = get_class_from_dynamic_module(backbone_config.auto_map["AutoBackbone"], root + "/backbone")
        backbone = backbone_class.from_pretrained(root + "/backbone").eval()
        pixels = torch.load(root + "/pixels.pt")
        with torch.no_grad():
            logits = model(pixels).logits
            pooled = base(pixels).pooler_output
            maps = backbone(pixels).feature_maps
        print(json.dumps({{"module": type(model).__module__, "base": type(base).__name__,
                           "backbone": type(backbone).__name__, "channels": backbone.channels,
                           "logits": logits.tolist(), "pooled": pooled.tolist(),
                           "maps": [m.tolist() for m in maps]}}))
        """
    )
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["module"].startswith("transformers_modules.") and payload["base"] == "DWSwinModel"
    assert payload["backbone"] == "DWSwinBackbone" and payload["channels"] == [16, 32]
    torch.testing.assert_close(torch.tensor(payload["logits"]), expected_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(payload["pooled"]), expected_pooled, atol=1e-5, rtol=0)
    for theirs, ours in zip(payload["maps"], expected_maps):
        torch.testing.assert_close(torch.tensor(theirs), ours, atol=1e-5, rtol=0)


def test_pipeline_on_real_cifar10_images(tmp_path, cifar10_test_slice):
    torch.manual_seed(16)
    model = cifar_model()
    warm_up_batchnorm(model)
    model.save_pretrained(tmp_path)
    dwvit.make_image_processor(32, dataset="cifar10").save_pretrained(tmp_path)
    images = [cifar10_test_slice[i]["img"] for i in range(6)]

    classifier = pipeline("image-classification", model=str(tmp_path), device="cpu")
    predictions = classifier(images, top_k=3)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        probabilities = model(**processor(images, return_tensors="pt")).logits.softmax(-1)
    for prediction, row in zip(predictions, probabilities):
        top = row.topk(3)
        assert [entry["label"] for entry in prediction] == [CIFAR10_NAMES[i] for i in top.indices.tolist()]
        np.testing.assert_allclose([entry["score"] for entry in prediction], top.values.numpy(), atol=1e-5)


def test_trainer_fine_tunes_on_real_cifar10(fine_tune_on_cifar10):
    torch.manual_seed(17)
    model = cifar_model(embed_dim=24, num_heads=[2, 4], window_size=4)
    fine_tune_on_cifar10(model, train_size=200, learning_rate=2e-3, batch_size=32, epochs=5, seed=17)
