"""The ``radiomicgan`` command line.

Problems with the user's input end with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import RadiomicGANError
from .jobs import EPOCH_KEYS, ERROR_PREFIX, PROGRESS_INTERVAL_S, PROGRESS_OPTION, STOP_OPTION, WARNING_PREFIX, ExitCode, progress_line

EXIT_USAGE = ExitCode.BAD_INPUT
EXIT_CANCELLED = ExitCode.CANCELLED
# "-800:-300" is an HU range (evaluate --ranges), not an option: argparse treats it like a negative number.
_NEGATIVE_NUMBER_OR_RANGE = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d*\.?\d+:-?\d*\.?\d+$")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit status 2), and HU ranges that start with a minus sign."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER_OR_RANGE

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _kernel_pairs(values: list[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise RadiomicGANError(f"'{value}': expected KERNEL=FILE, e.g. B30=scan_b30.nrrd")
        if name in pairs:
            raise RadiomicGANError(f"'{value}': the name {name} is given twice; names must be unique")
        pairs[name] = path
    return pairs


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def _memory_size(text: str) -> int:
    """Bytes from '8G', '512M', '1.5GiB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}': expected a size such as 8G or 512M")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))


from .settings import finite_float as _finite_float  # noqa: E402  (one definition; numpy only, no torch)


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"'{text}': must be positive")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"'{text}': must be zero or more")
    return value


def _progress_lines(enabled: bool, task: str, interval: float = PROGRESS_INTERVAL_S):
    """A function(stage, done, total, **extra) printing one ``PROGRESS {json}`` line to stderr, at most every
    ``interval`` seconds except for a stage's first and last steps; a no-op when not ``enabled``."""
    import time

    last = {"time": 0.0, "stage": None}

    def emit(stage: str, done: int, total: int, **extra) -> None:
        if not enabled:
            return
        now = time.monotonic()
        if done < total and stage == last["stage"] and now - last["time"] < interval:
            return
        last["time"], last["stage"] = now, stage
        print(progress_line(task, stage, done, total, **extra), file=sys.stderr, flush=True)

    return emit


def _fraction(text: str) -> float:
    """A probability, a CAM level or an accuracy: between 0 and 1."""
    value = _finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"'{text}': must be between 0 and 1")
    return value


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"'{text}': expected auto, cpu, cuda or cuda:N")
    return text


def cmd_simulate(args) -> int:
    from .io import check_output_path, check_output_volume, check_writable, read_volume, write_volume
    from .simulate import rekernel_volume, simulate_phantom_pairs

    if args.pairs:
        from .simulate import rekernel_folder_pairs

        if not args.from_volume or not args.kernel:
            raise RadiomicGANError("--pairs needs --from FOLDER_OF_SCANS and --kernel NAME (the kernel to simulate)")
        if args.out:
            raise RadiomicGANError("--pairs names the output folder; leave out --out")
        manifest, count = rekernel_folder_pairs(
            args.from_volume, args.pairs, args.kernel, args.source_kernel, seed=args.seed, noise_scale=args.noise_scale,
            suffix=args.format, overwrite=args.overwrite,
        )
        print(f"wrote {count} pair(s) (source: simulated {args.kernel.upper()}, target: the scan) and {manifest}")
        return 0
    if not args.out:
        raise RadiomicGANError("simulate needs --out (or --pairs DIR with --from FOLDER)")
    if args.from_volume:
        if not args.kernel:
            raise RadiomicGANError("--from needs --kernel NAME (the kernel to simulate)")
        check_output_path(args.out, [args.from_volume])
        check_output_volume(args.out)
        volume = read_volume(args.from_volume, series_uid=args.series)
        result = rekernel_volume(volume, args.kernel, args.source_kernel, seed=args.seed, noise_scale=args.noise_scale)
        write_volume(result, args.out, overwrite=args.overwrite, description=result.meta.series_description,
                     derivation=f"RadiomicGAN {__version__}: kernel simulated from {volume.meta.kernel or 'source'} to {args.kernel}")
        print(f"wrote {args.out}: {result.shape[0]} slices, kernel {result.meta.kernel}")
        return 0
    from tqdm import tqdm

    check_writable(args.out)
    with tqdm(total=args.cases, desc="phantom pairs", unit="case", disable=not sys.stderr.isatty()) as bar:
        manifest = simulate_phantom_pairs(
            args.out, args.cases, size=args.size, slices=args.slices, seed=args.seed,
            source_kernel=args.source_kernel or "B30", target_kernel=args.kernel or "B50",
            spacing=args.spacing, slice_thickness=args.slice_thickness, noise_scale=args.noise_scale,
            suffix=args.format, overwrite=args.overwrite, progress=lambda done, total: bar.update(1),
        )
    print(f"wrote {args.cases} pair(s) and {manifest}")
    return 0


