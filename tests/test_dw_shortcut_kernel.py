"""The fused CPU kernel of the depth-wise shortcut (issue 20): values, gradients and BatchNorm statistics against the
hand computation over grid shapes, kernel sizes and channel counts that reach every code path (vector blocks of 64
and 16 channels and the single-channel tail; kernels 3, 5, 7 and others; grids smaller than the kernel), the
one-pass add, when the kernel steps aside, and its build."""

from __future__ import annotations

import copy
import platform
import shlex
import shutil
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

from dwvit import DepthwiseShortcut, DWViTConfig, DWViTForImageClassification
from dwvit.models import dw_shortcut_kernel
from dwvit.models.dw_layers import add_shortcut, reference_shortcut
from dwvit.models.dw_shortcut_kernel import kernel_adds, kernel_applies
from conftest import hand_shortcut, randomise_shortcut_statistics


@pytest.fixture(autouse=True)
def _kernel_built():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the shortcut runs as PyTorch ops")
    assert dw_shortcut_kernel.load_library() is not None, "the kernel did not build with the compiler present"


def make_shortcut(channels, kernels, training, seed=40):
    torch.manual_seed(seed)
    shortcut = DepthwiseShortcut(channels, kernels).train(training)
    randomise_shortcut_statistics(shortcut, torch.Generator().manual_seed(seed + 1))
    return shortcut


def hand_statistics(tokens, norm, num_prefix_tokens):
    """`nn.BatchNorm2d`'s running statistics after one training batch (momentum 0.1), written out."""
    activated = torch.nn.functional.gelu(tokens[:, num_prefix_tokens:].detach()).reshape(-1, tokens.shape[-1])
    mean, variance = activated.mean(0), activated.var(0, unbiased=True)
    return 0.9 * norm.running_mean + 0.1 * mean, 0.9 * norm.running_var + 0.1 * variance


