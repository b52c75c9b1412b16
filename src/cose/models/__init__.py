"""Model registry over timm: architectures of the paper and the demo, heads, checkpoints, CAM layers.

``create(name, num_classes, weights=None, seed=None, head=None)`` builds an eval-mode model;
``preprocess(name)`` / ``normalize(images01, name)`` give its input pipeline; ``cam_layer(model)``
the layer GradCAM hooks (and the reshape of token activations to ``[B,C,h,w]``).
"""

from cose.data.image import PreprocessSpec
from cose.spec import HEADS

from .builder import create, load_checkpoint, load_checkpoints
from .cam import NHWCToNCHW, TokenReshape, cam_layer
from .heads import MLPHead, head_module, set_head
from .registry import (
    DEMO_MODELS,
    REGISTRY,
    ModelSpec,
    get,
    names,
    normalize,
    preprocess,
    register,
)
from .weights import cose_checkpoint, load_pretrained, read_checkpoint

__all__ = [
    "DEMO_MODELS",
    "HEADS",
    "MLPHead",
    "ModelSpec",
    "NHWCToNCHW",
    "PreprocessSpec",
    "REGISTRY",
    "TokenReshape",
    "cam_layer",
    "cose_checkpoint",
    "create",
    "get",
    "head_module",
    "load_checkpoint",
    "load_checkpoints",
    "load_pretrained",
    "names",
    "normalize",
    "preprocess",
    "read_checkpoint",
    "register",
    "set_head",
]
