"""`DWTrainer`: the `transformers.Trainer` that run_image_classification.py uses."""

from __future__ import annotations

import logging

import torch
from transformers import Trainer

from .checkpointing import AtomicCheckpointMixin
from .optim import decay_parameter_names

logger = logging.getLogger(__name__)


class DWTrainer(AtomicCheckpointMixin, Trainer):
    """A `Trainer` whose checkpoints appear complete or not at all (see `dwvit.training.checkpointing`).

    `train(resume_from_checkpoint=True)` resumes from the newest *complete* checkpoint, warning about each newer
    one it skips. Its weight-decay groups follow timm (`get_decay_parameter_names`); everything else is the stock
    `Trainer`.
    """

    def get_decay_parameter_names(self, model) -> list[str]:
        """Decay parameters with 2+ dimensions outside `model.no_weight_decay()`, as timm and the original code do.

        No weight decay on biases, LayerNorm/BatchNorm scales, LayerScale factors, position embeddings, class tokens
        and relative-position bias tables (see `dwvit.training.optim`). The stock rule, by names, decays the last four.
        """
        return decay_parameter_names(model)


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
