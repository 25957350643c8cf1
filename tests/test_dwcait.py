"""DWCaiT: faithfulness to timm's CaiT, the shortcut against a hand computation, the original code's forms,
parameter counts, inputs, and the transformers ecosystem (save/load, remote code, pipeline, Trainer)."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    pipeline,
)

import dwvit
from dwvit import DWCaiTConfig, DWCaiTForImageClassification, DWCaiTModel
from conftest import CIFAR10_LABELS, CIFAR10_NAMES, hand_shortcut, randomise_shortcut_statistics, warm_up_batchnorm

timm_cait = pytest.importorskip("timm.models.cait")
timm_vit = pytest.importorskip("timm.models.vision_transformer")

SMALL = dict(
    image_size=32,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=4,
    num_class_attention_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
)


def small_config(**overrides) -> DWCaiTConfig:
    return DWCaiTConfig(**{**SMALL, "num_labels": 5, **overrides})


def perturb_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Move every parameter away from its initialisation, so that no branch is (nearly) an identity or zero.

    CaiT initialises LayerScale at 1e-5 and talking heads near zero; left so, a wrong block would still pass a
    1e-5 comparison. LayerScale factors go to [0.5, 1.5].
    """
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lambda1"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            else:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)


# --------------------------------------------------------------------------------------------------------------
# Faithfulness: with the shortcut off, DWCaiT is timm's CaiT.
# --------------------------------------------------------------------------------------------------------------


def timm_reference_for(config: DWCaiTConfig) -> nn.Module:
    """timm's CaiT of the same size. Switched-off features are emulated by fixing the matching weights:
    LayerScale off = gammas of one, position embeddings off = zeros, talking heads off = plain ViT attention."""
    kwargs = dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        mlp_ratio_token_only=config.intermediate_size / config.hidden_size,
        depth_token_only=config.num_class_attention_layers,
        qkv_bias=config.qkv_bias,
        num_classes=config.num_labels,
        norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
        init_values=config.layer_scale_init_value,
    )
    if not config.use_talking_heads:
        kwargs["attn_block"] = timm_vit.Attention
    return timm_cait.Cait(**kwargs).eval()


def copy_dwcait_into_timm(model: DWCaiTForImageClassification, reference: nn.Module) -> None:
    source, config = model.state_dict(), model.config
    target = {"head.weight": source["classifier.weight"], "head.bias": source["classifier.bias"]}
    target["cls_token"] = source["dwcait.embeddings.cls_token"]
    target["pos_embed"] = source.get("dwcait.embeddings.position_embeddings", torch.zeros_like(reference.pos_embed))
    ones = torch.ones(config.hidden_size)

    def copy_linear(theirs: str, ours: str) -> None:
        target[f"{theirs}.weight"] = source[f"{ours}.weight"]
        if f"{ours}.bias" in source:
            target[f"{theirs}.bias"] = source[f"{ours}.bias"]

    copy_linear("patch_embed.proj", "dwcait.embeddings.patch_embeddings.projection")
    copy_linear("norm", "dwcait.layernorm")
    blocks = [(f"blocks.{i}", f"dwcait.encoder.layers.{i}") for i in range(config.num_hidden_layers)]
    class_blocks = [
        (f"blocks_token_only.{i}", f"dwcait.encoder.class_attention_layers.{i}")
        for i in range(config.num_class_attention_layers)
    ]
    for theirs, ours in blocks + class_blocks:
        copy_linear(f"{theirs}.norm1", f"{ours}.layernorm_before")
        copy_linear(f"{theirs}.norm2", f"{ours}.layernorm_after")
        copy_linear(f"{theirs}.mlp.fc1", f"{ours}.mlp.fc1")
        copy_linear(f"{theirs}.mlp.fc2", f"{ours}.mlp.fc2")
        copy_linear(f"{theirs}.attn.proj", f"{ours}.attention.out_proj")
        target[f"{theirs}.gamma_1"] = source.get(f"{ours}.layer_scale1.lambda1", ones)
        target[f"{theirs}.gamma_2"] = source.get(f"{ours}.layer_scale2.lambda1", ones)
    for theirs, ours in blocks:
        copy_linear(f"{theirs}.attn.qkv", f"{ours}.attention.qkv")
        if config.use_talking_heads:
            copy_linear(f"{theirs}.attn.proj_l", f"{ours}.attention.talking_heads_pre_softmax")
            copy_linear(f"{theirs}.attn.proj_w", f"{ours}.attention.talking_heads_post_softmax")
    for theirs, ours in class_blocks:
        for name in ("q", "k", "v"):
            copy_linear(f"{theirs}.attn.{name}", f"{ours}.attention.{dict(q='query', k='key', v='value')[name]}")
    reference.load_state_dict(target, strict=True)


