"""Whole-volume harmonization: batching, geometry and metadata, odd sizes, refusals, cancel, out-of-memory
handling, Grad-CAM maps and windows, from Python and from the command line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pydicom
import pytest
import torch
from helpers import write_ct_series

from radiomicgan.cli import main
from radiomicgan.errors import CTInputError, RadiomicGANError
from radiomicgan.harmonize import Cancelled, Harmonizer, harmonize_file, harmonize_volume
from radiomicgan.io import read_volume, write_volume
from radiomicgan.modelio import ModelError
from radiomicgan.simulate import phantom_pair, simulate_phantom_pairs
from radiomicgan.train import TrainConfig, train
from radiomicgan.volume import CTMetadata, CTVolume


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("harmonize")
    simulate_phantom_pairs(root / "pairs", cases=2, size=48, slices=2, seed=3)
    config = TrainConfig(epochs=2, steps_per_epoch=4, batch=2, crop=32, lr=1e-3, vgg_weights="random", schedule="none",
                         val_slices=1, device="cpu")
    train(root / "pairs", root / "model", config, progress=False)
    return root / "model"


@pytest.fixture(scope="module")
def scan():
    source, _, _ = phantom_pair(size=40, slices=3, seed=9)
    return source


def test_batched_output_equals_one_slice_output(model_dir, scan):
    batched = Harmonizer(model_dir, device="cpu", batch=3).harmonize(scan.hu)
    single = Harmonizer(model_dir, device="cpu", batch=1).harmonize(scan.hu)
    # equal but for float summation order flipping a rounding at .5 HU now and then
    assert np.abs(batched - single).max() <= 1 and np.mean(batched != single) < 1e-3
    assert not np.array_equal(batched, np.rint(scan.hu))  # the model does something
    assert batched.dtype == np.float32 and np.array_equal(batched, np.rint(batched))


def test_pixels_beyond_the_range_are_carried_over(model_dir):
    hu = np.full((1, 32, 32), 40.0, np.float32)
    hu[0, :8] = 2500.0  # dense bone or metal, beyond [-1024, 1000]
    hu[0, -4:] = -3024.0  # padding outside the field of view
    out = Harmonizer(model_dir, device="cpu").harmonize(hu)
    np.testing.assert_array_equal(out[0, :8], 2500.0)
    np.testing.assert_array_equal(out[0, -4:], -3024.0)


@pytest.mark.parametrize("shape", [(1, 500, 380), (3, 37, 53), (1, 9, 11)])
def test_odd_sizes(model_dir, shape):
    hu = np.random.default_rng(0).uniform(-1000, 600, shape).astype(np.float32)
    out = Harmonizer(model_dir, device="cpu", batch=2).harmonize(hu)
    assert out.shape == shape and np.isfinite(out).all()


def test_nrrd_geometry_and_metadata_preserved(model_dir, tmp_path):
    source, _, _ = phantom_pair(size=32, slices=3, seed=1)
    c, s = np.cos(0.2), np.sin(0.2)
    volume = CTVolume(hu=source.hu, spacing=(0.7, 0.8, 2.5), origin=(-12.0, 30.0, 7.5),
                      direction=(c, -s, 0, s, c, 0, 0, 0, 1), meta=CTMetadata(kernel="B30f", manufacturer="SIEMENS"))
    write_volume(volume, tmp_path / "in.nrrd")
    result = harmonize_file(tmp_path / "in.nrrd", model_dir, tmp_path / "out.nrrd", device="cpu")
    out = read_volume(tmp_path / "out.nrrd")
    assert out.same_geometry(read_volume(tmp_path / "in.nrrd"))
    assert out.direction == pytest.approx(volume.direction, abs=1e-6)
    assert out.meta.kernel == "B30f" and out.meta.manufacturer == "SIEMENS"
    np.testing.assert_array_equal(out.hu, result.volume.hu)
    assert "harmonized to B50" in out.meta.series_description


def test_dicom_input_gives_a_derived_dicom_series(model_dir, tmp_path):
    source, _, _ = phantom_pair(size=32, slices=3, seed=1)
    uids = write_ct_series(tmp_path / "scan", np.clip(source.hu, -1024, 3000), kernel="B30f")
    before = {f.name: f.read_bytes() for f in (tmp_path / "scan").iterdir()}
    harmonize_file(tmp_path / "scan", model_dir, tmp_path / "out", device="cpu")
    files = sorted((tmp_path / "out").iterdir())
    assert len(files) == 3
    ds = pydicom.dcmread(files[0])
    assert ds.StudyInstanceUID == uids["study_uid"] and ds.SeriesInstanceUID != uids["series_uid"]
    assert ds.FrameOfReferenceUID == uids["frame_uid"] and "DERIVED" in ds.ImageType
    assert "harmonized kernel B30f to B50" in ds.DerivationDescription and ds.ConvolutionKernel == "B30f"
    assert read_volume(tmp_path / "out").same_geometry(read_volume(tmp_path / "scan"))
    assert {f.name: f.read_bytes() for f in (tmp_path / "scan").iterdir()} == before  # input untouched


def test_refusals(model_dir, tmp_path, scan):
    write_volume(scan, tmp_path / "in.nrrd")
    with pytest.raises(CTInputError, match="output path is the input"):
        harmonize_file(tmp_path / "in.nrrd", model_dir, tmp_path / "in.nrrd")
    with pytest.raises(CTInputError, match="give the output a suffix like the input's"):
        harmonize_file(tmp_path / "in.nrrd", model_dir, tmp_path / "out")
    (tmp_path / "taken.nrrd").write_text("someone's file")
    with pytest.raises(CTInputError, match="refusing to overwrite"):
        harmonize_file(tmp_path / "in.nrrd", model_dir, tmp_path / "taken.nrrd")
    assert (tmp_path / "taken.nrrd").read_text() == "someone's file"
    with pytest.raises(ModelError, match="not a RadiomicGAN model folder"):
        harmonize_file(tmp_path / "in.nrrd", tmp_path, tmp_path / "out.nrrd")


def test_kernel_mismatch_warns(model_dir, scan):
    sharp = scan.with_hu(scan.hu, kernel="B70f")
    with pytest.warns(UserWarning, match="kernel 'B70f' differs from the model's source kernel 'B30'"):
        harmonize_volume(sharp, model_dir, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        harmonize_volume(scan.with_hu(scan.hu, kernel="B31f"), model_dir, device="cpu")  # B30-like: no warning


def test_cancel_leaves_no_file(model_dir, tmp_path, scan):
    write_volume(scan, tmp_path / "in.nrrd")
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 1  # stop after the work has started

    with pytest.raises(Cancelled):
        harmonize_file(tmp_path / "in.nrrd", model_dir, tmp_path / "out.nrrd", gradcam_output=tmp_path / "cam.nrrd",
                       device="cpu", batch=1, cancel=cancel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nrrd"]


class _OutOfMemoryAbove(torch.nn.Module):
    """Stands in for a GPU allocator that cannot fit more than ``limit`` slices at once."""

    def __init__(self, generator, limit):
        super().__init__()
        self.inner, self.limit, self.divisor, self.calls = generator, limit, generator.divisor, []

    def forward(self, x):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return self.inner(x)


def test_out_of_memory_halves_the_batch(model_dir, scan):
    reference = Harmonizer(model_dir, device="cpu", batch=1).harmonize(scan.hu)
    harmonizer = Harmonizer(model_dir, device="cpu", batch=4)
    harmonizer._network = _OutOfMemoryAbove(harmonizer.model.generator, limit=1)
    with pytest.warns(UserWarning, match="out of memory: batch halved to 1"):
        out = harmonizer.harmonize(scan.hu)
    np.testing.assert_array_equal(out, reference)
    assert harmonizer.batch == 1 and harmonizer._network.calls[:3] == [3, 2, 1]
    assert "batch halved to 2" in harmonizer.notes[0]


class _TooLargeAbove(_OutOfMemoryAbove):
    """Stands in for a kernel that refuses tensors of more than 2^31 elements (a RuntimeError, not out of memory)."""

    def forward(self, x):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise RuntimeError("upsample_nearest_nhwc only supports output tensors with less than INT_MAX elements")
        return self.inner(x)


def test_batch_too_large_for_a_kernel_halves_the_batch_and_other_errors_pass(model_dir, scan):
    reference = Harmonizer(model_dir, device="cpu", batch=1).harmonize(scan.hu)
    harmonizer = Harmonizer(model_dir, device="cpu", batch=4)
    harmonizer._network = _TooLargeAbove(harmonizer.model.generator, limit=1)
    with pytest.warns(UserWarning, match="too large for one kernel"):
        out = harmonizer.harmonize(scan.hu)
    np.testing.assert_array_equal(out, reference)
    assert harmonizer.batch == 1 and harmonizer._network.calls[:3] == [3, 2, 1]

    class _Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("a real bug")

    harmonizer._network = _Broken()
    with pytest.raises(RuntimeError, match="a real bug"):
        harmonizer.harmonize(scan.hu)


def test_out_of_memory_at_batch_one_moves_to_the_cpu(model_dir, scan):
    """An accelerator that cannot fit even one slice: the work continues on the CPU, and says so. The
    accelerator is stood in for by a second CPU device name, whose allocator always fails."""
    reference = Harmonizer(model_dir, device="cpu", batch=1).harmonize(scan.hu)
    harmonizer = Harmonizer(model_dir, device="cpu", batch=2)
    harmonizer.device = "cpu:0"
    harmonizer._network = _OutOfMemoryAbove(harmonizer.model.generator, limit=0)
    with pytest.warns(UserWarning, match="continuing on the CPU"):
        out = harmonizer.harmonize(scan.hu)
    assert harmonizer.device == "cpu" and any("even at batch 1" in n for n in harmonizer.notes)
    np.testing.assert_array_equal(out, reference)


def test_out_of_memory_at_batch_one_on_the_cpu_is_a_clear_error(model_dir, scan):
    harmonizer = Harmonizer(model_dir, device="cpu", batch=2)
    harmonizer._network = _OutOfMemoryAbove(harmonizer.model.generator, limit=0)
    with pytest.warns(UserWarning), pytest.raises(RadiomicGANError, match="out of memory on the CPU even at batch 1"):
        harmonizer.harmonize(scan.hu)


def test_gradcam_maps_are_aligned_and_in_range(model_dir, tmp_path, scan):
    write_volume(scan, tmp_path / "in.nrrd")
    result = harmonize_file(tmp_path / "in.nrrd", model_dir, tmp_path / "out.nrrd", gradcam_output=tmp_path / "cam.nii.gz",
                            device="cpu")
    for name in ("cam.nii.gz", "cam_input.nii.gz"):
        cam = read_volume(tmp_path / name, check_hu=False)
        assert cam.same_geometry(read_volume(tmp_path / "in.nrrd"))
        assert cam.hu.min() >= 0 and cam.hu.max() <= 1 and cam.hu.max() > 0.5  # per-slice maps scaled to 1
    saved = read_volume(tmp_path / "cam.nii.gz", check_hu=False).hu
    np.testing.assert_allclose(saved, result.cam_output, atol=1e-6)
    windows = json.loads((tmp_path / "cam_windows.json").read_text())
    for name in ("input", "harmonized"):
        w = windows[name]
        assert 0 <= w["standard_probability"] <= 1 and 0 <= w["hot_fraction"] <= 1
        if w["hot_spot_window_hu"]:
            lo, hi = w["hot_spot_window_hu"]
            assert -1024 <= lo < hi <= 1000
    assert windows["source_kernel"] == "B30" and windows["cam_input"].endswith("cam_input.nii.gz")


def test_baseline_models_harmonize_too(tmp_path, scan):
    simulate_phantom_pairs(tmp_path / "pairs", cases=2, size=40, slices=2, seed=1)
    train(tmp_path / "pairs", tmp_path / "filter", TrainConfig(method="filter"), progress=False)
    result = harmonize_volume(scan, tmp_path / "filter", device="cpu")
    assert result.volume.shape == scan.shape and not np.array_equal(result.volume.hu, np.rint(scan.hu))
    seen = []
    with pytest.raises(RadiomicGANError, match="no discriminator"):  # refused up front, not after the volume
        harmonize_volume(scan, tmp_path / "filter", device="cpu", gradcam=True, progress=lambda *a: seen.append(a))
    assert seen == []


def test_harmonize_command(model_dir, tmp_path, capsys, scan):
    write_volume(scan, tmp_path / "in.mha")
    assert main(["harmonize", str(tmp_path / "in.mha"), "--model", str(model_dir), "--out", str(tmp_path / "out.mha"),
                 "--device", "cpu", "--gradcam", str(tmp_path / "cam.nrrd")]) == 0
    printed = capsys.readouterr().out
    assert "3 slices harmonized to B50" in printed and "Grad-CAM input" in printed and "Grad-CAM harmonized" in printed
    assert (tmp_path / "out.mha").is_file() and (tmp_path / "cam_windows.json").is_file()
    assert main(["harmonize", str(tmp_path / "in.mha"), "--model", str(tmp_path), "--out", str(tmp_path / "x.mha")]) == 2
    assert "not a RadiomicGAN model folder" in capsys.readouterr().err


def test_gradcam_window_on_the_device_equals_dynamic_selection(model_dir, scan):
    """The hot-spot values are counted on the device; the window must be what dynamic selection makes of the maps."""
    from radiomicgan.window import select_window

    harmonizer = Harmonizer(model_dir, device="cpu", batch=2)
    candidate = harmonizer.harmonize(scan.hu)
    for th_fail in (0.2, 0.5):
        cams, summary = harmonizer.gradcam(scan.hu, candidate, th_fail=th_fail)
        window, details = select_window(list(cams), list(candidate), th_fail, harmonizer._window_and_scale()[0])
        assert summary["hot_values"] == details["hot_values"] > 0
        assert summary["hot_spot_window_hu"] == (list(window) if window else None)
        assert summary["hot_fraction"] == pytest.approx(float((cams > th_fail).mean()))
