"""Radiomic reproducibility: Lin's CCC, counting, ROIs, pyradiomics extraction, PSNR/SSIM, and the report."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from radiomicgan.cli import main
from radiomicgan.io import write_map, write_volume
from radiomicgan.metrics import psnr, ssim
from radiomicgan.report import write_report
from radiomicgan.reproducibility import (
    DEFAULT_PARAMS,
    EvaluationError,
    bootstrap_counts,
    body_slice_rois,
    count_reproducible,
    evaluate,
    extract_features,
    lins_ccc,
    rois_from_boxes,
    rois_from_labels,
    sample_hu_rois,
)
from radiomicgan.simulate import phantom_pair
from radiomicgan.volume import CTVolume

FAST_PARAMS = """
setting: {binWidth: 25, label: 1, preCrop: true}
imageType: {Original: {}}
featureClass: {firstorder: , glcm: }
"""


@pytest.fixture(scope="module")
def fast_params(tmp_path_factory):
    path = tmp_path_factory.mktemp("params") / "fast.yaml"
    path.write_text(FAST_PARAMS)
    return path


@pytest.fixture(scope="module")
def scans():
    source, target, labels = phantom_pair(size=96, slices=6, seed=5)
    return source, target, labels


# ------------------------------------------------------------------------------------------ CCC


def test_ccc_against_hand_computed_values():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([2.0, 2.0, 4.0, 5.0])
    # means 2.5, 3.25; population variances 1.25, 1.6875; covariance 1.375
    expected = 2 * 1.375 / (1.25 + 1.6875 + 0.75**2)
    assert lins_ccc(a, b)[0] == pytest.approx(expected)
    assert expected == pytest.approx(0.7857142857)


def test_ccc_defining_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 4))
    np.testing.assert_allclose(lins_ccc(a, a), 1.0)
    np.testing.assert_allclose(lins_ccc(a, -a + 2 * a.mean(axis=0)), -1.0)  # negated about the mean
    shifted = lins_ccc(a, a + 0.5)
    assert np.all(shifted < 1.0) and np.all(shifted > 0.5)  # a shift lowers it; correlation alone would not
    np.testing.assert_allclose(lins_ccc(a, 3 * a), lins_ccc(3 * a, a))  # symmetric


def test_zero_variance_rule():
    a = np.array([[1.0, 5.0, 2.0], [2.0, 5.0, 2.0], [3.0, 5.0, 2.0]])
    b = np.array([[1.0, 5.0, 7.0], [2.0, 5.0, 8.0], [3.0, 5.0, 9.0]])
    ccc = lins_ccc(a, b)
    assert ccc[0] == pytest.approx(1.0)
    assert np.isnan(ccc[1])  # constant in both: undefined, excluded
    assert ccc[2] == 0.0  # constant in one only: no agreement
    assert count_reproducible(ccc) == (1, 1)


def test_threshold_counting_and_bootstrap():
    ccc = np.array([0.99, 0.86, 0.85, 0.2, np.nan])
    assert count_reproducible(ccc, 0.85) == (2, 1)  # strictly above
    assert count_reproducible(ccc, 0.5) == (3, 1)
    rng = np.random.default_rng(1)
    a = rng.normal(size=(25, 50))
    b = a + rng.normal(scale=np.linspace(0.01, 2.0, 50), size=(25, 50))
    mean, sd = bootstrap_counts(a, b, resamples=50, seed=0)
    assert 0 < sd < 10 and abs(mean - count_reproducible(lins_ccc(a, b))[0]) < 10


# ------------------------------------------------------------------------------------------ ROIs


def test_hu_range_roi_sampling(scans):
    source, _, _ = scans
    rois = sample_hu_rois(source, ((-900.0, -700.0), (-100.0, 250.0)), per_range=5, size_mm=7.0, slices=2, seed=1)
    groups = {}
    for roi in rois:
        groups.setdefault(roi.group, []).append(roi)
        z0, z1, y0, y1, x0, x1 = roi.box
        lo, hi = map(float, roi.group.strip("[]").split(","))
        assert lo <= source.hu[z0:z1, y0:y1, x0:x1].mean() <= hi  # membership decided on the reference
        assert (z1 - z0, y1 - y0, x1 - x0) == (2, 10, 10)
    assert sorted(groups) == ["[-100, 250]", "[-900, -700]"] and all(len(v) == 5 for v in groups.values())
    again = sample_hu_rois(source, ((-900.0, -700.0), (-100.0, 250.0)), per_range=5, size_mm=7.0, slices=2, seed=1)
    assert [r.box for r in again] == [r.box for r in rois]  # seeded


def test_rois_from_labels_boxes_and_body(scans):
    source, _, labels = scans
    label_volume = source.with_hu(np.where(labels == 3, 1, np.where(labels == 6, 2, 0)).astype(np.float32))
    rois = rois_from_labels(label_volume, source)
    assert [r.name for r in rois] == ["label1", "label2"] and rois[0].voxels == int((labels == 3).sum())
    with pytest.raises(EvaluationError, match="label map is empty"):
        rois_from_labels(source.with_hu(np.zeros(source.shape, np.float32)), source)
    other = CTVolume(hu=np.zeros((2, 8, 8)), spacing=(1, 1, 1))
    with pytest.raises(EvaluationError, match="geometry differs"):
        rois_from_labels(other, source)
    o = np.asarray(source.origin)
    box = rois_from_boxes([{"name": "nodule", "min": list(o + [7.0, 14.0, 1.0]), "max": list(o + [14.0, 21.0, 3.0])}], source)[0]
    assert box.name == "nodule" and box.box == (1, 4, 20, 31, 10, 21)
    with pytest.raises(EvaluationError, match="outside the image"):
        rois_from_boxes([{"min": [1e4, 1e4, 1e4], "max": [2e4, 2e4, 2e4]}], source)
    body = body_slice_rois(source)
    assert len(body) == source.shape[0] and all(r.group == "whole image" for r in body)


# ------------------------------------------------------------------------------------------ features


def test_default_parameters_give_at_least_1400_features_on_a_3d_roi(scans):
    source, _, _ = scans
    roi = sample_hu_rois(source, ((-100.0, 250.0),), per_range=1, size_mm=10.0, slices=4, seed=0)
    features = extract_features({"ct": source}, roi, DEFAULT_PARAMS, workers=1)["ct"][0]
    assert "_error" not in features
    assert len(features) >= 1400
    assert any(k.startswith("wavelet-") for k in features) and any(k.startswith("log-sigma-5") for k in features)


def test_too_small_roi_is_a_documented_skip(scans, fast_params):
    source, target, _ = scans
    rois = sample_hu_rois(source, ((-100.0, 250.0),), per_range=4, size_mm=7.0, slices=2, seed=2)
    tiny = rois[0].__class__("one voxel", rois[0].group, (1, 2, 40, 41, 40, 41), np.ones((1, 1, 1), bool))
    result = evaluate(target, {"input": source}, rois + [tiny], params=fast_params, workers=1, bootstrap=0)
    skipped = result.summary["rois_skipped"]
    assert [s["roi"] for s in skipped] == ["one voxel"] and skipped[0]["reason"]
    assert result.summary["rois"] == 4


def test_mismatched_geometry(scans, fast_params):
    source, target, _ = scans
    moved = CTVolume(hu=source.hu, spacing=source.spacing, origin=(5.0, 0.0, 0.0))
    with pytest.raises(EvaluationError, match="geometry differs from the reference"):
        evaluate(target, {"moved": moved}, [], params=fast_params)


def test_psnr_and_ssim_agree_with_scikit_image(scans):
    source, target, _ = scans
    ref, cand = np.clip(target.hu, -1024, 3071), np.clip(source.hu, -1024, 3071)
    assert psnr(target.hu, source.hu) == pytest.approx(peak_signal_noise_ratio(ref, cand, data_range=4095))
    expected = np.mean([structural_similarity(r, c, data_range=4095) for r, c in zip(ref, cand)])
    assert ssim(target.hu, source.hu) == pytest.approx(expected)
    mask = np.zeros(ref.shape, bool)
    mask[:, 20:60, 20:60] = True
    mse = np.mean((ref[mask] - cand[mask]) ** 2)
    assert psnr(target.hu, source.hu, mask=mask) == pytest.approx(10 * np.log10(4095**2 / mse))
    assert 0 < ssim(target.hu, source.hu, mask=mask) < 1


# ------------------------------------------------------------------------------------------ report


def test_evaluate_and_report(scans, fast_params, tmp_path):
    source, target, _ = scans
    rois = sample_hu_rois(target, ((-900.0, -700.0), (-100.0, 250.0)), per_range=5, size_mm=7.0, slices=2, seed=3)
    result = evaluate(target, {"input": source, "itself": target}, rois, params=fast_params, workers=2, bootstrap=20,
                      reference_name="B50")
    groups = result.summary["groups"]
    for group in ("[-900, -700]", "[-100, 250]"):
        itself, given = groups[group]["itself"], groups[group]["input"]
        assert itself["reproducible"] + itself["excluded_undefined"] == len(result.feature_names)  # identical: all of them
        assert given["reproducible"] < itself["reproducible"]  # another kernel: fewer
        assert set(given["by_class"]) == {"firstorder", "glcm"} and set(given["by_image_type"]) == {"original"}
    assert result.summary["image_metrics"]["itself"]["psnr_db"] == float("inf")
    out = write_report(result, tmp_path / "report", {"B50": target, "input": source, "itself": target})
    with open(out / "ccc.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * len(result.feature_names) and set(rows[0]) >= {"group", "feature", "input", "itself"}
    assert all("," not in r["input"] for r in rows)  # '.' decimals
    float(rows[0]["input"])
    with open(out / "features.csv") as fh:
        assert sum(1 for _ in fh) == 1 + 3 * len(rois) * len(result.feature_names)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pyradiomics_version"] and summary["seed"] == 0
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Table 1" in page and "pyradiomics" in page


def test_evaluate_command(scans, fast_params, tmp_path, capsys):
    source, target, labels = scans
    write_volume(target, tmp_path / "b50.nrrd")
    write_volume(source, tmp_path / "b30.nrrd")
    label_map = np.where(labels == 3, 1, np.where(labels == 6, 2, np.where(labels == 2, 3, 0)))
    write_map(label_map, target, tmp_path / "labels.nrrd")
    assert main(["evaluate", "--reference", str(tmp_path / "b50.nrrd"), "--candidate", f"input={tmp_path / 'b30.nrrd'}",
                 "--labels", str(tmp_path / "labels.nrrd"), "--params", str(fast_params), "--out", str(tmp_path / "r"),
                 "--workers", "1", "--bootstrap", "10"]) == 0
    printed = capsys.readouterr().out
    assert "labels" in printed and "PSNR" in printed and (tmp_path / "r" / "report.html").is_file()
    assert main(["evaluate", "--reference", str(tmp_path / "b50.nrrd"), "--candidate", f"input={tmp_path / 'b30.nrrd'}",
                 "--out", str(tmp_path / "r")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    write_map(np.zeros(target.shape), target, tmp_path / "empty.nrrd")
    assert main(["evaluate", "--reference", str(tmp_path / "b50.nrrd"), "--candidate", f"input={tmp_path / 'b30.nrrd'}",
                 "--labels", str(tmp_path / "empty.nrrd"), "--out", str(tmp_path / "r2")]) == 2
    assert "label map is empty" in capsys.readouterr().err
