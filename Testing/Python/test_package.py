"""The package as users install it: a wheel built from this tree carries its data, so ``radiomicgan evaluate``
finds its default pyradiomics parameters outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import venv

import numpy as np

from helpers import REPO
from radiomicgan.io import write_volume
from radiomicgan.volume import CTVolume


def test_installed_wheel_evaluates_with_default_parameters(tmp_path):
    # only what the wheel is built from, so nothing of the checkout can leak onto the installed package's path
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "radiomicgan", source / "radiomicgan", ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (and pip, setuptools) of the environment running the tests, after the venv's own packages;
    # a plain path line, so an editable install there (its own .pth) is not activated
    os.makedirs(purelib, exist_ok=True)
    with open(os.path.join(purelib, "radiomicgan-test-deps.pth"), "w") as fh:
        fh.write(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(source)],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    shutil.rmtree(source)  # the installed copy alone from here on

    rng = np.random.default_rng(0)
    hu = rng.normal(40.0, 20.0, (3, 24, 24))
    write_volume(CTVolume(hu, (0.8, 0.8, 1.0)), tmp_path / "b50.nrrd")
    write_volume(CTVolume(hu + rng.normal(0.0, 10.0, hu.shape), (0.8, 0.8, 1.0)), tmp_path / "b30.nrrd")
    (tmp_path / "boxes.json").write_text(json.dumps([{"name": "box", "min": [2.0, 2.0, 0.0], "max": [14.0, 14.0, 2.0]}]))
    done = subprocess.run(
        [python, "-c", "import sys, radiomicgan, radiomicgan.cli; print(radiomicgan.__file__, file=sys.stderr); "
         "sys.exit(radiomicgan.cli.main(sys.argv[1:]))",
         "evaluate", "--reference", "b50.nrrd", "--candidate", "input=b30.nrrd", "--boxes", "boxes.json",
         "--out", "report", "--workers", "1", "--bootstrap", "0"],
        cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.splitlines()[0].startswith(str(env_dir))  # the installed package, not the checkout
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    params = summary["params_file"]
    assert params.startswith(str(env_dir)) and params.endswith("radiomics_ct.yaml")
    assert summary["features"] > 1000  # the default parameters' filters (LoG, wavelet), not a fallback
