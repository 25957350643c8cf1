"""DWViT modelling: faithfulness to transformers' ViT, the shortcut against a hand computation, sizes, inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

import dwvit
from dwvit import DWViTConfig, DWViTForImageClassification, DWViTModel
from dwvit.conversion.from_transformers import convert_state_dict
from conftest import hand_shortcut, randomise_shortcut_statistics

SMALL = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96)


def small_config(**overrides) -> DWViTConfig:
    return DWViTConfig(**{**SMALL, "num_labels": 5, **overrides})


def copy_hf_vit_into_dwvit(reference: ViTForImageClassification, model: DWViTForImageClassification) -> None:
    """Load transformers' ViT weights into DWViT with the package's key map (the one `dwvit.from_transformers` uses:
    q, k, v fused into qkv, o_proj -> out_proj, `vit.layers` -> `dwvit.encoder.layers`)."""
    model.load_state_dict(convert_state_dict(reference), strict=True)


def hf_reference_for(config: DWViTConfig, attn_implementation: str = "eager") -> ViTForImageClassification:
    hf_config = ViTConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        layer_norm_eps=config.layer_norm_eps,
        qkv_bias=config.qkv_bias,
        num_labels=config.num_labels,
    )
    hf_config._attn_implementation = attn_implementation
    reference = ViTForImageClassification(hf_config).eval()
    # Perturb every parameter: transformers starts biases at zero and LayerNorms at the identity.
    generator = torch.Generator().manual_seed(config.num_hidden_layers)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return reference


@pytest.mark.parametrize(
    "sizes",
    [SMALL, dict(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)],
    ids=["small-32-4", "vit-tiny-224-16"],
)
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_shortcut_off_matches_transformers_vit(sizes, qkv_bias):
    torch.manual_seed(0)
    config = DWViTConfig(**sizes, num_labels=7, qkv_bias=qkv_bias, use_dw_shortcut=False)
    model = DWViTForImageClassification(config).eval()
    reference = hf_reference_for(config)
    copy_hf_vit_into_dwvit(reference, model)
    pixel_values = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        ours = model(pixel_values, output_hidden_states=True)
        theirs = reference(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == config.num_hidden_layers + 1
    for our_state, their_state in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(our_state, their_state, atol=1e-5, rtol=0)


def test_attentions_match_transformers_vit_eager():
    torch.manual_seed(1)
    config = small_config(use_dw_shortcut=False)
    model = DWViTForImageClassification(config).eval()
    reference = hf_reference_for(config, "eager")
    copy_hf_vit_into_dwvit(reference, model)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(pixel_values, output_attentions=True)
        theirs = reference(pixel_values, output_attentions=True)
    assert len(ours.attentions) == config.num_hidden_layers
    for our_weights, their_weights in zip(ours.attentions, theirs.attentions):
        assert our_weights.shape == (2, 3, 65, 65)
        torch.testing.assert_close(our_weights, their_weights, atol=1e-6, rtol=0)


def test_sdpa_is_default_and_not_causal():
    torch.manual_seed(2)
    model = DWViTForImageClassification(small_config()).eval()
    assert model.config._attn_implementation == "sdpa"
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        sdpa_logits = model(pixel_values).logits
        model.config._attn_implementation = "eager"
        eager_logits = model(pixel_values).logits
    # Eager attention is full (no mask); a causal SDPA would differ by far more than rounding.
    torch.testing.assert_close(sdpa_logits, eager_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kernel_sizes,span,image_size,training",
    [([3], 1, 32, False), ([3, 5, 7], 1, 32, False), ([3], 2, 32, False), ([3], 3, 32, False),
     ([3, 5], 2, 32, True), ([3], 1, 48, False)],
    ids=["k3", "k3+5+7", "span2", "span3", "k3+5-span2-train", "k3-interpolated-48"],
)
def test_shortcut_matches_hand_computation(kernel_sizes, span, image_size, training):
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(4)
    config = small_config(dw_kernel_sizes=kernel_sizes, dw_block_span=span)
    model = DWViTModel(config)
    randomise_shortcut_statistics(model, generator)
    model.train(training)
    pixel_values = torch.randn(2, 3, image_size, image_size)
    grid = (image_size // 4, image_size // 4)

    # Expected: run the model's own blocks, and put the hand-computed shortcut around each group of `span`.
    with torch.no_grad():
        expected, _ = model.embeddings(pixel_values, interpolate_pos_encoding=True)
        layers = list(model.encoder.layers)
        shortcut_modules = list(model.encoder.shortcuts)
        assert len(shortcut_modules) == -(-config.num_hidden_layers // span)
        for group_index, start in enumerate(range(0, len(layers), span)):
            group_input = expected
            for layer in layers[start : start + span]:
                expected, _ = layer(expected)
            branches = [(b.norm, b.conv) for b in shortcut_modules[group_index].branches]
            assert [conv.kernel_size[0] for _, conv in branches] == kernel_sizes
            expected = expected + hand_shortcut(group_input, grid, branches, training, num_prefix_tokens=1)
        expected = model.layernorm(expected)

        actual = model(pixel_values, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_prefix_tokens", [0, 1, 2])
def test_shortcut_gradients_match_autograd_through_the_hand_computation(num_prefix_tokens):
    """Training-mode backward, class-token boundary included, against autograd through functional ops."""
    from dwvit.models.dw_layers import add_shortcut

    torch.manual_seed(14)
    grid, channels = (3, 4), 6
    shortcut = dwvit.DepthwiseShortcut(channels, [3, 5]).train()
    randomise_shortcut_statistics(shortcut, torch.Generator().manual_seed(15))
    branches = [(b.norm, b.conv) for b in shortcut.branches]
    tokens = torch.randn(2, num_prefix_tokens + 12, channels, requires_grad=True)
    block_output = torch.randn(2, num_prefix_tokens + 12, channels, requires_grad=True)
    upstream = torch.randn(2, num_prefix_tokens + 12, channels)

    actual = add_shortcut(block_output * 1, shortcut(tokens, *grid, num_prefix_tokens), num_prefix_tokens)
    actual_grads = torch.autograd.grad(actual, [tokens, block_output, *shortcut.parameters()], upstream)
    expected = block_output * 1 + hand_shortcut(tokens, grid, branches, True, num_prefix_tokens)
    expected_grads = torch.autograd.grad(expected, [tokens, block_output, *shortcut.parameters()], upstream)

    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # The block output here does not depend on `tokens`, so the class tokens get no gradient at all.
    assert torch.equal(actual_grads[0][:, :num_prefix_tokens], torch.zeros(2, num_prefix_tokens, channels))
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_shortcut_with_class_token_passes_gradcheck():
    """Finite differences in float64: the backward across the class-token boundary is exact."""
    from dwvit.models.dw_layers import add_shortcut

    torch.manual_seed(16)
    shortcut = dwvit.DepthwiseShortcut(3, [3]).double().train()
    tokens = torch.randn(2, 1 + 6, 3, dtype=torch.float64, requires_grad=True)
    block_output = torch.randn(2, 1 + 6, 3, dtype=torch.float64, requires_grad=True)

    def function(tokens, block_output):
        return add_shortcut(block_output * 1, shortcut(tokens, 2, 3, 1), 1)

    assert torch.autograd.gradcheck(function, (tokens, block_output))


def test_class_token_bypasses_the_shortcut():
    """Only patch tokens change when the shortcut is switched on with the same block weights."""
    torch.manual_seed(5)
    with_shortcut = DWViTModel(small_config(num_hidden_layers=1)).eval()
    without = DWViTModel(small_config(num_hidden_layers=1, use_dw_shortcut=False)).eval()
    without.load_state_dict(with_shortcut.state_dict(), strict=False)
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = with_shortcut.encoder(with_shortcut.embeddings(pixel_values)[0], (8, 8)).last_hidden_state
        b = without.encoder(without.embeddings(pixel_values)[0], (8, 8)).last_hidden_state
    torch.testing.assert_close(a[:, 0], b[:, 0], atol=0, rtol=0)
    assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-3


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(**fields) -> DWViTForImageClassification:
    with torch.device("meta"):
        return DWViTForImageClassification(DWViTConfig(**fields))


def test_parameter_counts_match_the_paper():
    tiny = dict(dwvit.NAMED_SIZES["vit-tiny"][1], num_labels=10)
    with_shortcut = count(build_on_meta(**tiny))
    without = count(build_on_meta(**tiny, use_dw_shortcut=False))
    # Paper: ViT-Tiny (and ViT-Tiny + DW) 5.5M parameters.
    assert abs(with_shortcut - 5.5e6) / 5.5e6 < 0.01
    # Per module: a 3x3 depth-wise kernel and bias (192*9 + 192) and BatchNorm's scale and shift (2*192).
    assert with_shortcut - without == 12 * (192 * 9 + 192 + 2 * 192)
    span3 = count(build_on_meta(**tiny, dw_block_span=3))
    assert span3 - without == (with_shortcut - without) // 3
    kernels = count(build_on_meta(**tiny, dw_kernel_sizes=[3, 5, 7]))
    assert kernels - without == 12 * sum(192 * k * k + 192 + 2 * 192 for k in (3, 5, 7))
    small = count(build_on_meta(**dict(dwvit.NAMED_SIZES["vit-small"][1], num_labels=10)))
    assert abs(small - 21.7e6) / 21.7e6 < 0.01


def test_named_sizes():
    config = dwvit.named_config("vit-tiny", num_labels=10, use_dw_shortcut=False)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (192, 12, 3, 768)
    assert (config.image_size, config.patch_size, config.use_dw_shortcut) == (224, 16, False)
    cifar = dwvit.named_config("vit-small-cifar")
    assert (cifar.image_size, cifar.patch_size, cifar.hidden_size) == (32, 4, 384)
    with pytest.raises(ValueError, match="Unknown model size 'vit-huge'.*vit-tiny"):
        dwvit.named_config("vit-huge")


def test_mean_pooling_and_no_position_embeddings():
    torch.manual_seed(6)
    model = DWViTModel(small_config(pooling="mean", use_position_embeddings=False)).eval()
    assert model.embeddings.position_embeddings is None
    assert not any("position_embeddings" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 1:].mean(1))


def test_labels_give_hard_and_soft_losses():
    torch.manual_seed(7)
    model = DWViTForImageClassification(small_config()).eval()
    pixel_values = torch.randn(4, 3, 32, 32)
    hard = torch.tensor([0, 1, 4, 2])
    with torch.no_grad():
        out = model(pixel_values, labels=hard)
        torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, hard))
        soft = torch.softmax(torch.randn(4, 5), dim=-1)  # e.g. a Mixup of two one-hot targets
        soft_out = model(pixel_values, labels=soft)
        expected = -(soft * torch.log_softmax(soft_out.logits, -1)).sum(-1).mean()
        torch.testing.assert_close(soft_out.loss, expected)
        as_tuple = model(pixel_values, labels=hard, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], out.logits)
    torch.testing.assert_close(as_tuple[0], out.loss)


def test_interpolate_pos_encoding_predicts_at_another_resolution():
    torch.manual_seed(8)
    model = DWViTForImageClassification(small_config()).eval()
    with torch.no_grad():
        same = model(torch.ones(1, 3, 32, 32), interpolate_pos_encoding=True).logits
        plain = model(torch.ones(1, 3, 32, 32)).logits
        larger = model(torch.randn(2, 3, 64, 48), interpolate_pos_encoding=True, output_hidden_states=True)
    torch.testing.assert_close(same, plain)
    assert larger.logits.shape == (2, 5)
    assert larger.hidden_states[-1].shape == (2, 1 + 16 * 12, 48)


def test_gradient_checkpointing_keeps_the_shortcut_and_counts_batchnorm_once():
    torch.manual_seed(9)
    config = small_config(hidden_dropout_prob=0.0)
    reference = DWViTForImageClassification(config).train()
    checkpointed = DWViTForImageClassification(config).train()
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.dwvit.encoder.gradient_checkpointing
    # The shortcuts recompute their activations too (BatchNorm statistics must still move once: checked below).
    assert all(shortcut.gradient_checkpointing for shortcut in checkpointed.dwvit.encoder.shortcuts)
    pixel_values, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    for model in (reference, checkpointed):
        model(pixel_values, labels=labels).loss.backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    shortcut_grad = checkpointed.dwvit.encoder.shortcuts[0].branches[0].conv.weight.grad
    assert shortcut_grad is not None and shortcut_grad.abs().sum() > 0
    for a, b in zip(reference.buffers(), checkpointed.buffers()):
        torch.testing.assert_close(a, b)


def test_drop_path_is_stochastic_in_training_only():
    torch.manual_seed(10)
    model = DWViTForImageClassification(small_config(drop_path_rate=0.5))
    pixel_values = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, model(pixel_values).logits)
    layer = model.dwvit.encoder.layers[-1]
    assert layer.drop_path.drop_prob == pytest.approx(0.5)  # the last block gets the full rate
    assert isinstance(model.dwvit.encoder.layers[0].drop_path, torch.nn.Identity)  # the first gets 0
    layer.drop_path.train()
    kept = layer.drop_path(torch.ones(2000, 3))
    assert set(kept.unique().tolist()) <= {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - 0.5)
    assert 0.4 < (kept[:, 0] == 0).float().mean() < 0.6


def test_init_weights():
    torch.manual_seed(11)
    model = DWViTForImageClassification(DWViTConfig(**dwvit.NAMED_SIZES["vit-tiny"][1], num_labels=10))
    qkv = model.dwvit.encoder.layers[0].attention.qkv.weight
    assert abs(qkv.std().item() - 0.02) < 0.002  # (truncated) normal, std = initializer_range
    conv = model.dwvit.encoder.shortcuts[0].branches[0].conv.weight
    assert conv.abs().max() <= 1 / 3 + 1e-6  # PyTorch's default: Kaiming-uniform bound 1/sqrt(fan_in=9)
    assert conv.std() > 0.1
    norm = model.dwvit.encoder.shortcuts[0].branches[0].norm
    assert torch.equal(norm.weight, torch.ones(192)) and torch.equal(norm.running_var, torch.ones(192))


def test_bad_inputs_raise_clear_errors():
    model = DWViTForImageClassification(small_config()).eval()
    with pytest.raises(ValueError, match="1 channels but the model expects num_channels=3"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"Input image size \(64x64\) doesn't match the model's image_size \(32x32\).*interpolate_pos_encoding=True"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="4-D tensor"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="smaller than one patch"):
        model(torch.randn(1, 3, 2, 2), interpolate_pos_encoding=True)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(hidden_size=50, num_attention_heads=3), r"hidden_size \(50\) must be divisible by num_attention_heads \(3\)"),
        (dict(dw_kernel_sizes=[4]), r"dw_kernel_sizes must hold positive odd ints.*got 4"),
        (dict(dw_kernel_sizes=[3, -1]), r"dw_kernel_sizes must hold positive odd ints.*got -1"),
        (dict(dw_kernel_sizes=[]), r"dw_kernel_sizes must be a non-empty list"),
        (dict(dw_block_span=0), r"dw_block_span must be an int >= 1"),
        (dict(dw_block_span=5), r"dw_block_span must be at most the number of blocks \(4\)"),
        (dict(image_size=30), r"image_size \(30\) must be divisible by patch_size \(4\)"),
        (dict(pooling="max"), r"pooling must be one of 'cls', 'mean'; got 'max'"),
        (dict(drop_path_rate=1.5), r"drop_path_rate must lie in \[0, 1\)"),
        (dict(num_hidden_layers=0), r"num_hidden_layers must be a positive int"),
        (dict(layer_norm_eps=0.0), r"layer_norm_eps must be a positive finite number .*got 0.0"),
        (dict(dw_batch_norm_eps=-1e-5), r"dw_batch_norm_eps must be a positive finite number .*got -1e-05"),
        (dict(hidden_act="gelux"), r"hidden_act 'gelux' is not one of transformers' activations \(did you mean 'gelu'"),
    ],
)
def test_invalid_config_values(fields, message):
    with pytest.raises(ValueError, match=message):
        small_config(**fields)


def saved_activation_bytes(module, *inputs) -> int:
    """Bytes of tensors autograd keeps for backward during one forward (parameters excluded)."""
    parameters = {p.data_ptr() for p in module.parameters()}
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.data_ptr() not in parameters and tensor.numel() > 1:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(*inputs)
    return total


def test_shortcut_recomputes_instead_of_saving_under_gradient_checkpointing():
    torch.manual_seed(12)
    shortcut = dwvit.DepthwiseShortcut(48, [3, 5]).train()
    tokens = torch.randn(4, 64, 48, requires_grad=True)
    grid_bytes = tokens.numel() * 4
    # The plain composition (a hook on a norm selects it) keeps the GELU output and each BatchNorm output; the
    # default training node keeps none of them (tests/test_dw_shortcut.py), nor does checkpointing.
    shortcut.branches[0].norm.register_forward_hook(lambda *args: None)
    assert saved_activation_bytes(shortcut, tokens, 8, 8) >= 2 * grid_bytes
    shortcut.gradient_checkpointing = True
    # Only the input is held (and it is a view of the block input, which the block keeps anyway).
    assert saved_activation_bytes(shortcut, tokens, 8, 8) <= grid_bytes


def test_regression_and_multi_label_losses():
    torch.manual_seed(13)
    pixel_values = torch.randn(3, 3, 32, 32)
    regression = DWViTForImageClassification(small_config(num_labels=1)).eval()
    targets = torch.randn(3)
    with torch.no_grad():
        out = regression(pixel_values, labels=targets)
    torch.testing.assert_close(out.loss, ((out.logits.squeeze(-1) - targets) ** 2).mean())

    multi_label = DWViTForImageClassification(small_config(problem_type="multi_label_classification")).eval()
    targets = torch.randint(0, 2, (3, 5)).float()
    with torch.no_grad():
        out = multi_label(pixel_values, labels=targets)
    probabilities = torch.sigmoid(out.logits)
    expected = -(targets * probabilities.log() + (1 - targets) * (1 - probabilities).log()).mean()
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-5)
