"""The bad-input battery (issue 8): every class of bad, odd or hostile input ends in one line on stderr and exit
status 2 (a cancel: 130), writes nothing, leaves the inputs bit-identical, and never shows a traceback; and the
silent wrong answers it found (a 2D slice made 3D, HU outside the range, a sheared DICOM slice, ...) stay fixed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import REPO, ramp_volume, write_ct_series

from radiomicgan.baselines import FilterHarmonizer
from radiomicgan.cli import build_parser, main
from radiomicgan.dataset import load_manifest, load_pair
from radiomicgan.harmonize import Harmonizer
from radiomicgan.io import read_volume
from radiomicgan.modelio import load_model
from radiomicgan.simulate import simulate_phantom_pairs
from radiomicgan.train import CANCEL_NAME, TrainConfig, train

FAST_PARAMS = "setting:\n  binWidth: 25\n  label: 1\nimageType:\n  Original: {}\nfeatureClass:\n  firstorder:\n"


# ---------------------------------------------------------------------------------------------- helpers


def run(argv, capsys) -> tuple[int, str, str]:
    """The command line in this process; anything but a clean exit (a traceback) fails the test here."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under the roots, with a hash of each file's bytes."""
    state = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


def assert_user_error(code: int, err: str, *names: str) -> None:
    """Exit 2, one error line (warnings aside) that names the file or option, no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if "warning:" not in line]
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


def write_nrrd(path: Path, array: np.ndarray, pixel_type=np.int16, spacing=None) -> Path:
    image = sitk.GetImageFromArray(np.asarray(array).astype(pixel_type))
    if spacing:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Tiny phantom pairs (16x16x3), a filter model fitted on them, a volume and a DICOM series."""
    root = tmp_path_factory.mktemp("bad_input")
    simulate_phantom_pairs(root / "pairs", cases=2, size=16, slices=3, seed=2)
    train(root / "pairs", root / "filter", TrainConfig(method="filter", schedule="none", val_slices=1), progress=False)
    write_nrrd(root / "vol.nrrd", ramp_volume(3, 16, 16), spacing=(0.7, 0.7, 1.0))
    write_ct_series(root / "dicom", ramp_volume(3, 16, 16))
    (root / "fast.yaml").write_text(FAST_PARAMS)
    simulate_phantom_pairs(root / "pairs32", cases=2, size=32, slices=1, seed=2)  # the smallest a GAN trains on
    return root


@pytest.fixture
def work(data, tmp_path) -> Path:
    """A scratch folder; the shared data's state is checked unchanged after each test."""
    before = snapshot(data)
    yield tmp_path
    assert snapshot(data) == before, "an input was modified"


# ---------------------------------------------------------------------------------------------- data loss


def test_dicom_overwrite_replaces_only_this_tools_series(data, work, capsys):
    out = work / "harmonized"
    assert run(["harmonize", data / "dicom", "--model", data / "filter", "--out", out], capsys)[0] == 0
    assert run(["harmonize", data / "dicom", "--model", data / "filter", "--out", out, "--overwrite"], capsys)[0] == 0  # its own
    (out / "notes.txt").write_text("my notes")
    before = snapshot(work)
    code, _, err = run(["harmonize", data / "dicom", "--model", data / "filter", "--out", out, "--overwrite"], capsys)
    assert_user_error(code, err, out, "notes.txt")
    code, _, err = run(["simulate", "--from", data / "dicom", "--kernel", "B50", "--out", out, "--overwrite"], capsys)
    assert_user_error(code, err, out, "notes.txt")
    assert snapshot(work) == before and (out / "notes.txt").read_text() == "my notes"


def test_report_and_phantom_overwrite_keep_user_files(data, work, capsys):
    for folder in ("report", "pairs"):
        (work / folder).mkdir()
        (work / folder / "notes.txt").write_text("mine")
    before = snapshot(work)
    code, _, err = run(["evaluate", "--reference", data / "vol.nrrd", "--candidate", f"a={data / 'vol.nrrd'}", "--out",
                        work / "report", "--params", data / "fast.yaml", "--per-range", 3, "--bootstrap", 0, "--workers", 1,
                        "--whole-image", "--overwrite"], capsys)
    assert_user_error(code, err, "notes.txt")
    code, _, err = run(["simulate", "--out", work / "pairs", "--size", 16, "--slices", 1, "--overwrite"], capsys)
    assert_user_error(code, err, "notes.txt")
    assert snapshot(work) == before


