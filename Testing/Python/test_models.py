"""Networks, Grad-CAM, pretrained-encoder loading, model folders and the closed-form baselines."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from radiomicgan.baselines import FilterHarmonizer, HistMatchHarmonizer
from radiomicgan.gradcam import gradcam_nonstandard
from radiomicgan.kernels import PRESETS, simulate_kernels
from radiomicgan.metrics import psnr
from radiomicgan.harmonize import Harmonizer
from radiomicgan.modelio import LoadedModel, ModelCard, ModelError, load_model
from radiomicgan.models import (
    ChoeCNN,
    PatchDiscriminator,
    RadiomicGANGenerator,
    UNetGenerator,
    VGGWeightsError,
    pad_to_multiple,
    vgg19_features,
)
from radiomicgan.phantom import make_chest_phantom


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    g = RadiomicGANGenerator("random")
    for p in g.head.parameters():  # a generator that is not the identity
        nn.init.normal_(p, 0.0, 0.05)
    return g.eval()


def test_generator_encoder_is_vgg19_with_trainable_filters(generator, tmp_path):
    convs = [m for group in generator.groups for m in group if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512]
    assert all(p.requires_grad for p in generator.filters.parameters())
    assert [f[0].out_channels for f in generator.filters] == [32, 64, 128, 256]
    assert "random" in generator.vgg_source
    # random weights are trained (frozen random filters transfer nothing); pretrained ones stay frozen (paper)
    assert generator.encoder == "trainable" and all(p.requires_grad for p in generator.groups.parameters())
    frozen = RadiomicGANGenerator("random", finetune_vgg=False)
    assert frozen.encoder == "frozen" and not any(p.requires_grad for p in frozen.groups.parameters())
    _vgg_file(tmp_path / "vgg.pth")
    pretrained = RadiomicGANGenerator(str(tmp_path / "vgg.pth"))
    assert pretrained.encoder == "frozen" and not any(p.requires_grad for p in pretrained.groups.parameters())


def test_random_encoder_is_initialised_as_torchvision_does():
    """With PyTorch's default layer init the fourth group's features of two different images differed by about
    1/1000 of their size (the encoder carried nothing); torchvision's Kaiming fan-out init keeps them apart."""
    torch.manual_seed(0)
    g = RadiomicGANGenerator("random")
    a, b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    for group in g.groups:
        a, b = group(a), group(b)
        assert a.abs().mean() > 1e-2  # alive after every group
    assert (a - b).abs().mean() / a.abs().mean() > 0.05
    convs = [m for m in g.groups.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:  # Kaiming normal, fan-out: std = sqrt(2 / (out_channels * 9))
        expected = (2.0 / (conv.out_channels * 9)) ** 0.5
        assert abs(conv.weight.std().item() / expected - 1) < 0.1 and torch.count_nonzero(conv.bias) == 0


def test_decoder_features_keep_their_scale():
    """Trainable layers are Kaiming-initialised for LeakyReLU(0.2): the features the residual head reads are
    of order one, so the head can build a correction of tens of HU within a short budget."""
    torch.manual_seed(0)
    g = RadiomicGANGenerator("random")
    captured = {}
    g.head.register_forward_hook(lambda module, inputs, output: captured.setdefault("features", inputs[0]))
    with torch.no_grad():
        g(torch.rand(2, 1, 64, 64) * 2 - 1)
    rms = captured["features"].pow(2).mean().sqrt().item()
    assert 0.05 < rms < 20


def test_head_reaches_a_kernel_sized_correction_quickly():
    """A constant +68 HU correction (the RMS the phantom needs) is learned within 100 Adam steps at the paper's
    learning rate; a zero-initialised 1x1 head over weak features managed about 17 HU in the demo's budget."""
    torch.manual_seed(0)
    g = RadiomicGANGenerator("random")
    opt = torch.optim.Adam([p for p in g.parameters() if p.requires_grad], lr=1e-4, betas=(0.5, 0.999))
    x = torch.rand(2, 1, 32, 32) * 0.2 - 0.6
    shift = 68.0 / 1012.0  # HU -> units over [-1024, 1000]
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.l1_loss(g(x), x + shift).backward()
        opt.step()
    with torch.no_grad():
        reached = (g(x) - x).mean().item() * 1012.0
    assert reached > 50.0


def test_untrained_generators_are_the_identity():
    x = torch.rand(2, 1, 32, 40) * 2 - 1
    for g in (RadiomicGANGenerator("random"), UNetGenerator(), ChoeCNN()):
        with torch.no_grad():
            assert torch.equal(g.eval()(x), x)


def test_batched_output_equals_one_slice_output(generator):
    x = torch.rand(3, 1, 48, 48) * 2 - 1
    with torch.no_grad():
        batched = generator(x)
        single = torch.cat([generator(x[k : k + 1]) for k in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def _loaded(generator) -> LoadedModel:
    return LoadedModel(card=ModelCard("radiomicgan", "B30", "B50", (-1024.0, 1000.0)), generator=generator)


@pytest.mark.parametrize("shape", [(1, 37, 50), (2, 61, 19), (1, 5, 7)])
def test_any_slice_size(generator, shape):
    hu = np.random.default_rng(0).uniform(-1000, 900, shape).astype(np.float32)
    out = Harmonizer(_loaded(generator), device="cpu", batch=2).harmonize(hu)
    assert out.shape == shape and np.isfinite(out).all() and not np.array_equal(out, np.rint(hu))
    padded, size = pad_to_multiple(torch.zeros(1, 1, *shape[1:]), 8, minimum=32)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0 and min(padded.shape[-2:]) >= 32 and size == shape[1:]


def test_bf16_autocast_agrees_with_fp32(generator):
    """The precision the GPU path uses, checked on the CPU: within 20 HU at worst, 3 HU on average."""
    hu = np.random.default_rng(1).uniform(-1000, 900, (2, 64, 64)).astype(np.float32)
    fp32 = Harmonizer(_loaded(generator), device="cpu", precision="fp32").harmonize(hu)
    bf16 = Harmonizer(_loaded(generator), device="cpu", precision="bf16").harmonize(hu)
    assert np.abs(bf16 - fp32).max() <= 20 and np.abs(bf16 - fp32).mean() < 3


def test_discriminator_is_patchgan():
    d = PatchDiscriminator()
    logits = d(torch.zeros(2, 1, 256, 256), torch.zeros(2, 1, 256, 256))
    assert logits.shape == (2, 1, 30, 30)  # 70x70 patches on a 256 image, as pix2pix
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d.modules())


class _KnownDiscriminator(nn.Module):
    """logit = -relu(candidate): a patch is "non-standard" exactly where the candidate is bright."""

    def __init__(self):
        super().__init__()
        pick = nn.Conv2d(2, 1, 1)
        pick.weight.data[:] = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
        pick.bias.data.zero_()
        self.features = nn.Sequential(pick, nn.ReLU())
        self.classifier = nn.Conv2d(1, 1, 1)
        self.classifier.weight.data.fill_(-1.0)
        self.classifier.bias.data.zero_()


def test_gradcam_finds_the_known_hot_spot():
    candidate = -torch.ones(1, 1, 16, 16)
    candidate[..., 4:8, 9:13] = 1.0
    cam = gradcam_nonstandard(_KnownDiscriminator(), torch.zeros_like(candidate), candidate)
    expected = (candidate > 0).float()
    torch.testing.assert_close(cam, expected)
    # an ROI-masked target reweights channels; with one channel the map is the same
    mask = torch.zeros_like(candidate)
    mask[..., 2:10, 6:14] = 1
    torch.testing.assert_close(gradcam_nonstandard(_KnownDiscriminator(), torch.zeros_like(candidate), candidate, mask=mask), expected)


def test_gradcam_leaves_the_discriminator_frozen_and_untouched():
    torch.manual_seed(0)
    d = PatchDiscriminator().train()
    before = {k: v.clone() for k, v in d.state_dict().items()}
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    cam = gradcam_nonstandard(d, x, x.flip(-1))
    assert cam.shape == (2, 1, 64, 64) and cam.min() >= 0 and cam.max() <= 1
    assert d.training and all(p.requires_grad and p.grad is None for p in d.parameters())
    assert all(torch.equal(before[k], v) for k, v in d.state_dict().items())


# ------------------------------------------------------------------------------------------ VGG weights


def _vgg_file(path, prefix="features."):
    features, _ = vgg19_features("random")
    torch.save({prefix + k: v for k, v in features.state_dict().items()}, path)
    return features


def test_vgg_weights_from_a_file(tmp_path):
    reference = _vgg_file(tmp_path / "vgg.pth")
    features, source = vgg19_features(str(tmp_path / "vgg.pth"))
    assert source == f"file {tmp_path / 'vgg.pth'}"
    assert all(torch.equal(a, b) for a, b in zip(features.state_dict().values(), reference.state_dict().values()))
    _vgg_file(tmp_path / "bad.pth", prefix="encoder.")
    with pytest.raises(VGGWeightsError, match="not VGG-19 weights"):
        vgg19_features(str(tmp_path / "bad.pth"))


def test_imagenet_weights_come_from_torchvisions_cache(tmp_path, monkeypatch):
    """The real torchvision loading code, offline: a file in the hub cache stands in for the download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    reference = _vgg_file(tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth")
    features, source = vgg19_features("imagenet")
    assert source.startswith("ImageNet")
    assert torch.equal(features[0].weight, reference[0].weight)


class _Exploit:
    """Unpickling this runs a shell command: what a model file must never be able to do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_weights_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"features.0.weight": _Exploit(marker)}))
    with pytest.raises(VGGWeightsError, match="not a readable weights file"):
        vgg19_features(str(tmp_path / "evil.pth"))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ baselines


