"""The three families follow transformers' own conventions for activation checkpointing, the attention
implementation setter and (DWSwin) the layout of `attentions`, checked against transformers' ViT and Swin."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import ViTConfig, ViTModel

from dwvit import (
    DWCaiTConfig,
    DWCaiTForImageClassification,
    DWSwinConfig,
    DWSwinForImageClassification,
    DWViTConfig,
    DWViTForImageClassification,
)
from test_dwswin import faithful_pair
from test_dwswin import small_config as small_swin_config

VIT = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96)
CAIT = dict(
    image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_class_attention_layers=2,
    num_attention_heads=4, intermediate_size=64,
)
SWIN = dict(image_size=32, patch_size=2, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4])


def build(family: str, **overrides):
    torch.manual_seed(0)
    if family == "dwvit":
        return DWViTForImageClassification(DWViTConfig(**{**VIT, "num_labels": 5, **overrides}))
    if family == "dwcait":
        # Without talking heads the patch blocks can run SDPA, so the attention switch has something to switch.
        overrides.setdefault("use_talking_heads", False)
        return DWCaiTForImageClassification(DWCaiTConfig(**{**CAIT, "num_labels": 5, **overrides}))
    return DWSwinForImageClassification(DWSwinConfig(**{**SWIN, "num_labels": 5, "drop_path_rate": 0.0, **overrides}))


def blocks(model) -> list[torch.nn.Module]:
    """The repeated blocks, in `model.modules()` order: what transformers counts for `every_n_layers`."""
    if hasattr(model, "dwvit"):
        return list(model.dwvit.encoder.layers)
    if hasattr(model, "dwcait"):
        return list(model.dwcait.encoder.layers) + list(model.dwcait.encoder.class_attention_layers)
    return [block for stage in model.dwswin.encoder.layers for block in stage.blocks]


FAMILIES = ["dwvit", "dwcait", "dwswin"]


def saved_tensor_count(model, pixel_values) -> int:
    """Tensors autograd keeps for backward during one training forward (whatever the checkpointing keeps)."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(pixel_values)
    hidden = output.logits if hasattr(output, "logits") else output.last_hidden_state
    hidden.sum().backward()
    return count


def counts_by_setting(make) -> dict:
    pixel_values = torch.randn(2, 3, 32, 32)
    counts = {}
    for setting in ("off", 1, 2):
        model = make().train()
        if setting != "off":
            model.activation_checkpointing_enable(every_n_layers=setting)
        counts[setting] = saved_tensor_count(model, pixel_values)
    return counts


def test_transformers_vit_keeps_more_with_every_second_layer_checkpointed():
    """The reference behaviour the families must share: every_n_layers=2 sits between all and none."""
    config = ViTConfig(**VIT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    counts = counts_by_setting(lambda: ViTModel(config, add_pooling_layer=False))
    assert counts["off"] > counts[2] > counts[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_n_layers_checkpoints_every_other_block(family):
    model = build(family).train()
    model.activation_checkpointing_enable(every_n_layers=2)
    flags = [block.gradient_checkpointing for block in blocks(model)]
    assert flags == [index % 2 == 0 for index in range(len(flags))]
    counts = counts_by_setting(lambda: build(family))
    # As for transformers' ViTModel: half the blocks keep their activations, so more is saved than with all.
    assert counts["off"] > counts[2] > counts[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_pre_hook_runs_once_per_step_under_checkpointing(family):
    model = build(family).train()
    model.activation_checkpointing_enable()
    calls = []
    handles = [block.register_forward_pre_hook(lambda module, args: calls.append(module)) for block in blocks(model)]
    model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1])).loss.backward()
    for handle in handles:
        handle.remove()
    # Checkpointing recomputes `forward`, not `__call__`: the hooks stay outside the recompute (as in ViTLayer).
    assert len(calls) == len(blocks(model))
    assert all(block.gradient_checkpointing for block in blocks(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_set_attn_implementation_switches_to_eager_and_back(family, monkeypatch):
    model = build(family).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    with torch.no_grad():
        sdpa_logits = model(pixel_values).logits
        assert calls, "SDPA is the default"
        calls.clear()
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        eager_logits = model(pixel_values).logits
        assert not calls
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "sdpa"
        model(pixel_values)
        assert calls
    torch.testing.assert_close(eager_logits, sdpa_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_set_attn_implementation_refuses_an_unknown_name(family):
    model = build(family)
    with pytest.raises(ValueError, match=r"nonsense.*eager.*sdpa"):
        model.set_attn_implementation("nonsense")
    assert model.config._attn_implementation == "sdpa"


def test_set_attn_implementation_works_through_remote_code(tmp_path, run_without_dwvit):
    model = build("dwvit").eval()
    model.save_pretrained(tmp_path / "model")
    result = run_without_dwvit(
        f"""
        import json, torch
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        model.eval().set_attn_implementation("eager")
        with torch.no_grad():
            out = model(torch.randn(1, 3, 32, 32))
        try:
            model.set_attn_implementation("nonsense")
            refused = False
        except ValueError:
            refused = True
        print(json.dumps({{"module": type(model).__module__, "impl": model.config._attn_implementation,
                           "refused": refused}}))
        """
    )
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload == {"module": payload["module"], "impl": "eager", "refused": True}
    assert payload["module"].startswith("transformers_modules.")


def test_dwswin_attentions_follow_swin_one_map_per_stage():
    config = small_swin_config(use_dw_shortcut=False)
    model, reference = faithful_pair(config, seed=3, attn_implementation="eager")
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(pixel_values, output_attentions=True)
        theirs = reference(pixel_values, output_attentions=True)
    assert len(ours.attentions) == len(theirs.attentions) == len(config.depths)
    for our_weights, their_weights in zip(ours.attentions, theirs.attentions):
        torch.testing.assert_close(our_weights, their_weights, atol=1e-6, rtol=0)


def test_dwswin_per_block_attentions_stay_available():
    model = build("dwswin", attentions_per_block=True).eval()
    assert model.config.attentions_per_block is True
    with torch.no_grad():
        per_block = model(torch.randn(2, 3, 32, 32), output_attentions=True).attentions
    assert [tuple(a.shape) for a in per_block] == [(32, 2, 16, 16)] * 2 + [(8, 4, 16, 16)] * 2
    # The option is a config field, so it survives saving.
    assert DWSwinConfig().attentions_per_block is False
