"""CT input/output: faithful round trips and one clear error per kind of bad input."""

from __future__ import annotations


import numpy as np
import pydicom
import pytest
from helpers import make_ct_dataset, ramp_volume, save_dataset, write_ct_series
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

from radiomicgan.cli import main
from radiomicgan.errors import CTInputError
from radiomicgan.io import check_output_path, read_volume, scan_dicom_folder, write_volume
from radiomicgan.volume import CTMetadata, CTVolume, require_volume


# ------------------------------------------------------------------------------------------ round trips


def test_dicom_series_written_by_test_reads_back_hu_geometry_and_tags(tmp_path):
    hu = ramp_volume(5, 24, 20)
    uids = write_ct_series(tmp_path / "series", hu, spacing_z=1.5, spacing_xy=(0.8, 0.75), origin=(-100.0, -120.0, 50.0))
    volume = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(volume.hu, hu)  # sorted by position although files are shuffled
    assert volume.spacing == pytest.approx((0.8, 0.75, 1.5))
    assert volume.origin == pytest.approx((-100.0, -120.0, 50.0))
    assert volume.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert volume.meta.kernel == "B30f"
    assert volume.meta.manufacturer == "SIEMENS"
    assert volume.meta.model == "SOMATOM Force"
    assert volume.meta.slice_thickness == pytest.approx(1.5)
    assert volume.meta.series_uid == uids["series_uid"]


def test_rescale_slope_and_intercept_applied(tmp_path):
    hu = ramp_volume(3, 16, 16)
    write_ct_series(tmp_path / "s", hu, slope=0.5, intercept=-1200.0)
    np.testing.assert_allclose(read_volume(tmp_path / "s").hu, np.rint((hu + 1200) / 0.5) * 0.5 - 1200)


def test_oblique_series_geometry(tmp_path):
    """Slices ordered along the normal of a tilted orientation, and the direction matrix keeps the tilt."""
    c, s = np.cos(0.3), np.sin(0.3)
    orientation = (1, 0, 0, 0, c, s)
    normal = np.cross([1, 0, 0], [0, c, s])
    positions = [tuple(np.array([5.0, 6.0, 7.0]) + 2.0 * k * normal) for k in range(4)]
    hu = ramp_volume(4, 12, 10)
    write_ct_series(tmp_path / "s", hu, positions=positions, orientation=orientation)
    volume = read_volume(tmp_path / "s")
    np.testing.assert_array_equal(volume.hu, hu)
    assert volume.spacing[2] == pytest.approx(2.0, abs=1e-3)  # positions written with 4 decimals
    np.testing.assert_allclose(volume.direction_matrix[:, 2], normal, atol=1e-6)
    np.testing.assert_allclose(volume.origin, positions[0], atol=1e-3)


@pytest.mark.parametrize("name", ["out.nrrd", "out.nii.gz", "out.nii", "out.mha", "dicom_out"])
def test_write_read_round_trip(tmp_path, name):
    rng = np.random.default_rng(0)
    hu = rng.normal(-300, 400, (4, 20, 18)).astype(np.float32)
    volume = CTVolume(hu=hu, spacing=(0.7, 0.8, 1.25), origin=(-10.0, -20.0, 30.0),
                      meta=CTMetadata(kernel="B50f", manufacturer="SIEMENS"))
    back = read_volume(write_volume(volume, tmp_path / name))
    np.testing.assert_array_equal(back.hu, np.rint(hu))
    assert back.spacing == pytest.approx(volume.spacing, abs=1e-5)
    assert back.origin == pytest.approx(volume.origin, abs=1e-4)
    assert back.meta.kernel == "B50f"


def test_derived_dicom_series_keeps_identity_and_gets_new_uids(tmp_path):
    hu = ramp_volume(3, 16, 16)
    uids = write_ct_series(tmp_path / "in", hu)
    source = read_volume(tmp_path / "in")
    out = write_volume(source.with_hu(source.hu + 5), tmp_path / "out", description="Harmonized to B50",
                       derivation="RadiomicGAN: B30f harmonized to B50")
    files = sorted(out.iterdir())
    assert len(files) == 3
    first = pydicom.dcmread(files[0])
    assert first.SeriesInstanceUID != uids["series_uid"]
    assert first.StudyInstanceUID == uids["study_uid"]
    assert first.FrameOfReferenceUID == uids["frame_uid"]
    assert first.PatientID == "P0001" and str(first.PatientName) == "Test^Patient"
    assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert first.SeriesDescription == "Harmonized to B50"
    assert "B30f harmonized to B50" in first.DerivationDescription
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == 3
    np.testing.assert_array_equal(read_volume(out).hu, hu + 5)
    np.testing.assert_array_equal(read_volume(tmp_path / "in").hu, hu)  # input untouched