@pytest.fixture(scope="module")
def kernel_pairs():
    pairs = []
    for seed in range(3):
        phantom = make_chest_phantom(96, 4, seed=seed)
        s, t = simulate_kernels(phantom.hu, (0.7, 0.7), [PRESETS["B30"], PRESETS["B50"]], seed=seed)
        pairs.append((s, t, (0.7, 0.7)))
    return pairs


def test_filter_baseline_learns_the_kernel_ratio_and_helps(kernel_pairs):
    model = FilterHarmonizer.fit(kernel_pairs[:2], 0.5 / 0.7)
    low = model.frequencies < 0.3
    expected = PRESETS["B50"].transfer(model.frequencies[low]) / PRESETS["B30"].transfer(model.frequencies[low])
    np.testing.assert_allclose(model.ratio[low], expected, rtol=0.1)
    source, target, _ = kernel_pairs[2]
    assert psnr(target, model.harmonize(source, (0.7, 0.7))) > psnr(target, source) + 1.0
    again = FilterHarmonizer.from_state(model.state())
    np.testing.assert_array_equal(again.ratio, model.ratio)


def test_histmatch_baseline_maps_the_distribution(kernel_pairs):
    model = HistMatchHarmonizer.fit(kernel_pairs[:2])
    assert np.all(np.diff(model.source_quantiles) > 0) and np.all(np.diff(model.target_quantiles) >= 0)
    source, target, _ = kernel_pairs[2]
    out = model.harmonize(source)
    q = np.linspace(0.05, 0.95, 19)
    before = np.abs(np.quantile(source, q) - np.quantile(target, q)).mean()
    after = np.abs(np.quantile(out, q) - np.quantile(target, q)).mean()
    assert after < before
    np.testing.assert_allclose(model.harmonize(np.array([5000.0])), 5000.0 + model.target_quantiles[-1] - model.source_quantiles[-1])