# ---------------------------------------------------------------------------------------------- wrong answers


def test_evaluate_candidate_names_unique_and_not_the_reference(data, work, capsys):
    vol = data / "vol.nrrd"
    code, _, err = run(["evaluate", "--reference", vol, "--candidate", f"reference={vol}", "--out", work / "r"], capsys)
    assert_user_error(code, err, "reference")
    code, _, err = run(["evaluate", "--reference", vol, "--candidate", f"a={vol}", "--candidate", f"a={vol}",
                        "--out", work / "r"], capsys)
    assert_user_error(code, err, "a=")
    assert not any(work.iterdir())


def test_2d_input_keeps_its_dimensionality(data, work, capsys):
    image = sitk.GetImageFromArray(ramp_volume(1, 16, 16)[0].astype(np.int16))
    image.SetSpacing((0.6, 0.8))
    image.SetOrigin((-3.0, 4.0))
    image.SetDirection((0.0, 1.0, 1.0, 0.0))
    sitk.WriteImage(image, str(work / "slice.nrrd"))
    assert run(["harmonize", work / "slice.nrrd", "--model", data / "filter", "--out", work / "h.nrrd"], capsys)[0] == 0
    assert run(["simulate", "--from", work / "slice.nrrd", "--kernel", "B50", "--source-kernel", "B30",
                "--out", work / "s.nrrd"], capsys)[0] == 0
    for name in ("h.nrrd", "s.nrrd"):
        out = sitk.ReadImage(str(work / name))
        assert out.GetDimension() == 2 and out.GetSize() == image.GetSize()
        assert np.allclose(out.GetSpacing(), image.GetSpacing()) and np.allclose(out.GetOrigin(), image.GetOrigin())
        assert np.allclose(out.GetDirection(), image.GetDirection())


def test_hu_outside_the_range_carried_over_and_air_floor_kept(data, work, capsys):
    hu = ramp_volume(3, 16, 16)
    hu[:, :3, :] = -3024  # padding outside the field of view
    hu[1, 8, 8] = 3900  # metal
    write_nrrd(work / "odd.nrrd", hu)
    assert run(["harmonize", work / "odd.nrrd", "--model", data / "filter", "--out", work / "h.nrrd"], capsys)[0] == 0
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "h.nrrd")))
    assert np.all(out[:, :3, :] == -3024) and out[1, 8, 8] == 3900
    assert out[hu >= -1024].min() >= -1024 and out.max() <= 3900
    # the filter never writes below the air floor on an ordinary scan either
    source, _ = load_pair(load_manifest(data / "pairs").pairs[0])
    harmonized = Harmonizer(load_model(data / "filter"), device="cpu").harmonize(source.hu, source.spacing[:2])
    assert harmonized.min() >= -1024


def test_filter_baseline_pads_before_its_fft(tmp_path):
    """A cut-out harmonized alone matches the same region of the harmonized whole near its border (no
    wrap-around from the opposite edge). Unpadded, the border ring was off by 865 HU on average here."""
    simulate_phantom_pairs(tmp_path / "p", cases=1, size=96, slices=1, seed=0)
    source, target = load_pair(load_manifest(tmp_path / "p").pairs[0])
    spacing = source.spacing[:2]
    model = FilterHarmonizer.fit([(source.hu, target.hu, spacing)], 0.5 / min(spacing))
    whole = model.harmonize(source.hu, spacing)[:, 10:73, 20:81]
    cut = model.harmonize(source.hu[:, 10:73, 20:81], spacing)
    difference = np.abs(cut - whole)
    ring = np.concatenate([difference[:, 0].ravel(), difference[:, -1].ravel(), difference[:, :, 0].ravel(), difference[:, :, -1].ravel()])
    assert cut.shape == whole.shape
    assert ring.mean() < 150 and difference[:, 8:-8, 8:-8].max() < 30


def test_dicom_pixel_data_longer_than_header_is_refused(work, capsys):
    write_ct_series(work / "scan", ramp_volume(3, 16, 16))
    bad = sorted((work / "scan").iterdir())[1]
    ds = pydicom.dcmread(bad)
    ds.PixelData = ds.PixelData + b"\0" * 64
    ds.save_as(bad)
    before = snapshot(work)
    code, _, err = run(["simulate", "--from", work / "scan", "--kernel", "B50", "--out", work / "o.nrrd"], capsys)
    assert_user_error(code, err, bad.name, "pixel data")
    assert snapshot(work) == before


