"""The three model families and the depth-wise shortcut they share.

One flat folder on purpose: `save_pretrained` copies a family's modeling and configuration files, with the files
they import relatively (`dw_layers.py`, `configuration_dwvit.py`), into the model folder, so that
`trust_remote_code=True` loads it where dwvit is not installed.
"""

from .configuration_dwcait import DWCaiTConfig
from .configuration_dwswin import DWSwinConfig
from .configuration_dwvit import DWViTConfig
from .dw_layers import DepthwiseShortcut
from .image_processing import make_image_processor, to_rgb
from .modeling_dwcait import DWCaiTForImageClassification, DWCaiTModel, DWCaiTPreTrainedModel
from .modeling_dwswin import DWSwinBackbone, DWSwinForImageClassification, DWSwinModel, DWSwinPreTrainedModel
from .modeling_dwvit import DWViTForImageClassification, DWViTModel, DWViTPreTrainedModel
from .sizes import NAMED_SIZES, create_model, named_config

__all__ = [
    "NAMED_SIZES",
    "DWCaiTConfig",
    "DWCaiTForImageClassification",
    "DWCaiTModel",
    "DWCaiTPreTrainedModel",
    "DWSwinBackbone",
    "DWSwinConfig",
    "DWSwinForImageClassification",
    "DWSwinModel",
    "DWSwinPreTrainedModel",
    "DWViTConfig",
    "DWViTForImageClassification",
    "DWViTModel",
    "DWViTPreTrainedModel",
    "DepthwiseShortcut",
    "create_model",
    "make_image_processor",
    "to_rgb",
    "named_config",
]
