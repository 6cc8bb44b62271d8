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
    PHANTOM_TISSUES,
    ROI,
    bootstrap_count_stats,
    bootstrap_counts,
    body_mask,
    body_slice_rois,
    count_reproducible,
    evaluate,
    extract_features,
    lins_ccc,
    rois_from_boxes,
    rois_from_labels,
    sample_hu_rois,
    sample_tissue_rois,
)
from radiomicgan.report import format_counts
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


def test_count_and_interval_on_a_constructed_case():
    """Known answer: 5 features identical in both images (CCC 1), 4 shifted far (CCC ~ 0), 2 constant in both
    (undefined), and one identical but for an outlier in ROI 0. On all ROIs the outlier spoils that feature:
    count 5. A resample leaves ROI 0 out with probability (1 - 1/n)^n, and then the count is 6."""
    n = 30
    rng = np.random.default_rng(4)
    a = rng.normal(size=(n, 12))
    a[:, 9:11] = 7.0
    b = a.copy()
    b[:, 5:9] += 100.0
    b[0, 11] += 50.0
    stats = bootstrap_count_stats(a, b, resamples=400, seed=0)
    assert stats["reproducible"] == 5 and stats["excluded_undefined"] == 2  # the point estimate, on all ROIs
    assert stats["interval"] == [5.0, 6.0]
    left_out = (1 - 1 / n) ** n  # 0.362
    assert stats["bootstrap_mean"] == pytest.approx(5 + left_out, abs=0.08)
    assert stats["bootstrap_sd"] == pytest.approx(np.sqrt(left_out * (1 - left_out)), abs=0.05)
    clean = bootstrap_count_stats(a[1:], b[1:], resamples=100, seed=0)  # no outlier: 6 always
    assert clean["reproducible"] == 6 and clean["interval"] == [6.0, 6.0] and clean["bootstrap_sd"] == 0.0
    assert bootstrap_count_stats(a, b, resamples=0)["interval"] is None
    assert bootstrap_counts(a, b, resamples=400, seed=0) == (stats["bootstrap_mean"], stats["bootstrap_sd"])


def _slab(hu_rows: np.ndarray) -> CTVolume:
    return CTVolume(hu=np.repeat(hu_rows[None].astype(np.float32), 3, axis=0), spacing=(1.0, 1.0, 1.0))


def test_hu_range_rois_lie_inside_the_body():
    """A body (0 HU) in air, and beside it a detached band of -600 HU (a blanket, say): boxes in the band are
    wholly in the lung range but outside the body; boxes across the body's edge mix air and tissue."""
    hu = np.full((60, 60), -1000.0)
    hu[10:50, 14:54] = 0.0
    hu[10:50, 0:8] = -600.0
    volume = _slab(hu)
    body = body_mask(volume)
    assert body[:, 10:50, 14:54].all() and not body[:, :, :8].any()
    assert sample_hu_rois(volume, ((-800.0, -300.0),), per_range=10, size_mm=6.0, slices=2, seed=0) == []
    rois = sample_hu_rois(volume, ((-1100.0, 250.0),), per_range=50, size_mm=6.0, slices=2, seed=0)  # air and tissue
    assert len(rois) >= 20
    for roi in rois:
        z0, z1, y0, y1, x0, x1 = roi.box
        assert body[z0:z1, y0:y1, x0:x1].all() and (z1 - z0, y1 - y0, x1 - x0) == (2, 6, 6)


def test_hu_range_rois_need_most_voxels_in_range():
    """Every 4th column at 300 HU: each 8-wide box has 75 % of its voxels in [-100, 250] (its mean, 75 HU, is
    in the range too): rejected at the 80 % default, taken at 70 %."""
    hu = np.full((64, 64), -1000.0)
    hu[8:56, 8:56] = 0.0
    hu[8:56, 8:56:4] = 300.0
    volume = _slab(hu)
    ranges = ((-100.0, 250.0),)
    assert sample_hu_rois(volume, ranges, per_range=5, size_mm=8.0, slices=2, seed=0) == []
    rois = sample_hu_rois(volume, ranges, per_range=5, size_mm=8.0, slices=2, seed=0, min_fraction=0.7)
    assert len(rois) == 5
    for roi in rois:
        z0, z1, y0, y1, x0, x1 = roi.box
        box = volume.hu[z0:z1, y0:y1, x0:x1]
        assert np.mean((box >= -100) & (box <= 250)) == pytest.approx(0.75)
    boxes = [r.box for r in rois]
    assert boxes == [r.box for r in sample_hu_rois(volume, ranges, per_range=5, size_mm=8.0, slices=2, seed=0, min_fraction=0.7)]
    taken = np.zeros(volume.shape, int)
    for z0, z1, y0, y1, x0, x1 in boxes:
        taken[z0:z1, y0:y1, x0:x1] += 1
    assert taken.max() == 1  # non-overlapping within a range


