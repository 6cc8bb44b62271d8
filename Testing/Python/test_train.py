"""Training: every method and schedule lowers its loss on tiny phantom data; model folders save, load and
resume; cancel leaves the last complete epoch; two DDP processes stay in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from radiomicgan.cli import main
from radiomicgan.harmonize import harmonize_hu
from radiomicgan.metrics import anatomy_shift
from radiomicgan.modelio import ModelCard, load_model, safe_load
from radiomicgan.simulate import simulate_phantom_pairs
from radiomicgan.dataset import load_manifest, load_pair
from radiomicgan.train import TrainConfig, TrainingError, _set_learning_rate, train, validation_psnr

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train") / "pairs"
    simulate_phantom_pairs(folder, cases=3, size=64, slices=3, seed=2)
    return folder


def tiny(**changes) -> TrainConfig:
    base = dict(epochs=4, steps_per_epoch=12, batch=4, crop=32, lr=3e-4, th_eta=1, window_step=1024.0,
                vgg_weights="random", cam_subset=2, val_slices=2, device="cpu", consolidate=0.0)
    return TrainConfig(**{**base, **changes})


def _epochs(folder: Path) -> list[dict]:
    return [r for r in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines()) if r["event"] == "epoch"]


@pytest.mark.parametrize(
    "method, schedule",
    [("radiomicgan", "dwt"), ("radiomicgan", "fixed"), ("radiomicgan", "dynamic"), ("radiomicgan", "none"),
     ("pix2pix", "none"), ("choe", "none")],
)
def test_each_method_and_schedule_lowers_its_loss(pairs, tmp_path, method, schedule):
    card = train(pairs, tmp_path / "m", tiny(method=method, schedule=schedule), progress=False)
    epochs = _epochs(tmp_path / "m")
    assert len(epochs) == 4
    relative = [e["l1"] / e["l1_input"] for e in epochs]  # 1.0 is what the untrained (identity) model scores
    assert relative[-1] < 0.999 and relative[-1] < relative[0], relative
    windows = [tuple(e["window"]) for e in epochs]
    if schedule in ("dwt", "fixed"):  # fixed growing takes at most a quarter of the 48 steps: 4 steps per window
        assert epochs[0]["windows"] == [[-1024, -769], [-1024, 255], [-1024, 1000]]
        assert windows[1:] == [(-1024, 1000)] * 3 or schedule == "dwt"
        steps = [r for r in map(json.loads, (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()) if r["event"] == "step"]
        assert steps[0]["step"] == 10 and steps[0]["window"] == [-1024, 1000]  # the step log names the step's window
    if schedule == "dwt":
        assert [h["phase"] for h in card.window_history] == ["fixed"] + ["dynamic"] * 3
        assert windows[1] == (-1024, 1000) and "cam_hot_values" in epochs[1]  # dynamic selection ran from epoch 1
        assert "at most 25% of the steps in all, 1 epoch(s) per window" in (tmp_path / "m" / "MODEL_CARD.md").read_text()
    if schedule == "dynamic":
        assert "cam_hot_values" in epochs[0] and windows[0] == (-1024, 1000)
    if schedule == "none":
        assert set(windows) == {(-1024, 1000)}
    assert card.training.status == "completed" and card.training.epochs_done == 4
    assert card.validation.psnr_db > card.validation.input_psnr_db  # whole held-out slices improve
    model = load_model(tmp_path / "m")
    assert model.method == method
    for name in ("model.json", "MODEL_CARD.md", "weights.pt", "checkpoint.pt", "train_log.jsonl"):
        assert (tmp_path / "m" / name).is_file()
    if method != "choe":
        assert (tmp_path / "m" / "windows.png").is_file() and (tmp_path / "m" / "gradcam_samples.png").is_file()
        samples = np.load(tmp_path / "m" / "gradcam_samples.npz")
        assert samples["cam"].min() >= 0 and samples["cam"].max() <= 1


@pytest.mark.parametrize("method", ["filter", "histmatch"])
def test_closed_form_baselines(pairs, tmp_path, method):
    card = train(pairs, tmp_path / "m", tiny(method=method), progress=False)
    assert card.training.closed_form and card.data.validation.startswith("held-out pair")
    if method == "filter":  # a linear kernel conversion beats doing nothing on a kernel pair
        assert card.validation.psnr_db > card.validation.input_psnr_db + 1.0
    model = load_model(tmp_path / "m")
    out = harmonize_hu(model, np.full((2, 16, 16), -500.0, np.float32), (0.7, 0.7))
    assert out.shape == (2, 16, 16) and np.isfinite(out).all()


def test_best_checkpoint_and_consolidation(pairs, tmp_path):
    """weights.pt is the epoch with the best validation PSNR on the held-out pair; the run ends with
    consolidation epochs at the inference window; the card says which epoch and which scaling."""
    out = tmp_path / "m"
    card = train(pairs, out, tiny(schedule="fixed", epochs=4, consolidate=0.5, window_scaling="window"), progress=False)
    epochs = _epochs(out)
    assert [h["phase"] for h in card.window_history][-2:] == ["consolidation"] * 2
    assert [tuple(e["window"]) for e in epochs][-2:] == [(-1024, 1000)] * 2
    best = max(range(4), key=lambda k: epochs[k]["val_psnr_db"])
    assert card.training.best_epoch == best and card.validation.epoch == best
    assert card.window_scaling == "window" and card.inference_window == (-1024, 1000)
    assert card.architecture["encoder"] == "trainable"  # random VGG weights are trained
    held_out = load_manifest(pairs).pairs[-1]
    source, target = load_pair(held_out)
    slices = [(source.hu[k], target.hu[k]) for k in range(0, source.shape[0], max(1, source.shape[0] // 2))][:2]
    psnr_best, _ = validation_psnr(load_model(out), slices, source.spacing[:2], "cpu")
    assert psnr_best == pytest.approx(epochs[best]["val_psnr_db"], abs=1e-6)


def test_learning_rate_decays_linearly_over_the_second_half():
    config = TrainConfig(lr=1e-3)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    seen = []
    for step in (0, 49, 50, 75, 99, 100):
        _set_learning_rate(config, (opt, None), step, 100)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 2e-5, 0.0])
    _set_learning_rate(TrainConfig(lr=1e-3, lr_decay=False), (opt,), 99, 100)
    assert opt.param_groups[0]["lr"] == 1e-3


def test_anatomy_is_kept(tmp_path):
    """A briefly trained RadiomicGAN keeps body and lung outlines within one pixel of its input's on the
    held-out scan, and inside tissue (away from edges) moves HU by no more than the kernel change does. (At
    128 px, the demo's size: on a 64 px phantom the thin table and vessels cross -500 HU differently in the two
    kernels themselves.)"""
    from scipy import ndimage

    pairs = simulate_phantom_pairs(tmp_path / "pairs", cases=3, size=128, slices=2, seed=4)
    out = tmp_path / "m"
    train(pairs, out, tiny(schedule="dwt", epochs=4, consolidate=0.25, lr=1e-3), progress=False)
    source, target = load_pair(load_manifest(pairs).pairs[-1])
    assert max(anatomy_shift(source.hu, target.hu).values()) <= 1.0  # the kernel change itself moves nothing
    result = harmonize_hu(load_model(out), source.hu, source.spacing[:2])
    assert not np.array_equal(result, np.rint(source.hu))  # it did learn something
    shift = anatomy_shift(source.hu, result)
    assert shift["body_px"] <= 1.0 and shift["lung_px"] <= 1.0, shift
    def local_mean(x):
        return ndimage.uniform_filter(x, (1, 7, 7))

    smooth = ndimage.gaussian_filter(source.hu, (0, 1, 1))
    flat = np.sqrt(np.maximum(local_mean(smooth**2) - local_mean(smooth) ** 2, 0)) < 40.0  # away from edges
    moved = np.abs(local_mean(result - source.hu))[flat]
    kernel = np.abs(local_mean(target.hu - source.hu))[flat]
    assert flat.mean() > 0.2 and np.percentile(moved, 99) <= np.percentile(kernel, 99) + 10.0


def test_model_card_is_readable(pairs, tmp_path):
    card = train(pairs, tmp_path / "m", tiny(epochs=1, steps_per_epoch=2), progress=False)
    written = json.loads((tmp_path / "m" / "model.json").read_text())
    for key in ("format", "method", "schedule", "source_kernel", "target_kernel", "hu_range", "final_window", "data", "versions"):
        assert key in written
    assert ModelCard.from_dict(written) == card == ModelCard.read(tmp_path / "m")  # what is written reads back the same
    assert card.source_kernel == "B30" and card.target_kernel == "B50"
    assert "random" in card.architecture["vgg_source"] and card.versions["torch"] == torch.__version__
    text = (tmp_path / "m" / "MODEL_CARD.md").read_text()
    assert "B30" in text and "random initialisation" in text and "Validation PSNR" in text


def test_save_load_resume_round_trip(pairs, tmp_path):
    out = tmp_path / "m"
    train(pairs, out, tiny(method="radiomicgan", schedule="dwt", epochs=2, steps_per_epoch=3), progress=False)
    first = load_model(out)
    window_after_2 = json.loads((out / "model.json").read_text())["window_history"]
    with pytest.raises(TrainingError, match="already exists and is not empty"):
        train(pairs, out, tiny(epochs=2, steps_per_epoch=3), progress=False)
    with pytest.raises(TrainingError, match="was trained with schedule 'dwt', not 'none'"):
        train(pairs, out, tiny(schedule="none", epochs=4), resume=True, progress=False)
    card = train(pairs, out, tiny(method="radiomicgan", schedule="dwt", epochs=4, steps_per_epoch=3), resume=True, progress=False)
    assert card.training.epochs_done == 4 and card.training.steps_done == 12
    assert card.window_history[:2] == window_after_2  # the schedule continued, not restarted
    assert [e["epoch"] for e in _epochs(out)] == [0, 1, 2, 3]
    resumed = load_model(out)
    latest = safe_load(out / "checkpoint.pt")["generator"]  # weights.pt holds the best epoch, maybe an early one
    changed = [not torch.equal(a, b) for a, b in zip(first.generator.state_dict().values(), latest.values())]
    assert any(changed)
    hu = np.random.default_rng(0).uniform(-1000, 500, (2, 40, 40)).astype(np.float32)
    assert harmonize_hu(resumed, hu, (0.7, 0.7)).shape == hu.shape


def test_cancel_leaves_the_last_complete_epoch(pairs, tmp_path):
    out = tmp_path / "m"

    def cancel_after_first_epoch(record):
        (out / "CANCEL").touch()

    card = train(pairs, out, tiny(epochs=5, steps_per_epoch=3), progress=False, on_epoch=cancel_after_first_epoch)
    assert card.training.status == "cancelled" and card.training.epochs_done == 1
    model = load_model(out)
    assert model.generator is not None
    saved = json.loads((out / "model.json").read_text())
    assert saved["training"]["epochs_done"] == 1 and saved["training"]["status"] == "cancelled"
    assert not list(out.glob(".*partial*"))


def test_ctrl_c_stops_training_and_keeps_the_last_epoch(pairs, tmp_path):
    import signal
    import time

    out = tmp_path / "m"
    command = [sys.executable, "-m", "radiomicgan.cli", "train", "--pairs", str(pairs), "--out", str(out), "--epochs", "50",
               "--steps-per-epoch", "2", "--batch", "2", "--crop", "32", "--vgg-weights", "random", "--device", "cpu"]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "model.json").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]  # a cancel is not a success
    assert "cancelled:" in stderr and "keeps epoch" in stderr and "stopping after this step" in stderr
    card = ModelCard.read(out)
    assert card.training.status == "cancelled" and 1 <= card.training.epochs_done < 50
    assert load_model(out).generator is not None


def test_cancel_before_any_epoch_leaves_nothing(pairs, tmp_path):
    flag = tmp_path / "stop"
    flag.touch()
    card = train(pairs, tmp_path / "m", tiny(), progress=False, cancel_file=flag)
    assert card.training.status == "cancelled"
    assert not (tmp_path / "m").exists()


def test_offline_imagenet_request_fails_clearly_and_leaves_nothing(pairs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    from torchvision.models import VGG19_Weights

    # offline wherever the test runs: the download points at a file that does not exist
    monkeypatch.setattr(VGG19_Weights.IMAGENET1K_V1.value, "url", "file:///nonexistent/vgg19-dcbb9e9d.pth")
    assert main(["train", "--pairs", str(pairs), "--out", str(tmp_path / "m"), "--epochs", "1"]) == 2
    assert "ImageNet VGG-19 weights" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_train_command(pairs, tmp_path, capsys):
    assert main(["train", "--pairs", str(pairs), "--out", str(tmp_path / "f"), "--method", "filter"]) == 0
    assert "validation PSNR input" in capsys.readouterr().out
    assert main(["train", "--pairs", str(pairs), "--out", str(tmp_path / "c"), "--method", "choe", "--schedule", "dwt"]) == 2
    assert "trains on the whole range: use --schedule none" in capsys.readouterr().err
    assert main(["train", "--pairs", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no manifest here" in capsys.readouterr().err
    assert main(["train", "--pairs", str(pairs), "--out", str(tmp_path / "g"), "--crop", "36", "--vgg-weights", "random"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_two_process_ddp_stays_in_sync(pairs, tmp_path):
    """torchrun with 2 CPU processes (gloo): both ranks end with identical generator weights."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "radiomicgan.cli", "train", "--pairs", str(pairs), "--out", str(out), "--epochs", "2",
               "--steps-per-epoch", "3", "--batch", "2", "--crop", "32", "--vgg-weights", "random", "--schedule", "dwt",
               "--th-eta", "1", "--window-step", "1024", "--device", "cpu", "--val-slices", "1", "--cam-subset", "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    sync = [r for r in log if r["event"] == "ddp_sync"]
    assert sync and sync[0]["in_sync"] and len(sync[0]["checksums"]) == 2
    card = ModelCard.read(out)
    assert card.training.world_size == 2 and card.training.epochs_done == 2
    assert len([r for r in log if r["event"] == "epoch"]) == 2  # only rank 0 writes


