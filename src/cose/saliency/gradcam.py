"""GradCAM (pytorch-grad-cam's GradCAM): channel weights = spatial mean of the target logit's
gradient at the CAM layer; map = ReLU(sum_c w_c A_c), min-max scaled, resized to the input."""

from __future__ import annotations

from cose.saliency import cam


def compute(model, images, targets, max_target, *, layer=None, reshape=None, batch_size=64):
    return cam.compute(
        "gradcam",
        model,
        images,
        targets,
        max_target,
        layer=layer,
        reshape=reshape,
        batch_size=batch_size,
    )
