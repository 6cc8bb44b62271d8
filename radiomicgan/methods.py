"""The harmonization methods, each described once: what it needs (a discriminator, windows, a crop size), its
default learning rate, how its networks are built and how one training step goes, or how it is fitted in closed
form. Everything else asks this registry instead of testing method names. Imports no torch until a network is
built (the Slicer panels read it before the packages are installed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    network: bool  # trained in steps; False: fitted in closed form on whole slices
    discriminator: bool = False  # a PatchGAN: adversarial loss, Grad-CAM, dynamic selection
    windows: bool = False  # may train with a window schedule (Dynamic Window-based Training)
    default_lr: float | None = None  # Adam
    adam_beta1: bool = False  # Adam with the setting beta1 (else torch's default betas)
    min_crop: int = 1  # pixels: the smallest slices and crops it can train on
    crop_multiple: int = 1  # crops must be a multiple of this (poolings of a U-Net)
    loss: str = "none"  # "gan": pix2pix's BCE + lambda L1; "l2": L2 only
    build: Callable[[dict], tuple[Any, Any]] | None = None  # architecture -> (generator, discriminator or None)
    fit: Callable[[list, float], Any] | None = None  # closed form: (triples, nyquist) -> harmonizer
    load: Callable[[dict], Any] | None = None  # closed form: weights state -> harmonizer

    @property
    def default_schedule(self) -> str | None:
        return None if not self.network else "dwt" if self.windows else "none"


# Below 32x32 the U-Net bottleneck (1/8) or the PatchGAN's last layers shrink to 1x1 (instance norm fails).
MIN_GAN_CROP = 32


def _radiomicgan(arch: dict):
    from .models import PatchDiscriminator, RadiomicGANGenerator

    generator = RadiomicGANGenerator(vgg_weights=arch.get("vgg_weights", "random"), finetune_vgg=arch.get("finetune_vgg"),
                                     decoder_channels=tuple(arch.get("decoder_channels", (256, 128, 64, 32))),
                                     head_gain=arch.get("head_gain", 1.0))
    return generator, PatchDiscriminator(arch.get("discriminator_channels", 64))


def _pix2pix(arch: dict):
    from .models import PatchDiscriminator, UNetGenerator

    return UNetGenerator(tuple(arch.get("channels", (32, 64, 128, 256)))), PatchDiscriminator(arch.get("discriminator_channels", 64))


def _choe(arch: dict):
    from .models import ChoeCNN

    return ChoeCNN(arch.get("channels", 64), arch.get("layers", 6)), None


def _fit_filter(triples, nyquist):
    from .baselines import FilterHarmonizer

    return FilterHarmonizer.fit(triples, nyquist)


def _fit_histmatch(triples, nyquist):
    from .baselines import HistMatchHarmonizer

    return HistMatchHarmonizer.fit(triples)


def _load_filter(state):
    from .baselines import FilterHarmonizer

    return FilterHarmonizer.from_state(state)


def _load_histmatch(state):
    from .baselines import HistMatchHarmonizer

    return HistMatchHarmonizer.from_state(state)


# Adam learning rates. RadiomicGAN: 4e-4, chosen on bench/real_slice.py's dev split at the demo's budget (300 steps;
# README): Siemens, seeds 0/1/2, 41.59 dB mean at 2e-4 (pix2pix's and the authors' script's; the paper says 1e-4),
# 42.33 at 4e-4; seed 0 43.40 at 6e-4, diverged at 1e-3; Toshiba seed 0 47.59 at 2e-4, 47.76 at 4e-4.
# pix2pix: 2e-4. Choe et al.: their published 1e-4.
REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("radiomicgan", "RadiomicGAN: VGG-19 encoder U-Net and PatchGAN, Dynamic Window-based Training", network=True,
           discriminator=True, windows=True, default_lr=4e-4, adam_beta1=True, min_crop=MIN_GAN_CROP, crop_multiple=8,
           loss="gan", build=_radiomicgan),
    Method("choe", "Choe et al.'s residual CNN, L2 loss", network=True, default_lr=1e-4, loss="l2", build=_choe),
    Method("pix2pix", "pix2pix: plain U-Net and PatchGAN", network=True, discriminator=True, default_lr=2e-4, adam_beta1=True,
           min_crop=MIN_GAN_CROP, crop_multiple=8, loss="gan", build=_pix2pix),
    Method("filter", "fitted linear filter (closed form)", network=False, fit=_fit_filter, load=_load_filter),
    Method("histmatch", "histogram matching (closed form)", network=False, fit=_fit_histmatch, load=_load_histmatch),
)}
METHODS = tuple(REGISTRY)
NETWORK_METHODS = tuple(name for name, m in REGISTRY.items() if m.network)


def get(name: str) -> Method:
    from .errors import TrainingError

    try:
        return REGISTRY[name]
    except KeyError:
        raise TrainingError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}") from None
