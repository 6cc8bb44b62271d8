"""Faults a user hits on purpose (issue 20): two runs on one output, a resume whose folder is damaged or whose
settings changed, pairs of different sizes, odd DICOM/NRRD headers. Each ends in one line and exit status 2 (or a
warning where the result is still right), never a traceback and never a silently wrong result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import REPO, ramp_volume

from radiomicgan.cli import main
from radiomicgan.lock import OutputLock, lock_path
from radiomicgan.simulate import simulate_phantom_pairs
from radiomicgan.train import TrainConfig, train


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err, *names) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines()
             if "warning:" not in line and "note:" not in line and "randomly initialised" not in line]
    assert code == 2 and len(lines) == 1, (code, err)
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    simulate_phantom_pairs(root / "pairs", cases=2, size=16, slices=3, seed=2)
    simulate_phantom_pairs(root / "pairs32", cases=2, size=32, slices=1, seed=2)
    train(root / "pairs", root / "filter", TrainConfig(method="filter", schedule="none", val_slices=1), progress=False)
    image = sitk.GetImageFromArray(ramp_volume(3, 16, 16).astype(np.int16))
    sitk.WriteImage(image, str(root / "vol.nrrd"))
    return root


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------- item 2: one run per output


def _endless_train(data: Path, out: Path) -> list[str]:
    """A train command that runs (100000 steps) until a stop request arrives on its standard input."""
    return [sys.executable, "-m", "radiomicgan.cli", "train", "--pairs", str(data / "pairs32"), "--out", str(out),
            "--crop", "32", "--vgg-weights", "random", "--epochs", "1", "--steps-per-epoch", "100000", "--batch", "1",
            "--device", "cpu", "--val-slices", "1", "--stop-on-stdin"]


def test_two_trains_started_together_on_one_folder_one_refuses(data, tmp_path):
    out = tmp_path / "model"
    argv = _endless_train(data, out)
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for _ in range(2)]
    try:
        # the loser refuses at once; the winner trains on (100000 steps) until told to stop
        deadline = time.monotonic() + 240
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        err = loser.stderr.read()
        assert loser.returncode == 2 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and "another train run is writing there" in err, err
        assert winner.poll() is None  # still training: the lock is held for the whole run
        winner.stdin.write("stop\n")
        winner.stdin.flush()
        winner.wait(timeout=240)
        assert winner.returncode == 130, winner.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not lock_path(out).exists()  # a finished run leaves only its output


def test_a_stop_request_reaches_a_run_started_with_ctrl_c_ignored(data, tmp_path):
    """A process started in a shell's background (``cmd &``, nohup, Slicer launched that way) inherits SIGINT
    ignored; the stop request, which arrives as SIGINT, must still cancel it (Cancel in the modules)."""
    from radiomicgan.jobs import ExitCode

    out = tmp_path / "model"
    argv = _endless_train(data, out)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 240
        while not lock_path(out).exists():  # the run holds its output: it is training
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        proc.wait(timeout=120)
        assert proc.returncode == ExitCode.CANCELLED, proc.stderr.read()
        assert not lock_path(out).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_killed_run_leaves_no_output_locked(data, tmp_path, capsys):
    out = tmp_path / "o.nrrd"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom radiomicgan.lock import OutputLock\n"
                               f"with OutputLock({str(out)!r}, 'harmonize run'):\n    print('held', flush=True)\n    time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run(["harmonize", data / "vol.nrrd", "--model", data / "filter", "--out", out], capsys)
        one_error_line(code, err, out, "another harmonize run")
        assert not out.exists()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert lock_path(out).exists()  # left by the killed run, but not held: the OS released it
    code, _, err = run(["harmonize", data / "vol.nrrd", "--model", data / "filter", "--out", out], capsys)
    assert code == 0 and out.is_file(), err


def test_evaluate_and_train_outputs_in_use_refused(data, tmp_path, capsys):
    with OutputLock(tmp_path / "report", "evaluate run"):
        code, _, err = run(["evaluate", "--reference", data / "vol.nrrd", "--candidate", f"a={data / 'vol.nrrd'}",
                            "--out", tmp_path / "report"], capsys)
    one_error_line(code, err, "report", "another evaluate run")
    with OutputLock(tmp_path / "m", "train run"):
        code, _, err = run(["train", "--pairs", data / "pairs", "--out", tmp_path / "m", "--method", "filter"], capsys)
    one_error_line(code, err, "another train run")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no lock file left behind


# ---------------------------------------------------------------------------------------------- items 3, 5, 6: resume


@pytest.fixture(scope="module")
def run_folder(data, tmp_path_factory) -> Path:
    """A tiny pix2pix run of one epoch (32x32, one step; a GAN like RadiomicGAN, without its 75 MB of VGG weights):
    something to resume."""
    out = tmp_path_factory.mktemp("run") / "m"
    code = main([str(a) for a in ["train", "--pairs", data / "pairs32", "--out", out, "--method", "pix2pix", "--crop", 32,
                                  "--epochs", 1, "--steps-per-epoch", 1, "--batch", 1, "--device", "cpu", "--val-slices", 1]])
    assert code == 0 and (out / "checkpoint.pt").is_file()
    return out


def resume_argv(data, out, *extra) -> list:
    return ["train", "--pairs", data / "pairs32", "--out", out, "--method", "pix2pix", "--crop", 32, "--epochs", 2,
            "--steps-per-epoch", 1, "--batch", 1, "--device", "cpu", "--val-slices", 1, "--resume", *extra]


@pytest.fixture
def copy_run(run_folder, tmp_path) -> Path:
    import shutil

    out = tmp_path / "m"
    shutil.copytree(run_folder, out)
    return out


def test_resume_without_model_json_names_the_missing_card(data, copy_run, capsys):
    (copy_run / "model.json").unlink()
    code, _, err = run(resume_argv(data, copy_run), capsys)
    line = one_error_line(code, err, "model.json is missing")
    assert "no checkpoint.pt" not in line
    (copy_run / "checkpoint.pt").unlink()
    code, _, err = run(resume_argv(data, copy_run), capsys)
    one_error_line(code, err, "nothing to resume (no checkpoint.pt)")


# ---------------------------------------------------------------------------------------------- item 4: pair sizes


def test_pairs_of_different_sizes_name_the_small_pair_before_training(data, tmp_path, capsys):
    import json

    simulate_phantom_pairs(tmp_path / "small", cases=1, size=16, slices=1, seed=3)
    manifest = json.loads((data / "pairs32" / "manifest.json").read_text())
    small = json.loads((tmp_path / "small" / "manifest.json").read_text())["pairs"][0]
    small = {**small, "id": "tiny", **{k: str(tmp_path / "small" / small[k]) for k in ("source", "target", "labels")}}
    manifest["pairs"] = [{**p, **{k: str(data / "pairs32" / p[k]) for k in ("source", "target", "labels")}} for p in manifest["pairs"]]
    for where, pairs in (("held out", manifest["pairs"] + [small]), ("trained on", [manifest["pairs"][0], small, manifest["pairs"][1]])):
        (tmp_path / "mixed.json").write_text(json.dumps({**manifest, "pairs": pairs}))
        code, _, err = run(["train", "--pairs", tmp_path / "mixed.json", "--out", tmp_path / "m", "--crop", 32, "--vgg-weights",
                            "random", "--epochs", 1, "--steps-per-epoch", 1, "--batch", 1, "--device", "cpu", "--val-slices", 1],
                           capsys)
        one_error_line(code, err, "'tiny'", "16x16", "32x32")
        assert not (tmp_path / "m").exists(), where


# ---------------------------------------------------------------------------------------------- item 6: damaged input


def test_resume_on_a_damaged_run_folder_is_one_line(data, copy_run, capsys):
    import torch

    card, checkpoint = copy_run / "model.json", copy_run / "checkpoint.pt"
    good_card, state = card.read_bytes(), torch.load(checkpoint, map_location="cpu", weights_only=True)
    for text, expected in (("{not json", "not valid JSON"), ("[1, 2]", "a JSON list")):
        card.write_text(text)
        code, _, err = run(resume_argv(data, copy_run), capsys)
        one_error_line(code, err, "model.json", expected)
    card.write_bytes(good_card)
    broken = {"empty": None, "key-less": {}, "a list": [1, 2],
              "another shape": {**state, "generator": {k: (v[..., :1] if v.ndim == 4 and i == 0 else v)
                                                        for i, (k, v) in enumerate(state["generator"].items())}}}
    for what, content in broken.items():
        if content is None:
            checkpoint.write_bytes(b"")
        else:
            torch.save(content, checkpoint)
        code, _, err = run(resume_argv(data, copy_run), capsys)
        one_error_line(code, err, "checkpoint.pt", "cannot resume")
    assert card.read_bytes() == good_card  # the folder is left as it was found


def test_headers_declaring_more_pixels_than_the_file_holds_are_refused_before_reading(data, tmp_path, capsys):
    from helpers import make_ct_dataset, save_dataset

    header = b"NRRD0004\ntype: short\ndimension: 3\nsizes: 12000 12000 16\nspacings: 1 1 1\nencoding: %s\nendian: little\n\n"
    for encoding in (b"raw", b"gzip"):
        path = tmp_path / f"huge_{encoding.decode()}.nrrd"
        path.write_bytes(header % encoding + bytes(200))
        for argv in (["info", path], ["harmonize", path, "--model", data / "filter", "--out", tmp_path / "o.nrrd"]):
            code, _, err = run(argv, capsys)
            one_error_line(code, err, path, "declares 12000 x 12000 x 16")
    ds = make_ct_dataset(np.full((16, 16), 1024, np.uint16), (0, 0, 0), series_uid="1.2.3", study_uid="1.2", instance=1)
    ds.Rows = ds.Columns = 65535
    (tmp_path / "series").mkdir()
    save_dataset(ds, tmp_path / "series" / "s.dcm")
    for path in (tmp_path / "series" / "s.dcm", tmp_path / "series"):
        code, _, err = run(["info", path], capsys)
        one_error_line(code, err, "s.dcm", "declares 65535 x 65535")
    assert not (tmp_path / "o.nrrd").exists()


def test_a_slice_whose_row_and_column_directions_coincide_is_refused(tmp_path, capsys):
    from helpers import make_ct_dataset, save_dataset

    for k, orientation in enumerate([(1, 0, 0, 1, 0, 0), (1, 0, 0, 0, 0, 0), (0, 1, 0, 0, 0.9999999, 0.0001)]):
        ds = make_ct_dataset(np.full((16, 16), 1024, np.uint16), (0, 0, 0), series_uid="1.2.3", study_uid="1.2", instance=1,
                             orientation=orientation)
        save_dataset(ds, tmp_path / f"s{k}.dcm")
        code, _, err = run(["info", tmp_path / f"s{k}.dcm"], capsys)
        one_error_line(code, err, f"s{k}.dcm", "ImageOrientationPatient")


def test_calibrate_crops_under_16_pixels_say_the_minimum(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for n in (8, 15):
        paths = []
        for kernel in ("B30", "B50"):
            paths.append(tmp_path / f"{kernel}_{n}.nrrd")
            sitk.WriteImage(sitk.GetImageFromArray(rng.normal(0, 50, (3, n, n)).astype(np.int16)), str(paths[-1]))
        code, out, err = run(["calibrate", f"B30={paths[0]}", f"B50={paths[1]}", "--fit"], capsys)
        one_error_line(code, err, f"{n}x{n}", "16x16")


# ---------------------------------------------------------------------------------------------- item 5: silent wrong results


def _positions(folder: Path) -> dict[int, np.ndarray]:
    import pydicom

    found = {}
    for f in folder.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        found[int(ds.InstanceNumber)] = np.array([float(v) for v in ds.ImagePositionPatient])
    return found


def test_a_gantry_tilted_series_keeps_its_slice_positions(data, tmp_path, capsys):
    from helpers import write_ct_series

    tilt = np.radians(20)
    positions = [(-100.0, -120.0, 50.0 + 5.0 * k) for k in range(4)]  # the table moves 5 mm; the slice plane is tilted
    write_ct_series(tmp_path / "tilted", ramp_volume(4, 16, 16), positions=positions,
                    orientation=(1, 0, 0, 0, np.cos(tilt), -np.sin(tilt)))
    with pytest.warns(UserWarning, match="gantry tilt of about 20"):
        code, _, err = run(["harmonize", tmp_path / "tilted", "--model", data / "filter", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    before, after = _positions(tmp_path / "tilted"), _positions(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for k in before:  # the result overlays the input slice by slice
        assert np.allclose(before[k], after[k], atol=0.01), (k, before[k], after[k])
    with pytest.warns(UserWarning, match="will not overlay"):  # an image file cannot hold the tilt: said, not silent
        code, _, err = run(["harmonize", tmp_path / "tilted", "--model", data / "filter", "--out", tmp_path / "o.nrrd"], capsys)
    assert code == 0, err
    shifted = [(-100.0 + (3.0 if k == 2 else 0.0), -120.0, 50.0 + 5.0 * k) for k in range(4)]  # one slice moved in-plane
    write_ct_series(tmp_path / "shifted", ramp_volume(4, 16, 16), positions=shifted)
    with pytest.warns(UserWarning, match="shifted slice"):
        code, _, err = run(["harmonize", tmp_path / "shifted", "--model", data / "filter", "--out", tmp_path / "out2"], capsys)
    assert code == 0, err
    before, after = _positions(tmp_path / "shifted"), _positions(tmp_path / "out2")
    assert all(np.allclose(before[k], after[k], atol=0.01) for k in before), (before, after)


def test_missing_pixel_spacing_or_orientation_is_said(tmp_path, capsys):
    from helpers import make_ct_dataset, save_dataset

    ds = make_ct_dataset(np.full((16, 16), 1024, np.uint16), (0, 0, 0), series_uid="1.2.3", study_uid="1.2", instance=1)
    del ds.PixelSpacing
    del ds.ImageOrientationPatient
    save_dataset(ds, tmp_path / "s.dcm")
    with pytest.warns(UserWarning) as caught:
        code, _, err = run(["info", tmp_path / "s.dcm"], capsys)
    said = " ".join(str(w.message) for w in caught)
    assert code == 0 and "no PixelSpacing; pixels taken as 1 x 1 mm" in said and "no ImageOrientationPatient" in said, said


def test_resume_with_other_settings_or_reversed_pairs_is_refused(data, copy_run, tmp_path, capsys):
    import json

    card = (copy_run / "model.json").read_text()
    for extra, expected in ((["--hu-range", -1000, 1000], "hu_range"), (["--window-scaling", "window"], "window_scaling")):
        code, _, err = run(resume_argv(data, copy_run, *extra), capsys)
        one_error_line(code, err, expected, "cannot resume")
    manifest = json.loads((data / "pairs32" / "manifest.json").read_text())
    reversed_pairs = [{**p, "source": str(data / "pairs32" / p["target"]), "target": str(data / "pairs32" / p["source"]),
                       "labels": str(data / "pairs32" / p["labels"]), "source_kernel": p["target_kernel"],
                       "target_kernel": p["source_kernel"]} for p in manifest["pairs"]]
    (tmp_path / "reversed.json").write_text(json.dumps({**manifest, "pairs": reversed_pairs}))
    argv = resume_argv(data, copy_run)
    argv[argv.index("--pairs") + 1] = tmp_path / "reversed.json"
    code, _, err = run(argv, capsys)
    one_error_line(code, err, "from B30 to B50", "cannot resume")
    assert (copy_run / "model.json").read_text() == card  # the card is not rewritten


def test_evaluate_labels_given_the_ct_itself_is_refused(data, tmp_path, capsys):
    vol = data / "vol.nrrd"
    code, _, err = run(["evaluate", "--reference", vol, "--candidate", f"a={vol}", "--out", tmp_path / "r", "--labels", vol], capsys)
    one_error_line(code, err, "vol.nrrd", "not a label map")
    assert not (tmp_path / "r").exists()


def test_simulate_pairs_from_scans_of_two_kernels_is_refused(tmp_path, capsys):
    simulate_phantom_pairs(tmp_path / "scans", cases=1, size=16, slices=3, seed=2)  # a B30 scan and a B50 scan
    for extra in (tmp_path / "scans" / "manifest.json", tmp_path / "scans" / "case000_labels.nrrd"):
        extra.unlink()
    code, _, err = run(["simulate", "--from", tmp_path / "scans", "--kernel", "B70", "--pairs", tmp_path / "pairs"], capsys)
    one_error_line(code, err, "one manifest learns one direction")
    assert not (tmp_path / "pairs").exists()


def test_a_card_whose_inference_window_is_inverted_is_refused(data, tmp_path, capsys):
    import json
    import shutil

    shutil.copytree(data / "filter", tmp_path / "model")
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    (tmp_path / "model" / "model.json").write_text(json.dumps({**card, "inference_window": [1000, -1024]}))
    code, _, err = run(["harmonize", data / "vol.nrrd", "--model", tmp_path / "model", "--out", tmp_path / "o.nrrd"], capsys)
    one_error_line(code, err, "inference_window", "LO < HI")
    assert not (tmp_path / "o.nrrd").exists()


# ---------------------------------------------------------------------------------------------- item 8: one slice's z


def test_a_single_slice_dicom_z_spacing_is_said_and_kept_through_the_output(data, tmp_path, capsys):
    import json

    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # one real CT slice, SliceThickness 5 mm
    del ds.SpacingBetweenSlices
    ds.save_as(tmp_path / "one.dcm")
    assert sitk.ReadImage(str(tmp_path / "one.dcm")).GetSpacing()[2] == 1.0  # what SimpleITK takes instead

    def info(path) -> dict:
        code, out, err = run(["info", path], capsys)
        assert code == 0, err
        return json.loads(out)

    given = info(tmp_path / "one.dcm")
    assert given["spacing_xyz_mm"][2] == 5.0 and given["spacing_z_from"] == "SliceThickness"
    for out in (tmp_path / "o.nrrd", tmp_path / "o_dicom"):
        code, _, err = run(["harmonize", tmp_path / "one.dcm", "--model", data / "filter", "--out", out], capsys)
        assert code == 0, err
        assert info(out)["spacing_xyz_mm"][2] == 5.0
    written = next((tmp_path / "o_dicom").iterdir())
    assert sitk.ReadImage(str(written)).GetSpacing()[2] == 5.0  # the output says it in a tag every reader takes
    del ds.SliceThickness
    ds.save_as(tmp_path / "bare.dcm")
    with pytest.warns(UserWarning, match="z spacing taken as 1 mm"):
        bare = info(tmp_path / "bare.dcm")
    assert bare["spacing_xyz_mm"][2] == 1.0 and bare["spacing_z_from"] == "none"


# ---------------------------------------------------------------------------------------------- item 1: a full disk


def leftovers(*roots: Path) -> list[str]:
    """Stagings or half-written files left under the roots."""
    return [str(p) for root in roots if root.exists() for p in root.rglob("*") if "-partial-" in p.name or ".partial" in p.name]


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(data, tmp_path, capsys):
    from helpers import file_size_limit, write_ct_series

    write_ct_series(tmp_path / "dicom", ramp_volume(3, 16, 16))
    (tmp_path / "fast.yaml").write_text("setting:\n  binWidth: 25\n  label: 1\nimageType:\n  Original: {}\n"
                                        "featureClass:\n  firstorder:\n")
    big = tmp_path / "big.nrrd"  # noise: gzip cannot squeeze it under the limit
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 1000, (6, 64, 64)).astype(np.int16)), str(big))
    out = tmp_path / "out"
    cases = {  # what is written -> (argv, the output named, what the line says it was)
        "SimpleITK image": (["harmonize", big, "--model", data / "filter", "--out", out / "h.nrrd"], out / "h.nrrd", "image"),
        "DICOM series": (["harmonize", tmp_path / "dicom", "--model", data / "filter", "--out", out / "dcm"], out / "dcm", ""),
        "torch.save": (["train", "--pairs", data / "pairs", "--out", out / "m", "--method", "filter"], out / "m" / "weights.pt",
                       "model weights"),
        "phantom pairs": (["simulate", "--out", out / "p", "--cases", 1, "--size", 16, "--slices", 2], out / "p", ""),
        "report": (["evaluate", "--reference", data / "vol.nrrd", "--candidate", f"a={data / 'vol.nrrd'}", "--out", out / "r",
                    "--params", tmp_path / "fast.yaml", "--per-range", 3, "--bootstrap", 0, "--workers", 1, "--whole-image"],
                   out / "r", ""),
    }
    for what, (argv, named, kind) in cases.items():
        with file_size_limit(200):
            code, _, err = run(argv, capsys)
        line = one_error_line(code, err, f"cannot write {named}", "No space left on device")
        assert kind in line, (what, line)
        assert not out.exists() or not any(out.iterdir()), (what, sorted(out.rglob("*")))
        assert leftovers(tmp_path) == [], what


def test_a_full_disk_in_a_real_process_is_one_line(data, tmp_path):
    """As the issue met it: ``harmonize big.nrrd ... --out FULLDISK/h.nrrd`` printed 35 lines of SimpleITK traceback."""
    from helpers import limit_file_size

    big = tmp_path / "big.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(1).integers(-1000, 1000, (6, 64, 64)).astype(np.int16)), str(big))
    done = subprocess.run([sys.executable, "-m", "radiomicgan.cli", "harmonize", str(big), "--model", str(data / "filter"),
                           "--out", str(tmp_path / "full" / "h.nrrd")], capture_output=True, text=True, env=_env(), timeout=120,
                          preexec_fn=limit_file_size(4096))
    lines = [line for line in done.stderr.strip().splitlines() if "warning:" not in line]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"cannot write {tmp_path / 'full' / 'h.nrrd'} (image): No space left on device" in lines[0]
    assert not (tmp_path / "full").exists() or not any((tmp_path / "full").iterdir())
    assert leftovers(tmp_path) == []


def test_a_write_nested_in_another_staging_names_the_users_path(tmp_path):
    """A folder staged whole (simulate's pairs, demo's folder) whose files are staged again: the line names the
    file under the user's folder, not under a hidden staging name."""
    import errno

    from radiomicgan.staging import OutputWriteError, staged

    with pytest.raises(OutputWriteError) as caught:
        with staged(tmp_path / "outer", directory=True) as outer:
            with staged(outer / "inner", directory=True) as inner:
                with staged(inner / "v.nrrd"):
                    raise OSError(errno.EFBIG, "File too large")
    assert str(caught.value) == f"cannot write {tmp_path / 'outer' / 'inner' / 'v.nrrd'} (image): No space left on device"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError is not a write fault: left as it is
        with staged(tmp_path / "x.pt"):
            raise RuntimeError("a bug")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- item 7: kills


