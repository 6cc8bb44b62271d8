"""Cohort mode: discovery and skip reasons on a tree with odd members, QA rows, features per ROI, resuming after
kill -9, the lock, failed scans in the exit status, ComBat learned on training scans only, torchrun shards."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import REPO, make_ct_dataset, save_dataset, write_ct_series
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from radiomicgan.cli import main
from radiomicgan.cohort import (
    EXIT_SCANS_FAILED_BASE,
    QA_COLUMNS,
    CohortLock,
    discover,
    exit_status,
    marker_path,
    read_qa_csv,
    run_cohort,
)
from radiomicgan.errors import RadiomicGANError
from radiomicgan.io import read_volume, write_map
from radiomicgan.simulate import phantom_pair, simulate_phantom_pairs
from radiomicgan.train import TrainConfig, train

PARAMS = REPO / "radiomicgan" / "data" / "radiomics_cohort.yaml"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model with a discriminator (B30 -> B50), so QA rows carry its "standard" probability and Grad-CAM hot
    fraction too: pix2pix, the same PatchGAN discriminator as RadiomicGAN's, without the VGG-19 encoder that takes
    seconds to build (a cohort run with a RadiomicGAN model: the demo, README)."""
    root = tmp_path_factory.mktemp("cohort_model")
    simulate_phantom_pairs(root / "pairs", cases=2, size=32, slices=2, seed=3)
    config = TrainConfig(method="pix2pix", epochs=1, steps_per_epoch=2, batch=2, crop=32, schedule="none",
                         val_slices=1, device="cpu")
    train(root / "pairs", root / "model", config, progress=False)
    return root / "model"


@pytest.fixture(scope="module")
def filter_model(tmp_path_factory):
    """The closed-form filter (B30 -> B50): fitted in a second, harmonizes in milliseconds."""
    root = tmp_path_factory.mktemp("cohort_filter")
    simulate_phantom_pairs(root / "pairs", cases=1, size=32, slices=2, seed=3)
    train(root / "pairs", root / "model", TrainConfig(method="filter"), progress=False)
    return root / "model"


def _phantom(seed, kernel="B30"):
    source, target, labels = phantom_pair(size=32, slices=4, seed=seed)
    return (source if kernel == "B30" else target).hu, labels


