"""Kernel simulator: presets are what simulated images measure, kernels of one scan share anatomy and noise,
and the presets agree with a real four-kernel slice."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from radiomicgan.calibration import NOISE_BAND, calibrate
from radiomicgan.cli import main
from radiomicgan.kernels import (
    PRESETS,
    get_preset,
    measure_nps,
    measure_transfer,
    preset_for_tag,
    rekernel,
    ring_edges,
    simulate_kernels,
)
from radiomicgan.phantom import make_chest_phantom

SPACING = (0.7, 0.7)
EDGES = ring_edges(0.7, 12)


@pytest.fixture(scope="module")
def phantom():
    return make_chest_phantom(128, 4, seed=3)


@pytest.mark.parametrize("name", list(PRESETS))
def test_transfer_measured_on_simulated_output_matches_preset(phantom, name):
    preset = PRESETS[name]
    (out,) = simulate_kernels(phantom.hu, SPACING, [preset], noise_scale=0.0, hu_range=None)
    f, ratio, _ = measure_transfer(phantom.hu, out, SPACING, EDGES)
    np.testing.assert_allclose(ratio, preset.transfer(f), rtol=0.03, atol=2e-3)


def test_two_kernels_share_noise_realisation():
    flat = np.zeros((6, 128, 128), np.float32)
    smooth, sharp = simulate_kernels(flat, SPACING, [PRESETS["B30"], PRESETS["B50"]], seed=7, hu_range=None)
    f, _, coherence = measure_transfer(smooth, sharp, SPACING, EDGES)
    assert np.all(coherence[1:] > 0.98)  # one realisation, filtered two ways
    (other_seed,) = simulate_kernels(flat, SPACING, [PRESETS["B50"]], seed=8, hu_range=None)
    _, _, unrelated = measure_transfer(smooth, other_seed, SPACING, EDGES)
    assert np.all(np.abs(unrelated[1:]) < 0.2)
    # the sharp noise is exactly the smooth noise through the kernel ratio
    f2 = np.hypot(np.fft.fftfreq(128, 0.7)[:, None], np.fft.rfftfreq(128, 0.7)[None, :])
    gain = np.sqrt(PRESETS["B50"].nps(f2) / np.maximum(PRESETS["B30"].nps(f2), 1e-30))
    predicted = np.fft.irfft2(np.fft.rfft2(smooth) * np.where(f2 < 0.5, gain, 0), s=(128, 128))
    low_sharp = np.fft.irfft2(np.fft.rfft2(sharp) * (f2 < 0.5), s=(128, 128))
    assert np.abs(predicted - low_sharp).max() < 0.05 * sharp.std()


def test_two_kernels_share_anatomy(phantom):
    smooth, sharp = simulate_kernels(phantom.hu, SPACING, [PRESETS["B30"], PRESETS["B50"]], seed=1)
    blur = lambda a: np.stack([sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(s), 3.0)) for s in a])  # noqa: E731
    body = phantom.labels > 0
    assert np.abs(blur(smooth) - blur(sharp))[body].mean() < 6.0  # same anatomy at low frequency
    assert np.abs(smooth - sharp)[body].mean() > 20.0  # different kernels at high frequency


def test_noise_level_and_spectrum_match_preset():
    flat = np.zeros((8, 128, 128), np.float32)
    for preset in PRESETS.values():
        (noise,) = simulate_kernels(flat, SPACING, [preset], seed=2, hu_range=None)
        assert noise.std() == pytest.approx(preset.noise_std(0.7, size=128), rel=0.05)
    corners = [(y, x) for y in range(0, 96, 32) for x in range(0, 96, 32)]
    (noise,) = simulate_kernels(flat[:1], SPACING, [PRESETS["B50"]], seed=4, hu_range=None)
    f, nps = measure_nps(noise[0], SPACING, corners, 32, ring_edges(0.7, 16))
    band = (f >= NOISE_BAND[0]) & (f <= NOISE_BAND[1])
    assert nps[band].mean() == pytest.approx(PRESETS["B50"].nps(f[band]).mean(), rel=0.2)


def test_noise_scale_and_seed(phantom):
    a = simulate_kernels(phantom.hu, SPACING, [PRESETS["B50"]], seed=5)[0]
    b = simulate_kernels(phantom.hu, SPACING, [PRESETS["B50"]], seed=5)[0]
    np.testing.assert_array_equal(a, b)
    quiet = simulate_kernels(np.zeros((2, 64, 64)), SPACING, [PRESETS["B50"]], seed=5, noise_scale=0.25, hu_range=None)[0]
    loud = simulate_kernels(np.zeros((2, 64, 64)), SPACING, [PRESETS["B50"]], seed=5, noise_scale=1.0, hu_range=None)[0]
    assert loud.std() / quiet.std() == pytest.approx(2.0, rel=1e-4)  # noise power scales, amplitude by sqrt


def test_air_floor_clipping(phantom):
    (out,) = simulate_kernels(phantom.hu, SPACING, [PRESETS["B70"]], seed=1)
    assert out.min() >= -1024 and out.max() <= 3071
    assert (out == -1024).mean() > 0.05  # noisy air is clipped at the floor, as on Siemens scanners


def test_rekernel_real_scan_towards_sharp(phantom):
    """A smooth scan re-kernelled to sharp: anatomy filtered by the kernel ratio, noise topped up to the
    sharp kernel's spectrum."""
    smooth, sharp = simulate_kernels(phantom.hu, SPACING, [PRESETS["B30"], PRESETS["B50"]], seed=1, hu_range=None)
    converted = rekernel(smooth, SPACING, PRESETS["B30"], PRESETS["B50"], seed=9, hu_range=None)
    f, ratio, _ = measure_transfer(sharp, converted, SPACING, EDGES)
    low = f < 0.25  # where B30 keeps the signal, conversion reproduces the sharp image's content
    np.testing.assert_allclose(ratio[low], 1.0, atol=0.06)
    flat = np.zeros((4, 128, 128), np.float32)
    smooth_noise = simulate_kernels(flat, SPACING, [PRESETS["B30"]], seed=3, hu_range=None)[0]
    converted_noise = rekernel(smooth_noise, SPACING, PRESETS["B30"], PRESETS["B50"], seed=4, hu_range=None)
    assert converted_noise.std() == pytest.approx(PRESETS["B50"].noise_std(0.7, size=128), rel=0.08)