def cmd_info(args) -> int:
    import numpy as np

    from .io import read_volume
    from .kernels import preset_for_tag

    volume = read_volume(args.volume, series_uid=args.series, check_hu=False)
    preset = preset_for_tag(volume.meta.kernel)
    info = {
        "source": volume.source,
        "shape_zyx": list(volume.shape),
        "spacing_xyz_mm": list(volume.spacing),
        "spacing_z_from": volume.spacing_z_from or None,  # a lone DICOM slice: see the README's reader notes
        "origin_xyz_mm": list(volume.origin),
        "direction": list(volume.direction),
        "hu_min": float(np.min(volume.hu)),
        "hu_max": float(np.max(volume.hu)),
        "kernel_preset": preset.name if preset else None,
        **volume.meta.as_dict(),
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_calibrate(args) -> int:
    import numpy as np

    from .calibration import calibrate, fit_presets, format_report, plot_calibration
    from .io import check_writable, read_volume

    if args.out:
        check_writable(args.out)
    images, spacing = {}, args.spacing
    for name, path in _kernel_pairs(args.images).items():
        volume = read_volume(path)
        images[name] = volume.hu[volume.shape[0] // 2].astype(np.float64)
        spacing = spacing or volume.spacing[0]
    if len(images) < 2:
        raise RadiomicGANError("calibrate needs at least two kernels of one scan (KERNEL=FILE KERNEL=FILE ...)")
    shapes = {im.shape for im in images.values()}
    if len(shapes) > 1:
        raise RadiomicGANError(f"images differ in size {sorted(shapes)}; they must be registered slices of one scan")
    pairs, noises = calibrate(images, spacing)
    print(f"pixel spacing {spacing:.4f} mm")
    print(format_report(pairs, noises))
    if not args.no_realism:
        from .calibration import _preset, format_realism, realism

        names = list(images)
        for a, b in zip(names, names[1:]):
            if _preset(a) and _preset(b) and _preset(a) != _preset(b):
                print(format_realism(realism(images[a], images[b], spacing, _preset(a).name, _preset(b).name)))
    if args.fit:
        print("Refitted presets (transfer (1 + c f^2) exp(-a f^2 - b f^4), NPS = noise f T^2):")
        for name, values in fit_presets(pairs, noises).items():
            print(f"  {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in values.items()))
    if args.out:
        out = Path(args.out)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            plot_calibration(pairs, noises, out / "calibration.png")
        except BaseException:
            if created and not any(out.iterdir()):
                out.rmdir()  # a folder this run made for nothing
            raise
        print(f"wrote {out / 'calibration.png'}")
    return 0


def cmd_train(args) -> int:
    from .io import check_writable
    from .settings import from_arguments
    from .train import train

    config = from_arguments(args).check()  # what the method needs, before any path is touched
    check_writable(args.out)
    emit = _progress_lines(args.progress_json, "train")

    def on_epoch(record: dict) -> None:
        emit("epoch", record["epoch"] + 1, config.epochs, **{k: record[k] for k in EPOCH_KEYS if k in record})

    card = train(args.pairs, args.out, config, resume=args.resume, cancel_file=Path(args.cancel_file) if args.cancel_file else None,
                 on_epoch=on_epoch)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        v = card.validation
        status = card.training.status or "completed"
        if status == "cancelled":
            done = card.training.epochs_done
            kept = f"{args.out} keeps epoch {done} (continue with --resume)" if done else "no epoch completed; nothing kept"
            print(f"radiomicgan: cancelled: {kept}", file=sys.stderr)
            return EXIT_CANCELLED
        print(f"{status}: {args.out} ({card.method}); validation PSNR input {v.input_psnr_db if v else float('nan'):.2f} dB "
              f"-> model {v.psnr_db if v else float('nan'):.2f} dB")
    return 0


def cmd_harmonize(args) -> int:
    from tqdm import tqdm

    from .harmonize import Harmonizer, harmonize_file

    harmonizer = Harmonizer(args.model, device=args.device, batch=args.batch, compile=args.compile)
    emit = _progress_lines(args.progress_json, "harmonize")
    with tqdm(desc="harmonize", unit="slice", disable=args.progress_json or not sys.stderr.isatty()) as bar:
        def progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()
            emit("harmonize", done, total)
            if done == total and args.gradcam:
                emit("gradcam", 0, 1)

        result = harmonize_file(args.input, harmonizer, args.out, gradcam_output=args.gradcam, series_uid=args.series,
                                overwrite=args.overwrite, th_fail=args.th_fail, progress=progress)
    slices = result.volume.shape[0]
    print(f"wrote {args.out}: {slices} slices harmonized to {harmonizer.model.card.target_kernel} in "
          f"{result.seconds:.1f} s on {result.device} (batch {result.batch})")
    if result.windows:
        for name in ("input", "harmonized"):
            w = result.windows[name]
            span = w["hot_spot_window_hu"]
            print(f"  Grad-CAM {name:<10}: discriminator says standard with p={w['standard_probability']:.2f}; "
                  f"hot spots {100 * w['hot_fraction']:.1f} % of voxels" + (f", spanning [{span[0]:.0f}, {span[1]:.0f}] HU" if span else ""))
        print(f"  maps and windows: {args.gradcam} (harmonized), its _input and _windows.json companions")
    return 0


def cmd_cohort(args) -> int:
    """Harmonize and measure a whole study folder or CSV of scans (see radiomicgan.cohort)."""
    from .cohort import exit_status, run_cohort
    from .cohort_stats import format_batch_effect

    emit = _progress_lines(args.progress_json, "cohort")
    result = run_cohort(args.input, args.model, args.out, device=args.device, batch=args.batch, workers=args.workers,
                        rois=args.rois, params=args.params, per_range=args.per_range, min_slices=args.min_slices,
                        th_fail=args.th_fail, seed=args.seed, combat_train_fraction=args.combat_train_fraction,
                        progress=emit, show_bar=not args.progress_json and sys.stderr.isatty())
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if result.summary.get("batch_effect"):
        print(format_batch_effect(result.summary["batch_effect"]))
    return exit_status(result.failed)


def _parse_range(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition(":")
    try:
        lo_value, hi_value = float(lo), float(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected LO:HI in HU, e.g. -800:-300") from None
    if not sep or hi_value <= lo_value:
        raise argparse.ArgumentTypeError(f"'{text}': expected LO:HI with LO < HI")
    return lo_value, hi_value


def cmd_evaluate(args) -> int:
    from tqdm import tqdm

    from .io import check_owned, check_writable, read_volume
    from .report import REPORT_FILES, format_counts, write_report
    from .reproducibility import (
        PAPER_RANGES,
        body_slice_rois,
        check_params,
        evaluate,
        rois_from_boxes,
        rois_from_labels,
        sample_hu_rois,
    )

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise RadiomicGANError(f"{out}: already exists and is not empty; refusing to overwrite")
    check_writable(out)
    if args.overwrite and out.is_dir():
        check_owned(out, lambda f: f.name in REPORT_FILES)  # --overwrite replaces a report, never a user's file
    names = _kernel_pairs(args.candidate)
    if args.reference_name in names:
        raise RadiomicGANError(f"--candidate {args.reference_name}=...: the name of the reference (--reference-name); "
                               "give the candidate another name")
    check_params(args.params)
    reference = read_volume(args.reference)
    candidates = {name: read_volume(path) for name, path in names.items()}
    if args.labels:
        rois = []
        for value in args.labels:  # [GROUP=]FILE, repeatable: overlapping ROIs go into separate label maps
            group, sep, path = value.partition("=")
            if not sep or not group or Path(value).exists():
                group, path = "labels", value
            rois += [dataclasses.replace(r, name=f"{Path(path).stem}:{r.name}") if len(args.labels) > 1 else r
                     for r in rois_from_labels(read_volume(path, check_hu=False), reference, group)]
    elif args.boxes:
        try:
            boxes = json.loads(Path(args.boxes).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RadiomicGANError(f"{args.boxes}: not a readable JSON list of boxes ({exc})") from None
        rois = rois_from_boxes(boxes, reference)
    else:
        ranges = args.ranges or PAPER_RANGES
        rois = sample_hu_rois(reference, ranges, args.per_range, args.roi_size, args.roi_slices, seed=args.seed)
        for lo, hi in ranges:
            found = sum(r.group == f"[{lo:g}, {hi:g}]" for r in rois)
            if found < args.per_range:
                print(f"radiomicgan: note: {found} of {args.per_range} ROIs found inside the body with >= 80 % of voxels "
                      f"in [{lo:g}, {hi:g}] HU", file=sys.stderr)
        if args.whole_image:
            rois += body_slice_rois(reference)
    from .reproducibility import available_memory, plan_workers

    emit = _progress_lines(args.progress_json, "evaluate")
    images = 1 + len(candidates)
    volume_bytes = sum(v.hu.nbytes for v in (reference, *candidates.values()))
    workers, why = plan_workers(volume_bytes, images * len(rois), requested=args.workers, max_memory=args.max_memory,
                                available=available_memory())
    if not args.progress_json:
        print(f"radiomicgan: note: {workers} worker process{'es' if workers > 1 else ''}: {why}", file=sys.stderr)
    with tqdm(desc="radiomic features", unit="ROI", disable=args.progress_json or not sys.stderr.isatty()) as bar:
        def progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()
            emit("features", done, total, images=images, rois=len(rois))
            if done == total:
                emit("report", 0, 1)

        if rois:
            emit("features", 0, images * len(rois), images=images, rois=len(rois), workers=workers, workers_reason=why)
        evaluation = evaluate(reference, candidates, rois, params=args.params, workers=workers, threshold=args.threshold,
                              bootstrap=args.bootstrap, seed=args.seed, reference_name=args.reference_name, progress=progress)
    write_report(evaluation, out, {args.reference_name: reference, **candidates}, overwrite=args.overwrite)
    print(format_counts(evaluation.summary))
    print(f"wrote {out / 'report.html'}, summary.json, ccc.csv, features.csv")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), size=args.size, slices=args.slices, seed=args.seed, epochs=args.epochs,
             steps_per_epoch=args.steps_per_epoch, crop=args.crop, roi_count=args.rois)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .settings import add_arguments

    parser = _Parser(prog="radiomicgan", description="CT kernel harmonization for reproducible radiomics.")
    parser.add_argument("--version", action="version", version=f"radiomicgan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="make paired kernel data: phantom pairs, or re-kernel a scan (--from)")
    sim.add_argument("--out", help="folder for phantom pairs; output volume with --from")
    sim.add_argument("--pairs", metavar="DIR", help="with --from FOLDER: re-kernel every scan in it and write a pairs "
                     "manifest here (source: the simulated --kernel, target: the scan), to train without paired scans")
    sim.add_argument("--from", dest="from_volume", help="re-kernel this volume (DICOM folder or file, NRRD, NIfTI, MetaImage)")
    sim.add_argument("--kernel", help="kernel to simulate (with --from), or the target kernel of phantom pairs (default B50)")
    sim.add_argument("--source-kernel", help="kernel of the --from volume when its tag does not say; source kernel of phantom pairs (default B30)")
    sim.add_argument("--size", type=_at_least(16), default=256, help="phantom rows and columns (default 256)")
    sim.add_argument("--slices", type=_at_least(1), default=16, help="phantom slices (default 16)")
    sim.add_argument("--cases", type=_at_least(1), default=1, help="number of phantom pairs (default 1)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--spacing", type=_positive_float, default=0.7, help="phantom pixel spacing in mm (default 0.7)")
    sim.add_argument("--slice-thickness", type=_positive_float, default=1.0, help="phantom slice thickness in mm (default 1.0)")
    sim.add_argument("--noise-scale", type=_non_negative_float, default=1.0, help="noise power relative to the calibrated dose (0: noise-free)")
    sim.add_argument("--format", default=".nrrd", choices=[".nrrd", ".nii.gz", ".nii", ".mha"], help="phantom file format")
    sim.add_argument("--series", help="SeriesInstanceUID when the --from folder holds several series")
    sim.add_argument("--overwrite", action="store_true", help="replace an existing output")
    sim.set_defaults(func=cmd_simulate)

    info = sub.add_parser("info", help="print a volume's geometry, HU range and kernel tags")
    info.add_argument("volume")
    info.add_argument("--series", help="SeriesInstanceUID when the folder holds several series")
    info.set_defaults(func=cmd_info)

    cal = sub.add_parser("calibrate", help="compare kernel presets with real images of one scan in several kernels")
    cal.add_argument("images", nargs="+", metavar="KERNEL=FILE", help="registered images, smoothest first")
    cal.add_argument("--spacing", type=_positive_float, help="pixel spacing in mm when the headers lost it")
    cal.add_argument("--out", help="folder for calibration.png")
    cal.add_argument("--fit", action="store_true", help="also print presets refitted to these images")
    cal.add_argument("--no-realism", action="store_true",
                     help="skip comparing simulated pairs with each pair of neighbouring kernels (coherence, fitted filter gain)")
    cal.set_defaults(func=cmd_calibrate)

    tr = sub.add_parser("train", help="train RadiomicGAN (DWT) or a baseline on paired data")
    tr.add_argument("--pairs", required=True, help="a pairs manifest.json or the folder holding it")
    tr.add_argument("--out", required=True, help="model folder (new or empty; with --resume, the run to continue)")
    add_arguments(tr)  # every training setting, from radiomicgan.settings
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--cancel-file", help="stop at the next step when this file appears (default: OUT/CANCEL)")
    tr.add_argument(PROGRESS_OPTION, action="store_true",
                    help="print a machine-readable line 'PROGRESS {json}' to stderr after each epoch (for the Slicer module)")
    tr.add_argument(STOP_OPTION, action="store_true", help=STOP_HELP)
    tr.set_defaults(func=cmd_train)

    hz = sub.add_parser("harmonize", help="harmonize a CT volume with a trained model; optionally map Grad-CAM windows")
    hz.add_argument("input", help="DICOM folder or file, NRRD, NIfTI or MetaImage")
    hz.add_argument("--model", required=True, help="model folder made by `radiomicgan train`")
    hz.add_argument("--out", required=True, help="output volume (same format as the input; a folder for a DICOM series)")
    hz.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    hz.add_argument("--batch", type=_at_least(1), help="slices per batch (default 16 on CUDA, 1 on the CPU; halved automatically on out-of-memory)")
    hz.add_argument("--gradcam", metavar="CAM_OUTPUT",
                    help="also write the discriminator's Grad-CAM map of the result (.nrrd/.nii.gz/.mha), of the input "
                         "(<name>_input), and the hot-spot windows (<name>_windows.json)")
    hz.add_argument("--th-fail", type=_fraction, default=0.5, help="CAM value that marks a hot spot (default 0.5)")
    hz.add_argument("--compile", action="store_true", help="torch.compile the generator (CUDA; pays off on large volumes)")
    hz.add_argument("--series", help="SeriesInstanceUID when the input folder holds several series")
    hz.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    hz.add_argument(PROGRESS_OPTION, action="store_true",
                    help="print machine-readable lines 'PROGRESS {json}' to stderr instead of a progress bar (for the Slicer module)")
    hz.add_argument(STOP_OPTION, action="store_true", help=STOP_HELP)
    hz.set_defaults(func=cmd_harmonize)

    ev = sub.add_parser("evaluate", help="radiomic reproducibility (CCC) and PSNR/SSIM of candidates against a reference")
    ev.add_argument("--reference", required=True, help="the standard-kernel volume")
    ev.add_argument("--candidate", required=True, action="append", metavar="NAME=FILE",
                    help="a volume to compare (repeat): e.g. input=b30.nrrd radiomicgan=harmonized.nrrd")
    ev.add_argument("--out", required=True, help="report folder (features.csv, ccc.csv, summary.json, report.html)")
    rois = ev.add_mutually_exclusive_group()
    rois.add_argument("--labels", action="append", metavar="[GROUP=]FILE",
                      help="label map (on another grid: resampled nearest-neighbour onto the reference's): each label is an ROI of GROUP (default 'labels'); repeat for "
                           "more groups or for overlapping ROIs")
    rois.add_argument("--boxes", help='JSON list of boxes in mm: [{"name": "n1", "min": [x, y, z], "max": [x, y, z]}]')
    rois.add_argument("--ranges", type=_parse_range, nargs="+", metavar="LO:HI",
                      help="HU ranges for random ROIs (default the paper's -800:-300 -100:250 300:800)")
    ev.add_argument("--per-range", type=_at_least(3), default=20, help="random ROIs per HU range (default 20)")
    ev.add_argument("--roi-size", type=_positive_float, default=10.0, help="in-plane size of random ROIs in mm (default 10)")
    ev.add_argument("--roi-slices", type=_at_least(1), default=3, help="slices of random ROIs (default 3)")
    ev.add_argument("--whole-image", action="store_true", help="also measure the whole body on every slice")
    ev.add_argument("--params", help="pyradiomics parameter file (default: radiomics_ct.yaml shipped in the package, radiomicgan/data)")
    ev.add_argument("--workers", type=_at_least(1),
                    help="processes (default: one per core, as far as memory allows: each holds a copy of every volume)")
    ev.add_argument("--max-memory", type=_memory_size, metavar="SIZE",
                    help="memory the worker processes may use together, e.g. 8G or 512M (default: what is available)")
    ev.add_argument("--threshold", type=_fraction, default=0.85, help="CCC above which a feature is reproducible")
    ev.add_argument("--bootstrap", type=_at_least(0), default=100, help="bootstrap resamples of the ROIs for mean +- SD")
    ev.add_argument("--reference-name", default="reference")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--overwrite", action="store_true")
    ev.add_argument(PROGRESS_OPTION, action="store_true",
                    help="print machine-readable lines 'PROGRESS {json}' to stderr instead of a progress bar (for the Slicer module)")
    ev.add_argument(STOP_OPTION, action="store_true", help=STOP_HELP)
    ev.set_defaults(func=cmd_evaluate)

    co = sub.add_parser("cohort", help="harmonize and measure every CT series of a study folder or CSV (resumable)")
    co.add_argument("input", help="folder of DICOM studies (any depth) or images, or a CSV with columns path[, roi][, batch]")
    co.add_argument("--model", required=True, help="model folder made by `radiomicgan train`")
    co.add_argument("--out", required=True, help="output folder: harmonized/ (mirrored tree), qa.csv, features.csv, "
                    "cohort.json, report.html; rerun the same command to resume")
    co.add_argument("--rois", choices=["none", "labels", "ranges"], default="none",
                    help="pyradiomics features of input and result: labels (the CSV's roi label maps), ranges (random "
                         "boxes per HU range) or none (default)")
    co.add_argument("--params", help="pyradiomics parameter file (default: radiomics_ct.yaml shipped in the package, radiomicgan/data; "
                    "radiomics_cohort.yaml beside it for quick runs)")
    co.add_argument("--per-range", type=_at_least(1), default=5, help="random boxes per HU range with --rois ranges")
    co.add_argument("--min-slices", type=_at_least(1), default=3, help="series with fewer slices are skipped (default 3)")
    co.add_argument("--workers", type=_at_least(1), help="processes (default: one per core, fewer when memory is short)")
    co.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (torchrun: one GPU per process)")
    co.add_argument("--batch", type=_at_least(1), help="slices per batch")
    co.add_argument("--th-fail", type=_fraction, default=0.5, help="CAM value that marks a hot spot (default 0.5)")
    co.add_argument("--combat-train-fraction", type=_fraction, default=0.5,
                    help="share of the patients ComBat learns on (applied to the rest; default 0.5)")
    co.add_argument("--seed", type=int, default=0)
    co.add_argument("--progress-json", action="store_true",
                    help="print machine-readable lines 'PROGRESS {json}' to stderr instead of a progress bar")
    co.add_argument(STOP_OPTION, action="store_true", help=STOP_HELP)
    co.set_defaults(func=cmd_cohort)

    demo = sub.add_parser("demo", help="run the main job on the embedded phantom (no data needed)")
    demo.add_argument("--out", default="demo_output")
    demo.add_argument("--size", type=_at_least(16), default=128, help="phantom rows and columns (default 128)")
    demo.add_argument("--slices", type=_at_least(1), default=10, help="slices per phantom scan (default 10: ten whole-body ROIs)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=_at_least(1), default=16, help="training epochs (default 16: four of fixed growing, a quarter of the steps; eight of dynamic selection; four of consolidation)")
    demo.add_argument("--steps-per-epoch", type=_at_least(1), default=19, help="steps per epoch (default 19: about 300 steps in all)")
    demo.add_argument("--crop", type=_at_least(8), default=64, help="training crop size (default 64)")
    demo.add_argument("--rois", type=_at_least(3), default=15, help="random box ROIs per tissue label for the CCC report (default 15)")
    demo.set_defaults(func=cmd_demo)
    return parser


STOP_HELP = ("stop as on Ctrl-C when a line 'stop' arrives on standard input or it closes (for programs that run this "
             "one in the background, on every platform; train then keeps its last complete epoch)")


def main(argv: list[str] | None = None) -> int:
    import threading

    from .staging import sigterm_as_interrupt

    parser = build_parser()
    args = parser.parse_args(argv)
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest: f"{WARNING_PREFIX}{message}\n"
    if threading.current_thread() is threading.main_thread() and getattr(args, "stop_on_stdin", False):
        from .jobs import watch_stdin_for_stop

        watch_stdin_for_stop()
    try:
        from .lock import command_lock

        # a cancel by SIGTERM removes every staging, as Ctrl-C does; a second run on an output in use is refused
        with sigterm_as_interrupt(), command_lock(args.command, args):
            return args.func(args)
    except RadiomicGANError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # an output path the system refuses (a file in the way, no permission, too long)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{ERROR_PREFIX}{where}{exc.strerror or str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("radiomicgan: cancelled; no output written", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