def test_uint8_refused_and_narrow_hu_span_accepted_with_a_warning(work, capsys):
    write_nrrd(work / "u8.nrrd", np.linspace(0, 255, 16 * 16 * 3).reshape(3, 16, 16), np.uint8)
    write_nrrd(work / "liver.nrrd", np.linspace(10, 69, 16 * 16 * 3).reshape(3, 16, 16), np.int16)
    before = snapshot(work)
    code, _, err = run(["simulate", "--from", work / "u8.nrrd", "--kernel", "B50", "--source-kernel", "B30",
                        "--out", work / "o.nrrd"], capsys)
    assert_user_error(code, err, "u8.nrrd", "8-bit")
    assert snapshot(work) == before
    with pytest.warns(UserWarning, match=r"liver.nrrd: values span only \[10, 69\]; assumed Hounsfield units"):
        code, _, err = run(["simulate", "--from", work / "liver.nrrd", "--kernel", "B50", "--source-kernel", "B30",
                            "--out", work / "o.nrrd"], capsys)
    assert code == 0 and (work / "o.nrrd").is_file()


def test_train_cancel_exits_130_keeps_the_last_epoch_and_the_users_folder(data, work, capsys):
    tiny = ["--pairs", data / "pairs32", "--method", "pix2pix", "--schedule", "none", "--epochs", 2, "--steps-per-epoch", 1,
            "--batch", 1, "--crop", 32, "--val-slices", 1, "--device", "cpu"]
    (work / "mine").mkdir()
    (work / "mine" / CANCEL_NAME).write_text("")
    code, _, err = run(["train", *tiny, "--out", work / "mine"], capsys)
    assert code == 130 and "cancelled" in err and "Traceback" not in err
    assert (work / "mine").is_dir() and not any((work / "mine").iterdir())  # the flag was consumed, the folder stays
    (work / "flag").write_text("")
    code, _, err = run(["train", *tiny, "--out", work / "new", "--cancel-file", work / "flag"], capsys)
    assert code == 130 and not (work / "new").exists()  # a folder it made itself, with no epoch: gone
    # cancelled after the first epoch: that epoch stays loadable, and the card says cancelled
    config = TrainConfig(method="pix2pix", schedule="none", epochs=3, steps_per_epoch=1, batch=1, crop=32, val_slices=1,
                         device="cpu")
    card = train(data / "pairs32", work / "run", config, progress=False,
                 on_epoch=lambda record: (work / "run" / CANCEL_NAME).write_text(""))
    assert card.training.status == "cancelled" and card.training.epochs_done == 1
    assert load_model(work / "run").card.training.epochs_done == 1 and not (work / "run" / CANCEL_NAME).exists()


def test_readme_commands_parse_as_written_and_run_on_tiny_data(data, work, capsys, monkeypatch):
    readme = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("radiomicgan "):
                commands.append(re.sub(r"\[([^\]]*)\]", r"\1", line))  # optional parts written out
    assert any("--ranges -800:-300 -100:250 300:800" in c for c in commands)
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command)[1:]
        argv = [a for a in argv if a != "|"]
        # "--labels x | --boxes y | --ranges ..." are alternatives: keep the last one
        if "--labels" in argv and "--ranges" in argv:
            start, stop = argv.index("--labels"), argv.index("--ranges")
            argv = argv[:start] + argv[stop:]
        args = parser.parse_args(argv)  # raises SystemExit on any usage error
        if args.command == "evaluate" and args.ranges:
            assert args.ranges == [(-800.0, -300.0), (-100.0, 250.0), (300.0, 800.0)]
    # the ones that need no trained model and little time, run as written in a folder with tiny data
    monkeypatch.chdir(work)
    write_ct_series(work / "scan_dicom", ramp_volume(3, 16, 16), kernel="B30f")
    write_ct_series(work / "sharp_scans" / "patient1", ramp_volume(3, 16, 16), kernel="B50f")
    for command in commands:
        if command.startswith(("radiomicgan info ", "radiomicgan simulate --from ")):
            code, _, err = run(shlex.split(command)[1:], capsys)
            assert code == 0, (command, err)
    assert read_volume(work / "scan_b70").meta.kernel.startswith("B70")


