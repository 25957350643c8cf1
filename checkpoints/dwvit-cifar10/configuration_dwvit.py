"""DWViT model configuration."""

from __future__ import annotations

import difflib
import math

from transformers import PretrainedConfig
from transformers.activations import ACT2FN


# Initialisations of the shortcut's depth-wise conv: the paper's (PyTorch's default) or an exact no-op start.
DW_INIT_CHOICES = ("paper", "zeros")


def to_pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"Expected an int or a pair of ints, got {value!r}.")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def validate_positive_ints(config, names) -> None:
    """Raise a ValueError naming the first of `names` that is not a positive int."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}.")


def validate_probabilities(config, names=("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate")):
    """Raise a ValueError naming the first of `names` outside [0, 1)."""
    for name in names:
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must lie in [0, 1); got {value!r}.")


def validate_patch_grid(config) -> None:
    """image_size and patch_size must be positive and tile the image exactly (the shortcut needs a whole grid)."""
    image_height, image_width = to_pair(config.image_size)
    patch_height, patch_width = to_pair(config.patch_size)
    if min(image_height, image_width, patch_height, patch_width) < 1:
        raise ValueError(
            f"image_size and patch_size must be positive; got {config.image_size!r} and {config.patch_size!r}."
        )
    if image_height % patch_height or image_width % patch_width:
        raise ValueError(
            f"image_size ({config.image_size}) must be divisible by patch_size ({config.patch_size}) so that the "
            f"depth-wise shortcut sees a whole patch grid."
        )


def validate_depthwise_fields(config, num_blocks: int) -> None:
    """Check the shortcut fields every DW family shares, and its norm epsilons and activation; raise a ValueError
    naming the field."""
    kernel_sizes = config.dw_kernel_sizes
    if not isinstance(kernel_sizes, (list, tuple)) or len(kernel_sizes) == 0:
        raise ValueError(
            f"dw_kernel_sizes must be a non-empty list of positive odd ints (e.g. [3] or [3, 5, 7]); got {kernel_sizes!r}."
        )
    for kernel in kernel_sizes:
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel <= 0 or kernel % 2 == 0:
            raise ValueError(
                f"dw_kernel_sizes must hold positive odd ints (1, 3, 5, 7, ...) so that padding keeps the grid; "
                f"got {kernel!r} in {list(kernel_sizes)}."
            )
    span = config.dw_block_span
    if isinstance(span, bool) or not isinstance(span, int) or span < 1:
        raise ValueError(f"dw_block_span must be an int >= 1 (1 = one shortcut per block); got {span!r}.")
    if span > num_blocks:
        raise ValueError(f"dw_block_span must be at most the number of blocks ({num_blocks}); got {span}.")
    if config.dw_init not in DW_INIT_CHOICES:
        allowed = ", ".join(repr(choice) for choice in DW_INIT_CHOICES)
        raise ValueError(f"dw_init must be one of {allowed}; got {config.dw_init!r}.")
    validate_epsilons_and_activation(config)


def validate_epsilons_and_activation(config) -> None:
    """Norm epsilons must be positive (zero divides by zero on a constant channel) and `hidden_act` one of
    transformers' activations (a wrong name would fail only when the model is built, as a bare KeyError)."""
    for name in ("layer_norm_eps", "dw_batch_norm_eps"):
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive finite number (e.g. 1e-5); got {value!r}.")
    activation = getattr(config, "hidden_act", None)
    if isinstance(activation, str) and activation not in ACT2FN:
        close = difflib.get_close_matches(activation, list(ACT2FN), n=3)
        hint = f" (did you mean {' or '.join(repr(name) for name in close)}?)" if close else ""
        raise ValueError(
            f"hidden_act {activation!r} is not one of transformers' activations{hint}; known: "
            f"{', '.join(sorted(ACT2FN))}."
        )


class DWViTConfig(PretrainedConfig):
    r"""
    Configuration of a Vision Transformer with depth-wise convolution shortcuts (Zhang et al., 2024).

    The ViT fields keep `transformers.ViTConfig`'s names and meaning. The shortcut fields:

    Args:
        use_dw_shortcut (`bool`, defaults to `True`):
            Add the depth-wise shortcut beside the blocks. `False` gives the plain ViT baseline.
        dw_kernel_sizes (`list[int]`, defaults to `[3]`):
            Kernel of the depth-wise convolution. Several sizes build parallel independent branches whose outputs
            are summed (the paper's variant 2, e.g. `[3, 5]` or `[3, 5, 7]`).
        dw_block_span (`int`, defaults to 1):
            Number of consecutive blocks one shortcut bypasses (the paper's variant 1 uses 2, 3 or 4).
        dw_batch_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the shortcut's BatchNorm2d.
        dw_init (`str`, defaults to `"paper"`):
            Initialisation of the shortcut's depth-wise convolution: `"paper"` keeps PyTorch's default
            (Kaiming-uniform), as the paper does; `"zeros"` zeroes its weight and bias, so the shortcut adds exactly
            nothing until trained (e.g. when adding shortcuts to a pretrained model). BatchNorm starts at the
            identity either way.
        use_position_embeddings (`bool`, defaults to `True`):
            Learned absolute position embeddings; the paper reports models with and without.
        pooling (`str`, defaults to `"cls"`):
            `"cls"` classifies from the class token, `"mean"` from the mean of the patch tokens.
        drop_path_rate (`float`, defaults to 0.0):
            Stochastic depth rate, rising linearly over the blocks to this value.

    Example:

    ```python
    >>> from dwvit import DWViTConfig, DWViTForImageClassification
    >>> config = DWViTConfig(image_size=32, patch_size=4, num_labels=10)
    >>> model = DWViTForImageClassification(config)
    ```
    """

    model_type = "dwvit"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 192,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 3,
        intermediate_size: int = 768,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        use_dw_shortcut: bool = True,
        dw_kernel_sizes: list[int] | tuple[int, ...] = (3,),
        dw_block_span: int = 1,
        dw_batch_norm_eps: float = 1e-5,
        dw_init: str = "paper",
        use_position_embeddings: bool = True,
        pooling: str = "cls",
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.drop_path_rate = drop_path_rate
        self.use_dw_shortcut = use_dw_shortcut
        self.dw_kernel_sizes = list(dw_kernel_sizes) if isinstance(dw_kernel_sizes, (list, tuple)) else dw_kernel_sizes
        self.dw_block_span = dw_block_span
        self.dw_batch_norm_eps = dw_batch_norm_eps
        self.dw_init = dw_init
        self.use_position_embeddings = use_position_embeddings
        self.pooling = pooling
        super().__init__(**kwargs)
        self._validate_dwvit()

    def _validate_dwvit(self) -> None:
        validate_positive_ints(
            self, ("num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        validate_patch_grid(self)
        validate_probabilities(self)
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be one of 'cls', 'mean'; got {self.pooling!r}.")
        validate_depthwise_fields(self, self.num_hidden_layers)


__all__ = ["DWViTConfig"]
