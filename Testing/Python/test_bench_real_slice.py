"""bench/real_slice.py, the generalization benchmark: its variants and a run on the real slices (skipped without them)."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def real_slice():
    spec = importlib.util.spec_from_file_location("real_slice", REPO / "bench" / "real_slice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def budget(**extra):
    return argparse.Namespace(epochs=6, steps_per_epoch=50, batch=4, crop=64, vgg_weights="random", device="cpu",
                              config=json.dumps(extra))


def test_variant_settings_override_the_budget(real_slice):
    """A variant may change any field the budget sets (the ImageNet encoder's weights file, the learning rate)."""
    imagenet = real_slice.train_config("radiomicgan-dwt", 1, budget(), {"vgg_weights": "weights.pth"})
    assert (imagenet.method, imagenet.schedule, imagenet.vgg_weights, imagenet.seed) == ("radiomicgan", "dwt", "weights.pth", 1)
    choe = real_slice.train_config("choe", 2, budget(lr=5e-4), {"lr": 1e-3})
    assert choe.lr == 1e-3 and choe.epochs == 6 and choe.schedule == "none"
    assert real_slice.train_config("choe", 0, budget(lr=5e-4)).lr == 5e-4


def test_variant_without_settings_and_unknown_method_are_refused(real_slice, tmp_path, capsys):
    with pytest.raises(SystemExit):
        real_slice.main(["--methods", "choe:fast", "--data", str(tmp_path), "--out", str(tmp_path)])
    assert "--variants gives no settings for ['choe:fast']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        real_slice.main(["--methods", "unet", "--data", str(tmp_path), "--out", str(tmp_path)])
    assert "unknown method(s) ['unet']" in capsys.readouterr().err


def test_filter_beats_input_on_the_toshiba_test_slice(real_slice, tmp_path):
    """The benchmark end to end on real DICOM (sharp FC51 -> soft FC13), with the methods that need no training."""
    if not (SHARED_DATA / "real-kernels-toshiba").is_dir():
        pytest.skip("the real Toshiba slices are not beside the project")
    assert real_slice.main(["--data", str(SHARED_DATA), "--domains", "toshiba", "--methods", "input,filter",
                            "--no-features", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary-test.json").read_text())
    rows = {r["method"]: r for r in summary["results"]["toshiba"]["rows"]}
    assert rows["filter"]["psnr_db"] > rows["input"]["psnr_db"] + 3
    assert "| filter | 1 |" in (tmp_path / "table-test.md").read_text()