def test_tissue_rois_come_from_the_label_map(scans):
    _, target, labels = scans
    rois = sample_hu_rois(target, per_range=12, size_mm=3.5, slices=2, seed=0, labels=labels)
    groups = {g: [r for r in rois if r.group == g] for g in PHANTOM_TISSUES}
    assert set(r.group for r in rois) == set(PHANTOM_TISSUES) and len(groups["lung"]) == 12
    body = body_mask(target)
    for group, members in groups.items():
        for roi in members:
            z0, z1, y0, y1, x0, x1 = roi.box
            assert body[z0:z1, y0:y1, x0:x1].all()
            assert np.isin(labels[z0:z1, y0:y1, x0:x1], PHANTOM_TISSUES[group]).mean() >= 0.8
    strict = sample_tissue_rois(target, labels, per_group=12, size_mm=3.5, slices=2, seed=0, min_fraction=1.0)
    assert strict
    for roi in strict:  # every voxel inside its tissue
        z0, z1, y0, y1, x0, x1 = roi.box
        assert np.isin(labels[z0:z1, y0:y1, x0:x1], PHANTOM_TISSUES[roi.group]).all()
    striped = np.zeros(target.shape, np.uint8)
    striped[:, :, ::4] = 3
    striped[:, :, 1::4] = 3
    striped[:, :, 2::4] = 3  # lung in 3 of every 4 columns: at most 75 % of any 8-wide box
    assert sample_tissue_rois(target, striped, {"lung": (3,)}, per_group=5, size_mm=5.6, slices=2) == []
    with pytest.raises(EvaluationError, match="shape"):
        sample_tissue_rois(target, labels[:-1], per_group=5)


def test_rois_from_labels_boxes_and_body(scans):
    source, _, labels = scans
    label_volume = source.with_hu(np.where(labels == 3, 1, np.where(labels == 6, 2, 0)).astype(np.float32))
    rois = rois_from_labels(label_volume, source)
    assert [r.name for r in rois] == ["label1", "label2"] and rois[0].voxels == int((labels == 3).sum())
    with pytest.raises(EvaluationError, match="label map is empty"):
        rois_from_labels(source.with_hu(np.zeros(source.shape, np.float32)), source)
    other = CTVolume(hu=np.ones((2, 8, 8)), spacing=(1, 1, 1), origin=(1e4, 1e4, 1e4))
    with pytest.raises(EvaluationError, match="on another grid than the reference .* none of its labels lands on it"):
        rois_from_labels(other, source)
    o = np.asarray(source.origin)
    box = rois_from_boxes([{"name": "nodule", "min": list(o + [7.0, 14.0, 1.0]), "max": list(o + [14.0, 21.0, 3.0])}], source)[0]
    assert box.name == "nodule" and box.box == (1, 4, 20, 31, 10, 21)
    with pytest.raises(EvaluationError, match="outside the image"):
        rois_from_boxes([{"min": [1e4, 1e4, 1e4], "max": [2e4, 2e4, 2e4]}], source)
    body = body_slice_rois(source)
    assert len(body) == source.shape[0] and all(r.group == "whole image" for r in body)


