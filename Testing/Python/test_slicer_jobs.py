"""The Slicer side's background jobs without MRML (so they also run under Python 3.9, where slicer-core does not
install): the core's command line really runs as a subprocess (progress, warnings, a cancel that asks the core to
stop over its standard input, then kills the process tree, never blocking, and leaves nothing), and the
dependency logic asks once and installs the right things (the installers, PyTorchUtils and Slicer's pip, are the
one allowed stand-in)."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, alive, oblique_scan, train_tiny_models
from RadiomicGANLib import dependencies
from RadiomicGANLib.process import (
    BackgroundProcess,
    ExitCode,
    Job,
    JobStatus,
    core_command,
    parse_progress,
    python_command,
)

from radiomicgan.io import write_volume


pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="process checks read /proc")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return train_tiny_models(tmp_path_factory.mktemp("models"))


_oblique_scan = oblique_scan


# ------------------------------------------------------------------------------------------ BackgroundProcess


def test_python_and_core_command_outside_slicer():
    assert python_command() == [sys.executable]
    assert core_command("harmonize", "x") == [sys.executable, "-m", "radiomicgan.cli", "harmonize", "x"]


def test_background_process_runs_the_core_and_delivers_its_lines(tmp_path):
    seen = []
    process = BackgroundProcess(core_command("--version"), cwd=tmp_path, on_output=seen.append).start()
    assert process.wait(120) == 0 and process.returncode == 0 and not process.running
    assert seen == process.lines and seen[-1].startswith("radiomicgan ")
    bad = BackgroundProcess(core_command("info", str(tmp_path / "missing.nrrd"))).start()
    assert bad.wait(120) == 2 and bad.lines[-1].startswith("radiomicgan: error: ")  # one line, no traceback


def test_cancel_kills_the_whole_process_tree(tmp_path):
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              "print('child', child.pid, flush=True)\n"
              "time.sleep(120)\n")
    process = BackgroundProcess(python_command() + ["-c", script]).start()
    deadline = time.monotonic() + 60
    while not any(line.startswith("child ") for line in process.lines):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    child = int(process.lines[0].split()[1])
    assert alive(process.pid) and alive(child)
    started = time.monotonic()
    process.kill()  # returns at once; the exit is seen by a later poll
    assert time.monotonic() - started < 2
    assert process.wait(30) != 0 and not process.running
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(process.pid) and not alive(child)


class _Sleeper(Job):
    """A job whose process ignores the stop request (a core stuck in native code, say)."""

    grace_s = 0.5

    def command(self):
        return python_command() + ["-c", "import signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                                   "print('ready', flush=True); time.sleep(120)"]


def test_a_job_that_ignores_the_stop_request_is_killed_by_a_later_poll_never_blocking():
    job = _Sleeper().start()
    deadline = time.monotonic() + 60
    while "ready" not in job.process.lines:
        assert job.poll() is JobStatus.RUNNING and time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    job.cancel()
    assert job.poll() is JobStatus.RUNNING and time.monotonic() - started < 0.5  # asked; nothing waited for
    assert job.wait(30) is JobStatus.CANCELLED and job.killed and job.exit_code != 0
    assert not alive(job.process.pid)


def test_job_status_and_exit_codes_are_the_cores_names():
    """One contract: both sides use radiomicgan.jobs' names; 130 appears nowhere as a bare literal."""
    import re

    from radiomicgan import cli, jobs

    assert cli.EXIT_CANCELLED is jobs.ExitCode.CANCELLED == 130 and cli.EXIT_USAGE is jobs.ExitCode.BAD_INPUT
    for path in [*REPO.glob("RadiomicGANLib/*.py"), *REPO.glob("RadiomicGAN*/RadiomicGAN*.py"), REPO / "radiomicgan" / "cli.py"]:
        text = path.read_text()
        assert not re.search(r"(?<![\w.])130(?![\w.])", text), path.name
        assert 'PROGRESS "' not in text and "gradcam_input.nrrd" not in text and 'partial-' not in text, path.name
    assert [s.value for s in JobStatus] == ["running", "completed", "cancelled", "failed"]