# ---------------------------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("argv, option", [
    (["evaluate", "--bootstrap", "-5"], "--bootstrap"),
    (["evaluate", "--threshold", "2"], "--threshold"),
    (["harmonize", "--th-fail", "nan"], "--th-fail"),
    (["train", "--th-fail", "5"], "--th-fail"),
    (["train", "--hu-range", "1000", "-1024"], "--hu-range"),
    (["train", "--hu-range", "100", "100"], "--hu-range"),
    (["train", "--hu-range", "A", "A"], "--hu-range"),
    (["train", "--device", "tpu"], "--device"),
    (["harmonize", "--device", "tpu"], "--device"),
    (["train", "--lr", "inf"], "--lr"),
    (["calibrate", "--spacing", "-1"], "--spacing"),
])
def test_numeric_options_checked_at_parse_time(data, work, capsys, argv, option):
    required = {"evaluate": ["--reference", data / "vol.nrrd", "--candidate", f"a={data / 'vol.nrrd'}", "--out", work / "r"],
                "harmonize": [data / "vol.nrrd", "--model", data / "filter", "--out", work / "o.nrrd"],
                "train": ["--pairs", data / "pairs", "--out", work / "m"],
                "calibrate": [f"A={data / 'vol.nrrd'}", f"B={data / 'vol.nrrd'}", "--out", work / "c"]}[argv[0]]
    code, _, err = run([argv[0], *required, *argv[1:]], capsys)
    assert_user_error(code, err, option)
    assert not any(work.iterdir())


def test_filter_refuses_a_window_schedule(data, work, capsys):
    code, _, err = run(["train", "--pairs", data / "pairs", "--out", work / "m", "--method", "filter", "--schedule", "dwt"], capsys)
    assert_user_error(code, err, "--schedule dwt", "filter")
    assert not any(work.iterdir())


def test_output_paths_the_system_refuses_are_one_line(data, work, capsys):
    (work / "afile").write_text("a file, not a folder")
    vol, long_name = data / "vol.nrrd", "x" * 300
    outputs = [work / "afile" / "out", work / long_name]
    if os.geteuid() != 0:  # root writes anywhere: an unwritable folder can only be tried as a user
        (work / "ro").mkdir(mode=0o500)
        outputs.append(work / "ro" / "out")
    commands = {
        "simulate": lambda out: ["simulate", "--out", out, "--size", 16, "--slices", 1],
        "simulate --from": lambda out: ["simulate", "--from", vol, "--kernel", "B50", "--source-kernel", "B30", "--out", f"{out}.nrrd"],
        "train": lambda out: ["train", "--pairs", data / "pairs", "--out", out, "--method", "histmatch"],
        "harmonize": lambda out: ["harmonize", vol, "--model", data / "filter", "--out", f"{out}.nrrd"],
        "evaluate": lambda out: ["evaluate", "--reference", vol, "--candidate", f"a={vol}", "--out", out],
        "calibrate": lambda out: ["calibrate", f"A={vol}", f"B={vol}", "--out", out],
    }
    before = snapshot(work)
    for name, argv in commands.items():
        for out in outputs:
            code, _, err = run(argv(out), capsys)
            assert_user_error(code, err, str(out)[:40])
    assert snapshot(work) == before


def test_pyradiomics_parameter_file_problems(data, work, capsys):
    (work / "broken.yaml").write_text("setting: [\n")
    (work / "unknown.yaml").write_text("imageType:\n  Bogus: {}\n")
    for params in ("broken.yaml", "unknown.yaml"):
        code, _, err = run(["evaluate", "--reference", data / "vol.nrrd", "--candidate", f"a={data / 'vol.nrrd'}",
                            "--out", work / "r", "--params", work / params], capsys)
        assert_user_error(code, err, params)
    assert not (work / "r").exists()


def test_boxes_whose_corners_are_numbers(data, work, capsys):
    (work / "boxes.json").write_text(json.dumps([{"name": "n", "min": 1, "max": 2}]))
    (work / "dict.json").write_text(json.dumps({"min": [0, 0, 0], "max": [1, 1, 1]}))
    for boxes in ("boxes.json", "dict.json"):
        code, _, err = run(["evaluate", "--reference", data / "vol.nrrd", "--candidate", f"a={data / 'vol.nrrd'}",
                            "--out", work / "r", "--boxes", work / boxes, "--params", data / "fast.yaml"], capsys)
        assert_user_error(code, err, "box")
    assert not (work / "r").exists()