CAIT_ON = dict(use_layer_scale=True, use_talking_heads=True, use_position_embeddings=True)
CAIT_SMALL_DATA = dict(use_layer_scale=False, use_talking_heads=False, use_position_embeddings=False)


@pytest.mark.parametrize(
    "switches,sizes",
    [
        (dict(CAIT_ON), SMALL),
        (dict(CAIT_ON, qkv_bias=False, layer_norm_eps=1e-5), SMALL),
        (dict(CAIT_SMALL_DATA), SMALL),
        (dict(CAIT_ON), dict(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=2,
                             num_class_attention_layers=2, num_attention_heads=4, intermediate_size=768)),
    ],
    ids=["layerscale-talkingheads-posemb", "no-qkv-bias-eps1e-5", "all-three-off", "xxs-width-224-16"],
)
def test_shortcut_off_matches_timm_cait(switches, sizes):
    torch.manual_seed(0)
    config = DWCaiTConfig(**sizes, **switches, num_labels=7, use_dw_shortcut=False)
    model = DWCaiTForImageClassification(config).eval()
    perturb_parameters(model, torch.Generator().manual_seed(1))
    reference = timm_reference_for(config)
    copy_dwcait_into_timm(model, reference)
    pixel_values = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        ours = model(pixel_values, output_hidden_states=True)
        their_features = reference.forward_features(pixel_values)
        their_logits = reference.forward_head(their_features)
    assert ours.logits.abs().max() > 0.1  # the comparison is not between two near-zero outputs
    torch.testing.assert_close(ours.logits, their_logits, atol=1e-5, rtol=0)
    # The whole final sequence (class token first, then patch tokens), not just the class token.
    hidden = model.dwcait(pixel_values).last_hidden_state
    torch.testing.assert_close(hidden, their_features, atol=1e-5, rtol=0)


def test_each_switch_changes_the_function():
    """With the same shared weights, switching LayerScale, talking heads or position embeddings off changes the
    logits by far more than the 1e-5 the timm comparison tolerates: that comparison exercises each feature."""
    torch.manual_seed(2)
    full = DWCaiTForImageClassification(small_config(**CAIT_ON, use_dw_shortcut=False)).eval()
    perturb_parameters(full, torch.Generator().manual_seed(3))
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference_logits = full(pixel_values).logits
        for switch in CAIT_ON:
            reduced = DWCaiTForImageClassification(small_config(**{**CAIT_ON, switch: False}, use_dw_shortcut=False))
            missing, unexpected = reduced.load_state_dict(full.state_dict(), strict=False)
            assert not missing and unexpected, switch  # only the switched-off feature's weights are dropped
            assert (reduced.eval()(pixel_values).logits - reference_logits).abs().max() > 1e-2, switch


def test_sdpa_is_default_not_causal_and_talking_heads_run_eagerly():
    torch.manual_seed(4)
    pixel_values = torch.randn(2, 3, 32, 32)
    for use_talking_heads in (False, True):
        model = DWCaiTForImageClassification(small_config(use_talking_heads=use_talking_heads)).eval()
        perturb_parameters(model, torch.Generator().manual_seed(5))
        assert model.config._attn_implementation == "sdpa"
        with torch.no_grad():
            sdpa_logits = model(pixel_values).logits
            model.config._attn_implementation = "eager"
            eager_logits = model(pixel_values).logits
        # Eager attention is full (no mask); a causal SDPA would differ by far more than rounding.
        torch.testing.assert_close(sdpa_logits, eager_logits, atol=1e-5, rtol=0)