def test_single_dicom_file_is_one_slice(tmp_path):
    write_ct_series(tmp_path / "s", ramp_volume(2, 12, 12), shuffle=False)
    volume = read_volume(tmp_path / "s" / "file000.dcm")
    assert volume.shape == (1, 12, 12)
    with pytest.raises(CTInputError, match="a 2D image .* volume of at least 2 slices is required"):
        require_volume(volume)


def test_rle_compressed_series_decodes(tmp_path):
    hu = ramp_volume(2, 16, 16)
    write_ct_series(tmp_path / "s", hu, shuffle=False)
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        ds.compress(RLELossless)
        save_dataset(ds, f)
    assert pydicom.dcmread(next((tmp_path / "s").iterdir())).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read_volume(tmp_path / "s").hu, hu)


def test_pick_series_by_uid(tmp_path):
    a = write_ct_series(tmp_path / "mixed" / "a", ramp_volume(2, 12, 12), kernel="B30f")
    write_ct_series(tmp_path / "mixed" / "b", ramp_volume(3, 12, 12), kernel="B50f")
    volume = read_volume(tmp_path / "mixed", series_uid=a["series_uid"])
    assert volume.shape[0] == 2 and volume.meta.kernel == "B30f"


# ------------------------------------------------------------------------------------------ bad input


def _error(path, **kwargs) -> str:
    with pytest.raises(CTInputError) as info:
        read_volume(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not dicom")
    assert "no DICOM image files found" in _error(tmp_path / "empty")


def test_folder_mixing_series_lists_them(tmp_path):
    a = write_ct_series(tmp_path / "mixed" / "a", ramp_volume(2, 12, 12), kernel="B30f")
    b = write_ct_series(tmp_path / "mixed" / "b", ramp_volume(3, 12, 12), kernel="B50f")
    message = _error(tmp_path / "mixed")
    assert "holds 2 series" in message and a["series_uid"] in message and b["series_uid"] in message
    assert "B50f" in message and "--series" in message
    assert "no series with SeriesInstanceUID 1.2.3" in _error(tmp_path / "mixed", series_uid="1.2.3")


def test_non_ct_modality(tmp_path):
    write_ct_series(tmp_path / "mr", ramp_volume(2, 12, 12), modality="MR")
    assert "modality MR, not CT" in _error(tmp_path / "mr")


def test_missing_rescale_tags(tmp_path):
    write_ct_series(tmp_path / "s", ramp_volume(2, 12, 12), with_rescale=False)
    assert "missing RescaleSlope and RescaleIntercept" in _error(tmp_path / "s")


def test_uneven_slice_spacing(tmp_path):
    positions = [(0.0, 0.0, z) for z in (0.0, 1.0, 2.0, 4.0)]  # a slice missing
    write_ct_series(tmp_path / "s", ramp_volume(4, 12, 12), positions=positions)
    assert "uneven slice spacing (gaps from 1.000 to 2.000 mm)" in _error(tmp_path / "s")


def test_duplicate_slice_positions(tmp_path):
    positions = [(0.0, 0.0, z) for z in (0.0, 1.0, 1.0)]
    write_ct_series(tmp_path / "s", ramp_volume(3, 12, 12), positions=positions)
    assert "two slices at the same position" in _error(tmp_path / "s")


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.201"])  # MPEG2, HTJ2K
def test_compressed_syntax_without_decoder(tmp_path, syntax):
    write_ct_series(tmp_path / "s", ramp_volume(2, 12, 12), shuffle=False)
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
        ds.PixelData = encapsulate([b"\x00\x01" * 50])
        ds["PixelData"].VR = "OB"
        save_dataset(ds, f)
    message = _error(tmp_path / "s")
    assert f"compressed transfer syntax {syntax}" in message and "no installed decoder" in message


def test_truncated_dicom_file(tmp_path):
    write_ct_series(tmp_path / "s", ramp_volume(2, 64, 64), shuffle=False)
    f = tmp_path / "s" / "file001.dcm"
    f.write_bytes(f.read_bytes()[:2000])
    message = _error(tmp_path / "s")
    assert "file001.dcm" in message and "truncated or corrupt" in message


def test_non_image_files(tmp_path):
    text = tmp_path / "readme"
    text.write_text("hello")
    assert "not a DICOM file and not a known image format" in _error(text)
    fake = tmp_path / "scan.nrrd"
    fake.write_text("this is not an nrrd")
    assert "not a readable .nrrd image" in _error(fake)


def test_values_that_are_not_hu(tmp_path):
    raw = CTVolume(hu=np.random.default_rng(0).uniform(0, 2500, (2, 16, 16)))  # intercept lost
    assert "without the rescale intercept" in _error(write_volume(raw, tmp_path / "raw.nrrd"))
    normalised = CTVolume(hu=np.random.default_rng(0).uniform(-1, 1, (2, 16, 16)))
    path = tmp_path / "norm.mha"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(normalised.hu), str(path))
    assert "looks normalised" in _error(path)


