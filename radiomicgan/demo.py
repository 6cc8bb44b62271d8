"""The main job on the embedded default data (the phantom): no user data needed.

simulate -> train -> harmonize -> compare: four phantom scans reconstructed with a smooth (B30) and a sharp
(B50) kernel; RadiomicGAN trained with Dynamic Window-based Training on two of them, the third choosing the best
checkpoint (validation), with the closed-form filter and Choe et al.'s CNN as baselines on the same data; the
fourth scan, which no model saw, harmonized by each; PSNR/SSIM against its sharp-kernel reconstruction;
radiomic reproducibility (pyradiomics features on ROIs inside the phantom's lung, soft tissue and bone labels
and on the whole body per slice, Lin's CCC) in an HTML report; pictures.
"""

from __future__ import annotations

import json
import time
import sys
from pathlib import Path

import numpy as np

from .dataset import MANIFEST_FORMAT, load_manifest, load_pair
from .errors import CTInputError
from .card import ModelCard
from .staging import staged
from .metrics import anatomy_shift, psnr, ssim
from .simulate import simulate_phantom_pairs

DEMO_MARKER = ".radiomicgan-demo"
DISPLAY_WINDOW = (-800.0, 800.0)  # the paper's display window
LUNG_WINDOW = (-1200.0, 200.0)


def run_demo(out: Path, size: int = 128, slices: int = 10, seed: int = 0, epochs: int = 16, steps_per_epoch: int = 19,
             crop: int = 64, roi_count: int = 15, roi_mm: float = 3.5) -> dict:
    """Writes into ``out`` (replacing only an earlier demo's output) and returns the summary."""
    if out.exists() and any(out.iterdir()) and not (out / DEMO_MARKER).exists():
        raise CTInputError(f"{out}: exists and was not made by the demo; refusing to overwrite (use --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out, directory=True) as tmp:
        (tmp / DEMO_MARKER).write_text("made by `radiomicgan demo`; safe to delete\n")
        print(f"[1/5] simulating 4 chest phantom scans ({size}x{size}x{slices}), each with a smooth (B30) and a sharp (B50) kernel")
        manifest_path = simulate_phantom_pairs(tmp / "data", 4, size=size, slices=slices, seed=seed)
        manifest = load_manifest(manifest_path)
        train_manifest = _training_manifest(manifest_path, 3)  # the last scan stays out of training and validation
        held_out = manifest.pairs[-1]
        source, target = load_pair(held_out)

        print(f"[2/5] training RadiomicGAN (dwt schedule, {epochs} epochs x {steps_per_epoch} steps) and the baselines "
              f"on {manifest.pairs[0].id} and {manifest.pairs[1].id}, validating on {manifest.pairs[2].id}; {held_out.id} is the test scan")
        models, seconds = _train_models(train_manifest, tmp / "models", epochs, steps_per_epoch, crop, seed)

        print(f"[3/5] harmonizing {held_out.id} with each model")
        from .harmonize import harmonize_hu
        from .modelio import load_model

        spacing = source.spacing[:2]
        images = {"input (B30)": source.hu}
        for name, folder in models.items():
            images[name] = harmonize_hu(load_model(folder), source.hu, spacing)
        rows = {name: {"psnr_db": psnr(target.hu, image), "ssim": ssim(target.hu, image), "train_seconds": seconds.get(name, 0.0),
                       "outline_shift_px": anatomy_shift(source.hu, image)}
                for name, image in images.items()}

        print("[4/5] radiomic reproducibility against the B50 reconstruction (pyradiomics, Lin's CCC)")
        from .io import read_volume
        from .report import write_report
        from .reproducibility import body_slice_rois, evaluate, sample_hu_rois

        candidates = {name: source.with_hu(image) for name, image in images.items()}
        labels = read_volume(held_out.labels, check_hu=False)
        rois = sample_hu_rois(target, per_range=roi_count, size_mm=roi_mm, slices=min(2, slices), seed=seed, labels=labels)
        rois += body_slice_rois(target)
        evaluation = evaluate(target, candidates, rois, bootstrap=50, seed=seed, reference_name="reference (B50)")
        write_report(evaluation, tmp / "report", {"reference (B50)": target, **candidates})
        card = ModelCard.read(models["RadiomicGAN"])
        summary = {
            "held_out_scan": held_out.id,
            "reference": "the same scan reconstructed with B50",
            "metrics_hu_range": [-1024, 3071],
            "results": rows,
            "reproducibility": evaluation.summary["groups"],
            "radiomicgan": {"vgg_source": card.architecture["vgg_source"], "encoder": card.architecture.get("encoder"),
                            "window_scaling": card.window_scaling, "best_epoch": card.training.best_epoch,
                            "final_window": list(card.final_window) if card.final_window else None, "window_history": card.window_history},
        }

        print("[5/5] plotting")
        _plot_results(images, target.hu, tmp / "harmonization.png")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nHeld-out scan {held_out.id} against its B50 reconstruction (HU clipped to [-1024, 3071]):")
    print(f"{'image':<22}{'PSNR (dB)':>10}{'SSIM':>8}{'train (s)':>11}   outline shift vs input, body / lung (px)")
    for name, row in rows.items():
        shift = row["outline_shift_px"]
        print(f"{name:<22}{row['psnr_db']:>10.2f}{row['ssim']:>8.4f}{row['train_seconds']:>11.0f}   {shift['body_px']:.0f} / {shift['lung_px']:.0f}")
    from .report import format_counts

    print()
    print(format_counts(evaluation.summary))
    print(f"\nwrote {out / 'harmonization.png'}, {out / 'summary.json'}, the reproducibility report {out / 'report' / 'report.html'}; "
          f"models with their cards, window history and Grad-CAM samples in {out / 'models'}")
    return summary


def _training_manifest(manifest_path: Path, count: int) -> Path:
    """A manifest of the first ``count`` pairs beside the full one: training data and, last, validation."""
    data = json.loads(manifest_path.read_text())
    path = manifest_path.with_name("train_manifest.json")
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "info": data.get("info", {}), "pairs": data["pairs"][:count]}, indent=2) + "\n")
    return path


