"""Paired data: phantom pairs on disk with a manifest, checks on pairs, slice sampling; the simulate command
and the demo end to end."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from scipy import ndimage
from helpers import ramp_volume, write_ct_series

from radiomicgan.cli import main
from radiomicgan.dataset import SliceSampler, load_manifest, load_pair, manifest_entry, write_manifest
from radiomicgan.errors import CTInputError, DatasetError
from radiomicgan.io import read_volume, write_volume
from radiomicgan.kernels import PRESETS, measure_transfer, ring_edges
from radiomicgan.simulate import simulate_phantom_pairs
from radiomicgan.volume import CTMetadata, CTVolume


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "pairs"
    simulate_phantom_pairs(out, cases=2, size=64, slices=3, seed=4)
    return out


def test_simulated_pairs_and_manifest(phantom_set):
    manifest = load_manifest(phantom_set)
    assert len(manifest.pairs) == 2 and manifest.kernels == ("B30", "B50")
    assert manifest.info["size"] == 64 and manifest.info["seed"] == 4
    a_source, a_target = load_pair(manifest.pairs[0])
    b_source, _ = load_pair(manifest.pairs[1])
    assert a_source.shape == (3, 64, 64) and a_source.same_geometry(a_target)
    assert a_source.meta.kernel == "B30-sim" and a_target.meta.kernel == "B50-sim"
    assert not np.array_equal(a_source.hu, b_source.hu)  # cases differ
    labels = read_volume(manifest.pairs[0].labels, check_hu=False)
    assert labels.shape == a_source.shape and labels.hu.max() > 3
    # the target is the sharper kernel of the same scan
    f, ratio, coherence = measure_transfer(a_source.hu, a_target.hu, (0.7, 0.7), ring_edges(0.7, 8))
    expected = PRESETS["B50"].transfer(f) / PRESETS["B30"].transfer(f)
    assert np.all(coherence[:4] > 0.95)
    np.testing.assert_allclose(ratio[:4], expected[:4], rtol=0.1)


def test_simulation_is_reproducible(tmp_path, phantom_set):
    again = simulate_phantom_pairs(tmp_path / "again", cases=2, size=64, slices=3, seed=4)
    for a, b in zip(load_manifest(phantom_set).pairs, load_manifest(again).pairs):
        np.testing.assert_array_equal(read_volume(a.target).hu, read_volume(b.target).hu)


def test_simulate_refuses_non_empty_output(phantom_set):
    before = sorted(p.name for p in phantom_set.iterdir())
    with pytest.raises(CTInputError, match="not empty; refusing to overwrite"):
        simulate_phantom_pairs(phantom_set, cases=1, size=32, slices=1)
    assert sorted(p.name for p in phantom_set.iterdir()) == before


def test_cancelled_simulation_leaves_nothing(tmp_path):
    def cancel(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate_phantom_pairs(tmp_path / "out", cases=3, size=32, slices=1, progress=cancel)
    assert list(tmp_path.iterdir()) == []


def _shifted_pair_set(folder, shift=100.0, shape=(2, 40, 30)):
    """Target = source + shift: any augmentation applied differently to the two images breaks it."""
    folder.mkdir()
    source = CTVolume(hu=ramp_volume(*shape), spacing=(0.7, 0.7, 1.0), meta=CTMetadata(kernel="B30f"))
    write_volume(source, folder / "s.nrrd")
    write_volume(source.with_hu(source.hu + shift), folder / "t.nrrd")
    write_manifest(folder, [manifest_entry("p", "s.nrrd", "t.nrrd", "B30", "B50")])
    return load_manifest(folder)


def test_sampler_crops_and_augments_both_images_alike(tmp_path):
    sampler = SliceSampler(_shifted_pair_set(tmp_path / "d"), crop=16, seed=0)
    source, target = sampler.sample(32)
    assert source.shape == target.shape == (32, 16, 16)
    np.testing.assert_allclose(target - source, 100.0)
    # augmentation really happens: ramps run along different axes and directions across samples
    gradients = {(int(np.sign(np.diff(s, axis=0).mean())), int(np.sign(np.diff(s, axis=1).mean()))) for s in source}
    assert len(gradients) >= 3


def test_sampler_contrast_jitter_scales_both_images_about_air(tmp_path):
    sampler = SliceSampler(_shifted_pair_set(tmp_path / "d"), crop=16, seed=0, contrast=0.2)
    source, target = sampler.sample(32)
    gains = (target - source)[:, 0, 0] / 100.0  # one factor per pair, the same for both images
    assert np.abs(target - source - gains[:, None, None] * 100.0).max() < 0.01
    assert gains.min() >= 0.8 - 1e-6 and gains.max() <= 1.2 + 1e-6 and gains.std() > 0.05
    air = SliceSampler(_shifted_pair_set(tmp_path / "e", shape=(1, 10, 12)), crop=16, augment=False, contrast=0.2)
    padded, _ = air.sample(2)
    assert (padded == -1024).sum() == 2 * (16 * 16 - 10 * 12)  # air stays air


def test_sampler_pads_small_slices_with_air(tmp_path):
    sampler = SliceSampler(_shifted_pair_set(tmp_path / "d", shape=(1, 10, 12)), crop=16, augment=False)
    source, target = sampler.sample(2)
    assert source.shape == (2, 16, 16)
    assert (source == -1024).sum() == 2 * (16 * 16 - 10 * 12)
    slices = list(sampler.slices())
    assert len(slices) == 1 and slices[0][2].shape == (10, 12)


def test_pair_geometry_mismatch(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    volume = CTVolume(hu=ramp_volume(2, 16, 16), spacing=(0.7, 0.7, 1.0))
    write_volume(volume, folder / "s.nrrd")
    write_volume(CTVolume(hu=volume.hu, spacing=(0.8, 0.8, 1.0)), folder / "t.nrrd")
    write_manifest(folder, [manifest_entry("p1", "s.nrrd", "t.nrrd", "B30", "B50")])
    with pytest.raises(DatasetError, match="pair 'p1'.*differ in geometry"):
        SliceSampler(load_manifest(folder))


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"pairs": []}), "not a RadiomicGAN pairs manifest"),
        (json.dumps({"format": "radiomicgan-pairs/1", "pairs": []}), "lists no pairs"),
        (json.dumps({"format": "radiomicgan-pairs/1", "pairs": [{"source": "a.nrrd"}]}), "needs 'source' and 'target'"),
        (json.dumps({"format": "radiomicgan-pairs/1", "pairs": [{"source": "a.nrrd", "target": "b.nrrd"}]}), "does not exist"),
    ],
)
def test_bad_manifests(tmp_path, content, message):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_manifest(tmp_path)


def test_manifest_mixing_kernel_directions(tmp_path):
    _shifted_pair_set(tmp_path / "d")
    write_manifest(tmp_path / "d", [manifest_entry("a", "s.nrrd", "t.nrrd", "B30", "B50"), manifest_entry("b", "s.nrrd", "t.nrrd", "B50", "B30")])
    with pytest.raises(DatasetError, match="mix kernel directions"):
        load_manifest(tmp_path / "d")
    with pytest.raises(DatasetError, match="no manifest here"):
        load_manifest(tmp_path)


# ------------------------------------------------------------------------------------------ commands


def test_simulate_command_phantom_pairs(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "p"), "--size", "48", "--slices", "2", "--cases", "2",
                 "--kernel", "B70", "--source-kernel", "smooth", "--format", ".mha"]) == 0
    manifest = load_manifest(tmp_path / "p")
    assert manifest.kernels == ("B30", "B70") and manifest.pairs[0].source.name == "case000_B30.mha"
    assert "wrote 2 pair(s)" in capsys.readouterr().out


def test_simulate_command_rekernels_a_dicom_series(tmp_path, capsys):
    rng = np.random.default_rng(0)
    hu = np.clip(rng.normal(-400, 300, (3, 32, 32)), -1024, 2000)
    uids = write_ct_series(tmp_path / "scan", hu, kernel="B30f")
    assert main(["simulate", "--from", str(tmp_path / "scan"), "--kernel", "B50", "--out", str(tmp_path / "sharp")]) == 0
    files = sorted((tmp_path / "sharp").iterdir())
    assert len(files) == 3
    ds = pydicom.dcmread(files[0])
    assert ds.ConvolutionKernel == "B50-sim" and ds.StudyInstanceUID == uids["study_uid"]
    assert "simulated from B30f to B50" in ds.DerivationDescription
    out = read_volume(tmp_path / "sharp")
    assert out.shape == (3, 32, 32) and not np.array_equal(out.hu, read_volume(tmp_path / "scan").hu)
    # the input series is untouched, and an output onto the input is refused with exit status 2
    np.testing.assert_array_equal(read_volume(tmp_path / "scan").hu, np.rint(hu))
    capsys.readouterr()
    assert main(["simulate", "--from", str(tmp_path / "scan"), "--kernel", "B50", "--out", str(tmp_path / "scan")]) == 2
    assert "output path is the input" in capsys.readouterr().err


def test_simulate_command_unknown_source_kernel(tmp_path, capsys):
    write_ct_series(tmp_path / "scan", ramp_volume(2, 16, 16), kernel="STANDARD")
    assert main(["simulate", "--from", str(tmp_path / "scan"), "--kernel", "B50", "--out", str(tmp_path / "o.nrrd")]) == 2
    assert "matches no preset; name the source kernel (--source-kernel)" in capsys.readouterr().err
    assert main(["simulate", "--from", str(tmp_path / "scan"), "--kernel", "B50", "--source-kernel", "B30",
                 "--out", str(tmp_path / "o.nrrd")]) == 0
    assert read_volume(tmp_path / "o.nrrd").meta.kernel == "B50-sim"


def test_simulate_command_pairs_from_a_folder_of_scans(tmp_path, capsys):
    """Paired data without paired scans: every scan of a folder (a DICOM series and an NRRD file, in
    subfolders) becomes (simulated smooth kernel, the scan itself); unreadable files are skipped."""
    from radiomicgan.kernels import PRESETS, simulate_kernels
    from radiomicgan.phantom import make_chest_phantom
    from radiomicgan.volume import CTMetadata, CTVolume

    scans = tmp_path / "scans"
    (sharp,) = simulate_kernels(make_chest_phantom(64, 2, seed=4).hu, (0.7, 0.7), [PRESETS["B50"]], seed=1)
    write_ct_series(scans / "patient1", sharp, kernel="B50f", spacing_xy=(0.7, 0.7))
    write_volume(CTVolume(hu=sharp[::-1].copy(), spacing=(0.7, 0.7, 1.0), meta=CTMetadata(kernel="B50f")), scans / "b" / "ct.nrrd")
    (scans / "notes.txt").write_text("not a scan")
    before = read_volume(scans / "b" / "ct.nrrd").hu.copy()
    assert main(["simulate", "--from", str(scans), "--kernel", "B30", "--pairs", str(tmp_path / "pairs")]) == 0
    assert "wrote 2 pair(s)" in capsys.readouterr().out
    manifest = load_manifest(tmp_path / "pairs")
    assert manifest.kernels == ("B30", "B50") and len(manifest.pairs) == 2
    for pair in manifest.pairs:
        source, target = read_volume(pair.source), read_volume(pair.target)
        assert source.shape == target.shape and source.spacing == target.spacing
        assert source.meta.kernel == "B30-sim"
        smooth = lambda a: ndimage.uniform_filter(a, (1, 9, 9))  # noqa: E731
        detail = lambda a: np.std(a - smooth(a))  # noqa: E731
        assert detail(source.hu) < 0.85 * detail(target.hu)  # smoother than the scan it came from (measured 0.74)
        assert np.abs(smooth(source.hu) - smooth(target.hu)).mean() < 15.0  # the same anatomy
    np.testing.assert_array_equal(read_volume(scans / "b" / "ct.nrrd").hu, before)  # inputs untouched
    # problems end with one line and status 2: output inside the input folder, no kernel, a kernel the scans have
    assert main(["simulate", "--from", str(scans), "--kernel", "B30", "--pairs", str(scans / "p")]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert main(["simulate", "--from", str(scans), "--pairs", str(tmp_path / "q")]) == 2
    assert main(["simulate", "--from", str(scans), "--kernel", "B50", "--pairs", str(tmp_path / "r")]) == 2
    assert "already a B50 scan" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r*partial*"))


def test_simulate_command_rejects_bad_numbers(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--out", str(tmp_path / "p"), "--size", "4"])
    assert info.value.code == 2 and "must be at least 16" in capsys.readouterr().err


def test_demo_runs_end_to_end_and_refuses_foreign_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    tiny = ["--size", "48", "--slices", "6", "--epochs", "2", "--steps-per-epoch", "2", "--crop", "32", "--rois", "3"]
    assert main(["demo", "--out", str(out), *tiny]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"input (B30)", "RadiomicGAN", "filter baseline", "Choe et al. CNN"}
    for row in summary["results"].values():
        assert 20 < row["psnr_db"] < 80 and 0 < row["ssim"] <= 1
    assert summary["results"]["filter baseline"]["psnr_db"] > summary["results"]["input (B30)"]["psnr_db"]
    assert "random" in summary["radiomicgan"]["vgg_source"]  # offline here: said, not hidden
    assert (out / "harmonization.png").stat().st_size > 20_000
    assert (out / "models" / "radiomicgan" / "windows.png").is_file()
    assert (out / "report" / "report.html").is_file() and summary["reproducibility"]
    printed = capsys.readouterr().out
    assert "Held-out scan case003" in printed and "randomly initialised encoder" in printed
    assert main(["demo", "--out", str(out), *tiny]) == 0  # reruns over its own output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    assert main(["demo", "--out", str(foreign)]) == 2
    assert (foreign / "thesis.docx").read_text() == "precious"
