"""Cohort mode's throughput: scans per minute for ``radiomicgan cohort`` on a simulated DICOM cohort, end to end
(discovery, reading, harmonizing, Grad-CAM QA, writing derived DICOM, markers, report), without and with features
(pyradiomics on the phantoms' tissue labels, ``radiomicgan/data/radiomics_cohort.yaml``). Prints figures; asserts nothing.

    python bench/bench_cohort.py [--patients 8] [--size 128] [--slices 10] [--model MODEL] [--workers N] [--device cuda]

Without ``--model`` a RadiomicGAN is built with a random encoder and saved (the cost of the architecture, not of
training). The figure counts the scans processed (harmonized ones and the standard-kernel ones measured as
references); the wall time includes the report. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def random_model(folder: Path) -> Path:
    """A RadiomicGAN model folder with untrained weights (the cost is the architecture's)."""
    from radiomicgan.simulate import simulate_phantom_pairs
    from radiomicgan.train import TrainConfig, train

    simulate_phantom_pairs(folder / "pairs", cases=2, size=32, slices=2, seed=1)
    train(folder / "pairs", folder / "model", TrainConfig(epochs=1, steps_per_epoch=1, batch=1, crop=32, vgg_weights="random",
                                                          schedule="none", val_slices=1, device="cpu"), progress=False)
    return folder / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("--model")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json")
    args = parser.parse_args()

    from radiomicgan.cohort import QUICK_PARAMS, run_cohort
    from radiomicgan.cohort_demo import write_demo_cohort

    work = Path(tempfile.mkdtemp(prefix="bench_cohort_"))
    try:
        csv = write_demo_cohort(work / "cohort", args.patients, size=args.size, slices=args.slices)
        model = args.model or random_model(work / "training")
        params = str(QUICK_PARAMS)
        figures = {"patients": args.patients, "size": args.size, "slices": args.slices, "cpu_count": os.cpu_count()}
        for name, rois in (("harmonize + QA", "none"), ("harmonize + QA + features", "labels")):
            started = time.perf_counter()
            result = run_cohort(csv, model, work / f"out_{rois}", device=args.device, workers=args.workers, rois=rois,
                                params=params, log=None)
            seconds = time.perf_counter() - started
            processed = result.summary["counts"]["harmonized"] + result.summary["counts"]["reference"]
            figures[name] = {"scans": processed, "seconds": round(seconds, 1), "scans_per_minute": round(60 * processed / seconds, 1)}
            print(f"{name:<28}{processed:>4} scans of {args.size}x{args.size}x{args.slices} in {seconds:6.1f} s: "
                  f"{60 * processed / seconds:6.1f} scans/min")
            if args.json:
                Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