def _series(folder: Path, hu, kernel, patient="P1", study=None, **kwargs):
    return write_ct_series(folder, hu, kernel=kernel, shuffle=False, spacing_z=1.0, **kwargs)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """patient1: B30 and B50 of one scan; patient2: a B30 scan (with ROIs in the CSV); odd members: an MR series, a
    CT localizer, a CT series of two slices, a corrupt DICOM file, a series compressed in a syntax without decoder, a
    B70 series, a series with a missing slice (fails on reading), a text file."""
    root = tmp_path_factory.mktemp("cohort_tree") / "study"
    hu1, labels1 = _phantom(1)
    _series(root / "patient1" / "b30", hu1, "B30f")
    _series(root / "patient1" / "b50", _phantom(1, "B50")[0], "B50f")
    hu2, labels2 = _phantom(2)
    _series(root / "patient2" / "b30", hu2, "B30f")
    _series(root / "patient3" / "mr", hu1, "B30f", modality="MR")
    _series(root / "patient3" / "two", hu1[:2], "B30f")
    _series(root / "patient3" / "b70", hu1, "B70f")
    _series(root / "patient3" / "gap", hu1, "B30f", positions=[(0, 0, z) for z in (0.0, 1.0, 2.0, 5.0)])
    scout = make_ct_dataset(np.full((32, 32), 1000, np.uint16), (0, 0, 0), series_uid=generate_uid(), study_uid=generate_uid(),
                            instance=1, kernel="B30f")
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    (root / "patient3" / "scout").mkdir(parents=True)
    save_dataset(scout, root / "patient3" / "scout" / "scout.dcm")
    _series(root / "patient3" / "mpeg2", hu1, "B30f")  # a compressed syntax no installed decoder reads
    for f in (root / "patient3" / "mpeg2").iterdir():
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID("1.2.840.10008.1.2.4.100")
        ds.PixelData = encapsulate([b"\x00\x01" * 50])
        ds["PixelData"].VR = "OB"
        save_dataset(ds, f)
    good = root / "patient1" / "b30" / "file000.dcm"
    (root / "patient3" / "broken").mkdir()
    (root / "patient3" / "broken" / "cut.dcm").write_bytes(good.read_bytes()[:400])
    (root / "notes.txt").write_text("not an image\n")
    rois = root.parent / "rois"
    rois.mkdir()
    write_map(np.where(np.isin(labels2, (1, 3)), labels2, 0), read_volume(root / "patient2" / "b30"), rois / "patient2.nrrd")
    with open(root.parent / "cohort.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "roi", "batch"])
        writer.writerow(["study/patient1/b30", "", "siteA"])
        writer.writerow(["study/patient1/b50", "", "siteA"])
        writer.writerow(["study/patient2/b30", "rois/patient2.nrrd", "siteB"])
    return root


EXPECTED = {
    "patient1/b30": ("harmonized", ""),
    "patient1/b50": ("reference", "already the model's target kernel (B50): measured, not harmonized"),
    "patient2/b30": ("harmonized", ""),
    "patient3/b70": ("skipped", "kernel 'B70f' (B70): the model converts B30 to B50"),
    "patient3/broken/cut.dcm": ("skipped", "unreadable"),
    "patient3/gap": ("failed", "uneven slice spacing"),
    "patient3/mpeg2": ("skipped", "compressed without decoder: compressed transfer syntax 1.2.840.10008.1.2.4.100"),
    "patient3/mr": ("skipped", "not CT (modality MR)"),
    "patient3/scout": ("skipped", "localizer (scout) image, not a volume"),
    "patient3/two": ("skipped", "too few slices (2; at least 3)"),
}


def test_discovery_lists_every_series_with_its_reason(tree):
    scans = {s.id: s for s in discover(tree, "B30", "B50")}
    assert set(scans) == set(EXPECTED)  # the text file is no scan
    for scan_id, (status, reason) in EXPECTED.items():
        expected = "todo" if status in ("harmonized", "failed") else status
        assert scans[scan_id].status == expected, scan_id
        if status == "skipped":
            assert scans[scan_id].reason.startswith(reason), (scan_id, scans[scan_id].reason)
    b30 = scans["patient1/b30"]
    assert b30.shape == (4, 32, 32) and b30.kernel == "B30f" and b30.patient_id == "P0001" and len(b30.files) == 4


def test_cohort_run_qa_rows_outputs_and_inputs_untouched(tree, model, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in tree.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    code = main(["cohort", str(tree), "--model", str(model), "--out", str(out), "--workers", "1", "--device", "cpu"])
    assert code == exit_status(1) == EXIT_SCANS_FAILED_BASE + 1  # the gap series failed, alone
    rows = {r["scan"]: r for r in read_qa_csv(out / "qa.csv")}
    assert list(read_qa_csv(out / "qa.csv")[0]) == list(QA_COLUMNS)
    for scan_id, (status, reason) in EXPECTED.items():
        assert rows[scan_id]["status"] == status, scan_id
        assert reason in rows[scan_id]["reason"], (scan_id, rows[scan_id]["reason"])
    done = rows["patient1/b30"]
    assert done["kernel_before"] == "B30f" and done["kernel_after"] == "B50"
    assert float(done["seconds"]) > 0 and 0 <= float(done["p_standard_input"]) <= 1 and 0 <= float(done["hot_fraction_result"]) <= 1
    for key in ("hu_shift_lung", "outline_shift_body_px", "outline_shift_lung_px"):  # (32 px: no soft-tissue interior)
        assert np.isfinite(float(done[key]))
    # the output mirrors the tree, as a derived DICOM series with the same geometry
    result = read_volume(out / done["output"])
    source = read_volume(tree / "patient1" / "b30")
    assert done["output"] == "harmonized/patient1/b30" and result.same_geometry(source)
    assert not np.array_equal(result.hu, source.hu) and result.meta.kernel == "B50"
    assert not (out / "harmonized" / "patient1" / "b50").exists()  # the reference scan is measured, not written
    # failed and flagged first in the table
    statuses = [r["status"] for r in read_qa_csv(out / "qa.csv")]
    assert statuses[0] == "failed" or read_qa_csv(out / "qa.csv")[0]["flagged"] == "True"
    report = (out / "report.html").read_text()
    assert "patient3/gap" in report and "data:image/png;base64," in report and "<script" not in report
    assert json.loads((out / "cohort.json").read_text())["counts"] == {"harmonized": 2, "reference": 1, "skipped": 6,
                                                                        "failed": 1, "flagged": sum(r["flagged"] == "True" for r in rows.values())}
    assert {p: p.stat().st_mtime_ns for p in tree.rglob("*") if p.is_file()} == before  # inputs never modified
    assert not [p for p in out.rglob(".*") if p.name != ".cohort.lock"]  # nothing half-written


def test_csv_with_rois_gives_features_for_input_and_result(tree, filter_model, tmp_path):
    out = tmp_path / "out"
    result = run_cohort(tree.parent / "cohort.csv", filter_model, out, device="cpu", workers=1, rois="labels", params=str(PARAMS), log=None)
    assert result.failed == 0
    rows = {r["scan"]: r for r in result.rows}
    assert rows["study/patient2/b30"]["rois"] > 0 and rows["study/patient1/b30"]["rois"] == 0
    assert rows["study/patient2/b30"]["batch"] == "siteB"
    with open(out / "features.csv", newline="") as fh:
        features = list(csv.DictReader(fh))
    assert {f["scan"] for f in features} == {"study/patient2/b30"}
    assert {f["image"] for f in features} == {"input", "result"}
    labels = {f["roi"] for f in features}
    assert labels == {"label 1", "label 3"}  # soft tissue and lung of the phantom's label map
    mean = {(f["image"], f["roi"]): float(f["value"]) for f in features if f["feature"] == "original_firstorder_Mean"}
    assert any(abs(mean[("input", r)] - mean[("result", r)]) > 0 for r in labels)  # features of two different images


def test_lock_refuses_a_second_run(tree, filter_model, tmp_path, capsys):
    out = tmp_path / "out"
    with CohortLock(out):
        code = main(["cohort", str(tree), "--model", str(filter_model), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another cohort run" in err[0]
    assert not (out / "qa.csv").exists()
    listing = tmp_path / "inside.csv"  # a CSV that lists the folder the output would be written into
    listing.write_text(f"path\n{tree / 'patient1' / 'b30'}\n")
    with pytest.raises(RadiomicGANError, match="inside the input folder"):
        run_cohort(listing, filter_model, tree / "patient1" / "b30" / "out", device="cpu", log=None)
    assert not (tree / "patient1" / "b30" / "out").exists()
    with pytest.raises(RadiomicGANError, match="another cohort run"):
        with CohortLock(out):
            with CohortLock(out):
                pass


def test_qa_measures_pass_a_kernel_change_and_flag_a_hu_shift():
    from radiomicgan.cohort import qa_flags, qa_measures

    source, target, _ = phantom_pair(size=64, slices=3, seed=4)
    kernel_change = qa_measures(source, target.hu)  # the same scan in the target kernel: what a perfect model gives
    assert abs(kernel_change["hu_shift_soft_tissue"]) < 5 and abs(kernel_change["hu_shift_lung"]) < 5
    assert qa_flags(kernel_change) == []
    body = source.hu > -500
    shifted = qa_measures(source, np.where(body, target.hu + 30.0, target.hu))  # a model that brightens tissue
    assert 25 < shifted["hu_shift_soft_tissue"] < 35
    assert any(flag.startswith("hu shift soft tissue +") for flag in qa_flags(shifted))
    moved = qa_measures(source, np.roll(target.hu, 4, axis=2))  # a model that moves the anatomy by 4 pixels
    assert moved["outline_shift_body_px"] >= 3 and any("outline shift body" in flag for flag in qa_flags(moved))


def test_hu_range_boxes_as_rois():
    from radiomicgan.cohort import Scan, Settings, _rois
    from radiomicgan.reproducibility import body_mask

    source, _, _ = phantom_pair(size=64, slices=3, seed=5)
    rois = _rois(Scan(id="s", source=""), source, Settings(model="", out="", rois="ranges", per_range=3, roi_size_mm=4.0))
    assert rois and {r.group for r in rois} <= {"[-800, -300]", "[-100, 250]", "[300, 800]"}
    body = body_mask(source)
    for roi in rois:  # wholly inside the body, mostly in the group's range
        z0, z1, y0, y1, x0, x1 = roi.box
        assert body[z0:z1, y0:y1, x0:x1].all()
        lo, hi = (float(v) for v in roi.group.strip("[]").split(","))
        values = source.hu[z0:z1, y0:y1, x0:x1]
        assert np.mean((values >= lo) & (values <= hi)) >= 0.8


def _kill_tree(tmp_path: Path, scans: int) -> Path:
    root = tmp_path / "many"
    for k in range(scans):
        _series(root / f"p{k}", _phantom(10 + k)[0], "B30f")
    return root


def _comparable(out: Path):
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in read_qa_csv(out / "qa.csv")]
    volumes = {r["scan"]: read_volume(out / r["output"]).hu for r in rows if r["output"]}
    return rows, volumes


def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, filter_model):
    tree = _kill_tree(tmp_path, 8)
    command = [sys.executable, "-m", "radiomicgan.cli", "cohort", str(tree), "--model", str(filter_model), "--device", "cpu",
               "--workers", "1"]
    out = tmp_path / "killed"
    process = subprocess.Popen(command + ["--out", str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / "markers").glob("*.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in (out / "markers").glob("*.json")}
    assert 1 <= len(finished) < 8, "the kill must land in the middle of the run"
    assert not (out / "qa.csv").exists()
    assert main(command[3:] + ["--out", str(out)]) == 0  # the same command again, here
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished scans were not redone
    assert len(list((out / "markers").glob("*.json"))) == 8
    assert not [p for p in out.rglob(".*") if p.name != ".cohort.lock"]  # what the kill left staged is gone
    reference = tmp_path / "uninterrupted"
    assert main(command[3:] + ["--out", str(reference)]) == 0
    rows, volumes = _comparable(out)
    rows_ref, volumes_ref = _comparable(reference)
    assert rows == rows_ref and len(volumes) == 8
    for scan_id, hu in volumes.items():
        np.testing.assert_array_equal(hu, volumes_ref[scan_id])


def test_markers_tie_results_to_input_model_and_settings(tmp_path, filter_model):
    import shutil

    from radiomicgan.io import write_volume

    tree = _kill_tree(tmp_path, 2)
    source, _, _ = phantom_pair(size=32, slices=4, seed=7)
    write_volume(source, tree / "p9" / "scan.nrrd")  # a research-format scan: its result is an .nrrd too
    out = tmp_path / "out"
    result = run_cohort(tree, filter_model, out, device="cpu", workers=1, log=None, report=False)
    nrrd = {r["scan"]: r for r in result.rows}["p9/scan.nrrd"]
    assert nrrd["status"] == "harmonized" and nrrd["output"] == "harmonized/p9/scan.nrrd"
    harmonized = read_volume(out / nrrd["output"])
    assert harmonized.same_geometry(source) and not np.array_equal(harmonized.hu, np.rint(source.hu))
    stamp = lambda: {p.name: p.stat().st_mtime_ns for p in (out / "markers").glob("*.json")}  # noqa: E731
    first = stamp()
    run_cohort(tree, filter_model, out, device="cpu", workers=1, log=None, report=False)
    assert stamp() == first  # nothing redone
    other = tmp_path / "other_model"
    shutil.copytree(filter_model, other)
    card = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**card, "note": "another model"}))
    run_cohort(tree, other, out, device="cpu", workers=1, log=None, report=False)
    second = stamp()
    assert all(second[name] != first[name] for name in first)  # another model: every scan redone
    hu = read_volume(tree / "p1").hu
    _series(tree / "p1", hu + 1.0, "B30f")  # the input changed (same file names, new pixels)
    run_cohort(tree, other, out, device="cpu", workers=1, log=None, report=False)
    third = stamp()
    changed = {name for name in second if third[name] != second[name]}
    assert changed == {marker_path(out, "p1").name}
    assert len(second) == 3
    marker = json.loads(marker_path(out, "p1").read_text())
    assert marker["scan"] == "p1" and len(marker["input_hash"]) == len(marker["model_hash"]) == 64


def test_torchrun_two_cpu_processes_give_the_same_report(tmp_path, filter_model):
    tree = _kill_tree(tmp_path, 3)
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["cohort", str(tree), "--model", str(filter_model), "--device", "cpu", "--workers", "1"]
    assert main(args + ["--out", str(one)]) == 0
    import socket

    with socket.socket() as probe:  # a free port: another run of the suite may be using torchrun's default
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                    "-m", "radiomicgan.cli", *args, "--out", str(two)], env=ENV, check=True, capture_output=True, timeout=240)
    rows_one, volumes_one = _comparable(one)
    rows_two, volumes_two = _comparable(two)
    assert rows_one == rows_two and set(volumes_one) == set(volumes_two) == {"p0", "p1", "p2"}
    for scan_id in volumes_one:
        np.testing.assert_array_equal(volumes_one[scan_id], volumes_two[scan_id])
    summary = lambda out: {k: v for k, v in json.loads((out / "cohort.json").read_text()).items() if k != "scans"}  # noqa: E731
    assert summary(one) == summary(two)


