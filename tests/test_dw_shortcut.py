"""The depth-wise shortcut across the families: initialisation of weights a checkpoint lacks, `dw_init`,
`no_weight_decay`, function transforms and double backward, and foreign modules in the norm slot."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForImageClassification

from dwvit import DWCaiTForImageClassification, DWSwinBackbone, DWSwinForImageClassification, DWSwinModel
from dwvit import DWViTForImageClassification, DepthwiseShortcut
from dwvit.models.dw_layers import add_shortcut
from conftest import hand_shortcut, randomise_shortcut_statistics
from test_dwcait import small_config as cait_config
from test_dwswin import small_config as swin_config
from test_dwvit import small_config as vit_config

FAMILIES = {
    "vit": (DWViTForImageClassification, vit_config),
    "cait": (DWCaiTForImageClassification, cait_config),
    "swin": (DWSwinForImageClassification, swin_config),
}

# (fields the checkpoint is saved with, fields it is loaded with): each leaves some shortcut weights missing.
SCENARIOS = {
    "shortcut-added": (dict(use_dw_shortcut=False), dict(use_dw_shortcut=True)),
    "kernel-added": (dict(dw_kernel_sizes=[3]), dict(dw_kernel_sizes=[3, 5])),
    "span-shortened": (dict(dw_block_span=2), dict(dw_block_span=1)),
}


def assert_fresh_shortcut_tensor(name: str, tensor: torch.Tensor, kernel_size: int) -> None:
    """What a fresh paper initialisation gives: BatchNorm at the identity, the conv within PyTorch's
    Kaiming-uniform bound 1 / sqrt(fan_in) (fan_in = k * k for a depth-wise conv)."""
    leaf = name.rsplit(".", 2)[-2:]
    bound = 1 / math.sqrt(kernel_size * kernel_size)
    if leaf[0] == "norm":
        expected = {"weight": 1, "bias": 0, "running_mean": 0, "running_var": 1, "num_batches_tracked": 0}[leaf[1]]
        assert torch.equal(tensor, torch.full_like(tensor, expected)), name
    else:
        assert torch.isfinite(tensor).all() and tensor.abs().max() <= bound + 1e-6, name
        if leaf[1] == "weight":
            # Uniform in [-bound, bound] has std bound / sqrt(3): far from a constant fill.
            assert tensor.std() > 0.5 * bound / math.sqrt(3), name


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_shortcut_weights_missing_from_a_checkpoint_are_initialised(tmp_path, family, scenario):
    model_class, make_config = FAMILIES[family]
    saved_fields, loaded_fields = SCENARIOS[scenario]
    torch.manual_seed(0)
    saved = model_class(make_config(**saved_fields))
    randomise_shortcut_statistics(saved, torch.Generator().manual_seed(1))
    saved.save_pretrained(tmp_path)
    saved_state = saved.state_dict()

    loaded, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True, **loaded_fields)
    state = loaded.state_dict()
    missing = set(info["missing_keys"])
    assert missing and all(".shortcuts." in key for key in missing)
    assert missing == set(state) - set(saved_state)
    for name in missing:
        kernel_size = loaded.get_submodule(name.rsplit(".", 2)[0]).conv.kernel_size[0]
        assert_fresh_shortcut_tensor(name, state[name], kernel_size)
    for name in set(state) & set(saved_state):  # loaded weights are not re-initialised
        torch.testing.assert_close(state[name], saved_state[name], rtol=0, atol=0, msg=name)

    loaded.eval()
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.randn(2, 3, 32, 32)).logits).all()


# ---------------------------------------------------------------------------------------------------- dw_init


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dw_init_zeros_starts_as_the_model_without_shortcut(tmp_path, family):
    model_class, make_config = FAMILIES[family]
    torch.manual_seed(2)
    zeros = model_class(make_config(dw_init="zeros", dw_kernel_sizes=[3, 5]))
    convs = [branch.conv for m in zeros.modules() if isinstance(m, DepthwiseShortcut) for branch in m.branches]
    assert convs and all(not conv.weight.any() and not conv.bias.any() for conv in convs)
    plain = model_class(make_config(use_dw_shortcut=False))
    missing, unexpected = plain.load_state_dict(zeros.state_dict(), strict=False)
    assert not missing and unexpected and all(".shortcuts." in key for key in unexpected)

    pixel_values = torch.randn(3, 3, 32, 32)
    for training in (False, True):  # BatchNorm with running or batch statistics: the conv zeroes either
        zeros.train(training), plain.train(training)
        with torch.no_grad():
            torch.testing.assert_close(zeros(pixel_values).logits, plain(pixel_values).logits, rtol=0, atol=0)

    # Shortcuts added to a checkpoint that has none start as exactly nothing.
    plain.save_pretrained(tmp_path)
    added = AutoModelForImageClassification.from_pretrained(tmp_path, use_dw_shortcut=True, dw_init="zeros").eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(added(pixel_values).logits, plain(pixel_values).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dw_init_rejects_unknown_values(family):
    _, make_config = FAMILIES[family]
    assert make_config().dw_init == "paper"
    with pytest.raises(ValueError, match=r"dw_init must be one of 'paper', 'zeros'; got 'ones'"):
        make_config(dw_init="ones")


# ---------------------------------------------------------------------------------------------- no_weight_decay


def test_no_weight_decay_names_position_embeddings_class_tokens_and_bias_tables():
    swin_tables = {
        f"dwswin.encoder.layers.{stage}.blocks.{block}.attention.relative_position_bias_table"
        for stage in range(2)
        for block in range(2)
    }
    vit_names = {"dwvit.embeddings.cls_token", "dwvit.embeddings.position_embeddings"}
    cases = [
        (DWViTForImageClassification(vit_config()), vit_names),
        (DWViTForImageClassification(vit_config(use_position_embeddings=False)), {"dwvit.embeddings.cls_token"}),
        (DWCaiTForImageClassification(cait_config()), {name.replace("dwvit", "dwcait") for name in vit_names}),
        (DWSwinForImageClassification(swin_config()), swin_tables),
        (
            DWSwinForImageClassification(swin_config(use_absolute_embeddings=True)),
            swin_tables | {"dwswin.embeddings.position_embeddings"},
        ),
        (DWSwinBackbone(swin_config(out_features=["stage1"])), swin_tables),
        (DWSwinModel(swin_config()), {name.removeprefix("dwswin.") for name in swin_tables}),
    ]
    for model, expected in cases:
        names = model.no_weight_decay()
        assert names == expected, type(model).__name__
        assert names <= dict(model.named_parameters()).keys()


# ------------------------------------------------------------------------------- function transforms, double backward


def make_shortcut(training: bool) -> DepthwiseShortcut:
    torch.manual_seed(20)
    shortcut = DepthwiseShortcut(6, [3, 5]).train(training)
    randomise_shortcut_statistics(shortcut, torch.Generator().manual_seed(21))
    return shortcut


def test_torch_func_grad_through_the_shortcut_matches_autograd_of_the_hand_computation():
    shortcut = make_shortcut(training=False)
    branches = [(branch.norm, branch.conv) for branch in shortcut.branches]
    parameters = {name: p.detach() for name, p in shortcut.named_parameters()}
    buffers = dict(shortcut.named_buffers())
    tokens = torch.randn(2, 1 + 12, 6)
    block_output = torch.randn(2, 1 + 12, 6)

    def loss(parameters, tokens):
        shortcut_output = torch.func.functional_call(shortcut, (parameters, buffers), (tokens, 3, 4, 1))
        return add_shortcut(block_output, shortcut_output, 1).pow(2).sum()

    grads, token_grad = torch.func.grad(loss, argnums=(0, 1))(parameters, tokens)

    tokens.requires_grad_()
    expected = (block_output + hand_shortcut(tokens, (3, 4), branches, False, num_prefix_tokens=1)).pow(2).sum()
    expected_grads = torch.autograd.grad(expected, [tokens, *shortcut.parameters()])
    torch.testing.assert_close(token_grad, expected_grads[0], atol=1e-5, rtol=1e-5)
    for (name, _), want in zip(shortcut.named_parameters(), expected_grads[1:]):
        torch.testing.assert_close(grads[name], want, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("variant", ["", "checkpointed", "under autocast"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.usefixtures("shortcut_path")
def test_double_backward_through_the_shortcut_matches_the_hand_computation(training, variant):
    """A gradient penalty: the gradient of the norm of the input gradient, with the class-token boundary; also
    through the checkpointed recompute (which runs more than once) and with both backward passes under bf16
    autocast (float32 all the way)."""
    shortcut = make_shortcut(training)
    shortcut.gradient_checkpointing = variant == "checkpointed"
    branches = [(branch.norm, branch.conv) for branch in shortcut.branches]
    tokens = torch.randn(2, 1 + 12, 6, requires_grad=True)
    block_output = torch.randn(2, 1 + 12, 6)

    def penalty_gradients(compute, autocast=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = compute(tokens).pow(2).sum()
            (token_grad,) = torch.autograd.grad(output, tokens, create_graph=True)
            return torch.autograd.grad(token_grad.norm(), [tokens, *shortcut.parameters()])

    actual = penalty_gradients(lambda t: add_shortcut(block_output, shortcut(t, 3, 4, 1), 1),
                               autocast=variant == "under autocast")  # fmt: skip
    expected = penalty_gradients(lambda t: block_output + hand_shortcut(t, (3, 4), branches, training, 1))
    assert actual[0].abs().sum() > 0
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- the norm slot


def test_detr_frozen_batch_norm_in_the_norm_slot_runs_trains_checkpoints_and_fuses():
    """DETR replaces every BatchNorm2d of a backbone with `DetrFrozenBatchNorm2d` (no eps, no momentum)."""
    from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d, replace_batch_norm

    torch.manual_seed(22)
    model = DWSwinModel(swin_config(dw_kernel_sizes=[3, 5]))
    randomise_shortcut_statistics(model, torch.Generator().manual_seed(23))
    reference = copy.deepcopy(model).eval()
    replace_batch_norm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, DetrFrozenBatchNorm2d) for m in model.modules()) == 8
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values).last_hidden_state

    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).last_hidden_state, expected, atol=1e-5, rtol=1e-5)

    # In training the frozen norm still uses its fixed statistics; checkpointing must not look for a momentum.
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.encoder.layers[0].shortcuts[0].gradient_checkpointing
    model(pixel_values).last_hidden_state.square().mean().backward()
    conv_grad = model.encoder.layers[0].shortcuts[0].branches[1].conv.weight.grad
    assert conv_grad is not None and torch.isfinite(conv_grad).all() and conv_grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        fused = model.fuse_dw_shortcuts()(pixel_values).last_hidden_state
    assert model.dw_shortcuts_fused
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


def test_fusion_refuses_a_norm_without_running_statistics_and_the_forward_still_runs():
    shortcut = make_shortcut(training=False)
    shortcut.branches[1].norm = torch.nn.GroupNorm(2, 6)
    tokens = torch.randn(2, 12, 6)
    with torch.no_grad():
        expected = shortcut(tokens, 3, 4)
        with pytest.raises(TypeError, match="norm is GroupNorm.*running statistics"):
            shortcut.fuse()
        assert not shortcut.is_fused
        torch.testing.assert_close(shortcut(tokens, 3, 4), expected, rtol=0, atol=0)


# ------------------------------------------- the training paths, fused kernel and recomputing node (issue 20)


def hand_running_statistics(tokens, grid, norm, num_prefix_tokens, momentum):
    """`nn.BatchNorm2d`'s update of the running statistics by one training batch, written out."""
    batch, _, channels = tokens.shape
    activated = torch.nn.functional.gelu(tokens[:, num_prefix_tokens:].detach()).reshape(-1, channels)
    mean, variance = activated.mean(0), activated.var(0, unbiased=True)
    return (1 - momentum) * norm.running_mean + momentum * mean, (1 - momentum) * norm.running_var + momentum * variance