def test_harmonize_command_reports_progress_and_cancelled_mid_run_leaves_nothing(models, tmp_path):
    write_volume(_oblique_scan(slices=4), tmp_path / "scan.nrrd")
    out = tmp_path / "out"
    records = []

    def on_output(line):
        if parse_progress(line):
            records.append(parse_progress(line))

    process = BackgroundProcess(core_command("harmonize", str(tmp_path / "scan.nrrd"), "--model", str(models / "gan"),
                                             "--out", str(out / "h.nrrd"), "--gradcam", str(out / "cam.nrrd"),
                                             "--device", "cpu", "--progress-json", "--stop-on-stdin"), on_output=on_output).start()
    deadline = time.monotonic() + 300
    while not any(r["stage"] == "gradcam" for r in records):  # slices done, Grad-CAM maps running
        assert process.poll() is None, process.lines
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert records[0] == {"task": "harmonize", "stage": "harmonize", "done": 4, "total": 4, "fraction": 1.0}
    process.ask_to_stop()  # a "stop" line on stdin: Ctrl-C's path, on Windows too; the core removes what it staged
    code = process.wait(120)
    assert code == ExitCode.CANCELLED or code == 0 and any(line.startswith("wrote") for line in process.lines), process.lines
    assert not alive(process.pid)
    left = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    complete = sorted(["scan.nrrd", "h.nrrd", "cam.nrrd", "cam_input.nrrd", "cam_windows.json"])
    assert left in (["scan.nrrd"], complete), left  # nothing, or (cancel during the final renames) everything


def test_train_command_reports_each_epoch(tmp_path, models):
    lines = []
    process = BackgroundProcess(core_command("train", "--pairs", str(models / "pairs"), "--out", str(tmp_path / "m"),
                                             "--epochs", "2", "--steps-per-epoch", "1", "--batch", "2", "--crop", "32",
                                             "--vgg-weights", "random", "--val-slices", "1", "--device", "cpu",
                                             "--progress-json"), on_output=lines.append).start()
    assert process.wait(600) == 0, lines[-5:]
    records = [parse_progress(line) for line in lines if parse_progress(line)]
    assert [(r["task"], r["stage"], r["done"], r["total"]) for r in records] == [("train", "epoch", 1, 2), ("train", "epoch", 2, 2)]
    log = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    epochs = [e for e in log if e["event"] == "epoch"]
    assert [r["val_psnr_db"] for r in records] == [e["val_psnr_db"] for e in epochs]  # the same figures as the log
    assert records[1]["window"] == epochs[1]["window"] and "loss_g" in records[0]


# ------------------------------------------------------------------------------------------ dependencies


class FakePyTorchUtilsLogic:
    """Stands in for PyTorchUtils' installer: records what it was asked to install."""

    def __init__(self, result=object()):
        self.calls, self.result = [], result

    def installTorch(self, **kwargs):
        self.calls.append(kwargs)
        return self.result


MISSING = {"radiomicgan_no_such_pkg": "radiomicgan-no-such-pkg>=1"}


def test_dependencies_satisfied_here_ask_nothing():
    asked, torch = [], FakePyTorchUtilsLogic()
    ok, message = dependencies.ensure_dependencies(asked.append, asked.append, torch, need_radiomics=True)
    assert ok and message == "" and asked == [] and torch.calls == []
    assert dependencies.satisfied("numpy", "numpy>=1") and not dependencies.satisfied("numpy", "numpy>=999")


