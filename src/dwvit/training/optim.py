"""Optimizer parameter groups: which parameters get weight decay.

The rule of the original (Swin Transformer) training code and of timm: no weight decay on 1-D parameters (every
bias, every LayerNorm/BatchNorm scale, CaiT's LayerScale factors) and on the parameters a model names in its
`no_weight_decay()` (position embeddings, class tokens, Swin's relative-position bias tables); every other
parameter (Linear and Conv2d weights, including the depth-wise shortcut kernels and the patch projection) decays.
"""

from __future__ import annotations

from torch import nn

__all__ = ["decay_parameter_names", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel/DataParallel (`.module`) and `torch.compile` (`._orig_mod`)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


def _no_weight_decay_ids(model: nn.Module) -> set[int]:
    """`id`s of the parameters named by `no_weight_decay()` of the unwrapped model (names relative to it)."""
    inner = unwrap_model(model)
    no_weight_decay = getattr(inner, "no_weight_decay", None)
    if not callable(no_weight_decay):
        return set()
    parameters = dict(inner.named_parameters(remove_duplicate=False))
    names = set(no_weight_decay())
    unknown = sorted(name for name in names if name not in parameters)
    if unknown:
        raise ValueError(
            f"{type(inner).__name__}.no_weight_decay() names parameters the model does not have: {', '.join(unknown)}"
        )
    return {id(parameters[name]) for name in names}


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names (as `model.named_parameters()` gives them, wrapper prefixes included) of the parameters to decay.

    A parameter decays when it has at least 2 dimensions and is not in the model's `no_weight_decay()` set. The
    model may be wrapped by DDP or `torch.compile`; the returned names then carry the wrapper's prefix
    (`module.`, `_orig_mod.`), so they match the names the `Trainer` looks up. Frozen parameters are listed too
    (the `Trainer` leaves out parameters that do not require gradients).
    """
    skip = _no_weight_decay_ids(model)
    return [name for name, parameter in model.named_parameters() if parameter.ndim >= 2 and id(parameter) not in skip]