# ------------------------------------------------------------------------------------------------ statistics


def test_combat_is_learned_on_training_rows_only():
    pytest.importorskip("neuroHarmonize", reason="ComBat is the optional extra 'combat' (make test installs it)")
    from radiomicgan.cohort_stats import combat_learn_apply, model_digest

    rng = np.random.default_rng(0)
    batch = np.array(["A", "B"] * 12)
    x = rng.normal(size=(24, 6)) + np.where(batch == "B", 3.0, 0.0)[:, None]
    train, test = np.arange(16), np.arange(16, 24)
    adjusted, learned = combat_learn_apply(x[train], batch[train], {}, x[test], batch[test], {})
    assert learned["adjusted"] == 6
    # ComBat removes the shift between batches on the test rows
    gap = lambda v, b: abs(v[b == "B"].mean() - v[b == "A"].mean())  # noqa: E731
    assert gap(adjusted, batch[test]) < 0.5 * gap(x[test], batch[test])
    # a test row changed beyond recognition changes neither the model nor the other test rows: nothing leaked
    leaked = x.copy()
    leaked[test[0]] += 100.0
    adjusted2, learned2 = combat_learn_apply(leaked[train], batch[train], {}, leaked[test], batch[test], {})
    assert model_digest(learned2) == model_digest(learned)
    np.testing.assert_allclose(adjusted2[1:], adjusted[1:])
    # and a training row does change it
    moved = x.copy()
    moved[train[0]] += 5.0
    _, learned3 = combat_learn_apply(moved[train], batch[train], {}, moved[test], batch[test], {})
    assert model_digest(learned3) != model_digest(learned)


