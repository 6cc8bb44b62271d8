"""Networks: RadiomicGAN's hybrid generator and PatchGAN discriminator, and the learned baselines.

Every network maps a window-scaled slice in [-1, 1] (see ``radiomicgan.window``) to a window-scaled slice.
Generators predict a correction added to their input (a residual head whose last layer starts at zero, so an
untrained model is the identity): with the little paired data CT sites have, a direct-output GAN does not even
reproduce its input, a residual one does (measured in the project brief). No layer uses batch statistics, so a
slice's output never depends on the other slices of its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RadiomicGANError

# VGG-19 ``features`` indices of the paper's four conv groups (conv1_1..conv1_2, ..., conv4_1..conv4_4),
# each with its ReLUs; the max-pools between groups are applied in front of groups 2-4.
VGG19_GROUPS = ((0, 4), (5, 9), (10, 18), (19, 27))
VGG19_CHANNELS = (64, 128, 256, 512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGWeightsError(RadiomicGANError, ValueError):
    """The pretrained encoder's weights could not be had (offline, or a wrong file)."""


def vgg19_features(weights: str = "imagenet") -> tuple[nn.Sequential, str]:
    """VGG-19's first four conv groups (``features[:27]``) and where their weights came from.

    ``weights``: "imagenet" (torchvision's download and cache), a path to a weights file (offline sites:
    torchvision's ``vgg19-dcbb9e9d.pth`` or any state dict with the same ``features.*`` keys), or "random",
    which only happens when asked for and is recorded in the model card. Random weights are initialised as
    torchvision initialises VGG (Kaiming normal, fan-out, zero bias): PyTorch's default layer initialisation
    shrinks activations group after group until the fourth group carries almost nothing. Files are read as
    data only.
    """
    from torchvision.models import VGG19_Weights
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["E"], batch_norm=False)[:27]
    if weights == "random":
        for m in features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        return features, "random initialisation (not ImageNet)"
    if weights == "imagenet":
        try:
            state = VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=True, weights_only=True)
        except OSError as exc:  # URLError and friends: no network, no cache
            raise VGGWeightsError(
                f"could not get torchvision's ImageNet VGG-19 weights ({exc}); offline, pass a weights file "
                "(e.g. vgg19-dcbb9e9d.pth) or 'random'"
            ) from None
        source = "ImageNet (torchvision VGG19_Weights.IMAGENET1K_V1)"
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise VGGWeightsError(f"{weights}: not a readable weights file ({type(exc).__name__}: {str(exc)[:100]})") from None
        source = f"file {weights}"
    if not isinstance(state, dict):
        raise VGGWeightsError(f"{weights}: holds no state dict")
    wanted = {k: v for k, v in state.items() if k.startswith("features.") and int(k.split(".")[1]) < 27}
    own = {f"features.{k}": v for k, v in features.state_dict().items()}
    missing = [k for k in own if k not in wanted]
    wrong = [k for k in own if k in wanted and tuple(wanted[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise VGGWeightsError(f"{weights}: not VGG-19 weights ({'missing' if missing else 'wrong shape of'} {(missing or wrong)[0]})")
    features.load_state_dict({k[len("features."):]: v for k, v in wanted.items()})
    return features, source


def _conv(cin: int, cout: int) -> nn.Sequential:
    """3x3 conv + LeakyReLU(0.2), Kaiming-initialised for that slope so activations keep their scale."""
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    nn.init.kaiming_normal_(conv.weight, a=0.2, nonlinearity="leaky_relu")
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.LeakyReLU(0.2, inplace=True))


class ResidualHead(nn.Module):
    """The correction added to the input: a 3x3 conv over the decoder's features, zero-initialised so an
    untrained network is the identity, times a learned gain that starts at ``gain`` (a 1x1 conv from zero
    moves by about the learning rate per step, far too little for the tens of HU a kernel change needs
    within a short budget; the gain lets the first steps reach that size). Computed and added in float32: in
    bf16 the input alone would lose several HU."""

    def __init__(self, channels: int, gain: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.gain = nn.Parameter(torch.tensor(float(gain)))

    def forward(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            return x.float() + self.gain * self.conv(features.float())


class RadiomicGANGenerator(nn.Module):
    """U-Net whose encoder is VGG-19's first four conv groups with a trainable filter layer after each group
    that feeds the skip connection to the matching decoder level (paper Fig. 1). ImageNet weights stay frozen,
    as in the paper; random weights (offline) are trained, since frozen random filters transfer nothing."""

    divisor = 8  # three poolings

    def __init__(self, vgg_weights: str = "imagenet", finetune_vgg: bool | None = None, decoder_channels=(256, 128, 64, 32),
                 head_gain: float = 1.0):
        super().__init__()
        features, self.vgg_source = vgg19_features(vgg_weights)
        self.groups = nn.ModuleList(
            nn.Sequential(*([nn.MaxPool2d(2)] if k else []), *features[a:b]) for k, (a, b) in enumerate(VGG19_GROUPS)
        )
        self.finetune_vgg = ("random" in self.vgg_source) if finetune_vgg is None else bool(finetune_vgg)
        for p in self.groups.parameters():
            p.requires_grad_(self.finetune_vgg)
        self.filters = nn.ModuleList(_conv(c, c // 2) for c in VGG19_CHANNELS)
        skips = [c // 2 for c in VGG19_CHANNELS]
        d4, d3, d2, d1 = decoder_channels
        self.bottom = _conv(skips[3], d4)
        self.up3 = nn.Sequential(_conv(d4 + skips[2], d3), _conv(d3, d3))
        self.up2 = nn.Sequential(_conv(d3 + skips[1], d2), _conv(d2, d2))
        self.up1 = nn.Sequential(_conv(d2 + skips[0], d1), _conv(d1, d1))
        self.head = ResidualHead(d1, head_gain)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def encoder(self) -> str:
        return "trainable" if self.finetune_vgg else "frozen"

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.finetune_vgg:
            self.groups.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.finetune_vgg and torch.is_grad_enabled()):
            # ImageNet normalisation and the first conv in float32: in bf16 the input would keep only ~4 HU
            # resolution, coarser than the texture the kernels differ by.
            with torch.autocast(device_type=x.device.type, enabled=False):
                rgb = ((x.float() + 1.0) / 2.0).expand(-1, 3, -1, -1)  # grayscale repeated, [0, 1]
                h = self.groups[0][0]((rgb - self.mean) / self.std)
            h = self.groups[0][1:](h)
            outs = [h]
            for group in self.groups[1:]:
                h = group(h)
                outs.append(h)
        skips = [filt(out) for out, filt in zip(outs, self.filters)]
        y = self.bottom(skips[3])
        for up, skip in ((self.up3, skips[2]), (self.up2, skips[1]), (self.up1, skips[0])):
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
            y = up(torch.cat([y, skip.to(y.dtype)], dim=1))
        return self.head(y, x)


class UNetGenerator(nn.Module):
    """From-scratch U-Net (pix2pix / GANai-like baseline): the same decoder, no VGG."""

    divisor = 8

    def __init__(self, channels=(32, 64, 128, 256)):
        super().__init__()
        c1, c2, c3, c4 = channels
        self.enc1 = nn.Sequential(_conv(1, c1), _conv(c1, c1))
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), _conv(c1, c2), _conv(c2, c2))
        self.enc3 = nn.Sequential(nn.MaxPool2d(2), _conv(c2, c3), _conv(c3, c3))
        self.enc4 = nn.Sequential(nn.MaxPool2d(2), _conv(c3, c4), _conv(c4, c4))
        self.up3 = nn.Sequential(_conv(c4 + c3, c3), _conv(c3, c3))
        self.up2 = nn.Sequential(_conv(c3 + c2, c2), _conv(c2, c2))
        self.up1 = nn.Sequential(_conv(c2 + c1, c1), _conv(c1, c1))
        self.head = ResidualHead(c1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        y = self.enc4(e3)
        for up, skip in ((self.up3, e3), (self.up2, e2), (self.up1, e1)):
            y = up(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), skip], dim=1))
        return self.head(y, x)


class ChoeCNN(nn.Module):
    """Choe et al. 2019: six 3x3 conv layers of 64 channels learning the residual (target - input)."""

    divisor = 1

    def __init__(self, channels: int = 64, layers: int = 6):
        super().__init__()
        body = [nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(layers - 2):
            body += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*body)
        self.last = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.last(self.body(x))


class PatchDiscriminator(nn.Module):
    """PatchGAN conditioned on the input: C64(s2, no norm)-C128(s2)-C256(s2)-C512(s1)-C1(s1), 4x4 kernels,
    LeakyReLU 0.2, InstanceNorm (not BatchNorm), 70x70 receptive field. Logits > 0 mean "standard kernel"."""

    def __init__(self, channels: int = 64):
        super().__init__()
        c = channels

        def block(cin, cout, stride, norm=True):
            layers = [nn.Conv2d(cin, cout, 4, stride, 1)]
            if norm:
                layers.append(nn.InstanceNorm2d(cout, affine=True))
            layers.append(nn.LeakyReLU(0.2))  # not in place: Grad-CAM hooks read this activation
            return layers

        self.features = nn.Sequential(*block(2, c, 2, norm=False), *block(c, 2 * c, 2), *block(2 * c, 4 * c, 2), *block(4 * c, 8 * c, 1))
        self.classifier = nn.Conv2d(8 * c, 1, 4, 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, source: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(torch.cat([source, candidate], dim=1)))


def pad_to_multiple(x: torch.Tensor, divisor: int, minimum: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (rows, cols) at the far edges up to a multiple of ``divisor`` (and at least ``minimum``) so any slice
    size fits the network; reflect where the image is large enough, else replicate. Returns the original size."""
    h, w = x.shape[-2:]
    ph, pw = max((-h) % divisor, minimum - h), max((-w) % divisor, minimum - w)
    ph, pw = ph + (-(h + ph)) % divisor, pw + (-(w + pw)) % divisor
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)