# ------------------------------------------------------------------------------------------ model folders


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not a RadiomicGAN model folder"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "radiomicgan-model/1", "method": "choe", "architecture": {"channels": 64}}))
    with pytest.raises(ModelError, match="no weights.pt"):
        load_model(tmp_path)
    torch.save({"generator": ChoeCNN(channels=32).state_dict()}, tmp_path / "weights.pt")
    with pytest.raises(ModelError, match="generator weights do not match the ChoeCNN architecture"):
        load_model(tmp_path)
    torch.save({"generator": ChoeCNN(channels=64).state_dict()}, tmp_path / "weights.pt")
    assert load_model(tmp_path).method == "choe"
    (tmp_path / "model.json").write_text(json.dumps({"format": "something-else", "method": "choe"}))
    with pytest.raises(ModelError, match="not a radiomicgan-model/1 card"):
        load_model(tmp_path)


def test_malicious_pickle_in_a_model_folder_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "model.json").write_text(json.dumps({"format": "radiomicgan-model/1", "method": "choe"}))
    (tmp_path / "weights.pt").write_bytes(pickle.dumps({"generator": _Exploit(marker)}))
    with pytest.raises(ModelError, match="refused: the file holds Python objects or code"):
        load_model(tmp_path)
    assert not marker.exists()