def test_output_equal_to_input_refused(tmp_path):
    write_ct_series(tmp_path / "s", ramp_volume(2, 12, 12))
    with pytest.raises(CTInputError, match="output path is the input"):
        check_output_path(tmp_path / "s", [tmp_path / "s"])
    with pytest.raises(CTInputError, match="inside the input folder"):
        check_output_path(tmp_path / "s" / "out", [tmp_path / "s"])
    volume = CTVolume(hu=ramp_volume(2, 12, 12))
    target = write_volume(volume, tmp_path / "a.nrrd")
    with pytest.raises(CTInputError, match="output path is the input"):
        check_output_path(target, [target])


def test_existing_output_not_overwritten(tmp_path):
    volume = CTVolume(hu=ramp_volume(2, 12, 12))
    path = write_volume(volume, tmp_path / "a.nrrd")
    before = path.read_bytes()
    with pytest.raises(CTInputError, match="refusing to overwrite"):
        write_volume(volume.with_hu(volume.hu + 1), path)
    assert path.read_bytes() == before
    write_volume(volume.with_hu(volume.hu + 1), path, overwrite=True)
    np.testing.assert_array_equal(read_volume(path).hu, volume.hu + 1)


def test_failed_dicom_write_leaves_nothing(tmp_path, monkeypatch):
    volume = CTVolume(hu=ramp_volume(4, 12, 12))
    calls = {"n": 0}
    original = pydicom.dataset.Dataset.save_as

    def failing_save(self, *args, **kwargs):  # the disk fills up on the third slice
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", failing_save)
    with pytest.raises(OSError):
        write_volume(volume, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_scan_ignores_non_image_dicom_and_stray_files(tmp_path):
    write_ct_series(tmp_path / "s", ramp_volume(2, 12, 12))
    (tmp_path / "s" / "DICOMDIR").write_bytes(b"x" * 200)
    (tmp_path / "s" / "thumbs.db").write_bytes(b"\x00" * 50)
    ds = make_ct_dataset(np.zeros((4, 4)), (0, 0, 0), series_uid=generate_uid(), study_uid=generate_uid(), instance=1)
    del ds.PixelData  # e.g. a structured report: no pixels
    save_dataset(ds, tmp_path / "s" / "report.dcm")
    series = scan_dicom_folder(tmp_path / "s")
    assert [len(v) for v in series.values()] == [2]


# ------------------------------------------------------------------------------------------ command line


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no DICOM image files found" in err and "Traceback" not in err


def test_cli_info_prints_kernel_and_geometry(tmp_path, capsys):
    write_ct_series(tmp_path / "s", ramp_volume(3, 12, 12), kernel="B31f")
    assert main(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert '"kernel": "B31f"' in out and '"kernel_preset": "B30"' in out and '"shape_zyx": [\n    3,' in out


def test_reading_does_not_touch_input(tmp_path):
    write_ct_series(tmp_path / "s", ramp_volume(2, 12, 12))
    before = {f.name: f.read_bytes() for f in (tmp_path / "s").iterdir()}
    read_volume(tmp_path / "s")
    assert {f.name: f.read_bytes() for f in (tmp_path / "s").iterdir()} == before
