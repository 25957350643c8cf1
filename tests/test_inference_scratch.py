"""Inference without autograd computes what the autograd forward computes and writes into no tensor that a
caller passed or a submodule returned: forward hooks on every module see tensors that stay as they were."""

from __future__ import annotations

import pytest
import torch

from dwvit import DWCaiTModel, DWSwinModel, DWViTModel, DepthwiseShortcut
from conftest import randomise_shortcut_statistics
from test_dwcait import small_config as cait_config
from test_dwswin import small_config as swin_config
from test_dwvit import small_config as vit_config

FAMILIES = {
    "vit": (DWViTModel, vit_config),
    "cait": (DWCaiTModel, cait_config),
    "swin": (DWSwinModel, swin_config),
}


def tensors_in(value) -> list[torch.Tensor]:
    """Every tensor in a (nested) tuple, list, dict or ModelOutput."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):  # ModelOutput included
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in tensors_in(item)]
    return []


def run_with_hooks(model: torch.nn.Module, pixel_values: torch.Tensor, mode):
    """Forward under `mode` with a hook on every module (the model included) that records each input when the
    module is called and each output when it returns, as `(name, original, clone at that moment)`."""
    records = []

    def record(name, value):
        records.extend((name, tensor, tensor.detach().clone()) for tensor in tensors_in(value))

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(
            lambda module, args, kwargs, name=name: record(f"{name} input", (args, kwargs)), with_kwargs=True
        ))
        handles.append(module.register_forward_hook(
            lambda module, args, output, name=name: record(f"{name} output", output)
        ))
    try:
        with mode():
            model(pixel_values, output_hidden_states=True, output_attentions=False)
    finally:
        for handle in handles:
            handle.remove()
    return records


def build(family: str, hidden_act: str = "gelu") -> torch.nn.Module:
    model_class, make_config = FAMILIES[family]
    torch.manual_seed(17)
    model = model_class(make_config(hidden_act=hidden_act, dw_kernel_sizes=[3, 5], dw_block_span=2))
    randomise_shortcut_statistics(model, torch.Generator().manual_seed(18))
    return model.eval()


def assert_untouched_and_equal_to_autograd(model, mode) -> None:
    pixel_values = torch.randn(2, 3, 32, 32)
    without_autograd = run_with_hooks(model, pixel_values, mode)
    shortcut_names = {name for name, module in model.named_modules() if isinstance(module, DepthwiseShortcut)}
    assert {f"{name} output" for name in shortcut_names} <= {name for name, _, _ in without_autograd}
    for name, original, at_capture in without_autograd:
        # Still what the module received or returned, though everything after it has run since.
        assert torch.equal(original, at_capture), f"{name} was modified after it was captured"

    with_autograd = run_with_hooks(model, pixel_values, torch.enable_grad)
    assert any(original.requires_grad for _, original, _ in with_autograd)  # the reference recorded a graph
    assert [name for name, _, _ in without_autograd] == [name for name, _, _ in with_autograd]
    for (name, _, got), (_, _, want) in zip(without_autograd, with_autograd):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_without_autograd_modifies_no_hooked_tensor_and_matches_autograd(family, hidden_act, mode):
    assert_untouched_and_equal_to_autograd(build(family, hidden_act), mode)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_identity_activation_in_the_shortcut_corrupts_nothing(family):
    """Without the GELU the grid the norm reads is a view of the block input itself."""
    model = build(family)
    for module in model.modules():
        if isinstance(module, DepthwiseShortcut):
            module.activation = torch.nn.Identity()
    assert_untouched_and_equal_to_autograd(model, torch.no_grad)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inference_without_autograd_under_bf16_autocast_keeps_the_recorded_dtypes(family):
    """Under autocast the layers run in bf16 (the shortcut in float32) while DWViT's and DWCaiT's residual
    stream stays fp32: every hidden state keeps the dtype the autograd forward gives it."""
    model = build(family)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recorded = tensors_in(model(pixel_values, output_hidden_states=True))
        with torch.inference_mode():
            scratch = tensors_in(model(pixel_values, output_hidden_states=True))
    assert recorded[0].requires_grad
    assert [t.dtype for t in scratch] == [t.dtype for t in recorded]
    for got, want in zip(scratch, recorded):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