def test_manifest_whose_source_is_a_number(data, work, capsys):
    manifest = json.loads((data / "pairs" / "manifest.json").read_text())
    manifest["pairs"][0]["source"] = 5
    (work / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(["train", "--pairs", work / "manifest.json", "--out", work / "m", "--method", "histmatch"], capsys)
    assert_user_error(code, err, "manifest.json", "source")
    assert not (work / "m").exists()


@pytest.mark.parametrize("card", [[1, 2], "change-hu_range"])
def test_model_card_that_is_a_list_or_has_a_string_range(data, work, capsys, card):
    model = work / "model"
    model.mkdir()
    (model / "weights.pt").write_bytes((data / "filter" / "weights.pt").read_bytes())
    if card == "change-hu_range":
        card = {**json.loads((data / "filter" / "model.json").read_text()), "hu_range": ["-1024", "1000"]}
    (model / "model.json").write_text(json.dumps(card))
    code, _, err = run(["harmonize", data / "vol.nrrd", "--model", model, "--out", work / "o.nrrd"], capsys)
    assert_user_error(code, err, "model.json")
    assert not (work / "o.nrrd").exists()


def test_mhd_output_refused_before_the_work(data, work, capsys):
    code, _, err = run(["harmonize", data / "vol.nrrd", "--model", data / "filter", "--out", work / "o.mhd"], capsys)
    assert_user_error(code, err, work / "o.mhd", ".mhd")
    assert ".partial" not in err and not any(work.iterdir())


def test_radiomicgan_below_its_minimum_size_says_the_minimum(data, work, capsys):
    code, _, err = run(["train", "--pairs", data / "pairs", "--out", work / "m", "--crop", 8, "--vgg-weights", "random"], capsys)
    assert_user_error(code, err, "crop 8", "32")
    code, _, err = run(["train", "--pairs", data / "pairs", "--out", work / "m", "--crop", 32, "--vgg-weights", "random",
                        "--epochs", 1, "--steps-per-epoch", 1, "--batch", 1, "--device", "cpu"], capsys)
    assert_user_error(code, err, "case000_B30.nrrd", "16x16", "32x32")
    assert not any(work.iterdir())


# ---------------------------------------------------------------------------------------------- no traceback


def test_no_subcommand_shows_a_traceback_on_malformed_arguments(data, work, capsys):
    vol, missing = data / "vol.nrrd", work / "missing.nrrd"
    (work / "junk.nrrd").write_bytes(b"not an image")
    malformed = {
        "simulate": [[], ["--out"], ["--out", work / "p", "--size", "x"], ["--from", missing, "--kernel", "B50", "--out", work / "o.nrrd"],
                     ["--from", vol, "--kernel", "Q99", "--out", work / "o.nrrd"], ["--from", vol, "--out", work / "o.nrrd"]],
        "info": [[], [missing], [work / "junk.nrrd"], [work]],
        "calibrate": [[], ["nonsense"], [f"A={vol}"], [f"A={vol}", f"B={missing}"], [f"A={vol}", f"A={vol}"]],
        "train": [[], ["--pairs", missing, "--out", work / "m"], ["--pairs", vol, "--out", work / "m"],
                  ["--pairs", data / "pairs", "--out", work / "m", "--method", "nope"],
                  ["--pairs", data / "pairs", "--out", work / "m", "--epochs", "0"],
                  ["--pairs", data / "pairs", "--out", work / "m", "--resume"]],
        "harmonize": [[], [vol, "--model", work, "--out", work / "o.nrrd"], [missing, "--model", data / "filter", "--out", work / "o.nrrd"],
                      [vol, "--model", data / "filter", "--out", vol], [vol, "--model", data / "filter", "--out", work / "o.xyz"],
                      [vol, "--model", data / "filter", "--out", work / "o.nrrd", "--batch", "-1"],
                      [vol, "--model", data / "filter", "--out", work / "o.nrrd", "--gradcam", work / "cam.txt"]],
        "evaluate": [[], ["--reference", vol, "--candidate", "nonsense", "--out", work / "r"],
                     ["--reference", missing, "--candidate", f"a={vol}", "--out", work / "r"],
                     ["--reference", vol, "--candidate", f"a={vol}", "--out", work / "r", "--ranges", "5:1"],
                     ["--reference", vol, "--candidate", f"a={vol}", "--out", work / "r", "--labels", missing],
                     ["--reference", vol, "--candidate", f"a={vol}", "--out", work / "r", "--boxes", work / "junk.nrrd"]],
        "demo": [["--size", "4"], ["--out", vol]],
        "cohort": [[], [missing, "--model", data / "filter", "--out", work / "c"], [vol, "--model", data / "filter", "--out", work / "c"],
                   [data, "--model", work, "--out", work / "c"], [data, "--model", data / "filter", "--out", data / "c"],
                   [data, "--model", data / "filter", "--out", work / "c", "--workers", "0"],
                   [data, "--model", data / "filter", "--out", work / "c", "--rois", "labels"]],
    }
    assert set(malformed) == set(build_parser()._subparsers._group_actions[0].choices)  # every subcommand is tried
    for command, cases in malformed.items():
        for argv in cases:
            code, _, err = run([command, *argv], capsys)
            assert code == 2 and "Traceback" not in err and err.strip(), (command, argv, err)
    # a second run on an output another run is writing (issue 20): refused in one line, nothing written
    from radiomicgan.cohort import CohortLock
    from radiomicgan.lock import OutputLock

    in_use = {
        "simulate": [work / "busy_pairs", ["--out", work / "busy_pairs", "--cases", 1, "--size", 16, "--slices", 1]],
        "train": [work / "busy_m", ["--pairs", data / "pairs", "--out", work / "busy_m", "--method", "filter"]],
        "harmonize": [work / "busy.nrrd", [vol, "--model", data / "filter", "--out", work / "busy.nrrd"]],
        "evaluate": [work / "busy_r", ["--reference", vol, "--candidate", f"a={vol}", "--out", work / "busy_r"]],
        "demo": [work / "busy_d", ["--out", work / "busy_d", "--size", 16]],
    }
    for command, (out, argv) in in_use.items():
        with OutputLock(out, "test"):
            code, _, err = run([command, *argv], capsys)
        assert_user_error(code, err, out, "another")
        assert not out.exists(), command
    with CohortLock(work / "busy_c"):
        code, _, err = run(["cohort", data, "--model", data / "filter", "--out", work / "busy_c"], capsys)
    assert_user_error(code, err, "busy_c", "another cohort run")
    # a full disk (issue 20; a file-size limit, which fails writes as a full disk does): every subcommand that writes
    # says which output it could not write in one line, and leaves no staging behind
    from helpers import file_size_limit

    big = write_nrrd(work / "big.nrrd", np.random.default_rng(0).integers(-1000, 1000, (3, 64, 64)))
    full = work / "full"
    full_disk = {
        "simulate": [["--out", full / "p", "--cases", 1, "--size", 16, "--slices", 1],
                     ["--from", big, "--kernel", "B50", "--source-kernel", "B30", "--out", full / "s.nrrd"]],
        "calibrate": [[f"B30={big}", f"B50={big}", "--out", full / "cal"]],
        "train": [["--pairs", data / "pairs", "--out", full / "m", "--method", "filter"]],
        "harmonize": [[big, "--model", data / "filter", "--out", full / "h.nrrd"], [data / "dicom", "--model", data / "filter", "--out", full / "d"]],
        "evaluate": [["--reference", vol, "--candidate", f"a={vol}", "--out", full / "r", "--params", data / "fast.yaml",
                      "--per-range", 3, "--bootstrap", 0, "--workers", 1, "--whole-image"]],
        "demo": [["--out", full / "demo", "--size", 16]],
        "cohort": [[data / "pairs32", "--model", data / "filter", "--out", full / "c", "--workers", 1]],
    }
    assert set(full_disk) | {"info"} == set(build_parser()._subparsers._group_actions[0].choices)  # info writes nothing
    for command, cases in full_disk.items():
        for argv in cases:
            with file_size_limit(200):
                code, _, err = run([command, *argv], capsys)
            lines = [line for line in err.strip().splitlines() if "warning:" not in line and "note:" not in line]
            assert code == 2 and "Traceback" not in err and len(lines) == 1, (command, argv, err)
            assert f"cannot write {full}" in lines[0] and "No space left on device" in lines[0], (command, lines[0])
            assert not [p for p in work.rglob("*") if "-partial-" in p.name], (command, sorted(work.rglob("*")))
    # and a real process, as a user runs it: the handler is in main(), not in the tests
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "radiomicgan.cli", "train", "--pairs", data / "pairs", "--out", work / "afile" / "m",
                           "--hu-range", "1", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_gradcam_output_format_checked_before_the_work(data, work, capsys):
    code, _, err = run(["harmonize", data / "vol.nrrd", "--model", data / "filter", "--out", work / "o.nrrd",
                        "--gradcam", work / "cam.mhd"], capsys)
    assert_user_error(code, err, "cam.mhd")
    assert ".partial" not in err and not any(work.iterdir())
