"""`DWTrainer`: the `transformers.Trainer` that run_image_classification.py uses."""

from __future__ import annotations

import logging

import torch
from transformers import Trainer

from .checkpointing import AtomicCheckpointMixin
from .distributed import any_rank, broadcast_buffers_from_rank_zero
from .optim import decay_parameter_names

logger = logging.getLogger(__name__)

NON_FINITE_STEPS_TOLERATED_UNDER_FP16 = 10  # in a row: the scaler has then gone from 65536 down to 64


class DWTrainer(AtomicCheckpointMixin, Trainer):
    """A `Trainer` whose checkpoints appear complete or not at all (see `dwvit.training.checkpointing`).

    `train(resume_from_checkpoint=True)` resumes from the newest *complete* checkpoint, warning about each newer
    one it skips. Its weight-decay groups follow timm (`get_decay_parameter_names`); everything else is the stock
    `Trainer`.
    """

    def evaluation_loop(self, *args, **kwargs):
        # Each rank evaluates the unwrapped model, whose BatchNorm statistics it last updated from its own batch
        # (DDP hands rank 0's to the others only as a training forward starts): all take rank 0's, the saved ones,
        # so the gathered metrics are those of the saved model.
        broadcast_buffers_from_rank_zero(self.model)
        return super().evaluation_loop(*args, **kwargs)

    def get_decay_parameter_names(self, model) -> list[str]:
        """Decay parameters with 2+ dimensions outside `model.no_weight_decay()`, as timm and the original code do.

        No weight decay on biases, LayerNorm/BatchNorm scales, LayerScale factors, position embeddings, class tokens
        and relative-position bias tables (see `dwvit.training.optim`). The stock rule, by names, decays the last four.
        """
        return decay_parameter_names(model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The stock step, stopping the run at a loss or gradients that are not finite.

        The stock Trainer logs such steps as the running mean (`logging_nan_inf_filter`) and keeps going, so a run
        can end with exit 0 and meaningless weights. The check comes after the backward pass and before the optimizer
        step, so no weights of the broken step are written and the newest checkpoint is from before it.
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Decided over all ranks (one all-reduce of a flag): a rank stopping alone would leave the others waiting
        # in the next gradient all-reduce.
        finite_here = bool(torch.isfinite(loss).all())
        gradients_finite = finite_here and (self.args.fp16 or _gradients_finite(model))
        finite = not any_rank(not gradients_finite, self.args.device)
        # Under fp16 the gradient scaler skips a step with non-finite gradients and lowers its scale, so isolated
        # overflows are survivable; without it the next optimizer step makes every weight NaN.
        self._non_finite_steps = 0 if finite else getattr(self, "_non_finite_steps", 0) + 1
        if self._non_finite_steps > (NON_FINITE_STEPS_TOLERATED_UNDER_FP16 if self.args.fp16 else 0):
            what = (
                f"non-finite training loss ({loss.float().mean().item()})" if not finite_here
                else "non-finite gradients (the loss was finite)" if not gradients_finite
                else "non-finite training loss or gradients on another process"
            )
            raise FloatingPointError(
                f"Training stopped: {what} at step "
                f"{self.state.global_step + 1} (epoch {self.state.epoch or 0:.2f}). Nothing of this step was saved. "
                "Usual causes: a learning rate too high, --image_std near 0, fp16 overflow (try --mixed_precision "
                "bf16 or no)."
            )
        return loss


def _gradients_finite(model) -> bool:
    """Whether every gradient is finite: one fused norm per dtype group, a small cost beside the step's backward.
    (Under fp16 the gradient scaler does this check itself and skips the step.)"""
    gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    if not gradients:
        return True
    return bool(torch.isfinite(torch.stack([norm.float() for norm in torch._foreach_norm(gradients)])).all())


def prepare_torch_compile(args) -> bool:
    """Set inductor up for `--torch_compile` on the CPU; call before the `Trainer` is built.

    Inductor lays convolutions out channels-last on the CPU, but decides it per graph by counting forward
    convolutions, so the backward graph, which holds only `convolution_backward`, is compiled without it
    (pytorch/pytorch#189239, from the conv-backward lowering of PyTorch 2.13): the depth-wise conv's saved input
    and its gradient are copied into NCHW-like layouts, and the shortcut's compiled backward takes about twice the
    eager time. `force_layout_optimization` gives every graph the channels-last layout of the forward (measured in
    docs/speed.md, "torch.compile on the CPU"). Returns whether the inductor setting was changed.
    """
    if not args.torch_compile or args.device.type != "cpu":
        return False
    if (args.torch_compile_backend or "inductor") != "inductor" or not torch.backends.mkldnn.is_available():
        return False
    import torch._inductor.config as inductor_config
    import torch._inductor.kernel.conv as inductor_conv

    if not hasattr(inductor_conv, "convolution_backward_lowering"):
        return False
    inductor_config.force_layout_optimization = True
    logger.info(
        "--torch_compile on the CPU: channels-last layout forced for every inductor graph, so the depth-wise "
        "convolution's backward is not slowed down (pytorch/pytorch#189239; docs/speed.md, 'torch.compile on the CPU')."
    )
    return True