def test_label_map_on_another_grid_is_resampled_nearest_neighbour():
    """A label map at another resolution, rotated and shifted (another tool's output) lands on the reference's
    voxels as nearest-neighbour lookup in physical space predicts, voxel by voxel, with a warning; labels outside
    the reference are named."""
    import warnings

    reference = CTVolume(hu=np.zeros((5, 12, 14), np.float32), spacing=(0.8, 0.7, 1.5), origin=(-3.3, 2.1, 10.4))
    angle = 0.3
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    spacing, origin = np.array([1.3, 1.1, 2.2]), np.array([-4.05, 0.93, 9.71])
    rng = np.random.default_rng(3)
    values = np.zeros((4, 10, 11), np.float32)
    values[1:3, 2:8, 3:9] = rng.integers(1, 4, (2, 6, 6))
    values[3, 9, 10] = 7  # far corner: outside the reference
    labels = CTVolume(hu=values, spacing=tuple(spacing), origin=tuple(origin), direction=tuple(direction.ravel()), source="other.nrrd")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rois = rois_from_labels(labels, reference)
    assert any("resampled onto it (nearest neighbour); label(s) 7 fall outside" in str(w.message) for w in caught)
    # independent prediction: each reference voxel centre -> physical point -> nearest label voxel
    k, j, i = np.meshgrid(*(np.arange(n) for n in reference.shape), indexing="ij")
    points = np.stack([i, j, k], -1) @ (reference.direction_matrix * np.asarray(reference.spacing)).T + reference.origin
    index = np.rint((points - origin) @ np.linalg.inv(direction * spacing).T).astype(int)
    inside = np.all((index >= 0) & (index < np.array(values.shape[::-1])), axis=-1)
    expected = np.zeros(reference.shape, np.int64)
    expected[inside] = values[index[inside][:, 2], index[inside][:, 1], index[inside][:, 0]]
    fractional = np.abs((points - origin) @ np.linalg.inv(direction * spacing).T % 1 - 0.5)
    assert fractional.min() > 1e-3  # no voxel centre on a rounding tie, so the prediction is unambiguous
    assert len(rois) == len(np.unique(expected[expected != 0])) >= 2
    for roi in rois:
        mask = np.zeros(reference.shape, bool)
        z0, z1, y0, y1, x0, x1 = roi.box
        mask[z0:z1, y0:y1, x0:x1] = roi.mask
        np.testing.assert_array_equal(mask, expected == int(roi.name[len("label"):]))


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
    rois = sample_hu_rois(target, ((-900.0, -700.0), (-100.0, 250.0)), per_range=10, size_mm=7.0, slices=2, seed=3)
    nine = [ROI(f"nine #{k}", "nine", r.box, r.mask) for k, r in enumerate(rois[:9])]  # one short of a count
    result = evaluate(target, {"input": source, "itself": target}, rois + nine, params=fast_params, workers=2,
                      bootstrap=20, reference_name="B50")
    groups = result.summary["groups"]
    assert list(groups) == ["[-900, -700]", "[-100, 250]", "nine"] and groups["[-900, -700]"]["rois"] == 10
    for group in ("[-900, -700]", "[-100, 250]"):
        itself, given = groups[group]["itself"], groups[group]["input"]
        assert itself["reproducible"] + itself["excluded_undefined"] == len(result.feature_names)  # identical: all of them
        assert itself["interval"] == [itself["reproducible"]] * 2
        assert given["reproducible"] < itself["reproducible"]  # another kernel: fewer
        assert given["interval"][0] <= given["interval"][1] <= itself["reproducible"]
        assert set(given["by_class"]) == {"firstorder", "glcm"} and set(given["by_image_type"]) == {"original"}
    assert groups["nine"] == {"rois": 9, "too_small": "only 9 ROI(s); a count needs at least 10"}
    assert ("nine", "input") not in result.ccc
    table = format_counts(result.summary)
    count = groups["[-100, 250]"]["input"]
    lo, hi = count["interval"]
    row = next(line for line in table.splitlines() if line.startswith("input"))
    assert f"{count['reproducible']} [{lo:.0f}, {hi:.0f}] {count['bootstrap_mean']:.0f} +- {count['bootstrap_sd']:.0f}" in row
    assert "too small" in row and "nine (9 ROIs)" in table
    assert result.summary["image_metrics"]["itself"]["psnr_db"] == float("inf")
    out = write_report(result, tmp_path / "report", {"B50": target, "input": source, "itself": target})
    with open(out / "ccc.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * len(result.feature_names) and set(rows[0]) >= {"group", "feature", "input", "itself"}
    assert all("," not in r["input"] for r in rows)  # '.' decimals
    float(rows[0]["input"])
    with open(out / "features.csv") as fh:
        assert sum(1 for _ in fh) == 1 + 3 * (len(rois) + 9) * len(result.feature_names)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pyradiomics_version"] and summary["seed"] == 0
    assert summary["groups"]["nine"]["too_small"] and summary["groups"]["[-100, 250]"]["input"]["interval"] == [lo, hi]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Table 1" in page and "pyradiomics" in page
    assert "<i>too small</i>" in page and f"<b>{count['reproducible']}</b> <small>[{lo:.0f}, {hi:.0f}]</small>" in page


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
    assert "labels (3 ROIs)" in printed and "group labels: too small" in printed and "PSNR" in printed
    assert (tmp_path / "r" / "report.html").is_file()
    assert main(["evaluate", "--reference", str(tmp_path / "b50.nrrd"), "--candidate", f"input={tmp_path / 'b30.nrrd'}",
                 "--out", str(tmp_path / "r")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    write_map(np.zeros(target.shape), target, tmp_path / "empty.nrrd")
    assert main(["evaluate", "--reference", str(tmp_path / "b50.nrrd"), "--candidate", f"input={tmp_path / 'b30.nrrd'}",
                 "--labels", str(tmp_path / "empty.nrrd"), "--out", str(tmp_path / "r2")]) == 2
    assert "label map is empty" in capsys.readouterr().err


def test_workers_are_bounded_by_the_memory_each_needs():
    """Each worker holds a copy of every volume: four 512x512x300 float32 CTs (1.2 GiB) on a 64-core machine with
    8 GiB free get 4 workers, not 64; without a memory figure, one per core; --workers is taken as given."""
    from radiomicgan.reproducibility import WORKER_OVERHEAD_BYTES, plan_workers

    volumes = 4 * 512 * 512 * 300 * 4
    n, why = plan_workers(volumes, 1000, cores=64, available=8 * 2**30)
    assert n == 8 * 2**30 // (volumes + WORKER_OVERHEAD_BYTES) == 4 and "bounded by memory" in why and "8.0 GiB available" in why
    assert plan_workers(volumes, 1000, cores=64, available=8 * 2**30, max_memory=2 * 2**30)[0] == 1
    assert "--max-memory" in plan_workers(volumes, 1000, cores=64, available=8 * 2**30, max_memory=4 * 2**30)[1]
    assert plan_workers(1000, 1000, cores=2, available=64 * 2**30) == (2, plan_workers(1000, 1000, cores=2, available=64 * 2**30)[1])
    assert plan_workers(1000, 1, cores=8, available=64 * 2**30)[0] == 1  # never more workers than measurements
    assert plan_workers(volumes, 1000, cores=3)[0] == 3 and "unknown" in plan_workers(volumes, 1000, cores=3)[1]
    assert plan_workers(volumes, 1000, requested=5, cores=2, available=1)[0] == 5


def test_evaluate_progress_says_how_many_workers_and_why(scans, fast_params, tmp_path, capsys):
    source, target, labels = scans
    write_volume(target, tmp_path / "b50.nrrd")
    write_volume(source, tmp_path / "b30.nrrd")
    write_map(np.where(labels == 3, 1, 0), target, tmp_path / "labels.nrrd")
    args = ["evaluate", "--reference", str(tmp_path / "b50.nrrd"), "--candidate", f"input={tmp_path / 'b30.nrrd'}",
            "--labels", str(tmp_path / "labels.nrrd"), "--params", str(fast_params), "--bootstrap", "2", "--max-memory", "600M"]
    assert main([*args, "--out", str(tmp_path / "r"), "--progress-json"]) == 0
    from radiomicgan.jobs import parse_progress

    first = next(r for r in map(parse_progress, capsys.readouterr().err.splitlines()) if r)
    assert first["stage"] == "features" and first["workers"] == 1  # 600 MiB: room for one worker
    assert "bounded by memory" in first["workers_reason"] and "--max-memory" in first["workers_reason"]
    assert main([*args, "--out", str(tmp_path / "r2")]) == 0
    assert "radiomicgan: note: 1 worker process: bounded by memory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*args[:-2], "--max-memory", "lots", "--out", str(tmp_path / "r3")])
    assert exit_info.value.code == 2 and "expected a size" in capsys.readouterr().err