def test_dependencies_ask_once_and_install_the_right_requirements(monkeypatch):
    monkeypatch.setattr(dependencies, "TORCH_REQUIREMENT", ">=999")  # this torch is too old
    asked, pip, torch = [], [], FakePyTorchUtilsLogic()
    ok, message = dependencies.ensure_dependencies(lambda text: asked.append(text) or True, pip.append, torch,
                                                   requirements=MISSING)
    assert len(asked) == 1 and "torch >=999" in asked[0] and "radiomicgan-no-such-pkg>=1" in asked[0]
    assert torch.calls == [{"askConfirmation": False, "torchVersionRequirement": ">=999",
                            "torchvisionVersionRequirement": dependencies.TORCHVISION_REQUIREMENT}]
    assert pip == [f"radiomicgan-no-such-pkg>=1 numpy=={importlib.metadata.version('numpy')}"]  # numpy kept as it is
    assert "simpleitk" not in " ".join(pip).lower()
    assert not ok and "Still missing" in message  # the fakes installed nothing


def test_torch_alone_is_asked_by_pytorchutils(monkeypatch):
    monkeypatch.setattr(dependencies, "TORCH_REQUIREMENT", ">=999")
    asked, pip, torch = [], [], FakePyTorchUtilsLogic(result=None)  # the user declines in PyTorchUtils' dialog
    ok, message = dependencies.ensure_dependencies(asked.append, pip.append, torch)
    assert not ok and asked == [] and pip == [] and torch.calls[0]["askConfirmation"] is True
    assert "torch was not installed" in message


def test_declined_or_testing_mode_installs_nothing(monkeypatch):
    monkeypatch.setattr(dependencies, "TORCH_REQUIREMENT", ">=999")
    asked, pip, torch = [], [], FakePyTorchUtilsLogic()
    ok, message = dependencies.ensure_dependencies(lambda text: asked.append(text) and False, pip.append, torch,
                                                   requirements=MISSING)
    assert not ok and len(asked) == 1 and pip == [] and torch.calls == [] and "declined" in message
    asked.clear()
    ok, message = dependencies.ensure_dependencies(lambda text: asked.append(text) or True, pip.append, torch,
                                                   testing=True, requirements=MISSING)
    assert not ok and asked == [] and pip == [] and torch.calls == [] and "testing mode" in message


def test_pyradiomics_is_pip_installed_after_the_one_question_without_its_dependency_list(monkeypatch):
    """No SlicerRadiomics (none for macOS): pyradiomics comes with pip, asked once with the rest, never with its
    dependency list (it names SimpleITK, Slicer's own); its other dependencies beside it, numpy pinned."""
    monkeypatch.setattr(dependencies, "RADIOMICS_MODULE", "radiomicgan_no_such_module")
    monkeypatch.setattr(dependencies, "RADIOMICS_DEPENDENCIES", ("radiomicgan-no-such-dep>=1",))
    asked, pip, torch = [], [], FakePyTorchUtilsLogic()
    ok, message = dependencies.ensure_dependencies(lambda text: asked.append(text) or True, pip.append, torch,
                                                   need_radiomics=True)
    assert len(asked) == 1 and "pyradiomics>=3.0" in asked[0] and "SlicerRadiomics" in asked[0]
    numpy_pin = f"numpy=={importlib.metadata.version('numpy')}"
    assert pip == [f"radiomicgan-no-such-dep>=1 {numpy_pin}", "pyradiomics>=3.0 --no-deps"], pip
    assert torch.calls == [] and not ok and "Still missing" in message
    ok, message = dependencies.ensure_dependencies(lambda text: True, pip.append, torch)  # not asked for: not needed
    assert ok


def test_never_simpleitk_and_no_pytorch_extension(monkeypatch):
    pip, torch = [], FakePyTorchUtilsLogic()
    with pytest.raises(ValueError, match="Slicer ships its own"):
        dependencies.ensure_dependencies(lambda text: True, pip.append, torch, requirements={"SimpleITK": "SimpleITK>=999"})
    assert pip == [] and torch.calls == []
    monkeypatch.setattr(dependencies, "TORCH_REQUIREMENT", ">=999")
    ok, message = dependencies.ensure_dependencies(lambda text: True, pip.append, None)
    assert not ok and "PyTorch extension" in message and pip == []

