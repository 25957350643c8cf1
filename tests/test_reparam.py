"""Re-parameterized inference: BatchNorm folded into the depth-wise conv, parallel kernels merged, exact borders."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from dwvit.models.dw_layers import DepthwiseShortcut


def _family(name: str):
    """(config class, classification class) of a family."""
    configuration = importlib.import_module(f"dwvit.models.configuration_{name}")
    modeling = importlib.import_module(f"dwvit.models.modeling_{name}")
    prefix = {"dwvit": "DWViT", "dwcait": "DWCaiT", "dwswin": "DWSwin"}[name]
    return getattr(configuration, f"{prefix}Config"), getattr(modeling, f"{prefix}ForImageClassification")


def _small_config(name: str, kernels, span):
    config_class, model_class = _family(name)
    common = dict(image_size=32, num_labels=7, dw_kernel_sizes=kernels, dw_block_span=span)
    if name == "dwvit":
        fields = dict(patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    elif name == "dwcait":
        fields = dict(
            patch_size=4, hidden_size=32, num_hidden_layers=3, num_class_attention_layers=1,
            num_attention_heads=2, intermediate_size=64,
        )
    else:
        fields = dict(patch_size=2, embed_dim=16, depths=[3, 3], num_heads=[2, 4], window_size=4, drop_path_rate=0.0)
    return config_class(**common, **fields), model_class


def _randomize_shortcuts(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every shortcut BatchNorm statistics and affine terms far from the identity, so folding is non-trivial."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DepthwiseShortcut):
                for branch in module.branches:
                    norm, conv = branch.norm, branch.conv
                    norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=generator))
                    norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=generator) * 2 + 0.2)
                    norm.weight.copy_(torch.randn(norm.weight.shape, generator=generator))
                    norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator))
                    conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)


def _build(name: str, kernels, span, seed: int = 0):
    config, model_class = _small_config(name, kernels, span)
    torch.manual_seed(seed)
    model = model_class(config)
    _randomize_shortcuts(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


FAMILIES = ["dwvit", "dwcait", "dwswin"]
KERNELS = [[3], [3, 5], [3, 5, 7]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kernels", KERNELS, ids=["k3", "k3+5", "k3+5+7"])
def test_fused_logits_equal_unfused(family, kernels):
    model = _build(family, kernels, span=1)
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(pixel_values).logits
        assert model.fuse_dw_shortcuts() is model
        assert model.dw_shortcuts_fused
        fused = model(pixel_values).logits
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)
    shortcuts = [m for m in model.modules() if isinstance(m, DepthwiseShortcut)]
    # One conv of the largest kernel replaces all branches.
    assert all(m.fused_weight.shape[-1] == max(kernels) for m in shortcuts)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("span", [1, 2, 3])
def test_fused_logits_equal_unfused_across_spans(family, span):
    model = _build(family, [3, 5, 7], span=span, seed=span)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(pixel_values).logits
        fused = model.fuse_dw_shortcuts()(pixel_values).logits
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_at_a_second_resolution_through_interpolate_pos_encoding(family):
    model = _build(family, [3, 5], span=1)
    small = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    large = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected_large = model(large, interpolate_pos_encoding=True).logits
        expected_small = model(small).logits
        model.fuse_dw_shortcuts()
        # Alternate resolutions so a bias map cached for one grid is never reused for the other.
        fused_large = model(large, interpolate_pos_encoding=True).logits
        fused_small = model(small).logits
        fused_large_again = model(large, interpolate_pos_encoding=True).logits
    torch.testing.assert_close(fused_large, expected_large, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused_small, expected_small, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused_large_again, expected_large, rtol=0, atol=1e-5)


def test_fused_shortcut_matches_a_hand_computation_and_needs_a_position_dependent_bias():
    """The fused module against functional ops; a single per-channel bias would be wrong at the borders."""
    torch.manual_seed(0)
    channels, height, width = 6, 5, 7
    shortcut = DepthwiseShortcut(channels, (3, 5), batch_norm_eps=1e-5)
    _randomize_shortcuts(shortcut, torch.Generator().manual_seed(1))
    shortcut.eval()
    tokens = torch.randn(2, height * width, channels)
    grid = F.gelu(tokens.reshape(2, height, width, channels).permute(0, 3, 1, 2))
    expected = torch.zeros(2, channels, height, width)
    naive_bias = torch.zeros(channels)
    for branch in shortcut.branches:
        norm, conv = branch.norm, branch.conv
        normalized = F.batch_norm(grid, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        k = conv.kernel_size[0]
        expected += F.conv2d(normalized, conv.weight, conv.bias, padding=k // 2, groups=channels)
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        naive_bias += conv.bias + (norm.bias - norm.running_mean * scale) * conv.weight.sum(dim=(1, 2, 3))
    expected = expected.permute(0, 2, 3, 1).reshape(2, height * width, channels)

    with torch.no_grad():
        shortcut.fuse()
        fused = shortcut(tokens, height, width)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)

    # Folding the shift into one constant per channel is exact only where the whole 5x5 window lies inside.
    bias_map = shortcut._bias_map(height, width, torch.float32)[0]
    interior = bias_map[:, 2 : height - 2, 2 : width - 2]
    torch.testing.assert_close(interior, naive_bias.view(-1, 1, 1).expand_as(interior), rtol=0, atol=1e-5)
    assert (bias_map[:, 0, 0] - naive_bias).abs().max() > 1e-2


def test_train_undoes_fusion_and_fusing_in_training_mode_is_refused():
    model = _build("dwvit", [3, 5], span=1)
    pixel_values = torch.randn(2, 3, 32, 32)
    model.fuse_dw_shortcuts()
    model.train()
    assert not model.dw_shortcuts_fused
    with pytest.raises(RuntimeError, match="eval"):
        model.fuse_dw_shortcuts()
    # Training after the undo updates the branches, and a new fusion sees the new parameters and statistics.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(pixel_values, labels=torch.tensor([1, 2])).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values).logits
        fused = model.fuse_dw_shortcuts()(pixel_values).logits
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)


def test_save_after_fusion_writes_the_unfused_weights(tmp_path):
    """The fused tensors are derived, non-persistent state: a saved fused model reloads unfused, same logits."""
    from transformers import AutoModelForImageClassification

    import dwvit  # noqa: F401  (registers the Auto classes)

    model = _build("dwvit", [3, 5, 7], span=2)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused_logits = model.fuse_dw_shortcuts()(pixel_values).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert not reloaded.dw_shortcuts_fused
    assert not any("fused" in key for key in reloaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, fused_logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(reloaded.fuse_dw_shortcuts()(pixel_values).logits, fused_logits, rtol=0, atol=1e-5)


def test_fused_model_follows_dtype_and_device_moves():
    model = _build("dwvit", [3, 5], span=1)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values).logits
        model.fuse_dw_shortcuts()
        model.to(torch.float64)
        fused = model(pixel_values.double()).logits
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused.float(), expected, rtol=0, atol=1e-5)


def test_bias_map_cached_in_inference_mode_serves_a_later_gradient_pass():
    """A map cached under `torch.inference_mode` must not break a later forward that records autograd."""
    model = _build("dwvit", [3], span=1)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values).logits
    model.fuse_dw_shortcuts()
    with torch.inference_mode():
        model(pixel_values)
    pixel_values.requires_grad_()
    logits = model(pixel_values).logits
    logits.sum().backward()
    torch.testing.assert_close(logits.detach(), expected, rtol=0, atol=1e-5)
    assert pixel_values.grad is not None and pixel_values.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_loading_weights_after_fusion_unfuses(family):
    """Fused tensors derive from the weights: loading new ones must not leave the old fold in place."""
    model = _build(family, [3, 5], span=1, seed=0)
    other = _build(family, [3, 5], span=1, seed=7)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = other(pixel_values).logits
        model.fuse_dw_shortcuts()
        model.load_state_dict(other.state_dict())
        assert not model.dw_shortcuts_fused
        torch.testing.assert_close(model(pixel_values).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(model.fuse_dw_shortcuts()(pixel_values).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fusion_of_a_half_precision_shortcut_is_the_float32_fold_rounded_once(dtype):
    """The fold of half-precision weights equals the float32 fold of the same values, cast at the end."""
    shortcut = DepthwiseShortcut(8, (3, 5))
    _randomize_shortcuts(shortcut, torch.Generator().manual_seed(8))
    low = shortcut.to(dtype).eval()
    reference = copy.deepcopy(low).float()  # the same (rounded) values, in float32
    low.fuse()
    reference.fuse()
    assert low.fused_weight.dtype == dtype
    torch.testing.assert_close(low.fused_weight, reference.fused_weight.to(dtype), rtol=0, atol=0)
    # GELU(0) = 0, so zero tokens give the bias map alone: the border terms summed, then rounded once.
    zeros = torch.zeros(2, 5 * 7, 8)
    with torch.no_grad():
        got = low(zeros.to(dtype), 5, 7)
        want = reference(zeros, 5, 7).to(dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