def test_adversarial_warmup_trains_the_generator_on_l1_alone():
    import contextlib

    from radiomicgan.models import PatchDiscriminator, UNetGenerator
    from radiomicgan.train import train_step

    torch.manual_seed(0)
    g, d = UNetGenerator((8, 8, 8, 8)), PatchDiscriminator(8)
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 1e-4), torch.optim.Adam(d.parameters(), 1e-4)
    x, y = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    config = TrainConfig()
    warm = train_step(config, g, d, opt_g, opt_d, x, y, contextlib.nullcontext(), adversarial=False)
    assert warm["loss_g"] == pytest.approx(config.lambda_l1 * warm["l1"], rel=1e-6) and warm["loss_d"] > 0
    full = train_step(config, g, d, opt_g, opt_d, x, y, contextlib.nullcontext(), adversarial=True)
    assert full["loss_g"] > config.lambda_l1 * full["l1"] + 0.1  # the adversarial term is back


def test_contrast_jitter_is_a_checked_training_option(pairs, tmp_path):
    with pytest.raises(TrainingError, match="--contrast-jitter"):
        TrainConfig(contrast_jitter=1.5).check()
    card = train(pairs, tmp_path / "m", tiny(method="choe", schedule="none", epochs=1, steps_per_epoch=2, contrast_jitter=0.2),
                 progress=False)
    assert card.config["contrast_jitter"] == 0.2 and card.training.status == "completed"