def test_hidden_states_and_attentions():
    torch.manual_seed(6)
    config = small_config(use_talking_heads=False, use_dw_shortcut=True)
    model = DWCaiTModel(config).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(pixel_values)
        out = model(pixel_values, output_hidden_states=True, output_attentions=True)
        as_tuple = model(pixel_values, output_hidden_states=True, output_attentions=True, return_dict=False)
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state, atol=1e-5, rtol=0)
    patch_states = out.hidden_states[: config.num_hidden_layers + 1]
    class_states = out.hidden_states[config.num_hidden_layers + 1 :]
    assert [tuple(h.shape) for h in patch_states] == [(2, 64, 32)] * (config.num_hidden_layers + 1)
    assert [tuple(h.shape) for h in class_states] == [(2, 65, 32)] * config.num_class_attention_layers
    # Class attention leaves the patch tokens alone; the final LayerNorm of the last state is the output.
    torch.testing.assert_close(class_states[-1][:, 1:], patch_states[-1])
    torch.testing.assert_close(model.layernorm(class_states[-1]), out.last_hidden_state)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])
    assert [tuple(a.shape) for a in out.attentions] == [(2, 4, 64, 64)] * config.num_hidden_layers + [
        (2, 4, 1, 65)
    ] * config.num_class_attention_layers
    for weights in out.attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert len(as_tuple) == 4 and torch.equal(as_tuple[0], out.last_hidden_state)


