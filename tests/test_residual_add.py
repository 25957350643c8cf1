"""The last block of every shortcut group leaves its final residual add to the shortcut's kernel pass (issue 20):
the same values, gradients and BatchNorm statistics as when the block adds it, in every family; a hooked block keeps
its own add and its hooks see its own output; and the add is gone from the model's ops."""

from __future__ import annotations

import contextlib
import copy
import shutil
from unittest import mock

import pytest
import torch

from dwvit import (
    DepthwiseShortcut,
    DWCaiTConfig,
    DWCaiTForImageClassification,
    DWSwinConfig,
    DWSwinForImageClassification,
    DWViTConfig,
    DWViTForImageClassification,
)
from dwvit.models import dw_shortcut_kernel

FAMILIES = {
    "dwvit": (DWViTConfig, DWViTForImageClassification, dict(
        image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96,
    )),
    "dwcait": (DWCaiTConfig, DWCaiTForImageClassification, dict(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_class_attention_layers=2,
        num_attention_heads=4, intermediate_size=64,
    )),
    "dwswin": (DWSwinConfig, DWSwinForImageClassification, dict(
        image_size=32, patch_size=2, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
    )),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _kernel_built():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the shortcut runs as PyTorch ops and the block keeps its add")
    assert dw_shortcut_kernel.load_library() is not None


def build(family: str, **overrides):
    config_class, model_class, small = FAMILIES[family]
    torch.manual_seed(0)
    model = model_class(config_class(**{**small, "num_labels": 5, **overrides}))
    with torch.no_grad():  # BatchNorm away from its initial identity, so that a wrong statistic shows
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


@contextlib.contextmanager
def blocks_add_their_residual():
    """Every block adds its own residual, as before the hand-over."""
    with mock.patch.object(DepthwiseShortcut, "takes_residual_add", lambda self, block: False):
        yield


def shortcut_groups(model) -> int:
    return sum(1 for module in model.modules() if isinstance(module, DepthwiseShortcut))


def last_blocks(model) -> list[torch.nn.Module]:
    """The last block of each shortcut group, from the encoders' `groups`."""
    blocks = []
    for module in model.modules():
        groups, layers = getattr(module, "groups", None), getattr(module, "layers", getattr(module, "blocks", None))
        if groups is not None and isinstance(layers, torch.nn.ModuleList):
            blocks += [layers[end - 1] for _, end in groups]
    return blocks


def step(model, pixels, labels, seed):
    torch.manual_seed(seed)  # the same stochastic-depth draws in both models
    loss = model(pixel_values=pixels, labels=labels).loss
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("span", [1, 2])
def test_handing_the_add_over_trains_exactly_as_the_blocks_adding_it(family, span):
    model = build(family, dw_block_span=span, drop_path_rate=0.2).train()
    reference = copy.deepcopy(model)
    pixels, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with mock.patch.object(DepthwiseShortcut, "takes_residual_add", autospec=True,
                           side_effect=DepthwiseShortcut.takes_residual_add) as asked:  # fmt: skip
        loss = step(model, pixels, labels, seed=5)
    assert asked.call_count == shortcut_groups(model) and all(call.args[1] in last_blocks(model) for call in
                                                               asked.call_args_list)  # fmt: skip
    with blocks_add_their_residual():
        expected = step(reference, pixels, labels, seed=5)
    assert torch.equal(loss, expected)
    for (name, parameter), expected_parameter in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(parameter.grad, expected_parameter.grad), name
    for (name, buffer), expected_buffer in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(buffer, expected_buffer), name


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_handing_the_add_over_infers_exactly_as_the_blocks_adding_it_and_removes_one_add_per_group(family, fused):
    model = build(family).eval()
    if fused:
        model.fuse_dw_shortcuts()
    pixels = torch.randn(3, 3, 32, 32)

    def counts_and_logits():
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            logits = model(pixel_values=pixels).logits
        counts = {event.key: event.count for event in profile.key_averages()}
        return counts.get("aten::add", 0), counts.get("_KernelShortcut", 0), logits

    counts_and_logits()  # the eval fold is cached on the first call: its own ops must not be counted
    adds, kernel_calls, logits = counts_and_logits()
    with blocks_add_their_residual():
        expected_adds, _, expected_logits = counts_and_logits()
    assert torch.equal(logits, expected_logits)
    assert kernel_calls == shortcut_groups(model)  # every shortcut, the first group's included
    assert expected_adds - adds == shortcut_groups(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_hooked_block_keeps_its_add_and_its_hook_sees_the_block_output(family):
    model = build(family).eval()
    block = last_blocks(model)[0]
    inputs, outputs = [], []
    block.register_forward_pre_hook(lambda module, args: inputs.append(args))
    block.register_forward_hook(lambda module, args, output: outputs.append(output[0]))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        with blocks_add_their_residual():
            expected_logits = model(pixel_values=pixels).logits
        alone = block.forward(*inputs[0])[0]  # the block by itself, hooks aside
    assert torch.equal(logits, expected_logits)
    assert isinstance(outputs[0], torch.Tensor) and torch.equal(outputs[0], outputs[1])
    assert torch.equal(outputs[0], alone)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_under_bf16_autocast_a_low_precision_branch_still_gets_the_kernels_adding_pass(family, mode):
    """Autocast leaves the last branch in bf16, which the kernel cannot add: the group must then add the residual
    itself and still hand the float32 sum to the kernel's adding pass, as the block's own add did, rather than fall
    back to a separate shortcut and add (more passes, more memory)."""
    model = build(family).train(mode == "train")
    pixels = torch.randn(2, 3, 32, 32)

    def adding_calls_and_logits():
        calls = []

        def recording(*args, **kwargs):
            calls.append(len(args) > 5 or "block_output" in kwargs)  # given a tensor to add to
            return dw_shortcut_kernel.kernel_shortcut(*args, **kwargs)

        with mock.patch("dwvit.models.dw_layers.kernel_shortcut", recording), torch.autocast("cpu", torch.bfloat16):
            torch.manual_seed(1)
            logits = model(pixel_values=pixels).logits
        return calls, logits

    with blocks_add_their_residual():
        expected_calls, expected_logits = adding_calls_and_logits()
    calls, logits = adding_calls_and_logits()
    if family != "dwswin":  # DWSwin's tokens are bf16 under autocast: its kernel computes the shortcut alone
        assert expected_calls == [True] * shortcut_groups(model)
    assert calls == expected_calls
    assert torch.equal(logits, expected_logits)