def _features(values_by_scan: dict) -> list[dict]:
    rows = []
    for (scan, patient, batch), (inputs, results) in values_by_scan.items():
        for image, values in (("input", inputs), ("result", results)):
            for j, value in enumerate(values):
                rows.append({"scan": scan, "patient_id": patient, "study_uid": patient, "batch": batch, "roi": "label 1",
                             "group": "label 1", "image": image, "feature": f"f{j}", "value": value, "reference": batch == "B50"})
    return rows


def test_batch_effect_counts_and_combat_split_by_patient():
    pytest.importorskip("neuroHarmonize", reason="ComBat is the optional extra 'combat' (make test installs it)")
    from radiomicgan.cohort_stats import batch_effect

    rng = np.random.default_rng(1)
    data = {}
    for p in range(16):
        for batch, shift in (("B30", 0.0), ("B50", 4.0)):
            base = rng.normal(size=8)
            shifted = base + np.r_[np.full(4, shift), np.zeros(4)]  # features 0-3 carry the kernel effect
            data[(f"s{p}{batch}", f"P{p}", batch)] = (shifted, base + rng.normal(scale=0.05, size=8))
    stats = batch_effect(_features(data), seed=0)
    assert stats["all_scans"]["input"]["features_differing"] == 4  # exactly the four shifted features
    assert stats["all_scans"]["radiomicgan"]["differ"] == 0
    assert stats["combat"]["available"], stats["combat"]
    assert stats["test_scans"]["combat"]["differ"] < stats["test_scans"]["input"]["differ"]
    split = stats["split"]
    train_patients = {s[1:-3] for s in split["train_scans"]}
    assert not train_patients & {s[1:-3] for s in split["test_scans"]}  # a patient's scans stay on one side
    assert stats["reproducible"]["pairs"] == len(split["test_scans"]) // 2
    # the test scans' values do not reach the learned ComBat models
    leaked = {k: (v[0] + (50.0 if k[0] in split["test_scans"] else 0.0), v[1]) for k, v in data.items()}
    again = batch_effect(_features(leaked), seed=0)
    assert again["combat"]["combat"]["model"] == stats["combat"]["combat"]["model"]
