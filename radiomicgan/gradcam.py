"""Grad-CAM of the discriminator's "non-standard" decision: where a slice still looks non-standard.

Target: the negated mean of the PatchGAN logits (logits > 0 mean "standard"), optionally inside a mask.
Layer: the discriminator's last activation before its 1-channel classifier. Weights: spatial mean of the
gradients per channel. Map: ReLU of the weighted sum, upsampled to the slice and scaled to [0, 1] per slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import PatchDiscriminator


def gradcam_nonstandard(
    discriminator: PatchDiscriminator, source: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor | None = None,
    return_logits: bool = False,
):
    """(N, 1, H, W) maps in [0, 1] for window-scaled ``source`` and ``candidate`` batches (and, with
    ``return_logits``, the discriminator's logits, so callers need no second forward pass). D stays frozen:
    no parameter gradient is kept and its mode is restored."""
    was_training = discriminator.training
    discriminator.eval()
    params = [p.requires_grad for p in discriminator.parameters()]
    for p in discriminator.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            activations = discriminator.features(torch.cat([source, candidate], dim=1).detach())
            activations.requires_grad_(True)
            logits = discriminator.classifier(activations)
            if mask is not None:
                m = F.interpolate(mask.float(), size=logits.shape[-2:], mode="area")
                score = -(logits * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1e-6)
            else:
                score = -logits.mean(dim=(1, 2, 3))
            (grads,) = torch.autograd.grad(score.sum(), activations)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activations).sum(dim=1, keepdim=True)).detach()
        cam = F.interpolate(cam, size=source.shape[-2:], mode="bilinear", align_corners=False)
        peak = cam.amax(dim=(2, 3), keepdim=True)
        cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
        return (cam, logits.detach()) if return_logits else cam
    finally:
        for p, flag in zip(discriminator.parameters(), params):
            p.requires_grad_(flag)
        discriminator.train(was_training)
