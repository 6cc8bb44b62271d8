"""A simulated cohort to run cohort mode on a fresh machine: phantom "patients" (one chest phantom each), every one
reconstructed with the smooth and the sharp kernel from one noise realisation (paired reconstructions), some also
with a very sharp one, written as a DICOM tree patient/study/series, with the phantoms' tissue label maps and a
CSV (path, roi) beside it; optionally a small RadiomicGAN trained on other phantoms.

    python -m radiomicgan.cohort_demo --out cohort_demo/      # then the radiomicgan cohort command it prints
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from .cohort import QUICK_PARAMS
from .errors import CTInputError
from .io import write_map, write_volume
from .kernels import get_preset, simulate_kernels
from .phantom import make_chest_phantom
from .simulate import SIMULATED_MANUFACTURER, simulated_kernel_tag
from .volume import CTMetadata, CTVolume


def write_demo_cohort(out: str | Path, patients: int = 12, kernels=("B30", "B50"), extra_kernel: str | None = "B70",
                      extra_every: int = 4, size: int = 64, slices: int = 6, seed: int = 0, spacing: float = 0.7) -> Path:
    """Write the cohort tree under ``out`` (refused if it exists and is not empty); returns the CSV's path."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CTInputError(f"{out}: already exists and is not empty; refusing to overwrite")
    seeds = np.random.SeedSequence(seed).generate_state(patients)
    rows = []
    for p in range(patients):
        kernel_names = list(kernels) + ([extra_kernel] if extra_kernel and p % extra_every == extra_every - 1 else [])
        presets = [get_preset(k) for k in kernel_names]
        phantom_seed, noise_seed = np.random.SeedSequence(int(seeds[p])).generate_state(2)
        phantom = make_chest_phantom(size, slices, seed=int(phantom_seed), spacing=spacing, slice_thickness=1.0)
        images = simulate_kernels(phantom.hu, (spacing, spacing), presets, seed=int(noise_seed))
        patient = f"patient{p + 1:02d}"
        template = Dataset()
        template.PatientID, template.PatientName = patient.upper(), f"Phantom^{patient}"
        template.StudyInstanceUID = generate_uid(entropy_srcs=[f"cohort-demo-{seed}-{patient}-study"])
        template.FrameOfReferenceUID = generate_uid(entropy_srcs=[f"cohort-demo-{seed}-{patient}-frame"])
        template.StudyDescription = "Simulated chest CT"
        half = (size - 1) / 2.0
        labels_path = out / "labels" / f"{patient}.nrrd"
        for number, (hu, preset) in enumerate(zip(images, presets), start=1):
            meta = CTMetadata(kernel=simulated_kernel_tag(preset), manufacturer=SIMULATED_MANUFACTURER, slice_thickness=1.0,
                              series_description=f"Chest {preset.name} (simulated)", patient_id=patient.upper())
            volume = CTVolume(hu=hu, spacing=(spacing, spacing, 1.0), origin=(-half * spacing, -half * spacing, 0.0),
                              meta=meta, source=f"{patient} {preset.name}", dicom_template=template)
            series = out / "dicom" / patient / "study1" / f"series{number}_{preset.name}"
            write_volume(volume, series, description=meta.series_description,
                         derivation=f"simulated {preset.name} reconstruction of a chest phantom")
            if not labels_path.exists():
                labels_path.parent.mkdir(parents=True, exist_ok=True)
                write_map(np.where(np.isin(phantom.labels, (1, 3, 6, 7)), phantom.labels, 0), volume, labels_path)
            rows.append({"path": series.relative_to(out).as_posix(), "roi": labels_path.relative_to(out).as_posix()})
    with open(out / "cohort.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "roi"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out / "cohort.csv"


def train_demo_model(out: str | Path, size: int = 64, epochs: int = 8, steps_per_epoch: int = 12, seed: int = 100) -> Path:
    """A small RadiomicGAN (dwt, random VGG-19 encoder as offline) on phantom pairs that are not in the cohort."""
    from .simulate import simulate_phantom_pairs
    from .train import TrainConfig, train

    out = Path(out)
    simulate_phantom_pairs(out / "pairs", cases=3, size=size, slices=4, seed=seed)
    config = TrainConfig(method="radiomicgan", schedule="dwt", th_eta=1, vgg_weights="random", epochs=epochs,
                         steps_per_epoch=steps_per_epoch, crop=min(64, size), batch=4, seed=0, val_slices=2, device="cpu")
    train(out / "pairs", out / "model", config, progress=sys.stderr.isatty())
    return out / "model"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m radiomicgan.cohort_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cohort_demo")
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the demo's model, 12 steps each (0: no model)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    manifest = write_demo_cohort(Path(args.out) / "cohort", args.patients, size=args.size, slices=args.slices, seed=args.seed)
    print(f"wrote the cohort and {manifest} in {time.perf_counter() - started:.0f} s")
    if args.epochs:
        started = time.perf_counter()
        model = train_demo_model(Path(args.out) / "training", size=args.size, epochs=args.epochs)
        print(f"trained {model} in {time.perf_counter() - started:.0f} s")
        print(f"next: radiomicgan cohort {manifest} --model {model} --out {Path(args.out) / 'result'} --rois labels "
              f"--params {QUICK_PARAMS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