def test_focus_windows_train_on_the_weighted_l1():
    """A weight that leaves out half the pixels: the L1 is the mean over the other half, what the step reports."""
    import contextlib

    from radiomicgan.models import PatchDiscriminator, UNetGenerator
    from radiomicgan.train import train_step

    torch.manual_seed(0)
    g, d = UNetGenerator((8, 8, 8, 8)), PatchDiscriminator(8)
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 0.0), torch.optim.Adam(d.parameters(), 0.0)  # lr 0: g unchanged
    x, y = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    y[..., 16:] = 5.0  # far off where the weight is 0: counted, it would dominate the L1
    weight = torch.zeros_like(y)
    weight[..., :16] = 1.0
    with torch.no_grad():
        fake = g(x)
    record = train_step(TrainConfig(), g, d, opt_g, opt_d, x, y, contextlib.nullcontext(), weight=weight)
    assert record["l1"] == pytest.approx(float((fake - y)[..., :16].abs().mean()), rel=1e-5)
    assert record["l1"] < 0.5 * float((fake - y).abs().mean())


def test_focus_scaling_trains_dwt(pairs, tmp_path):
    card = train(pairs, tmp_path / "m", tiny(window_scaling="focus", epochs=2, steps_per_epoch=6), progress=False)
    assert card.window_scaling == "focus" and card.training.status == "completed"
    assert _epochs(tmp_path / "m")[0]["windows"][0] == [-1024, -769]  # the curriculum ran