def test_preset_lookup():
    assert get_preset("sharp").name == "B50" and get_preset("b70").name == "B70"
    assert preset_for_tag("B31f").name == "B30"
    assert preset_for_tag("I70f\\3").name == "B70"
    assert preset_for_tag("B50-sim").name == "B50"
    assert preset_for_tag("STANDARD") is None
    with pytest.raises(Exception, match="unknown kernel 'B99'"):
        get_preset("B99")


def test_calibration_recovers_presets_from_simulated_kernels():
    """The calibration's measurement is right: on a phantom slice made with the presets, it finds them
    (unclipped: the air-floor clip, like a scanner's, distorts the smoothest kernels near Nyquist)."""
    phantom = make_chest_phantom(256, 1, seed=11)
    names = ["B10", "B30", "B50", "B70"]
    simulated = simulate_kernels(phantom.hu, SPACING, [PRESETS[n] for n in names], seed=2, hu_range=None)
    images = dict(zip(names, [im[0] for im in simulated]))
    pairs, noises = calibrate(images, 0.7, patch=16)
    assert [nc.kernel for nc in noises] == names
    for pc in pairs:
        assert pc.trusted.sum() >= 5
        assert pc.worst_relative_error() < 0.03, (pc.source, pc.target)


def test_calibration_against_real_slice(real_kernels):
    """Presets against the real four-kernel slice: ratios within 15 % where the kernels are coherent,
    noise power in soft tissue within 25 %."""
    images = {}
    for name in ("B10", "B30", "B50", "B70"):
        image = sitk.ReadImage(str(real_kernels / f"test1_{name}.mha"))
        images[name] = sitk.GetArrayFromImage(image).reshape(512, 512).astype(np.float64)
    pairs, noises = calibrate(images, 0.693359)  # B10/B70 headers lost the spacing
    for pc in pairs:
        assert pc.trusted.sum() >= 8, (pc.source, pc.target)
        assert pc.worst_relative_error() < 0.15, (pc.source, pc.target)
    for nc in noises:
        assert nc.band_power("preset") == pytest.approx(nc.band_power("measured"), rel=0.25), nc.kernel


def test_calibrate_command_writes_plot(real_kernels, tmp_path, capsys):
    args = [f"{k}={real_kernels / f'test1_{k}.mha'}" for k in ("B30", "B50", "B70")]
    assert main(["calibrate", *args, "--spacing", "0.693359", "--out", str(tmp_path), "--fit"]) == 0
    out = capsys.readouterr().out
    assert "B50/B30" in out and "worst preset error" in out and "Refitted presets" in out
    assert (tmp_path / "calibration.png").stat().st_size > 10_000
