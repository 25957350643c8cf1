"""dwvit: Vision Transformers with depth-wise convolution shortcuts, native to Hugging Face `transformers`.

Importing the package registers every family with the Auto classes and marks the classes so that
`save_pretrained` writes the `auto_map` and code files that `trust_remote_code=True` loading needs.
"""

from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification

from .conversion.from_transformers import from_transformers
from .models import (
    NAMED_SIZES,
    DepthwiseShortcut,
    DWCaiTConfig,
    DWCaiTForImageClassification,
    DWCaiTModel,
    DWCaiTPreTrainedModel,
    DWSwinBackbone,
    DWSwinConfig,
    DWSwinForImageClassification,
    DWSwinModel,
    DWSwinPreTrainedModel,
    DWViTConfig,
    DWViTForImageClassification,
    DWViTModel,
    DWViTPreTrainedModel,
    create_model,
    make_image_processor,
    to_rgb,
    named_config,
)

__version__ = "0.1.0"

_FAMILIES = [
    (DWViTConfig, DWViTModel, DWViTForImageClassification),
    (DWCaiTConfig, DWCaiTModel, DWCaiTForImageClassification),
    (DWSwinConfig, DWSwinModel, DWSwinForImageClassification),
]


def _register(config_class, base_model_class, classification_class) -> None:
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, base_model_class, exist_ok=True)
    AutoModelForImageClassification.register(config_class, classification_class, exist_ok=True)
    config_class.register_for_auto_class()
    base_model_class.register_for_auto_class("AutoModel")
    classification_class.register_for_auto_class("AutoModelForImageClassification")


for _family in _FAMILIES:
    _register(*_family)

# Families with a stage-wise backbone for detection and segmentation heads.
AutoBackbone.register(DWSwinConfig, DWSwinBackbone, exist_ok=True)
DWSwinBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "DWViTConfig",
    "DWViTModel",
    "DWViTPreTrainedModel",
    "DWViTForImageClassification",
    "DWCaiTConfig",
    "DWCaiTModel",
    "DWCaiTPreTrainedModel",
    "DWCaiTForImageClassification",
    "DWSwinConfig",
    "DWSwinModel",
    "DWSwinPreTrainedModel",
    "DWSwinForImageClassification",
    "DWSwinBackbone",
    "DepthwiseShortcut",
    "NAMED_SIZES",
    "named_config",
    "create_model",
    "from_transformers",
    "make_image_processor",
    "to_rgb",
]