@pytest.mark.parametrize("kernels", [[3], [3, 5, 7]], ids=["k3", "k357"])
@pytest.mark.parametrize("num_prefix_tokens", [0, 1])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.usefixtures("shortcut_path")
def test_training_shortcut_matches_the_hand_computation_in_values_gradients_and_statistics(
    kernels, num_prefix_tokens, momentum
):
    torch.manual_seed(30)
    shortcut = DepthwiseShortcut(8, kernels).train()
    randomise_shortcut_statistics(shortcut, torch.Generator().manual_seed(31))
    for branch in shortcut.branches:
        branch.norm.momentum = momentum
        branch.norm.num_batches_tracked.fill_(3)
    branches = [(branch.norm, branch.conv) for branch in shortcut.branches]
    tokens = torch.randn(3, num_prefix_tokens + 20, 8, requires_grad=True)
    block_output = torch.randn(3, num_prefix_tokens + 20, 8, requires_grad=True)
    weights = torch.randn(3, num_prefix_tokens + 20, 8)
    tokens_before, block_output_before = tokens.detach().clone(), block_output.detach().clone()
    factor = momentum if momentum is not None else 1 / 4  # cumulative: 1 / batches seen, 3 before this one
    expected_statistics = [
        hand_running_statistics(tokens, (4, 5), norm, num_prefix_tokens, factor) for norm, _ in branches
    ]

    expected = block_output + hand_shortcut(tokens, (4, 5), branches, True, num_prefix_tokens)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [tokens, block_output, *shortcut.parameters()])
    actual = add_shortcut(block_output, shortcut(tokens, 4, 5, num_prefix_tokens), num_prefix_tokens)
    actual_grads = torch.autograd.grad((actual * weights).sum(), [tokens, block_output, *shortcut.parameters()])

    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(actual_grads[0][:, :num_prefix_tokens], torch.zeros_like(actual_grads[0][:, :num_prefix_tokens]))
    for branch, (mean, variance) in zip(shortcut.branches, expected_statistics):
        torch.testing.assert_close(branch.norm.running_mean, mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(branch.norm.running_var, variance, atol=1e-6, rtol=1e-5)
        assert int(branch.norm.num_batches_tracked) == 4
    # Neither input is written into.
    assert torch.equal(tokens, tokens_before) and torch.equal(block_output, block_output_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16 under autocast"])
@pytest.mark.usefixtures("shortcut_path")
def test_training_shortcut_keeps_no_activation_sized_tensor_for_backward(dtype):
    """Autograd holds only the input (a view of the block input, which the block keeps) and per-channel batch
    statistics: the GELU and BatchNorm outputs are recomputed in backward instead of kept for the whole step. bf16
    tokens under autocast (DWSwin's) are cast to float32 inside, so no float32 copy of them is kept either."""
    from test_dwvit import saved_activation_bytes

    shortcut = DepthwiseShortcut(48, [3, 5]).train()
    tokens = torch.randn(4, 1 + 64, 48).to(dtype).requires_grad_()
    statistics_bytes = 2 * 2 * 48 * 4  # mean and inverse deviation per branch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        saved = saved_activation_bytes(shortcut, tokens, 8, 8, 1)
    assert saved <= tokens.numel() * tokens.element_size() + statistics_bytes


def test_a_hook_on_the_norm_sees_its_output_and_the_result_is_unchanged():
    """Hooks read what a module returns: with one on a branch's norm the shortcut calls its modules."""
    torch.manual_seed(32)
    shortcut = DepthwiseShortcut(8, [3, 5]).train()
    hooked = copy.deepcopy(shortcut)
    seen = []
    hooked.branches[1].norm.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    tokens = torch.randn(2, 1 + 12, 8, requires_grad=True)
    plain = shortcut(tokens, 3, 4, 1)
    observed = hooked(tokens, 3, 4, 1)
    torch.testing.assert_close(observed, plain, atol=1e-6, rtol=1e-6)
    ((activated, output),) = seen
    assert torch.equal(activated, torch.nn.functional.gelu(tokens[:, 1:]).reshape(2, 3, 4, 8).permute(0, 3, 1, 2))
    norm = hooked.branches[1].norm
    expected = torch.nn.functional.batch_norm(activated, None, None, norm.weight, norm.bias, training=True)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(plain.square().sum(), tokens)[0]
    torch.testing.assert_close(torch.autograd.grad(observed.square().sum(), tokens)[0], grads, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "activation", [torch.nn.Identity(), torch.nn.GELU(approximate="tanh")], ids=["identity", "gelu-tanh"]
)
def test_the_module_in_the_activation_slot_is_what_the_training_shortcut_applies(activation):
    torch.manual_seed(33)
    shortcut = DepthwiseShortcut(8, [3]).train()
    shortcut.activation = activation
    norm, conv = shortcut.branches[0].norm, shortcut.branches[0].conv
    tokens = torch.randn(2, 1 + 12, 8, requires_grad=True)
    grid = tokens[:, 1:].reshape(2, 3, 4, 8).permute(0, 3, 1, 2)
    normalized = torch.nn.functional.batch_norm(activation(grid), None, None, norm.weight, norm.bias, training=True)
    expected = torch.nn.functional.conv2d(normalized, conv.weight, conv.bias, padding=1, groups=8)
    expected = expected.permute(0, 2, 3, 1).reshape(2, 12, 8)
    actual = shortcut(tokens, 3, 4, 1)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(expected)
    torch.testing.assert_close(
        torch.autograd.grad((actual * weights).sum(), tokens)[0],
        torch.autograd.grad((expected * weights).sum(), tokens)[0],
        atol=1e-5, rtol=1e-4,
    )  # fmt: skip


@pytest.mark.parametrize("num_prefix_tokens", [0, 1])
@pytest.mark.parametrize(
    "mode, path",
    [("train", "node or kernel"), ("train", "plain modules"), ("train", "checkpointed"), ("eval", "kernel"),
     ("eval", "plain modules"), ("fused", "kernel"), ("fused", "plain modules")],
)  # fmt: skip
@pytest.mark.usefixtures("shortcut_path")
def test_the_shortcut_under_bf16_autocast_computes_in_float32(num_prefix_tokens, mode, path):
    """Autocast keeps the shortcut in float32, like a norm: every path (the kernel, the recomputing node, the plain
    composition that a hook on the activation selects, the checkpointed recompute; trained, eval or fused) gives,
    under bf16 autocast, the values, gradients and statistics of the same shortcut outside autocast, where a bf16
    conv would be ~1e-2 off."""
    torch.manual_seed(34)
    shortcut = DepthwiseShortcut(8, [3, 5]).train(mode == "train")
    randomise_shortcut_statistics(shortcut, torch.Generator().manual_seed(35))
    if mode == "fused":
        shortcut.fuse()
    if path == "plain modules":
        shortcut.activation.register_forward_hook(lambda *args: None)
    shortcut.gradient_checkpointing = path == "checkpointed"
    reference = copy.deepcopy(shortcut)
    tokens = torch.randn(3, num_prefix_tokens + 20, 8, requires_grad=True)
    block_output = torch.randn(3, num_prefix_tokens + 20, 8, requires_grad=True)
    weights = torch.randn(3, num_prefix_tokens + 20, 8)
    results = []
    for module, autocast in ((shortcut, True), (reference, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = module.add_to(block_output, tokens, 4, 5, num_prefix_tokens)
        grads = torch.autograd.grad((output * weights).sum(), [tokens, block_output, *module.parameters()],
                                    allow_unused=True)  # fmt: skip
        results.append((output, grads))
    (output, grads), (expected, expected_grads) = results
    assert output.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-6)
    assert grads[0].abs().sum() > 0
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for a, b in zip(shortcut.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("num_prefix_tokens", [0, 1])
@pytest.mark.usefixtures("shortcut_path")
def test_bf16_tokens_under_autocast_are_computed_in_float32_and_returned_in_bf16(num_prefix_tokens):
    """DWSwin's first shortcut of a stage reads bf16 tokens under autocast (its patch merging is a linear layer):
    the shortcut computes from them in float32 and rounds once, so the stage keeps its bf16 stream; the input
    gradient comes back in bf16 as well."""
    torch.manual_seed(36)
    shortcut = DepthwiseShortcut(8, [3]).train()
    reference = copy.deepcopy(shortcut)
    tokens = torch.randn(2, num_prefix_tokens + 12, 8).bfloat16().requires_grad_()
    block_output = torch.randn(2, num_prefix_tokens + 12, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = shortcut.add_to(block_output, tokens, 3, 4, num_prefix_tokens)
    weights = torch.randn(output.shape).bfloat16()
    (tokens_grad,) = torch.autograd.grad((output * weights).sum(), tokens)
    float_tokens = tokens.detach().float().requires_grad_()
    expected_shortcut = reference(float_tokens, 3, 4, num_prefix_tokens)
    expected = add_shortcut(block_output, expected_shortcut.bfloat16(), num_prefix_tokens)
    (expected_grad,) = torch.autograd.grad(expected_shortcut, float_tokens, weights[:, num_prefix_tokens:].float())
    assert output.dtype == tokens_grad.dtype == torch.bfloat16
    torch.testing.assert_close(output, expected, atol=0, rtol=0)
    torch.testing.assert_close(tokens_grad, expected_grad.bfloat16(), atol=0, rtol=0)
    for a, b in zip(shortcut.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("autocast", [True, False], ids=["under autocast", "outside autocast"])
@pytest.mark.usefixtures("shortcut_path")
def test_bf16_tokens_added_to_a_float32_block_output_give_what_the_separate_add_gives(autocast):
    """`add_to` is `add_shortcut(block_output, shortcut(tokens))` on every path: the shortcut of bf16 tokens is
    rounded to bf16 before it meets a float32 block output (the kernel's fused add, which skipped the rounding,
    now takes float32 tokens only)."""
    torch.manual_seed(39)
    shortcut = DepthwiseShortcut(8, [3, 5]).train()
    separate = copy.deepcopy(shortcut)
    tokens = (4 * torch.randn(2, 1 + 20, 8)).bfloat16().requires_grad_()
    block_output = torch.randn(2, 1 + 20, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = shortcut.add_to(block_output, tokens, 4, 5, 1)
        expected = add_shortcut(block_output, separate(tokens, 4, 5, 1), 1)
    assert output.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(output, expected, atol=0, rtol=0)
    weights = torch.randn(output.shape)
    grads = torch.autograd.grad((output * weights).sum(), [tokens, block_output, *shortcut.parameters()])
    expected_grads = torch.autograd.grad((expected * weights).sum(), [tokens, block_output, *separate.parameters()])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.usefixtures("shortcut_path")
def test_other_dtype_mixes_are_left_to_the_modules(training):
    """Only half-precision tokens of a float32 shortcut are cast; float64 tokens are not silently rounded to float32,
    nor float32 tokens to a bf16 shortcut's precision: the modules refuse them, as they do alone."""
    shortcut = DepthwiseShortcut(8, [3]).train(training)
    with pytest.raises(RuntimeError, match="dtype"):
        shortcut(torch.randn(2, 1 + 12, 8, dtype=torch.float64), 3, 4, 1)
    with pytest.raises(RuntimeError, match="dtype"):
        shortcut.bfloat16()(torch.randn(2, 1 + 12, 8), 3, 4, 1)


@pytest.mark.parametrize("mode", ["train", "eval", "fused"])
def test_a_bf16_shortcut_under_autocast_runs_as_its_bf16_modules(mode):
    """A model cast to bf16 (weights and statistics) and run under autocast, as with transformers'
    `bf16_full_eval`, keeps autocast's own behaviour: what the same bf16 module computes outside autocast."""
    torch.manual_seed(37)
    shortcut = DepthwiseShortcut(8, [3, 5]).train(mode == "train")
    randomise_shortcut_statistics(shortcut, torch.Generator().manual_seed(38))
    if mode == "fused":
        shortcut.fuse()
    shortcut = shortcut.bfloat16()
    reference = copy.deepcopy(shortcut)
    tokens = torch.randn(2, 1 + 20, 8).bfloat16().requires_grad_()
    block_output = torch.randn(2, 1 + 20, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = shortcut.add_to(block_output, tokens, 4, 5, 1)
    expected = reference.add_to(block_output, tokens, 4, 5, 1)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output, expected, atol=0, rtol=0)
    (grad,) = torch.autograd.grad(output.float().sum(), tokens)
    (expected_grad,) = torch.autograd.grad(expected.float().sum(), tokens)
    torch.testing.assert_close(grad, expected_grad, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_given_to_a_model_without_a_head_are_refused(family):
    """With num_labels=0 the logits are the pooled features; a cross-entropy over them would be meaningless."""
    model_class, make_config = FAMILIES[family]
    model = model_class(make_config(num_labels=0)).eval()
    pixel_values = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        features = model(pixel_values).logits
        with pytest.raises(ValueError, match=r"no classification head \(num_labels=0\)"):
            model(pixel_values, labels=torch.tensor([0, 1]))
    assert features.shape[0] == 2 and features.shape[1] > 0


@pytest.mark.parametrize("kind", ["hook", "pre-hook"])
def test_a_full_backward_hook_on_the_conv_fires_in_training(kind):
    """Module backward hooks fire only when the module is called: with one registered the shortcut calls it."""
    torch.manual_seed(35)
    shortcut = DepthwiseShortcut(8, [3]).train()
    seen = []
    conv = shortcut.branches[0].conv
    if kind == "hook":
        conv.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0]))
    else:
        conv.register_full_backward_pre_hook(lambda module, grad_out: seen.append(grad_out[0]))
    tokens = torch.randn(2, 1 + 12, 8, requires_grad=True)
    output = shortcut(tokens, 3, 4, 1)
    output.sum().backward()
    (grad_output,) = seen
    assert torch.equal(grad_output, torch.ones(2, 8, 3, 4))
