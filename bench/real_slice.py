"""Real-slice benchmark: every method trained on the left half of a real CT slice reconstructed with B30 and
B50 (the same raw data), evaluated on the right half, which no method saw.

    python bench/real_slice.py [--data ../shared/data/real-kernels] [--device cuda] [--steps 300] [--out DIR]

Prints, per method: PSNR and SSIM against the real B50 right half (HU clipped to [-1024, 3071]), the number of
reproducible 2D radiomic features (Lin's CCC > 0.85 over ROIs) per HU range, and the training time. Learned
methods get the same number of optimisation steps on the same crops. Skips (exit 0) where the data is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from radiomicgan.metrics import psnr, ssim  # noqa: E402
from radiomicgan.volume import CTVolume, CTMetadata  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "real-kernels"
PARAMS_2D = REPO / "radiomicgan" / "data" / "radiomics_ct_2d.yaml"
RADIOMICGAN_SCHEDULES = {"radiomicgan-fixed": "fixed", "radiomicgan-dynamic": "dynamic", "radiomicgan-dwt": "dwt"}
METHODS = ("input", "filter", "choe", "radiomicgan-none", *RADIOMICGAN_SCHEDULES)


def read_slice(path: Path) -> tuple[np.ndarray, float]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    return hu.reshape(-1, *hu.shape[-2:])[0], float(image.GetSpacing()[0])


def half_volume(hu: np.ndarray, spacing: float, kernel: str) -> CTVolume:
    return CTVolume(hu[None].copy(), spacing=(spacing, spacing, 1.0), meta=CTMetadata(kernel=kernel), source=f"test1 {kernel}")


def write_training_pair(folder: Path, source: CTVolume, target: CTVolume) -> Path:
    from radiomicgan.dataset import manifest_entry, write_manifest
    from radiomicgan.io import write_volume

    write_volume(source, folder / "left_B30.nrrd")
    write_volume(target, folder / "left_B50.nrrd")
    return write_manifest(folder, [manifest_entry("test1-left", "left_B30.nrrd", "left_B50.nrrd", "B30", "B50")],
                          {"what": "left half of the real test1 slice"})


def train_method(method: str, manifest: Path, out: Path, args) -> float:
    from radiomicgan.train import TrainConfig, train

    started = time.perf_counter()
    if method == "filter":
        config = TrainConfig(method="filter", schedule="none")
    else:
        schedule = "none" if method in ("choe", "radiomicgan-none") else RADIOMICGAN_SCHEDULES[method]
        name = "choe" if method == "choe" else "radiomicgan"
        config = TrainConfig(method=name, schedule=schedule, epochs=args.epochs, steps_per_epoch=args.steps // args.epochs,
                             batch=args.batch, crop=args.crop, vgg_weights=args.vgg_weights, device=args.device,
                             seed=args.seed, val_slices=1, th_eta=1, **json.loads(args.config))
    train(manifest, out, config, progress=False)
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with test1_B30.mha and test1_B50.mha")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=300, help="optimisation steps per learned method")
    parser.add_argument("--epochs", type=int, default=12, help="epochs the steps are split into (DWT counts epochs)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--vgg-weights", default="random", help="'imagenet', a weights file, or 'random' (offline)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--rois-per-range", type=int, default=20)
    parser.add_argument("--no-features", action="store_true", help="PSNR/SSIM only (fast)")
    parser.add_argument("--workers", type=int, default=None, help="feature-extraction processes (default: one per core)")
    parser.add_argument("--label", default="", help="suffix for the method names in the table (experiments)")
    parser.add_argument("--config", default="{}", help="extra TrainConfig fields as JSON, for experiments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for the models, summary.json and table.md")
    args = parser.parse_args(argv)
    files = [args.data / "test1_B30.mha", args.data / "test1_B50.mha"]
    if not all(f.is_file() for f in files):
        print(f"real_slice: skipped: {args.data} does not hold test1_B30.mha and test1_B50.mha")
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}")

    b30, spacing = read_slice(files[0])
    b50, _ = read_slice(files[1])
    half = b30.shape[1] // 2
    train_source, train_target = half_volume(b30[:, :half], spacing, "B30"), half_volume(b50[:, :half], spacing, "B50")
    test_source, test_target = half_volume(b30[:, half:], spacing, "B30"), half_volume(b50[:, half:], spacing, "B50")

    from radiomicgan.harmonize import harmonize_hu
    from radiomicgan.modelio import load_model

    out = args.out or Path(tempfile.mkdtemp(prefix="real_slice-"))
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_training_pair(out / "pairs", train_source, train_target) if not (out / "pairs").exists() else out / "pairs" / "manifest.json"
    images, seconds = {}, {}
    for method in methods:
        if method == "input":
            images[method] = test_source.hu
            continue
        folder = out / "models" / method
        seconds[method] = train_method(method, manifest, folder, args)
        images[method] = harmonize_hu(load_model(folder), test_source.hu, test_source.spacing[:2], device=args.device)
        print(f"  {method}: trained in {seconds[method]:.0f} s, PSNR {psnr(test_target.hu, images[method]):.2f} dB", flush=True)

    rows = {m: {"psnr_db": psnr(test_target.hu, im), "ssim": ssim(test_target.hu, im), "train_seconds": seconds.get(m, 0.0)}
            for m, im in images.items()}
    if args.label:
        rows = {(m if m == "input" else f"{m} {args.label}"): r for m, r in rows.items()}
        images = {(m if m == "input" else f"{m} {args.label}"): im for m, im in images.items()}
    groups = []
    if not args.no_features:
        from radiomicgan.reproducibility import evaluate, sample_hu_rois

        rois = sample_hu_rois(test_target, per_range=args.rois_per_range, size_mm=10.0, slices=1, seed=args.seed)
        evaluation = evaluate(test_target, {m: test_source.with_hu(im) for m, im in images.items()}, rois,
                              params=PARAMS_2D, bootstrap=0, seed=args.seed, reference_name="B50", workers=args.workers)
        for group, entry in evaluation.summary["groups"].items():
            groups.append(group)
            for m in images:
                rows[m][group] = entry.get(m, {}).get("reproducible") if "too_small" not in entry and "skipped" not in entry else None
        features = evaluation.summary["features"]
        rois_per_group = {g: e.get("rois") for g, e in evaluation.summary["groups"].items()}
    else:
        features, rois_per_group = 0, {}

    header = ["method", "PSNR (dB)", "SSIM", *[f"reproducible {g} ({rois_per_group.get(g)} ROIs)" for g in groups], "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m, r in rows.items():
        cells = [m, f"{r['psnr_db']:.2f}", f"{r['ssim']:.4f}", *[str(r.get(g)) for g in groups], f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    budget = (f"{args.steps} steps ({args.epochs} epochs) of batch {args.batch}, {args.crop}x{args.crop} crops, "
              f"VGG {args.vgg_weights}, device {args.device}; {features} 2D features per ROI")
    table = "\n".join(lines)
    print(f"\nReal slice test1, B30 -> B50: trained on the left half, evaluated on the right half\n{budget}\n\n{table}")
    (out / "table.md").write_text(f"{budget}\n\n{table}\n")
    (out / "summary.json").write_text(json.dumps({"budget": budget, "rows": rows, "rois_per_group": rois_per_group,
                                                  "args": {k: str(v) for k, v in vars(args).items()}}, indent=2) + "\n")
    print(f"wrote {out / 'table.md'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