# --------------------------------------------------------------------------------------------------------------
# The shortcut, and the paper's original code's forms, against hand computations with functional ops.
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel_sizes,span,image_size,training",
    [([3], 1, 32, False), ([3, 5, 7], 1, 32, False), ([3], 2, 32, False), ([3], 3, 32, False),
     ([3, 5], 2, 32, True), ([3], 1, 48, False)],
    ids=["k3", "k3+5+7", "span2", "span3", "k3+5-span2-train", "k3-interpolated-48"],
)
def test_shortcut_matches_hand_computation(kernel_sizes, span, image_size, training):
    torch.manual_seed(7)
    config = small_config(dw_kernel_sizes=kernel_sizes, dw_block_span=span, use_talking_heads=False)
    model = DWCaiTModel(config)
    perturb_parameters(model, torch.Generator().manual_seed(8))
    randomise_shortcut_statistics(model, torch.Generator().manual_seed(9))
    model.train(training)
    pixel_values = torch.randn(2, 3, image_size, image_size)
    grid = (image_size // 4, image_size // 4)

    # Expected: the model's own blocks with a hand-computed shortcut around each group of `span` patch blocks,
    # then the class-attention blocks with no shortcut at all.
    with torch.no_grad():
        expected, class_token, _ = model.embeddings(pixel_values, interpolate_pos_encoding=True)
        layers = list(model.encoder.layers)
        shortcut_modules = list(model.encoder.shortcuts)
        assert len(shortcut_modules) == -(-config.num_hidden_layers // span)
        for group_index, start in enumerate(range(0, len(layers), span)):
            group_input = expected
            for layer in layers[start : start + span]:
                expected, _ = layer(expected)
            branches = [(b.norm, b.conv) for b in shortcut_modules[group_index].branches]
            assert [conv.kernel_size[0] for _, conv in branches] == kernel_sizes
            expected = expected + hand_shortcut(group_input, grid, branches, training)
        for layer in model.encoder.class_attention_layers:
            class_token, _ = layer(expected, class_token)
        expected = model.layernorm(torch.cat((class_token, expected), dim=1))

        actual = model(pixel_values, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_shortcut_changes_every_patch_token_and_no_class_attention_block_has_one():
    torch.manual_seed(10)
    with_shortcut = DWCaiTModel(small_config(num_hidden_layers=1)).eval()
    without = DWCaiTModel(small_config(num_hidden_layers=1, use_dw_shortcut=False)).eval()
    without.load_state_dict(with_shortcut.state_dict(), strict=False)
    randomise_shortcut_statistics(with_shortcut, torch.Generator().manual_seed(11))
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = with_shortcut(pixel_values, output_hidden_states=True).hidden_states[1]
        b = without(pixel_values, output_hidden_states=True).hidden_states[1]
    # Every token, the first one included, is a patch token here and receives the shortcut.
    assert ((a - b).abs().amax(-1) > 1e-4).all()
    names = [name for name, _ in with_shortcut.named_modules()]
    assert not any(name.startswith("encoder.class_attention_layers") and "shortcut" in name for name in names)
    assert len(with_shortcut.encoder.shortcuts) == 1


def hand_attention(query, key, value, scale, mix_pre, mix_post):
    """Attention with bias-free talking-heads matrices M applied as out[:, g] = sum_h in[:, h] * M[h, g]."""
    logits = torch.einsum("bhid,bhjd->bhij", query, key) * scale
    logits = torch.einsum("bhij,hg->bgij", logits, mix_pre)
    weights = torch.einsum("bhij,hg->bgij", logits.softmax(-1), mix_post)
    return torch.einsum("bhij,bhjd->bhid", weights, value)


def test_original_code_forms_of_talking_heads_and_class_attention():
    """The paper's original code: bias-free head-mixing matrices M (held as Linear weight M^T, bias 0), talking
    heads in the class attention too, and a class-attention LayerNorm that normalises only the class token."""
    torch.manual_seed(12)
    config = small_config(
        use_talking_heads=True, use_class_attention_talking_heads=True, class_attention_norm_patches=False,
        qkv_bias=False, use_layer_scale=True, layer_norm_eps=1e-5,
    )
    model = DWCaiTModel(config).eval()
    perturb_parameters(model, torch.Generator().manual_seed(13))
    heads, head_dim, width = 4, 8, 32
    mixings = []
    with torch.no_grad():
        for attention in [layer.attention for layer in model.encoder.layers] + [
            layer.attention for layer in model.encoder.class_attention_layers
        ]:
            pair = (torch.randn(heads, heads), torch.randn(heads, heads))
            attention.talking_heads_pre_softmax.weight.copy_(pair[0].T)
            attention.talking_heads_post_softmax.weight.copy_(pair[1].T)
            attention.talking_heads_pre_softmax.bias.zero_()
            attention.talking_heads_post_softmax.bias.zero_()
            mixings.append(pair)

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, head_dim).transpose(1, 2)

    def merge(t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], width)

    def layer_norm(x, norm):
        return F.layer_norm(x, (width,), norm.weight, norm.bias, eps=1e-5)

    def mlp(x, block):
        return F.linear(F.gelu(F.linear(x, block.mlp.fc1.weight, block.mlp.fc1.bias)), block.mlp.fc2.weight, block.mlp.fc2.bias)

    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x, class_token, grid = model.embeddings(pixel_values)
        for index, block in enumerate(model.encoder.layers):
            mix_pre, mix_post = mixings[index]
            normed = layer_norm(x, block.layernorm_before)
            q, k, v = (split(t) for t in F.linear(normed, block.attention.qkv.weight).chunk(3, dim=-1))
            attended = merge(hand_attention(q, k, v, head_dim**-0.5, mix_pre, mix_post))
            attended = F.linear(attended, block.attention.out_proj.weight, block.attention.out_proj.bias)
            block_input = x
            x = x + attended * block.layer_scale1.lambda1
            x = x + mlp(layer_norm(x, block.layernorm_after), block) * block.layer_scale2.lambda1
            branch = model.encoder.shortcuts[index].branches[0]
            x = x + hand_shortcut(block_input, grid, [(branch.norm, branch.conv)], training=False)
        for index, block in enumerate(model.encoder.class_attention_layers):
            mix_pre, mix_post = mixings[config.num_hidden_layers + index]
            normed_class = layer_norm(class_token, block.layernorm_before)
            context = torch.cat((normed_class, x), dim=1)  # patch tokens enter un-normalised
            q = split(F.linear(normed_class, block.attention.query.weight))
            k = split(F.linear(context, block.attention.key.weight))
            v = split(F.linear(context, block.attention.value.weight))
            attended = merge(hand_attention(q, k, v, head_dim**-0.5, mix_pre, mix_post))
            attended = F.linear(attended, block.attention.out_proj.weight, block.attention.out_proj.bias)
            class_token = class_token + attended * block.layer_scale1.lambda1
            class_token = class_token + mlp(layer_norm(class_token, block.layernorm_after), block) * block.layer_scale2.lambda1
        expected = layer_norm(class_token[:, 0], model.layernorm)
        actual = model(pixel_values).pooler_output
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Sizes and parameter counts.
# --------------------------------------------------------------------------------------------------------------


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(name: str, **overrides) -> DWCaiTForImageClassification:
    with torch.device("meta"):
        return DWCaiTForImageClassification(dwvit.named_config(name, num_labels=10, **overrides))


@pytest.mark.parametrize("name,paper_millions,blocks", [("cait-xxs12", 6.4, 12), ("cait-xxs24", 11.8, 24)])
def test_parameter_counts_match_the_paper(name, paper_millions, blocks):
    # The paper prints counts rounded to 0.1M, so a faithful model lies within half that digit: 0.05M.
    named = count(build_on_meta(name))  # the paper's "+ DW (no LayerScale, talking heads, pos. emb.)" row
    assert abs(named - paper_millions * 1e6) <= 0.05e6, named
    plain_cait = count(build_on_meta(name, use_dw_shortcut=False, **CAIT_ON))  # the paper's CaiT row
    assert abs(plain_cait - paper_millions * 1e6) <= 0.05e6, plain_cait

    without = count(build_on_meta(name, use_dw_shortcut=False))
    # Per module: a 3x3 depth-wise kernel and bias (192*9 + 192) and BatchNorm's scale and shift (2*192),
    # one beside each patch block and none beside the two class-attention blocks.
    assert named - without == blocks * (192 * 9 + 192 + 2 * 192)
    span2 = count(build_on_meta(name, dw_block_span=2))
    assert span2 - without == (blocks // 2) * (192 * 9 + 192 + 2 * 192)
    kernels = count(build_on_meta(name, dw_kernel_sizes=[3, 5, 7]))
    assert kernels - without == blocks * sum(192 * k * k + 192 + 2 * 192 for k in (3, 5, 7))
    # The switched-off features: LayerScale 2 x 192 per block, talking heads 2 x (4*4 + 4) per patch block,
    # position embeddings 196 x 192 at 224 / 16.
    switched_on = count(build_on_meta(name, **CAIT_ON))
    assert switched_on - named == (blocks + 2) * 2 * 192 + blocks * 2 * 20 + 196 * 192


def test_named_sizes():
    config = dwvit.named_config("cait-xxs24", num_labels=10)
    assert isinstance(config, DWCaiTConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.num_class_attention_layers) == (192, 24, 2)
    assert (config.num_attention_heads, config.intermediate_size, config.image_size, config.patch_size) == (4, 768, 224, 16)
    assert (config.use_layer_scale, config.use_talking_heads, config.use_position_embeddings) == (False, False, False)
    assert config.use_dw_shortcut and config.dw_kernel_sizes == [3] and config.dw_block_span == 1
    cifar = dwvit.named_config("cait-xxs12-cifar", use_talking_heads=True)
    assert (cifar.image_size, cifar.patch_size, cifar.num_hidden_layers, cifar.use_talking_heads) == (32, 4, 12, True)
    with torch.device("meta"):
        assert isinstance(dwvit.create_model("cait-xxs24-cifar", num_labels=10), DWCaiTForImageClassification)


# --------------------------------------------------------------------------------------------------------------
# Training behaviour and inputs.
# --------------------------------------------------------------------------------------------------------------


def test_labels_give_hard_and_soft_losses():
    torch.manual_seed(14)
    model = DWCaiTForImageClassification(small_config()).eval()
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
    torch.manual_seed(15)
    model = DWCaiTForImageClassification(small_config()).eval()
    with torch.no_grad():
        same = model(torch.ones(1, 3, 32, 32), interpolate_pos_encoding=True).logits
        plain = model(torch.ones(1, 3, 32, 32)).logits
        larger = model(torch.randn(2, 3, 64, 48), interpolate_pos_encoding=True, output_hidden_states=True)
    torch.testing.assert_close(same, plain)
    assert larger.logits.shape == (2, 5)
    assert larger.hidden_states[4].shape == (2, 16 * 12, 32)  # the patch stage has no class slot
    assert larger.hidden_states[-1].shape == (2, 1 + 16 * 12, 32)
    # A constant position table stays constant when resized, so only the grid, not the values, changes.
    embeddings = model.dwcait.embeddings
    with torch.no_grad():
        embeddings.position_embeddings.copy_(torch.full_like(embeddings.position_embeddings, 0.7))
        resized = embeddings.interpolate_pos_encoding((16, 12))
    assert resized.shape == (1, 192, 32)
    torch.testing.assert_close(resized, torch.full_like(resized, 0.7))


def test_gradient_checkpointing_keeps_the_shortcut_and_counts_batchnorm_once():
    torch.manual_seed(16)
    config = small_config()
    reference = DWCaiTForImageClassification(config).train()
    perturb_parameters(reference, torch.Generator().manual_seed(17))
    checkpointed = DWCaiTForImageClassification(config).train()
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.dwcait.encoder.gradient_checkpointing
    pixel_values, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    for model in (reference, checkpointed):
        model(pixel_values, labels=labels).loss.backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    shortcut_grad = checkpointed.dwcait.encoder.shortcuts[0].branches[0].conv.weight.grad
    assert shortcut_grad is not None and shortcut_grad.abs().sum() > 0
    for (name, a), (_, b) in zip(reference.named_buffers(), checkpointed.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)  # num_batches_tracked == 1: one update per forward


def test_drop_path_is_constant_over_patch_blocks_and_absent_in_class_attention():
    torch.manual_seed(18)
    # Without LayerScale (initialised at 1e-5) a dropped branch changes the output visibly.
    model = DWCaiTForImageClassification(small_config(drop_path_rate=0.5, use_layer_scale=False))
    assert [layer.drop_path.drop_prob for layer in model.dwcait.encoder.layers] == [0.5] * 4
    assert not any(isinstance(m, dwvit.models.dw_layers.DropPath) for m in model.dwcait.encoder.class_attention_layers.modules())
    pixel_values = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, model(pixel_values).logits)
        model.train()
        outputs = [model(pixel_values).logits for _ in range(3)]
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3 or (outputs[1] - outputs[2]).abs().max() > 1e-3


def test_init_weights():
    torch.manual_seed(19)
    config = dwvit.named_config("cait-xxs12-cifar", num_labels=10, use_layer_scale=True, use_talking_heads=True,
                                layer_scale_init_value=0.1)
    model = DWCaiTForImageClassification(config)
    layer = model.dwcait.encoder.layers[0]
    assert abs(layer.attention.qkv.weight.std().item() - 0.02) < 0.002  # truncated normal, std = initializer_range
    assert torch.equal(layer.layer_scale1.lambda1, torch.full((192,), 0.1))
    assert torch.equal(model.dwcait.encoder.class_attention_layers[1].layer_scale2.lambda1, torch.full((192,), 0.1))
    assert torch.equal(layer.attention.talking_heads_pre_softmax.bias, torch.zeros(4))
    assert 0 < layer.attention.talking_heads_post_softmax.weight.abs().max() <= 0.04  # truncated at 2 std
    assert abs(model.dwcait.embeddings.cls_token.std().item() - 0.02) < 0.01
    conv = model.dwcait.encoder.shortcuts[0].branches[0].conv.weight
    assert conv.abs().max() <= 1 / 3 + 1e-6  # PyTorch's default: Kaiming-uniform bound 1/sqrt(fan_in=9)
    assert conv.std() > 0.1
    norm = model.dwcait.encoder.shortcuts[0].branches[0].norm
    assert torch.equal(norm.weight, torch.ones(192)) and torch.equal(norm.running_var, torch.ones(192))


def test_bad_inputs_raise_clear_errors():
    model = DWCaiTForImageClassification(small_config()).eval()
    with pytest.raises(ValueError, match="1 channels but the model expects num_channels=3"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"Input image size \(64x64\) doesn't match the model's image_size \(32x32\).*interpolate_pos_encoding=True"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="4-D tensor"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="You have to specify pixel_values"):
        model()


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(hidden_size=30, num_attention_heads=4), r"hidden_size \(30\) must be divisible by num_attention_heads \(4\)"),
        (dict(num_class_attention_layers=0), r"num_class_attention_layers must be a positive int; got 0"),
        (dict(num_hidden_layers=0), r"num_hidden_layers must be a positive int"),
        (dict(dw_kernel_sizes=[4]), r"dw_kernel_sizes must hold positive odd ints.*got 4"),
        (dict(dw_kernel_sizes=[]), r"dw_kernel_sizes must be a non-empty list"),
        (dict(dw_block_span=0), r"dw_block_span must be an int >= 1"),
        (dict(dw_block_span=5), r"dw_block_span must be at most the number of blocks \(4\)"),
        (dict(image_size=30), r"image_size \(30\) must be divisible by patch_size \(4\)"),
        (dict(drop_path_rate=1.5), r"drop_path_rate must lie in \[0, 1\)"),
        (dict(layer_scale_init_value=0.0), r"layer_scale_init_value must be a positive float.*got 0.0"),
    ],
)
def test_invalid_config_values(fields, message):
    with pytest.raises(ValueError, match=message):
        small_config(**fields)