def _start_training(data, out: Path) -> subprocess.Popen:
    """A pix2pix run of one endless epoch, returned once it is training (its log is open)."""
    argv = [sys.executable, "-m", "radiomicgan.cli", "train", "--pairs", str(data / "pairs32"), "--out", str(out),
            "--method", "pix2pix", "--crop", "32", "--epochs", "1", "--steps-per-epoch", "100000", "--batch", "1",
            "--device", "cpu", "--val-slices", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 120
    while not (out / "train_log.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.5)  # into its first steps
    return proc


def test_a_run_killed_in_its_first_epoch_leaves_a_folder_a_new_run_takes_over(data, tmp_path, capsys):
    out = tmp_path / "m"
    # SIGHUP (a closed terminal) cancels as SIGTERM does: exit 130, the folder this run made removed, no staging left
    proc = _start_training(data, out)
    try:
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err)
    assert not out.exists() and leftovers(tmp_path) == []
    # SIGKILL leaves the folder with the run's own log and nothing to resume
    proc = _start_training(data, out)
    proc.kill()
    proc.wait()
    assert out.is_dir() and not (out / "checkpoint.pt").exists()
    code, _, err = run(resume_argv(data, out), capsys)
    one_error_line(code, err, "no epoch was completed", "without --resume")
    argv = [a for a in resume_argv(data, out) if a != "--resume"]
    code, _, err = run(argv, capsys)
    assert code == 0 and (out / "checkpoint.pt").is_file() and (out / "model.json").is_file(), err
    # a folder holding anything a run does not write is never taken over
    other = tmp_path / "other"
    other.mkdir()
    (other / "train_log.jsonl").write_text("")
    (other / "notes.txt").write_text("mine")
    code, _, err = run([a if a != out else other for a in argv], capsys)
    one_error_line(code, err, "already exists and is not empty")
    assert (other / "notes.txt").read_text() == "mine"


def test_resume_removes_what_a_kill_during_a_save_left(data, copy_run, capsys):
    from radiomicgan.staging import staging_name

    ours = [staging_name(copy_run / name) for name in ("weights.pt", "checkpoint.pt", "gradcam_samples.npz", "model.json")]
    for path in ours:
        path.write_bytes(b"\0" * 4096)  # what a SIGKILL during torch.save / np.savez leaves
    mine = copy_run / ".notes.txt-partial-1-deadbeef.txt"  # the user's, under a name no run writes
    mine.write_text("mine")
    code, _, err = run(resume_argv(data, copy_run), capsys)
    assert code == 0, err
    assert [p for p in ours if p.exists()] == [] and mine.read_text() == "mine"
    # Grad-CAM samples are staged under a name unique to each write (two runs never share one)
    names = {staging_name(copy_run / "gradcam_samples.npz") for _ in range(2)}
    assert len(names) == 2 and all(n.name.endswith(".npz") and n.name.startswith(".gradcam_samples.npz-partial-")
                                   for n in names)