def test_model_card_format_round_trip_and_one_line_errors(tmp_path):
    """radiomicgan-model/1: written, read back equal; unknown keys kept; every malformed card a one-line error."""
    from radiomicgan.card import FORMAT, DataRecord, TrainingRecord, ValidationRecord

    card = ModelCard("radiomicgan", "B30", "B50", (-1024.0, 1000.0), schedule="dwt", config={"th_eta": 2, "growing_share": 0.25,
                     "th_acc": 0.5}, data=DataRecord("pairs/manifest.json", 2, 20, "held-out pair 'case002'"),
                     architecture={"vgg_source": "random initialisation"}, window_scaling="fixed", final_window=(-1024.0, 255.0),
                     window_history=[{"epoch": 0, "phase": "fixed", "lo": -1024.0, "hi": -769.0}],
                     training=TrainingRecord(epochs=3, epochs_done=3, steps_done=30, status="completed"),
                     validation=ValidationRecord(40.5, 38.25, 8, epoch=2))
    card.write(tmp_path)
    raw = json.loads((tmp_path / "model.json").read_text())
    assert raw["format"] == FORMAT == "radiomicgan-model/1" and raw["hu_range"] == [-1024.0, 1000.0]
    assert "validation" in raw and "closed_form" not in raw["training"]  # unset fields are left out
    assert ModelCard.read(tmp_path) == card
    text = (tmp_path / "MODEL_CARD.md").read_text()
    assert "**B30** to **B50**" in text and "input 38.25 dB -> model 40.50 dB" in text and "at most 25% of the steps" in text
    (tmp_path / "model.json").write_text(json.dumps({**raw, "from_a_later_version": {"x": 1}}))
    again = ModelCard.read(tmp_path)
    again.write(tmp_path)
    assert json.loads((tmp_path / "model.json").read_text())["from_a_later_version"] == {"x": 1}
    for broken, message in (({**raw, "training": "yes"}, "malformed"), ({**raw, "final_window": [3, 1]}, "final_window"),
                            ({**raw, "hu_range": [0]}, "hu_range"), ({**raw, "method": "unet"}, "not a radiomicgan-model/1 card"),
                            ({**raw, "validation": {"psnr_db": 1.0}}, "malformed")):
        (tmp_path / "model.json").write_text(json.dumps(broken))
        with pytest.raises(ModelError, match=message) as info:
            ModelCard.read(tmp_path)
        assert "\n" not in str(info.value) and str(tmp_path / "model.json") in str(info.value)
