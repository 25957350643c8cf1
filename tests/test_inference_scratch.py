"""Inference without autograd overwrites fresh intermediates in place (residual sums, the MLP's GELU, the
shortcut's BatchNorm); it must compute exactly what the autograd forward computes and leave every tensor a
caller holds untouched."""

from __future__ import annotations

import pytest
import torch

from dwvit import DWCaiTModel, DWSwinModel, DWViTModel
from conftest import randomise_shortcut_statistics
from test_dwcait import small_config as cait_config
from test_dwswin import small_config as swin_config
from test_dwvit import small_config as vit_config

FAMILIES = {
    "vit": (DWViTModel, vit_config),
    "cait": (DWCaiTModel, cait_config),
    "swin": (DWSwinModel, swin_config),
}


def flatten(output) -> list[torch.Tensor]:
    tensors = []
    for item in output.to_tuple():
        tensors.extend(item if isinstance(item, tuple) else [item])
    return tensors


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_inference_without_autograd_matches_the_recorded_forward(family, hidden_act):
    model_class, make_config = FAMILIES[family]
    torch.manual_seed(17)
    model = model_class(make_config(hidden_act=hidden_act, dw_kernel_sizes=[3, 5], dw_block_span=2))
    randomise_shortcut_statistics(model, torch.Generator().manual_seed(18))
    model.eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    original_pixels = pixel_values.clone()

    recorded = flatten(model(pixel_values, output_hidden_states=True))
    assert recorded[0].requires_grad  # the reference really ran with autograd
    with torch.inference_mode():
        scratch = flatten(model(pixel_values, output_hidden_states=True))

    assert torch.equal(pixel_values, original_pixels)
    assert len(scratch) == len(recorded) > 3  # the pooled output and every returned hidden state
    for got, want in zip(scratch, recorded):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inference_without_autograd_under_bf16_autocast_keeps_the_recorded_dtypes(family):
    """Under autocast the branches run in bf16 while the residual stream stays fp32: an in-place sum would round
    the stream to bf16 where the recorded forward promotes, so every hidden state must keep its dtype."""
    model_class, make_config = FAMILIES[family]
    torch.manual_seed(19)
    model = model_class(make_config()).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recorded = flatten(model(pixel_values, output_hidden_states=True))
        with torch.inference_mode():
            scratch = flatten(model(pixel_values, output_hidden_states=True))
    assert recorded[0].requires_grad
    assert [t.dtype for t in scratch] == [t.dtype for t in recorded]
    for got, want in zip(scratch, recorded):
        # Both run bf16 matmuls; BatchNorm as an affine map and the in-place GELU round differently in the last bit.
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
