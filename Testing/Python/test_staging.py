"""Staged writes (radiomicgan.staging): complete output or the previous one, never a part, on errors and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from helpers import REPO
from radiomicgan.errors import CTInputError
from radiomicgan.io import image_suffix
from radiomicgan.staging import staged, staged_many, staging_name


def test_staging_name_is_hidden_unique_per_process_and_keeps_the_suffix(tmp_path):
    names = {staging_name(tmp_path / "scan.nii.gz") for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert name.parent == tmp_path and name.name.startswith(".scan.nii.gz-partial-") and name.name.endswith(".nii.gz")
        assert f"-{os.getpid()}-" in name.name
    assert image_suffix(staging_name(tmp_path / "series")) == ""  # a DICOM folder stays a folder


def test_a_file_is_replaced_only_when_complete(tmp_path):
    target = tmp_path / "sub" / "card.json"
    with staged(target) as tmp:
        tmp.write_text("first")
        assert not target.exists()  # nothing visible under the real name meanwhile
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with staged(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("failed mid-write")
    assert target.read_text() == "first" and sorted(p.name for p in target.parent.iterdir()) == ["card.json"]


def test_folders_replace_only_what_this_tool_wrote(tmp_path):
    target = tmp_path / "report"
    with staged(target, directory=True, owned=lambda f: f.suffix == ".csv") as tmp:
        (tmp / "a.csv").write_text("1")
    with staged(target, directory=True, owned=lambda f: f.suffix == ".csv") as tmp:
        (tmp / "b.csv").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.csv"]  # swapped whole, the old folder removed
    (target / "notes.txt").write_text("the user's")
    with pytest.raises(CTInputError, match="notes.txt"):
        with staged(target, directory=True, owned=lambda f: f.suffix == ".csv") as tmp:
            (tmp / "c.csv").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.csv", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_several_outputs_all_or_none(tmp_path):
    targets = [tmp_path / "volume.nrrd", tmp_path / "cam.nrrd"]
    with pytest.raises(KeyboardInterrupt):
        with staged_many(targets) as tmps:
            tmps[0].write_text("volume")
            raise KeyboardInterrupt  # Ctrl-C after the first output was written
    assert not any(tmp_path.iterdir())
    with staged_many(targets) as tmps:
        for tmp, text in zip(tmps, ("volume", "cam")):
            tmp.write_text(text)
    assert [t.read_text() for t in targets] == ["volume", "cam"]


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_sigterm_removes_the_staging(tmp_path):
    """A program cancelling this one (the Slicer modules send SIGTERM) leaves neither output nor staging."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from radiomicgan.staging import sigterm_as_interrupt, staged\n"
        "try:\n"
        "    with sigterm_as_interrupt(), staged(Path(sys.argv[1]), directory=True) as tmp:\n"
        "        (tmp / 'part.txt').write_text('half')\n"
        "        print('writing', flush=True)\n"
        "        time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "writing"
    assert any(p.name.startswith(".out-partial-") for p in tmp_path.iterdir())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 130
    assert not any(tmp_path.iterdir())
