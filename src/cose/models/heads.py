"""Classification heads of the reference and where they sit.

A head is named ``linear``, ``mlp`` (1024-256-C, the reference's CIFAR10 head) or
``mlp-<w>[-<w>...]`` with the hidden widths (``mlp-1024``: Oxford102 and Caltech101,
``mlp-256``: EuroSAT), ReLU between layers.
"""

from __future__ import annotations

from torch import nn

from cose.spec import head_widths

MLP_HIDDEN = (1024, 256)


class MLPHead(nn.Sequential):
    """Linear(in, 1024) - ReLU - Linear(1024, 256) - ReLU - Linear(256, C)."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = MLP_HIDDEN):
        layers: list[nn.Module] = []
        prev = in_features
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.ReLU(inplace=True)]
            prev = width
        layers.append(nn.Linear(prev, num_classes))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = num_classes


def classifier_path(model: nn.Module) -> str:
    """Dotted path of the model's final classifier module (a registered model's
    ``classifier``, else timm's ``pretrained_cfg``)."""
    if getattr(model, "cose_classifier", None):
        return model.cose_classifier
    cfg = getattr(model, "pretrained_cfg", None) or {}
    path = cfg.get("classifier")
    if isinstance(path, (list, tuple)):
        path = path[0]
    if not path:
        raise ValueError(f"cannot locate the classifier of {type(model).__name__}; register "
                         "the model with classifier='<dotted name of its last layer>'")
    return path


def head_module(model: nn.Module) -> nn.Module:
    """The model's classification head (the part trained when the backbone is frozen)."""
    return model.get_submodule(classifier_path(model))


def set_head(model: nn.Module, head: str, num_classes: int) -> None:
    """Replace the model's classifier by a fresh ``head`` (``linear``, ``mlp``, ``mlp-<w>...``)
    for ``num_classes``."""
    widths = head_widths(head)
    path = classifier_path(model)
    old = model.get_submodule(path)
    in_features = getattr(old, "in_features", None) or getattr(model, "num_features", None)
    if in_features is None:
        raise ValueError(f"cannot tell the feature width of {type(model).__name__}'s classifier")
    new: nn.Module = (
        nn.Linear(in_features, num_classes) if not widths
        else MLPHead(in_features, num_classes, widths)
    )
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)
