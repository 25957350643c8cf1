"""DWSwin model configuration."""

from __future__ import annotations

from transformers import BackboneConfigMixin, PretrainedConfig

from .configuration_dwvit import to_pair, validate_depthwise_fields, validate_positive_ints, validate_probabilities


class DWSwinConfig(BackboneConfigMixin, PretrainedConfig):
    r"""
    Configuration of a Swin Transformer with depth-wise convolution shortcuts (Zhang et al., 2024).

    The Swin fields keep `transformers.SwinConfig`'s names and meaning; the defaults are Swin-T's. The shortcut
    fields are those of every DW family:

    Args:
        use_dw_shortcut (`bool`, defaults to `True`):
            Add the depth-wise shortcut beside the Swin blocks. `False` gives the plain Swin baseline.
        dw_kernel_sizes (`list[int]`, defaults to `[3]`):
            Kernel of the depth-wise convolution; several sizes build parallel branches whose outputs are summed
            (the paper's variant 2, e.g. `[3, 5]`).
        dw_block_span (`int`, defaults to 1):
            Consecutive blocks one shortcut bypasses (variant 1). Groups are formed per stage, so a shortcut never
            spans two stages; a stage whose depth the span does not divide ends with a shorter group.
        dw_batch_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the shortcut's BatchNorm2d.
        dw_init (`str`, defaults to `"paper"`):
            Initialisation of the shortcut's depth-wise convolution: `"paper"` keeps PyTorch's default
            (Kaiming-uniform), as the paper does; `"zeros"` zeroes its weight and bias, so the shortcut adds exactly
            nothing until trained (e.g. when adding shortcuts to a pretrained model). BatchNorm starts at the
            identity either way.
        use_shifted_windows (`bool`, defaults to `True`):
            Shift the windows of every second block by half a window (Swin's SW-MSA). `False` keeps every block on
            the regular window partition; the paper reports both.
        patch_norm (`bool`, defaults to `True`):
            LayerNorm after the patch embedding, as in Swin.
        attentions_per_block (`bool`, defaults to `False`):
            What `output_attentions=True` returns: by default one map per stage, its last block's, as
            `transformers`' Swin does; `True` returns every block's map, in order.
        out_features (`list[str]`, *optional*):
            Stages `DWSwinBackbone` returns, among `stage_names` (`["stem", "stage1", ..., "stageN"]`).
        out_indices (`list[int]`, *optional*):
            The same choice by index into `stage_names`.

    Example:

    ```python
    >>> from dwvit import DWSwinConfig, DWSwinForImageClassification
    >>> config = DWSwinConfig(image_size=32, patch_size=2, window_size=4, embed_dim=48, num_labels=10)
    >>> model = DWSwinForImageClassification(config)
    ```
    """

    model_type = "dwswin"
    attribute_map = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 4,
        num_channels: int = 3,
        embed_dim: int = 96,
        depths: list[int] | tuple[int, ...] = (2, 2, 6, 2),
        num_heads: list[int] | tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.1,
        hidden_act: str = "gelu",
        use_absolute_embeddings: bool = False,
        patch_norm: bool = True,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        use_shifted_windows: bool = True,
        attentions_per_block: bool = False,
        use_dw_shortcut: bool = True,
        dw_kernel_sizes: list[int] | tuple[int, ...] = (3,),
        dw_block_span: int = 1,
        dw_batch_norm_eps: float = 1e-5,
        dw_init: str = "paper",
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        **kwargs,
    ):
        # Derived fields come back from a saved config.json; they are recomputed below.
        for derived in ("hidden_size", "num_layers", "stage_names"):
            kwargs.pop(derived, None)
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.embed_dim = embed_dim
        self.depths = list(depths) if isinstance(depths, (list, tuple)) else depths
        self.num_heads = list(num_heads) if isinstance(num_heads, (list, tuple)) else num_heads
        self.window_size = window_size
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.hidden_act = hidden_act
        self.use_absolute_embeddings = use_absolute_embeddings
        self.patch_norm = patch_norm
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.use_shifted_windows = use_shifted_windows
        self.attentions_per_block = attentions_per_block
        self.use_dw_shortcut = use_dw_shortcut
        self.dw_kernel_sizes = list(dw_kernel_sizes) if isinstance(dw_kernel_sizes, (list, tuple)) else dw_kernel_sizes
        self.dw_block_span = dw_block_span
        self.dw_batch_norm_eps = dw_batch_norm_eps
        self.dw_init = dw_init
        self._validate_dwswin()
        self.num_layers = len(self.depths)
        # The channel width after the last stage, under the name other `transformers` code looks for.
        self.hidden_size = int(embed_dim * 2 ** (self.num_layers - 1))
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, self.num_layers + 1)]
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        super().__init__(**kwargs)

    def _validate_dwswin(self) -> None:
        validate_positive_ints(self, ("num_channels", "embed_dim", "window_size"))
        for name in ("depths", "num_heads"):
            value = getattr(self, name)
            if (
                not isinstance(value, list)
                or len(value) == 0
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
            ):
                raise ValueError(f"{name} must be a non-empty list of positive ints (one per stage); got {value!r}.")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"depths and num_heads must have one entry per stage; got {len(self.depths)} depths "
                f"({self.depths}) and {len(self.num_heads)} head counts ({self.num_heads})."
            )
        for stage, heads in enumerate(self.num_heads):
            width = self.embed_dim * 2**stage
            if width % heads != 0:
                raise ValueError(
                    f"Stage {stage + 1} is {width} wide (embed_dim={self.embed_dim} x 2^{stage}), which is not "
                    f"divisible by its num_heads ({heads}); embed_dim * 2^stage must be a multiple of num_heads[stage]."
                )
        patch_height, patch_width = to_pair(self.patch_size)
        image_height, image_width = to_pair(self.image_size)
        if min(image_height, image_width, patch_height, patch_width) < 1:
            raise ValueError(
                f"image_size and patch_size must be positive; got {self.image_size!r} and {self.patch_size!r}."
            )
        if image_height < patch_height or image_width < patch_width:
            raise ValueError(
                f"image_size ({self.image_size}) must be at least one patch_size ({self.patch_size})."
            )
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0):
            raise ValueError(f"mlp_ratio must be a positive number; got {self.mlp_ratio!r}.")
        validate_probabilities(self)
        # A shortcut never spans two stages, so the longest stage bounds the span.
        validate_depthwise_fields(self, max(self.depths))


__all__ = ["DWSwinConfig"]
