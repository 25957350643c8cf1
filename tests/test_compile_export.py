"""torch.compile without graph breaks, ONNX export checked with onnxruntime, channels-last and bf16 autocast."""

from __future__ import annotations

import copy
import importlib
import os

import pytest
import torch

from dwvit.models.dw_layers import DepthwiseShortcut


def _small_model(family: str = "dwvit", kernels=(3, 5), span: int = 1, seed: int = 0):
    configuration = importlib.import_module(f"dwvit.models.configuration_{family}")
    modeling = importlib.import_module(f"dwvit.models.modeling_{family}")
    prefix = {"dwvit": "DWViT", "dwcait": "DWCaiT", "dwswin": "DWSwin"}[family]
    common = dict(image_size=32, num_labels=5, dw_kernel_sizes=list(kernels), dw_block_span=span)
    if family == "dwvit":
        fields = dict(patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    elif family == "dwcait":
        fields = dict(
            patch_size=4, hidden_size=32, num_hidden_layers=2, num_class_attention_layers=1,
            num_attention_heads=2, intermediate_size=64,
        )
    else:
        fields = dict(patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, drop_path_rate=0.0)
    config = getattr(configuration, f"{prefix}Config")(**common, **fields)
    torch.manual_seed(seed)
    model = getattr(modeling, f"{prefix}ForImageClassification")(config)
    # Non-trivial BatchNorm statistics so that fused and unfused paths differ if the fold were wrong.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model


class _Logits(torch.nn.Module):
    """Export wrapper: pixel values in, logits out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


# ---------------------------------------------------------------- torch.compile

# CPU compilation costs 10-30 s per family; the suite compiles DWViT and the others with DWVIT_SLOW_TESTS=1.
_slow = pytest.mark.skipif(
    os.environ.get("DWVIT_SLOW_TESTS") != "1", reason="slow CPU compile: set DWVIT_SLOW_TESTS=1 to run"
)


@pytest.mark.parametrize(
    "family", ["dwvit", pytest.param("dwcait", marks=_slow), pytest.param("dwswin", marks=_slow)]
)
def test_compile_fullgraph_forward_and_training_step(family):
    """`fullgraph=True` raises on any graph break. `aot_eager` traces forward and backward like inductor does
    (Dynamo + AOTAutograd) without a C++ build, which keeps the test in the CPU budget."""
    torch._dynamo.reset()
    eager = _small_model(family)
    compiled_model = _small_model(family)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])

    eager.eval(), compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values=pixel_values).logits, eager(pixel_values=pixel_values).logits,
                                   rtol=1e-5, atol=1e-5)

    eager.train(), compiled_model.train()
    eager_optimizer = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    compiled_optimizer = torch.optim.AdamW(compiled_model.parameters(), lr=1e-3)
    for model, optimizer in ((eager, eager_optimizer), (compiled, compiled_optimizer)):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # Same loss path, same update: the parameters and BatchNorm statistics agree after the step.
    eager_state, compiled_state = eager.state_dict(), compiled_model.state_dict()
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_compile_fullgraph_fused_inference():
    torch._dynamo.reset()
    model = _small_model("dwvit", kernels=(3, 5, 7)).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
        model.fuse_dw_shortcuts()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(pixel_values=pixel_values).logits, expected, rtol=0, atol=1e-5)
    # Graph capture computes the bias map in the graph instead of caching a traced tensor.
    assert all(not m._bias_maps for m in model.modules() if isinstance(m, DepthwiseShortcut))


# ---------------------------------------------------------------- ONNX


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_onnx_export_matches_pytorch_in_onnxruntime(tmp_path, fused):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _small_model("dwvit", kernels=(3, 5)).eval()
    if fused:
        model.fuse_dw_shortcuts()
    wrapper = _Logits(model).eval()
    path = tmp_path / "model.onnx"
    example = torch.randn(2, 3, 32, 32)
    torch.onnx.export(
        wrapper,
        (example,),
        str(path),
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
    )
    assert model.dw_shortcuts_fused == fused

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # another batch size
    (onnx_logits,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
    with torch.no_grad():
        expected = wrapper(pixel_values)
    torch.testing.assert_close(torch.from_numpy(onnx_logits), expected, rtol=1e-4, atol=1e-4)

    import onnx

    graph = onnx.load(str(path)).graph
    conv_nodes = [node for node in graph.node if node.op_type == "Conv"]
    # Patch embedding plus, per shortcut, one conv per kernel (unfused) or one merged conv (fused).
    num_shortcuts = len([m for m in model.modules() if isinstance(m, DepthwiseShortcut)])
    assert len(conv_nodes) == 1 + num_shortcuts * (1 if fused else 2)


# ---------------------------------------------------------------- memory format and dtype


@pytest.mark.parametrize("family", ["dwvit", "dwcait", "dwswin"])
def test_channels_last_gives_the_same_logits(family):
    model = _small_model(family).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
        model = model.to(memory_format=torch.channels_last)
        result = model(pixel_values=pixel_values.contiguous(memory_format=torch.channels_last)).logits
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_bf16_autocast_matches_float32_within_bf16_tolerance(fused):
    model = _small_model("dwvit", kernels=(3, 5)).eval()
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
        if fused:
            model.fuse_dw_shortcuts()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = model(pixel_values=pixel_values).logits
    # bf16 keeps 8 mantissa bits (relative step 2**-8 ~ 4e-3); a dozen layers of rounding stay within a few %.
    assert torch.isfinite(result).all()
    relative = (result.float() - expected).norm() / expected.norm()
    assert relative < 3e-2, relative
    assert (result.float().argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


def test_compiled_shortcut_under_autocast_computes_in_float32():
    """The shortcut turns autocast off inside itself: graph capture keeps that (no break), and the compiled training
    shortcut gives, under bf16 autocast, the float32 values, gradients and statistics of the eager one outside it."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    shortcut = DepthwiseShortcut(8, [3, 5]).train()
    reference = copy.deepcopy(shortcut)
    tokens = torch.randn(2, 1 + 12, 8, requires_grad=True)
    block_output = torch.randn(2, 1 + 12, 8)
    compiled = torch.compile(lambda b, t: shortcut.add_to(b, t, 3, 4, 1), fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = compiled(block_output, tokens)
    expected = reference.add_to(block_output, tokens, 3, 4, 1)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), [tokens, *module.parameters()])
             for out, module in ((result, shortcut), (expected, reference))]  # fmt: skip
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(shortcut.buffers(), reference.buffers()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["dwvit", "dwcait", "dwswin"])
def test_bf16_autocast_training_step_runs_and_matches_float32_loss(family):
    """DWSwin's stages carry bf16 tokens into their first shortcut under autocast (before d3befc6 its backward
    failed on the mixed dtypes)."""
    model = _small_model(family).train()
    reference = _small_model(family).train()
    reference.load_state_dict(model.state_dict())
    pixel_values = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    expected = reference(pixel_values=pixel_values, labels=labels).loss
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=3e-2, atol=3e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
