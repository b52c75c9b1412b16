"""GradCAM++ (pytorch-grad-cam's GradCAMPlusPlus), batched in torch: with g the target logit's
gradient and A the activation at the CAM layer,
a = g^2 / (2 g^2 + sum_hw(A) g^3 + 1e-6) (0 where g = 0), w_c = sum_hw(relu(g) a);
map = ReLU(sum_c w_c A_c), min-max scaled, resized to the input."""

from __future__ import annotations

from cose.saliency import cam


def compute(model, images, targets, max_target, *, layer=None, reshape=None, batch_size=64):
    return cam.compute(
        "gradcampp",
        model,
        images,
        targets,
        max_target,
        layer=layer,
        reshape=reshape,
        batch_size=batch_size,
    )
