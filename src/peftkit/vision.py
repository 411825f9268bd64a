"""EfficientNet-Lite0 moved to :mod:`peftkit.models.efficientnet`; this module keeps the old import path."""

from .models.efficientnet import (  # noqa: F401 - re-exported
    BACKBONES,
    BN_EPS,
    BN_MOMENTUM,
    DEFAULT_TARGETS,
    HEAD,
    INPUT_MEAN,
    INPUT_STD,
    LAYERS_PATTERN,
    LITE0_HEAD,
    PACKAGE,
    EfficientNetLite,
    EvalBatchNorm2d,
    MBConvBlock,
    build_backbone,
    check_backbone,
    efficientnet_lite0,
    load_state_dict_file,
    same_padding,
    weights_path,
)