SHAPES = {  # (channels, kernels, grid): every vector width and the tail; grids smaller than the kernel
    "c8-k3": (8, [3], (4, 5)),
    "c20-k357": (20, [3, 5, 7], (4, 5)),
    "c70-k5": (70, [5], (3, 6)),
    "c96-k3": (96, [3], (6, 6)),
    "c16-k7-tiny-grid": (16, [7], (2, 3)),
    "c33-k35-one-row": (33, [3, 5], (1, 7)),
    "c24-k9-any-size": (24, [9], (5, 6)),  # the kernel-size-generic loops (3, 5 and 7 have unrolled ones)
    "c17-k1": (17, [1], (3, 3)),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("num_prefix_tokens", [0, 1])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_kernel_matches_the_hand_computation(shape, num_prefix_tokens, training):
    channels, kernels, (height, width) = SHAPES[shape]
    shortcut = make_shortcut(channels, kernels, training)
    branches = [(branch.norm, branch.conv) for branch in shortcut.branches]
    tokens = torch.randn(3, num_prefix_tokens + height * width, channels, requires_grad=True)
    block_output = torch.randn(3, num_prefix_tokens + height * width, channels, requires_grad=True)
    weights = torch.randn_like(block_output)
    assert kernel_adds(shortcut, block_output, tokens)
    expected_statistics = [hand_statistics(tokens, norm, num_prefix_tokens) for norm, _ in branches]
    expected = block_output + hand_shortcut(tokens, (height, width), branches, training, num_prefix_tokens)
    inputs = [tokens, block_output, *shortcut.parameters()]
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    tokens_before, block_before = tokens.detach().clone(), block_output.detach().clone()

    actual = shortcut.add_to(block_output, tokens, height, width, num_prefix_tokens)
    actual_grads = torch.autograd.grad((actual * weights).sum(), inputs)

    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(actual_grads[0][:, :num_prefix_tokens], torch.zeros_like(actual_grads[0][:, :num_prefix_tokens]))
    if training:
        for branch, (mean, variance) in zip(shortcut.branches, expected_statistics):
            torch.testing.assert_close(branch.norm.running_mean, mean, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(branch.norm.running_var, variance, atol=1e-6, rtol=1e-5)
    assert torch.equal(tokens, tokens_before) and torch.equal(block_output, block_before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_kernel_gelu_holds_over_the_whole_input_range(training):
    """The kernel's GELU (a clamped rational erf, and A&S 7.1.26 in the input gradient) against the exact function in
    float64, on tokens from -30 to 30: the clamp, both tails and the centre."""
    shortcut = make_shortcut(32, [3], training)
    exact = copy.deepcopy(shortcut).double()
    order = torch.randperm(2 * 65 * 32, generator=torch.Generator().manual_seed(9))
    tokens = torch.linspace(-30, 30, 2 * 65 * 32)[order].reshape(2, 65, 32).requires_grad_()
    weights = torch.randn(2, 64, 32)
    assert kernel_applies(shortcut, tokens)
    output = shortcut(tokens, 8, 8, 1)
    branches = [(branch.norm, branch.conv) for branch in exact.branches]
    expected = hand_shortcut(tokens.double(), (8, 8), branches, training, 1)[:, 1:]
    torch.testing.assert_close(output.double(), expected, atol=2e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad((output * weights).sum(), tokens)
    (expected_grad,) = torch.autograd.grad((expected * weights.double()).sum(), tokens)
    torch.testing.assert_close(grad.double(), expected_grad.double(), atol=2e-5, rtol=1e-4)


def test_kernel_gelu_keeps_the_sign_of_its_input_and_the_exact_value():
    """An eval shortcut whose BatchNorm and 1x1 conv are the identity outputs the kernel's GELU itself: it never has
    the opposite sign of its input nor exceeds it (Phi within [0, 1]), and is within 1e-6 of the float64 GELU."""
    shortcut = DepthwiseShortcut(16, [1]).eval()
    with torch.no_grad():
        norm, conv = shortcut.branches[0].norm, shortcut.branches[0].conv
        norm.running_mean.zero_(), norm.running_var.fill_(1 - norm.eps), norm.weight.fill_(1), norm.bias.zero_()
        conv.weight.fill_(1), conv.bias.zero_()
    tokens = torch.linspace(-12, 12, 480_000).reshape(125, 15 * 16, 16)
    assert kernel_applies(shortcut, tokens)
    with torch.no_grad():
        gelu = shortcut(tokens, 15, 16)
    exact = tokens.double() * 0.5 * torch.erfc(-tokens.double() / 2**0.5)
    negative, positive = tokens < 0, tokens > 0
    assert (gelu[negative] <= 0).all() and (gelu[positive] >= 0).all() and (gelu[positive] <= tokens[positive]).all()
    torch.testing.assert_close(gelu.double(), exact, atol=1e-6, rtol=0)


def test_statistics_stay_exact_when_the_mean_dwarfs_the_deviation():
    """Large activations with a small spread: a sum of squares in float would cancel; BatchNorm's own update is
    the reference."""
    shortcut = make_shortcut(32, [3], training=True)
    reference = copy.deepcopy(shortcut)
    tokens = 40 + 0.5 * torch.randn(8, 1 + 64, 32)
    shortcut(tokens, 8, 8, 1)
    reference_shortcut(reference, tokens, 8, 8, 1)
    for branch, expected in zip(shortcut.branches, reference.branches):
        torch.testing.assert_close(branch.norm.running_var, expected.norm.running_var, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(branch.norm.running_mean, expected.norm.running_mean, atol=1e-6, rtol=1e-6)


def test_the_module_output_is_the_shortcut_alone_and_matches_the_plain_modules():
    shortcut = make_shortcut(48, [3, 5], training=False)
    tokens = torch.randn(2, 1 + 35, 48)
    assert kernel_applies(shortcut, tokens)
    output = shortcut(tokens, 5, 7, 1)
    assert output.shape == (2, 35, 48)
    torch.testing.assert_close(output, reference_shortcut(shortcut, tokens, 5, 7, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_same_values_with_and_without_autograd(training):
    shortcut = make_shortcut(24, [3, 5], training)
    twin = copy.deepcopy(shortcut)
    tokens, block_output = torch.randn(2, 1 + 20, 24), torch.randn(2, 1 + 20, 24)
    with torch.no_grad():
        without = shortcut.add_to(block_output, tokens, 4, 5, 1)
    with_grad = twin.add_to(block_output, tokens.clone().requires_grad_(), 4, 5, 1)
    assert torch.equal(without, with_grad)


def test_a_run_repeats_bit_for_bit():
    results = []
    for _ in range(2):
        shortcut = make_shortcut(40, [3, 7], training=True)
        tokens = torch.randn(6, 1 + 49, 40, generator=torch.Generator().manual_seed(3)).requires_grad_()
        output = shortcut.add_to(torch.zeros_like(tokens), tokens, 7, 7, 1)
        grads = torch.autograd.grad(output.pow(2).sum(), [tokens, *shortcut.parameters()])
        results.append((output, grads, shortcut.branches[0].norm.running_var.clone()))
    (first, first_grads, first_var), (second, second_grads, second_var) = results
    assert torch.equal(first, second) and torch.equal(first_var, second_var)
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads))


def test_fused_inference_through_the_kernel_matches_the_unfused_modules():
    shortcut = make_shortcut(64, [3, 5, 7], training=False)
    tokens, block_output = torch.randn(2, 1 + 48, 64), torch.randn(2, 1 + 48, 64)
    expected = add_shortcut(block_output, reference_shortcut(shortcut, tokens, 6, 8, 1), 1)
    shortcut.fuse()
    assert kernel_adds(shortcut, block_output, tokens)
    torch.testing.assert_close(shortcut.add_to(block_output, tokens, 6, 8, 1), expected, atol=1e-5, rtol=1e-5)
    # An input gradient through the fused form (a saliency map) is the unfused one.
    tokens.requires_grad_()
    (fused_grad,) = torch.autograd.grad(shortcut.add_to(block_output, tokens, 6, 8, 1).sum(), tokens)
    shortcut.unfuse()
    unfused = add_shortcut(block_output, reference_shortcut(shortcut, tokens, 6, 8, 1), 1)
    (unfused_grad,) = torch.autograd.grad(unfused.sum(), tokens)
    torch.testing.assert_close(fused_grad, unfused_grad, atol=1e-5, rtol=1e-5)


def test_eval_folding_follows_weights_changed_in_place():
    """The folded kernel is cached in eval mode: an in-place weight or statistics update must not serve the old one."""
    shortcut = make_shortcut(16, [3], training=False)
    tokens = torch.randn(2, 1 + 16, 16)
    shortcut(tokens, 4, 4, 1)
    with torch.no_grad():
        shortcut.branches[0].conv.weight.mul_(2)
        shortcut.branches[0].norm.running_var.add_(1)
    torch.testing.assert_close(shortcut(tokens, 4, 4, 1), reference_shortcut(shortcut, tokens, 4, 4, 1))


def test_eval_after_a_training_step_uses_the_moved_running_statistics():
    """The kernel moves running statistics itself: an eval fold cached before a training step must not be reused."""
    shortcut = make_shortcut(16, [3, 5], training=False)
    tokens = torch.randn(4, 1 + 16, 16)
    shortcut(tokens, 4, 4, 1)
    versions = [branch.norm.running_var._version for branch in shortcut.branches]
    shortcut.train()(3 + tokens, 4, 4, 1)
    assert all(branch.norm.running_var._version > v for branch, v in zip(shortcut.branches, versions))
    shortcut.eval()
    torch.testing.assert_close(shortcut(tokens, 4, 4, 1), reference_shortcut(shortcut, tokens, 4, 4, 1))


@pytest.mark.parametrize("num_prefix_tokens", [0, 1])
@pytest.mark.parametrize("mode", ["train", "eval", "fused"])
def test_the_kernel_adds_a_residual_as_the_block_would_have(num_prefix_tokens, mode):
    """`add_to(branch, tokens, ..., residual=r)` is `add_shortcut(branch + r, shortcut(tokens))`, the block's own add
    then the shortcut's, to the bit; both addends get the output's gradient."""
    shortcut = make_shortcut(24, [3, 5], training=mode == "train")
    if mode == "fused":
        shortcut.fuse()
    reference = copy.deepcopy(shortcut)
    shape = (3, num_prefix_tokens + 20, 24)
    tokens, branch, residual = (torch.randn(shape, requires_grad=True) for _ in range(3))
    assert kernel_adds(shortcut, branch, tokens, residual)
    output = shortcut.add_to(branch, tokens, 4, 5, num_prefix_tokens, residual=residual)
    expected_inputs = [tensor.detach().clone().requires_grad_() for tensor in (tokens, branch, residual)]
    with mock.patch.object(dw_shortcut_kernel, "load_library", lambda: None):  # the PyTorch-ops path
        expected = add_shortcut(expected_inputs[1] + expected_inputs[2],
                                reference(expected_inputs[0], 4, 5, num_prefix_tokens), num_prefix_tokens)  # fmt: skip
    # The kernel's stencil sums in its own order: the shortcut agrees to rounding, the adds around it exactly.
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # in training, the same batch statistics again
        assert torch.equal(output, shortcut.add_to(branch + residual, tokens, 4, 5, num_prefix_tokens))
    output_grad = torch.randn(shape)
    output.backward(output_grad)
    expected.backward(output_grad)
    assert torch.equal(branch.grad, output_grad) and torch.equal(residual.grad, output_grad)
    torch.testing.assert_close(tokens.grad, expected_inputs[0].grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("adds", [False, True], ids=["shortcut", "added"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_an_inference_pass_through_the_kernel_shows_in_a_profile(adds, fused):
    """The eval forward is one ctypes call with no autograd node: a profile must still name it, as it names the
    training node."""
    shortcut = make_shortcut(16, [3, 5], training=False)
    if fused:
        shortcut.fuse()
    tokens, block_output = torch.randn(2, 1 + 16, 16), torch.randn(2, 1 + 16, 16)
    assert kernel_applies(shortcut, tokens)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        shortcut.add_to(block_output, tokens, 4, 4, 1) if adds else shortcut(tokens, 4, 4, 1)
    events = {event.key: event.count for event in profile.key_averages()}
    assert events.get("_KernelShortcut") == 1, sorted(events)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as training_profile:
        shortcut.train()(tokens.requires_grad_(), 4, 4, 1).sum().backward()
    assert "_KernelShortcut" in {event.key for event in training_profile.key_averages()}


def test_a_forward_hook_on_the_shortcut_sees_its_output_when_it_is_added():
    shortcut = make_shortcut(16, [3], training=True)
    seen = []
    shortcut.register_forward_hook(lambda module, args, output: seen.append(output))
    tokens, block_output = torch.randn(2, 1 + 16, 16), torch.randn(2, 1 + 16, 16)
    assert not kernel_adds(shortcut, block_output, tokens)
    output = shortcut.add_to(block_output, tokens, 4, 4, 1)
    assert len(seen) == 1 and seen[0].shape == (2, 16, 16)
    torch.testing.assert_close(output[:, 1:], block_output[:, 1:] + seen[0])


def test_the_kernel_applies_under_autocast_and_steps_aside_for_other_inputs():
    """Under autocast the shortcut computes in float32, which the kernel does too."""
    shortcut = make_shortcut(16, [3], training=True)
    tokens = torch.randn(2, 1 + 16, 16)
    assert kernel_applies(shortcut, tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernel_applies(shortcut, tokens)
    assert not kernel_applies(shortcut, tokens.double())
    assert not kernel_applies(shortcut, tokens.transpose(0, 1).contiguous().transpose(0, 1))  # not contiguous
    shortcut.activation.approximate = "tanh"
    assert not kernel_applies(shortcut, tokens)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_kernel_runs_under_autocast(monkeypatch, training):
    """Under bf16 autocast a DWViT forward goes through the kernel, one call per shortcut, and so does a
    training backward (its pass counters move)."""
    calls, forward = [], dw_shortcut_kernel._forward
    monkeypatch.setattr(dw_shortcut_kernel, "_forward", lambda *args: calls.append(1) or forward(*args))
    counters = torch.zeros(6, dtype=torch.float64)
    monkeypatch.setattr(dw_shortcut_kernel, "pass_seconds", counters)
    config = DWViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, num_labels=3)  # fmt: skip
    model = DWViTForImageClassification(config).train(training)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(4, 3, 16, 16), labels=torch.tensor([0, 1, 2, 0])).loss
    assert len(calls) == len(model.dwvit.encoder.shortcuts) == 2
    if training:
        loss.backward()
        assert counters[3] > 0 and counters[5] > 0  # backward reductions and input gradient


def test_a_model_trains_through_the_kernel_as_through_the_plain_modules(monkeypatch):
    """One optimizer step of DWViT: the kernel path and the PyTorch path agree in loss, gradients and statistics."""
    config = DWViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, num_labels=3, dw_kernel_sizes=[3, 5])  # fmt: skip
    torch.manual_seed(5)
    kernel_model = DWViTForImageClassification(config).train()
    plain_model = copy.deepcopy(kernel_model)
    pixel_values, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    kernel_loss = kernel_model(pixel_values, labels=labels).loss
    kernel_loss.backward()
    monkeypatch.setattr(dw_shortcut_kernel, "load_library", lambda: None)
    plain_loss = plain_model(pixel_values, labels=labels).loss
    plain_loss.backward()
    torch.testing.assert_close(kernel_loss, plain_loss, atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(kernel_model.named_parameters(), plain_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    for (name, a), (_, b) in zip(kernel_model.named_buffers(), plain_model.named_buffers()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_without_a_working_compiler_the_shortcut_warns_once_and_runs_as_pytorch_ops(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv("DWVIT_KERNEL_CACHE", str(tmp_path))
    dw_shortcut_kernel.load_library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="fused CPU kernel of the depth-wise shortcut is unavailable"):
            assert dw_shortcut_kernel.load_library() is None
        shortcut = make_shortcut(8, [3], training=False)
        tokens = torch.randn(2, 1 + 9, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not per call
            assert not kernel_applies(shortcut, tokens)
            torch.testing.assert_close(shortcut(tokens, 3, 3, 1), reference_shortcut(shortcut, tokens, 3, 3, 1))
        assert not list(tmp_path.rglob("*.so"))  # nothing half-built is left in the cache
    finally:
        dw_shortcut_kernel.load_library.cache_clear()


def _logging_compiler(tmp_path, refuse: str | None = None) -> tuple[str, Path]:
    """A CXX value for g++ behind a shell script that logs each command and fails where `refuse` is among its
    arguments, as a compiler that does not know that option would; and the log."""
    log, script = tmp_path / "commands.txt", tmp_path / "cxx.sh"
    refusal = f'for arg in "$@"; do [ "$arg" = {shlex.quote(refuse)} ] && exit 1; done\n' if refuse else ""
    script.write_text(
        f'echo "$*" >> {shlex.quote(str(log))}\n{refusal}exec {shlex.quote(shutil.which("g++"))} "$@"\n'
    )
    return f"/bin/sh {shlex.quote(str(script))}", log


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("g++") is None, reason="x86 with g++"
)
@pytest.mark.parametrize("refused", [False, True], ids=["accepted", "refused"])
def test_the_kernel_asks_for_512_bit_vectors_on_x86_and_builds_without_them_where_refused(
    monkeypatch, tmp_path, refused
):
    compiler, log = _logging_compiler(tmp_path, "-mprefer-vector-width=512" if refused else None)
    monkeypatch.setenv("CXX", compiler)
    monkeypatch.setenv("DWVIT_KERNEL_CACHE", str(tmp_path / "cache"))
    dw_shortcut_kernel.load_library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fallback builds without a warning
            assert dw_shortcut_kernel.load_library() is not None
        builds = [line.split() for line in log.read_text().splitlines() if "-o" in line.split()]
        assert ["-mprefer-vector-width=512" in build for build in builds] == ([True, False] if refused else [True])
        assert "-march=native" in builds[-1]
        shortcut = make_shortcut(16, [3], training=False)
        tokens = torch.randn(2, 1 + 16, 16)
        assert kernel_applies(shortcut, tokens)
        torch.testing.assert_close(shortcut(tokens, 4, 4, 1), reference_shortcut(shortcut, tokens, 4, 4, 1))
    finally:
        dw_shortcut_kernel.load_library.cache_clear()


def test_a_changed_header_rebuilds_the_kernel(monkeypatch, tmp_path):
    """The source is split into a translation unit and headers: editing any of them must give a new library, not the
    cached one built from the old text."""
    sources = tmp_path / "csrc"
    shutil.copytree(dw_shortcut_kernel._source_path().parent, sources)
    compiler, log = _logging_compiler(tmp_path)
    monkeypatch.setenv("CXX", compiler)
    monkeypatch.setenv("DWVIT_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dw_shortcut_kernel, "_source_path", lambda: sources / "dw_shortcut_cpu.cpp")

    def load():
        dw_shortcut_kernel.load_library.cache_clear()
        assert dw_shortcut_kernel.load_library() is not None
        return [line for line in log.read_text().splitlines() if "-o" in line.split()]

    try:
        assert len(load()) == 1
        assert len(load()) == 1  # unchanged sources: the cached library
        header = sources / "dw_shortcut_normal.h"
        assert header.is_file()
        header.write_text(header.read_text() + "\n// edited\n")
        assert len(load()) == 2
        assert len(list((tmp_path / "cache").glob("*.so"))) == 2
    finally:
        dw_shortcut_kernel.load_library.cache_clear()


def test_the_package_ships_every_kernel_source():
    """A wheel must carry the headers the translation unit includes, or an installed package cannot build it."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dwvit"]
    package = root / "src" / "dwvit"
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    sources = dw_shortcut_kernel._source_files(package / "models" / "csrc" / "dw_shortcut_cpu.cpp")
    assert len(sources) > 1 and set(sources) <= shipped, sorted(set(sources) - shipped)


def test_the_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("DWVIT_CPU_KERNEL", "0")
    dw_shortcut_kernel.load_library.cache_clear()
    try:
        assert dw_shortcut_kernel.load_library() is None
        assert not kernel_applies(make_shortcut(8, [3], training=True), torch.randn(2, 9, 8))
    finally:
        dw_shortcut_kernel.load_library.cache_clear()