def test_layer_scale_init_value_is_free_when_layer_scale_is_off():
    assert small_config(use_layer_scale=False, layer_scale_init_value=0.0).use_layer_scale is False


# --------------------------------------------------------------------------------------------------------------
# The transformers ecosystem.
# --------------------------------------------------------------------------------------------------------------


def cifar_model(**overrides) -> DWCaiTForImageClassification:
    config = DWCaiTConfig(
        **{**SMALL, **overrides},
        **CIFAR10_LABELS,
    )
    return DWCaiTForImageClassification(config)


def test_auto_classes_know_dwcait():
    config = AutoConfig.for_model("dwcait", **SMALL)
    assert isinstance(config, DWCaiTConfig)
    assert isinstance(AutoModel.from_config(config), DWCaiTModel)
    assert isinstance(AutoModelForImageClassification.from_config(config), DWCaiTForImageClassification)


def test_save_and_load_round_trip_keeps_batchnorm_statistics(tmp_path):
    torch.manual_seed(20)
    model = cifar_model(dw_kernel_sizes=[3, 5], dw_block_span=2)
    warm_up_batchnorm(model)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    saved = load_file(tmp_path / "model.safetensors")
    running_mean = model.dwcait.encoder.shortcuts[1].branches[1].norm.running_mean
    assert running_mean.abs().sum() > 0
    torch.testing.assert_close(saved["dwcait.encoder.shortcuts.1.branches.1.norm.running_mean"], running_mean)

    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, DWCaiTForImageClassification)
    assert reloaded.config.dw_kernel_sizes == [3, 5] and reloaded.config.id2label[3] == "cat"
    pixel_values = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits, atol=0, rtol=0)
    for (name, a), (_, b) in zip(model.named_buffers(), reloaded.named_buffers()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    base = AutoModel.from_pretrained(tmp_path).eval()  # the bare encoder from a head checkpoint
    with torch.no_grad():
        torch.testing.assert_close(base(pixel_values).pooler_output, model.dwcait(pixel_values).pooler_output)


def test_remote_code_and_pipeline_without_dwvit(tmp_path, cifar10_test_slice, run_without_dwvit):
    """One saved folder (model + image processor): the pipeline with dwvit imported, then the Auto classes and
    the pipeline again in a process where dwvit cannot be imported, all giving the same answers."""
    torch.manual_seed(21)
    model = cifar_model(dw_kernel_sizes=[3, 5, 7], use_talking_heads=True)
    warm_up_batchnorm(model)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    dwvit.make_image_processor(32, dataset="cifar10").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_dwcait.DWCaiTConfig",
        "AutoModel": "modeling_dwcait.DWCaiTModel",
        "AutoModelForImageClassification": "modeling_dwcait.DWCaiTForImageClassification",
    }
    files = {p.name for p in folder.iterdir()}
    assert {"configuration_dwcait.py", "modeling_dwcait.py", "dw_layers.py"} <= files

    images = [cifar10_test_slice[i]["img"] for i in range(6)]
    classifier = pipeline("image-classification", model=str(folder), device="cpu")
    predictions = classifier(images, top_k=3)
    # Independent expectation: processor + model + softmax by hand.
    processor = AutoImageProcessor.from_pretrained(folder)
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probabilities = model(pixel_values).logits.softmax(-1)
        expected_features = model.dwcait(pixel_values).pooler_output
    for prediction, row in zip(predictions, probabilities):
        top = row.topk(3)
        assert [entry["label"] for entry in prediction] == [CIFAR10_NAMES[i] for i in top.indices.tolist()]
        np.testing.assert_allclose([entry["score"] for entry in prediction], top.values.numpy(), atol=1e-5)

    torch.save(pixel_values, tmp_path / "pixels.pt")
    for index, image in enumerate(images):
        image.save(tmp_path / f"image{index}.png")
    result = run_without_dwvit(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModel, AutoModelForImageClassification, pipeline
        try:
            import dwvit
            raise SystemExit("dwvit should not be importable here")
        except ImportError:
            pass
        folder = {str(folder)!r}
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        pixels = torch.load({str(tmp_path / "pixels.pt")!r})
        with torch.no_grad():
            probabilities = model(pixels).logits.softmax(-1)
            features = base(pixels).pooler_output
        classifier = pipeline("image-classification", model=folder, trust_remote_code=True, device="cpu")
        images = [Image.open({str(tmp_path)!r} + f"/image{{i}}.png") for i in range(6)]
        print(json.dumps({{"module": type(model).__module__, "base": type(base).__name__,
                           "probabilities": probabilities.tolist(), "features": features.tolist(),
                           "predictions": classifier(images, top_k=3)}}))
        """
    )
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["module"].startswith("transformers_modules.") and payload["base"] == "DWCaiTModel"
    torch.testing.assert_close(torch.tensor(payload["probabilities"]), probabilities, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(payload["features"]), expected_features, atol=1e-5, rtol=0)
    for ours, theirs in zip(predictions, payload["predictions"]):
        assert [e["label"] for e in ours] == [e["label"] for e in theirs]
        np.testing.assert_allclose([e["score"] for e in ours], [e["score"] for e in theirs], atol=1e-5)


def test_trainer_fine_tunes_on_real_cifar10(fine_tune_on_cifar10):
    torch.manual_seed(22)
    model = cifar_model(hidden_size=64, num_hidden_layers=3, use_layer_scale=False, use_talking_heads=False,
                        use_position_embeddings=False, intermediate_size=128)
    fine_tune_on_cifar10(model, train_size=200, learning_rate=2e-3, batch_size=16, seed=22)