def _train_models(manifest_path: Path, folder: Path, epochs: int, steps_per_epoch: int, crop: int, seed: int) -> tuple[dict, dict]:
    from .models import VGGWeightsError, vgg19_features
    from .train import TrainConfig, train

    try:
        vgg19_features("imagenet")
        vgg = "imagenet"
    except VGGWeightsError:
        vgg = "random"
        print("      ImageNet VGG-19 weights are not available here (offline): the demo asks for a randomly "
              "initialised encoder, and the model card says so")
    common = dict(epochs=epochs, steps_per_epoch=steps_per_epoch, crop=crop, batch=4, seed=seed, val_slices=4)
    jobs = {
        "RadiomicGAN": TrainConfig(method="radiomicgan", schedule="dwt", th_eta=1, vgg_weights=vgg, **common),
        "filter baseline": TrainConfig(method="filter", schedule="none", **common),
        "Choe et al. CNN": TrainConfig(method="choe", schedule="none", **common),
    }
    folders, seconds = {}, {}
    for name, config in jobs.items():
        started = time.perf_counter()
        target = folder / config.method
        card = train(manifest_path, target, config, progress=sys.stderr.isatty(),
                     on_epoch=lambda r, name=name: print(
                         f"      {name} epoch {r['epoch'] + 1}: {_windows_text(r)} HU, "
                         f"validation PSNR {r['val_psnr_db']:.2f} dB (input {r['val_input_psnr_db']:.2f})"))
        if card.training.closed_form:
            v = card.validation
            print(f"      {name}: fitted; validation PSNR {v.psnr_db:.2f} dB (input {v.input_psnr_db:.2f})")
        folders[name] = target
        seconds[name] = time.perf_counter() - started
    return folders, seconds


def _windows_text(record: dict) -> str:
    windows = record.get("windows") or [record["window"]]
    return ("windows " if len(windows) > 1 else "window ") + " to ".join(f"[{lo:.0f}, {hi:.0f}]" for lo, hi in (windows[0], windows[-1])[:len(windows)])


def _plot_results(images: dict, target: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = target.shape[0] // 2
    rows, cols = target.shape[1:]
    zoom = (slice(rows // 3, rows // 3 + rows // 3), slice(cols // 6, cols // 6 + cols // 3))
    panels = [("reference (B50)", target)] + list(images.items())
    fig, axes = plt.subplots(3, len(panels), figsize=(3.2 * len(panels), 9.6))
    for col, (name, image) in enumerate(panels):
        axes[0, col].imshow(image[k], cmap="gray", vmin=DISPLAY_WINDOW[0], vmax=DISPLAY_WINDOW[1])
        axes[0, col].set_title(name if name.startswith("reference") else f"{name}\nPSNR {psnr(target, image):.2f} dB")
        axes[1, col].imshow(image[k][zoom], cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1])
        diff = axes[2, col].imshow((image - target)[k], cmap="RdBu_r", vmin=-150, vmax=150)
        for row in range(3):
            axes[row, col].axis("off")
    axes[1, 0].set_title("lung detail", fontsize=9)
    axes[2, 0].set_title("minus reference (HU)", fontsize=9)
    fig.colorbar(diff, ax=axes[2, :].tolist(), fraction=0.02)
    fig.suptitle(f"Held-out phantom scan, slice {k}: harmonizing B30 to B50 (display [-800, 800] HU; lung [-1200, 200] HU)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
