"""DWCaiT model configuration."""

from __future__ import annotations

from transformers import PretrainedConfig

from .configuration_dwvit import (
    validate_depthwise_fields,
    validate_patch_grid,
    validate_positive_ints,
    validate_probabilities,
)


class DWCaiTConfig(PretrainedConfig):
    r"""
    Configuration of CaiT (Touvron et al., 2021) with depth-wise convolution shortcuts (Zhang et al., 2024).

    CaiT runs `num_hidden_layers` self-attention blocks over the patch tokens only (no class token), then
    `num_class_attention_layers` class-attention blocks in which a class token attends to itself and the patch
    tokens. A depth-wise shortcut sits beside every group of `dw_block_span` patch blocks and sees every token;
    the class-attention blocks have none. Defaults describe CaiT as published (and as `timm` implements it);
    the named sizes in `dwvit.models.sizes` switch LayerScale, talking heads and position embeddings off, as in the
    paper's best small-data results.

    Args:
        image_size (`int` or `tuple[int, int]`, defaults to 224):
            Input resolution; must be divisible by `patch_size`.
        patch_size (`int` or `tuple[int, int]`, defaults to 16):
            Side of the square (or `(height, width)`) patches.
        num_channels (`int`, defaults to 3):
            Channels of the input images.
        hidden_size (`int`, defaults to 192):
            Width of every token.
        num_hidden_layers (`int`, defaults to 12):
            Self-attention (patch) blocks; CaiT-XXS12 has 12, CaiT-XXS24 24.
        num_class_attention_layers (`int`, defaults to 2):
            Class-attention blocks after the patch blocks.
        num_attention_heads (`int`, defaults to 4):
            Heads in every attention layer; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 768):
            Hidden width of the MLP of every block.
        hidden_act (`str`, defaults to `"gelu"`):
            Activation of the MLP.
        hidden_dropout_prob (`float`, defaults to 0.0):
            Dropout after the embeddings, the attention output projection and the MLP.
        attention_probs_dropout_prob (`float`, defaults to 0.0):
            Dropout on the attention weights.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the truncated normal initialisation of linear layers and embeddings.
        layer_norm_eps (`float`, defaults to 1e-6):
            Epsilon of every LayerNorm (CaiT uses 1e-6; the paper's original code uses PyTorch's 1e-5).
        qkv_bias (`bool`, defaults to `True`):
            Bias in the query, key and value projections of both kinds of attention.
        drop_path_rate (`float`, defaults to 0.0):
            Stochastic depth rate of every patch block (CaiT keeps it constant over depth; the class-attention
            blocks have none).
        use_layer_scale (`bool`, defaults to `True`):
            Multiply each residual branch by a learned per-channel scale (LayerScale).
        layer_scale_init_value (`float`, defaults to 1e-5):
            Initial value of the LayerScale factors (CaiT's rule: 0.1 up to 18 blocks, 1e-5 up to 24, 1e-6 beyond).
        use_talking_heads (`bool`, defaults to `True`):
            Talking-heads attention in the patch blocks: learned `heads x heads` mixings (with bias) of the
            attention logits before the softmax and of the attention weights after it. Forces eager attention.
        use_class_attention_talking_heads (`bool`, defaults to `False`):
            The same mixings in the class-attention blocks. CaiT has none there; the paper's original code
            uses one attention module for both stages and so has them (set this with `use_talking_heads`).
        class_attention_norm_patches (`bool`, defaults to `True`):
            Whether the class-attention blocks' first LayerNorm also normalises the patch tokens that serve as
            keys and values (CaiT) or only the class token (the paper's original code).
        use_position_embeddings (`bool`, defaults to `True`):
            Learned absolute position embeddings for the patch tokens (CaiT gives the class token none).
        use_dw_shortcut (`bool`, defaults to `True`):
            Add the depth-wise shortcut beside the patch blocks. `False` gives plain CaiT.
        dw_kernel_sizes (`list[int]`, defaults to `[3]`):
            Kernel of the depth-wise convolution; several sizes build parallel branches summed (variant 2).
        dw_block_span (`int`, defaults to 1):
            Consecutive patch blocks one shortcut bypasses (the paper's variant 1 on CaiT uses 2, 3 or 4).
        dw_batch_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the shortcut's BatchNorm2d.
        dw_init (`str`, defaults to `"paper"`):
            Initialisation of the shortcut's depth-wise convolution: `"paper"` keeps PyTorch's default
            (Kaiming-uniform), as the paper does; `"zeros"` zeroes its weight and bias, so the shortcut adds exactly
            nothing until trained (e.g. when adding shortcuts to a pretrained model). BatchNorm starts at the
            identity either way.

    Example:

    ```python
    >>> from dwvit import DWCaiTConfig, DWCaiTForImageClassification
    >>> config = DWCaiTConfig(image_size=32, patch_size=4, num_labels=10, use_talking_heads=False)
    >>> model = DWCaiTForImageClassification(config)
    ```
    """

    model_type = "dwcait"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 192,
        num_hidden_layers: int = 12,
        num_class_attention_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 768,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        use_layer_scale: bool = True,
        layer_scale_init_value: float = 1e-5,
        use_talking_heads: bool = True,
        use_class_attention_talking_heads: bool = False,
        class_attention_norm_patches: bool = True,
        use_position_embeddings: bool = True,
        use_dw_shortcut: bool = True,
        dw_kernel_sizes: list[int] | tuple[int, ...] = (3,),
        dw_block_span: int = 1,
        dw_batch_norm_eps: float = 1e-5,
        dw_init: str = "paper",
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_class_attention_layers = num_class_attention_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.drop_path_rate = drop_path_rate
        self.use_layer_scale = use_layer_scale
        self.layer_scale_init_value = layer_scale_init_value
        self.use_talking_heads = use_talking_heads
        self.use_class_attention_talking_heads = use_class_attention_talking_heads
        self.class_attention_norm_patches = class_attention_norm_patches
        self.use_position_embeddings = use_position_embeddings
        self.use_dw_shortcut = use_dw_shortcut
        self.dw_kernel_sizes = list(dw_kernel_sizes) if isinstance(dw_kernel_sizes, (list, tuple)) else dw_kernel_sizes
        self.dw_block_span = dw_block_span
        self.dw_batch_norm_eps = dw_batch_norm_eps
        self.dw_init = dw_init
        super().__init__(**kwargs)
        self._validate_dwcait()

    def _validate_dwcait(self) -> None:
        validate_positive_ints(
            self,
            (
                "num_channels",
                "hidden_size",
                "num_hidden_layers",
                "num_class_attention_layers",
                "num_attention_heads",
                "intermediate_size",
            ),
        )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        validate_patch_grid(self)
        validate_probabilities(self)
        if self.use_layer_scale and not self.layer_scale_init_value > 0.0:
            raise ValueError(
                f"layer_scale_init_value must be a positive float (e.g. 1e-5) when use_layer_scale=True; "
                f"got {self.layer_scale_init_value!r}."
            )
        validate_depthwise_fields(self, self.num_hidden_layers)


__all__ = ["DWCaiTConfig"]
