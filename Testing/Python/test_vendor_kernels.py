"""Kernels by the vendor's names (issue 17): a Toshiba sharp FC51 -> soft FC13 model from DICOM series whose only
kernel names are their ConvolutionKernel tags; no Siemens-only assumption on the way."""

from __future__ import annotations

import json
import warnings

import pytest
from helpers import REPO, write_ct_series
from scipy import ndimage

from radiomicgan.cli import main
from radiomicgan.dataset import load_manifest, manifest_entry, write_manifest
from radiomicgan.errors import DatasetError
from radiomicgan.harmonize import harmonize_volume
from radiomicgan.io import read_volume
from radiomicgan.kernels import PRESETS, kernel_name, preset_for_tag, same_kernel, simulate_kernels
from radiomicgan.metrics import psnr
from radiomicgan.phantom import make_chest_phantom

TOSHIBA = REPO.parent / "shared" / "data" / "real-kernels-toshiba"


def test_kernel_names_of_any_vendor():
    # Siemens numbers index the presets; Toshiba's FC13 is no "very smooth B10", nor FC51 a Siemens B50
    assert preset_for_tag("FC51") is None and preset_for_tag("FC13") is None and preset_for_tag("STANDARD") is None
    assert preset_for_tag("B31f").name == "B30" and preset_for_tag("Br40d").name == "B30"
    assert kernel_name("fc51") == "FC51" and kernel_name("B30f") == "B30" and kernel_name("B50-sim") == "B50"
    assert kernel_name("I70f\\3") == "I70"
    assert same_kernel("FC51", "fc51") and same_kernel("B30f", "B30-sim") and same_kernel("B31f", "B30")
    assert not same_kernel("FC51", "B50f") and not same_kernel("FC51", "FC13") and not same_kernel("", "FC51")


def _pairs(folder, entries):
    folder.mkdir(parents=True, exist_ok=True)
    return write_manifest(folder, entries)


def _sharp_soft_series(folder, seed=0, slices=2, size=48):
    """One phantom 'scan' as two DICOM series: a sharp one tagged FC51 and a soft one tagged FC13."""
    hu = make_chest_phantom(size, slices, seed=seed).hu
    soft, sharp = simulate_kernels(hu, (0.7, 0.7), [PRESETS["B30"], PRESETS["B50"]], seed=seed)
    write_ct_series(folder / "sharp", sharp, kernel="FC51", spacing_xy=(0.7, 0.7))
    write_ct_series(folder / "soft", soft, kernel="FC13", spacing_xy=(0.7, 0.7))
    return folder / "sharp", folder / "soft"


def test_sharp_to_soft_model_from_dicom_tags(tmp_path, capsys):
    sharp, soft = _sharp_soft_series(tmp_path / "scan")
    # a manifest that names no kernel: the names come from the series' tags
    _pairs(tmp_path / "pairs", [{"id": "scan", "source": "../scan/sharp", "target": "../scan/soft"}])
    assert main(["train", "--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "model"), "--method", "filter"]) == 0
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["source_kernel"] == "FC51" and card["target_kernel"] == "FC13"
    assert "**FC51** to **FC13**" in (tmp_path / "model" / "MODEL_CARD.md").read_text()
    capsys.readouterr()
    volume = read_volume(sharp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model's own kernel: no warning
        out = harmonize_volume(volume, tmp_path / "model", device="cpu")
    assert psnr(read_volume(soft).hu, out.volume.hu) > psnr(read_volume(soft).hu, volume.hu) + 1.0
    # a Siemens B50f scan is another kernel, whatever its number: warned by name
    with pytest.warns(UserWarning, match="kernel 'B50f' differs from the model's source kernel 'FC51'"):
        harmonize_volume(volume.with_hu(volume.hu, kernel="B50f"), tmp_path / "model", device="cpu")


def test_pairs_whose_tags_disagree_are_refused(tmp_path):
    a_sharp, a_soft = _sharp_soft_series(tmp_path / "a", slices=1, size=32)
    b_sharp, _ = _sharp_soft_series(tmp_path / "b", seed=1, slices=1, size=32)
    _pairs(tmp_path / "pairs", [{"id": "a", "source": "../a/sharp", "target": "../a/soft"},
                                        {"id": "b", "source": "../b/soft", "target": "../b/sharp"}])
    assert main(["train", "--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "model"), "--method", "filter"]) == 2
    # a manifest name that the tags contradict is kept, and said
    _pairs(tmp_path / "named", [manifest_entry("a", "../a/sharp", "../a/soft", "FC52", "FC13")])
    from radiomicgan.dataset import SliceSampler

    with pytest.warns(UserWarning, match="names the source kernel 'FC52', the scan's tag says 'FC51'"):
        sampler = SliceSampler(load_manifest(tmp_path / "named"), crop=None)
    assert sampler.manifest.kernels == ("FC52", "FC13")
    with pytest.raises(DatasetError, match="one model learns one direction"):
        load = load_manifest(tmp_path / "pairs")
        SliceSampler(load, crop=None).manifest.kernels


def test_simulated_pairs_name_the_target_by_the_scans_tag(tmp_path, capsys):
    """`simulate --pairs` from Toshiba soft FC13 scans: FC13 matches no Siemens preset, so the user names the preset
    it is closest to; the pairs' target is still called FC13, as the scans say."""
    _, soft = _sharp_soft_series(tmp_path / "scans", slices=1, size=48)
    args = ["simulate", "--from", str(soft), "--kernel", "B50", "--pairs", str(tmp_path / "pairs")]
    assert main(args) == 2
    assert "matches no preset" in capsys.readouterr().err
    assert main([*args, "--source-kernel", "B30"]) == 0
    manifest = load_manifest(tmp_path / "pairs")
    assert manifest.kernels == ("B50", "FC13") and manifest.pairs[0].target.name == "scan000_FC13.nrrd"


@pytest.mark.skipif(not (TOSHIBA / "sharp_FC51" / "00000002.DCM").is_file(), reason="real Toshiba pair not present (../shared/data)")
def test_real_toshiba_dicom_sharp_to_soft(tmp_path):
    """The real FC51/FC13 DICOM: trained on one slice by its tags, checked on the other slice."""
    _pairs(tmp_path / "pairs", [{"id": "slice2", "source": str(TOSHIBA / "sharp_FC51" / "00000002.DCM"),
                                         "target": str(TOSHIBA / "soft_FC13" / "00000002.DCM")}])
    assert main(["train", "--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "model"), "--method", "filter"]) == 0
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert (card["source_kernel"], card["target_kernel"]) == ("FC51", "FC13")
    sharp, soft = read_volume(TOSHIBA / "sharp_FC51" / "00000016.DCM"), read_volume(TOSHIBA / "soft_FC13" / "00000016.DCM")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = harmonize_volume(sharp, tmp_path / "model", device="cpu")
    body = ndimage.binary_erosion(soft.hu[0] > -500, iterations=8)
    assert psnr(soft.hu[0][body], out.volume.hu[0][body]) > psnr(soft.hu[0][body], sharp.hu[0][body]) + 3.0
