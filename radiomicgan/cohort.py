"""Cohort mode: every CT series of a study folder (or a CSV of scans) harmonized and measured in one resumable
command, with one QA row per scan, optional pyradiomics features per ROI, and the batch effect between kernel
groups before and after (see ``cohort_stats``), in a report (``cohort_report``).

Safety: the input is only read. Each scan's outputs are written under hidden names and renamed into place; its
marker (a JSON holding the input's, the model's and the settings' hashes, the QA row and the features) is written
last, atomically, so a run killed at any moment (SIGKILL included) is resumed by running it again: scans with a
matching marker are skipped, the others redone from scratch. A lock on the output folder (``fcntl.flock``;
``msvcrt.locking`` on Windows) refuses a second run on the same output. One bad scan fails alone, with its reason
in the QA table; the exit status counts the failed scans (``exit_status``).

Scale: a bounded process pool on one machine (memory-aware), or ``torchrun --nproc_per_node N`` with one process
per GPU (or CPU process, gloo), each on a deterministic shard of the sorted scans; rank 0 merges after a barrier.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .errors import CTInputError, RadiomicGANError
from .jobs import ExitCode, scans_failed_status
from .kernels import preset_for_tag
from .lock import OutputLock
from .staging import write_fault

# Exit status of a run where scans failed: this base plus the number failed (capped at 63), so a script can read the
# count; 0 when none failed. (A named constant here until the project's exit codes are unified.)
EXIT_SCANS_FAILED_BASE = int(ExitCode.SCANS_FAILED)  # kept for readers of this module; the contract is jobs.py
MIN_SLICES = 3
# pyradiomics parameters for quick cohort runs (the demo, the tests): original image only, about 100 features per ROI
QUICK_PARAMS = Path(__file__).resolve().parent / "data" / "radiomics_cohort.yaml"
MARKER_FORMAT = "radiomicgan-cohort-scan-1"
MARKERS = "markers"
HARMONIZED = "harmonized"
LOCK_NAME = ".cohort.lock"
# QA bounds: a scan outside any of them is flagged (listed first in the report), never silently passed.
QA_BOUNDS = {
    "hu_shift_soft_tissue": 20.0,  # |mean HU change| inside soft tissue (input -100..250 HU; see tissue_interiors)
    "hu_shift_lung": 40.0,  # |mean HU change| inside lung (input -950..-500 HU)
    "outline_shift_px": 2.0,  # body or lung outline moved by more than this (95th percentile distance, pixels)
}
SOFT_TISSUE_HU = (-100.0, 250.0)
LUNG_HU = (-950.0, -500.0)
# QA table columns, in order (qa.csv, the report, the Slicer table node).
QA_COLUMNS = (
    "scan", "status", "flagged", "reason", "warnings", "kernel_before", "kernel_after", "batch", "patient_id", "study_uid",
    "series_uid", "modality", "slices", "rows", "columns", "spacing_mm", "seconds", "hu_shift_soft_tissue", "hu_shift_lung",
    "outline_shift_body_px", "outline_shift_lung_px", "p_standard_input", "p_standard_result", "hot_fraction_input",
    "hot_fraction_result", "rois", "output", "source",
)
STATUSES = ("harmonized", "reference", "skipped", "failed")


exit_status = scans_failed_status


# ------------------------------------------------------------------------------------------------ discovery


@dataclass
class Scan:
    """One series found in the input: what it is, and whether (and why not) it is processed."""

    id: str  # relative path in the input tree (POSIX), unique; the output mirrors it
    source: str  # the series' folder or the image file
    files: list[str] = field(default_factory=list)
    kind: str = "dicom"  # or "image"
    series_uid: str = ""
    modality: str = ""
    kernel: str = ""
    patient_id: str = ""
    study_uid: str = ""
    description: str = ""
    shape: tuple = ()  # (slices, rows, columns)
    spacing: tuple = ()  # (x, y, z) mm
    roi: str = ""  # label map (CSV column roi)
    batch: str = ""  # batch/site (CSV column batch); the kernel group otherwise
    status: str = "todo"  # todo (to harmonize), reference (already the target kernel), skipped
    reason: str = ""

    def row(self) -> dict:
        """The QA row of a scan that is not processed (skipped), or its identity for one that is."""
        return {"scan": self.id, "status": "skipped" if self.status == "skipped" else self.status, "flagged": False,
                "reason": self.reason, "warnings": "", "kernel_before": self.kernel, "kernel_after": self.kernel,
                "batch": self.batch or self.kernel_group, "patient_id": self.patient_id, "study_uid": self.study_uid,
                "series_uid": self.series_uid, "modality": self.modality, "slices": self.shape[0] if self.shape else "",
                "rows": self.shape[1] if self.shape else "", "columns": self.shape[2] if self.shape else "",
                "spacing_mm": " x ".join(f"{s:g}" for s in self.spacing) if self.spacing else "", "source": self.source}

    @property
    def kernel_group(self) -> str:
        preset = preset_for_tag(self.kernel)
        return preset.name if preset else (self.kernel or "unknown")


def _skip(scan: Scan, reason: str) -> Scan:
    scan.status, scan.reason = "skipped", reason
    return scan


def discover(input_path: str | os.PathLike, source_kernel: str | None = None, target_kernel: str | None = None,
             min_slices: int = MIN_SLICES) -> list[Scan]:
    """Every series in a folder tree (any depth) or listed in a CSV (columns path, optional roi, optional batch),
    sorted by id, each with a reason when it will not be harmonized."""
    p = Path(input_path)
    if not p.exists():
        raise CTInputError(f"{p}: does not exist")
    if p.is_file() and p.suffix.lower() == ".csv":
        scans = _discover_csv(p, min_slices)
    elif p.is_dir():
        scans = _discover_tree(p, p, min_slices)
    else:
        raise CTInputError(f"{p}: give a folder of DICOM studies or a CSV of scans (columns path, roi, batch)")
    ids = [s.id for s in scans]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise CTInputError(f"{p}: two scans share the name {duplicate}")
    for scan in scans:
        if scan.status == "todo":
            _classify_kernel(scan, source_kernel, target_kernel)
    return sorted(scans, key=lambda s: s.id)


def _classify_kernel(scan: Scan, source_kernel: str | None, target_kernel: str | None) -> None:
    found = preset_for_tag(scan.kernel)
    if not scan.kernel:
        _skip(scan, "no ConvolutionKernel tag: which kernel to convert is unknown")
    elif found is None:
        _skip(scan, f"kernel '{scan.kernel}' matches no kernel preset")
    elif target_kernel and found == preset_for_tag(target_kernel):
        scan.status, scan.reason = "reference", f"already the model's target kernel ({target_kernel}): measured, not harmonized"
    elif source_kernel and found != preset_for_tag(source_kernel):
        _skip(scan, f"kernel '{scan.kernel}' ({found.name}): the model converts {source_kernel} to {target_kernel}")


def _discover_csv(path: Path, min_slices: int) -> list[Scan]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CTInputError(f"{path}: unreadable CSV ({exc})") from None
    if not rows or "path" not in rows[0]:
        raise CTInputError(f"{path}: needs a header with a 'path' column (optional: roi, batch)")
    scans = []
    for n, row in enumerate(rows, start=2):
        entry = (row.get("path") or "").strip()
        if not entry:
            raise CTInputError(f"{path}, line {n}: empty path")
        target = (path.parent / entry) if not Path(entry).is_absolute() else Path(entry)
        roi = (row.get("roi") or "").strip()
        batch = (row.get("batch") or "").strip()
        if not target.exists():
            scans.append(_skip(Scan(id=entry, source=str(target)), "does not exist"))
            continue
        found = _discover_tree(target, path.parent, min_slices) if target.is_dir() else _discover_files([target], path.parent, min_slices)
        if not found:
            scans.append(_skip(Scan(id=entry, source=str(target)), "no CT image found"))
        for scan in found:
            scan.roi = str((path.parent / roi) if roi and not Path(roi).is_absolute() else roi) if roi else ""
            scan.batch = batch
            if scan.roi and not Path(scan.roi).is_file() and scan.status == "todo":
                _skip(scan, f"ROI label map {roi} does not exist")
        scans += found
    return scans


def _discover_tree(folder: Path, root: Path, min_slices: int) -> list[Scan]:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith(".") and f.name.upper() != "DICOMDIR")
    return _discover_files(files, root, min_slices)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix() or "."
    except ValueError:
        return path.resolve().as_posix().lstrip("/")


def _discover_files(files: list[Path], root: Path, min_slices: int) -> list[Scan]:
    from .io import _try_dcmread, image_suffix

    scans: list[Scan] = []
    series: dict[str, list] = {}
    for path in files:
        if image_suffix(path):
            scans.append(_image_scan(path, root, min_slices))
            continue
        try:
            ds = _try_dcmread(path)
        except CTInputError as exc:
            scans.append(_skip(Scan(id=_relative(path, root), source=str(path), files=[str(path)]),
                               f"unreadable: {str(exc).split(': ', 1)[-1]}"))
            continue
        if ds is not None and "PixelData" not in ds and ("Rows" in ds or _image_storage(ds)):
            scans.append(_skip(Scan(id=_relative(path, root), source=str(path), files=[str(path)]),
                               "unreadable: an image header without pixel data (truncated file?)"))
            continue
        if ds is None or "PixelData" not in ds:
            continue  # not DICOM, or no image (a report, a presentation state)
        series.setdefault(str(ds.get("SeriesInstanceUID", "")) or f"no-uid:{path.parent}", []).append((path, ds))
    by_folder: dict[Path, int] = {}
    for members in series.values():
        folder = Path(os.path.commonpath([str(m[0].parent) for m in members]))
        by_folder[folder] = by_folder.get(folder, 0) + 1
    for uid, members in series.items():
        folder = Path(os.path.commonpath([str(m[0].parent) for m in members]))
        ds = members[0][1]
        scan_id = _relative(folder, root)
        if by_folder[folder] > 1:  # several series in one folder: each gets a name of its own
            scan_id = f"{scan_id}/series{ds.get('SeriesNumber', '') or ''}_{uid.replace('.', '')[-8:]}".replace("./", "")
        scans.append(_dicom_scan(scan_id, folder, members, min_slices))
    return scans


def _image_storage(ds) -> bool:
    """The file says it holds an image (its SOP class), whatever is left of it."""
    uid = getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "")
    return "Image Storage" in str(getattr(uid, "name", ""))


def _dicom_scan(scan_id: str, folder: Path, members: list, min_slices: int) -> Scan:
    from .io import _kernel_text, _slice_hu

    ds = members[0][1]
    spacing = [float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])]
    thickness = ds.get("SliceThickness")
    scan = Scan(
        id=scan_id, source=str(folder), files=[str(m[0]) for m in members], kind="dicom",
        series_uid=str(ds.get("SeriesInstanceUID", "")), modality=str(ds.get("Modality", "")), kernel=_kernel_text(ds),
        patient_id=str(ds.get("PatientID", "")), study_uid=str(ds.get("StudyInstanceUID", "")),
        description=str(ds.get("SeriesDescription", "")),
        shape=(len(members), int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)),
        spacing=(spacing[1], spacing[0], float(thickness) if thickness not in (None, "") else 0.0),
    )
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if scan.modality.upper() != "CT":
        return _skip(scan, f"not CT (modality {scan.modality or 'missing'})")
    if "LOCALIZER" in image_type or "SCOUT" in image_type or "TOPOGRAM" in scan.description.upper():
        return _skip(scan, "localizer (scout) image, not a volume")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return _skip(scan, "enhanced multi-frame DICOM: not supported; export as classic slices")
    if len(members) < min_slices:
        return _skip(scan, f"too few slices ({len(members)}; at least {min_slices})")
    try:  # one slice decoded now: a compressed series without a decoder is named here, not after the pool started
        import pydicom

        _slice_hu(members[0][0], pydicom.dcmread(str(members[0][0])))
    except CTInputError as exc:
        text = str(exc)
        return _skip(scan, ("compressed without decoder: " if "no installed decoder" in text else "unreadable: ")
                     + text.split(": ", 1)[-1][:160])
    except Exception as exc:  # pydicom on a broken file
        return _skip(scan, f"unreadable: {type(exc).__name__}: {str(exc)[:120]}")
    return scan


def _image_scan(path: Path, root: Path, min_slices: int) -> Scan:
    import SimpleITK as sitk

    scan = Scan(id=_relative(path, root), source=str(path), files=[str(path)], kind="image")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return _skip(scan, "unreadable: not a readable image (truncated or corrupt?)")
    keys = set(reader.GetMetaDataKeys())
    get = lambda key: reader.GetMetaData(key).strip() if key in keys else ""  # noqa: E731
    scan.kernel = get("ConvolutionKernel")
    if not scan.kernel and "descrip" in keys:
        from .io import _kernel_from_description

        scan.kernel = _kernel_from_description(get("descrip"))
    scan.modality = get("Modality").removeprefix("MET_MOD_") or "CT"
    scan.description = get("SeriesDescription")
    size = reader.GetSize()
    scan.shape = (size[2] if len(size) > 2 else 1, size[1], size[0])
    scan.spacing = tuple(reader.GetSpacing()) + ((0.0,) if len(size) < 3 else ())
    if scan.modality.upper() not in ("CT", "UNKNOWN"):
        return _skip(scan, f"not CT (modality {scan.modality})")
    if reader.GetPixelID() in (sitk.sitkUInt8, sitk.sitkLabelUInt8) or "label" in path.name.lower():
        return _skip(scan, "a label map, not CT")
    if scan.shape[0] < min_slices:
        return _skip(scan, f"too few slices ({scan.shape[0]}; at least {min_slices})")
    return scan


# ------------------------------------------------------------------------------------------------ hashes, lock


def file_hash(paths, digest=None) -> str:
    digest = digest or hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_hash(model: str | os.PathLike) -> str:
    from .modelio import CARD_NAME, WEIGHTS_NAME

    return file_hash([Path(model) / CARD_NAME, Path(model) / WEIGHTS_NAME])


def scan_hash(scan: Scan) -> str:
    return file_hash(scan.files + ([scan.roi] if scan.roi else []))


class CohortLock(OutputLock):
    """An OS lock on OUT/.cohort.lock, held for the run (see radiomicgan.lock): a second run on the same output is
    refused at once, and a killed run never blocks the next."""

    def __init__(self, out: Path):
        super().__init__(out, "cohort run", path=Path(out) / LOCK_NAME, remove=False)


def atomic_write(path: Path, text: str) -> None:
    """Write beside the target under a hidden name, flush to disk, rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk: one line naming the file (staging.write_fault, as for every output)
        raise write_fault(exc, [tmp], [path], "cohort " + ("table" if path.suffix == ".csv" else "record")) or exc from None
    finally:
        if tmp.exists():
            tmp.unlink()


_PARTIAL = re.compile(r"^\..+[.-](partial|old)-[0-9a-f]{8}")


def clean_partials(out: Path) -> list[Path]:
    """Remove what a killed run left staged (hidden ``.NAME.partial-XXXXXXXX`` and ``.old-`` files and folders) under
    the output folder; called under the lock, when no other run can be writing there."""
    removed = []
    for path in sorted(Path(out).rglob(".*"), key=lambda p: len(p.parts)):
        if _PARTIAL.match(path.name) and (path.is_file() or path.is_dir()) and path.exists():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
    return removed


def marker_path(out: Path, scan_id: str) -> Path:
    safe = re.sub(r"[^\w.-]+", "_", scan_id).strip("_") or "scan"
    return Path(out) / MARKERS / f"{safe}-{hashlib.sha1(scan_id.encode()).hexdigest()[:8]}.json"


def read_marker(out: Path, scan: Scan, hashes: dict) -> dict | None:
    """The scan's finished record when its marker matches the input, model and settings, else None."""
    path = marker_path(out, scan.id)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("format") != MARKER_FORMAT or record.get("scan") != scan.id:
        return None
    if any(record.get(key) != value for key, value in hashes.items()):
        return None
    return record


# ------------------------------------------------------------------------------------------------ one scan


@dataclass
class Settings:
    """What a scan's result depends on besides its input and the model (hashed into the marker)."""

    model: str
    out: str
    device: str = "cpu"
    batch: int | None = None
    rois: str = "none"  # none | labels (the CSV's roi column) | ranges (random boxes per HU range)
    params: str | None = None
    per_range: int = 5
    roi_size_mm: float = 10.0
    roi_slices: int = 3
    th_fail: float = 0.5
    seed: int = 0
    threads: int = 1

    def hash(self) -> str:
        from .reproducibility import DEFAULT_PARAMS

        keyed = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "device", "batch", "threads", "model")}
        keyed["params"] = file_hash([self.params or DEFAULT_PARAMS]) if self.rois != "none" else None
        keyed["qa_bounds"] = QA_BOUNDS
        keyed["version"] = __version__
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


_HARMONIZER: dict = {}
_PRELOADED: dict = {}


def _harmonizer(settings: Settings):
    from .harmonize import Harmonizer

    key = (settings.model, settings.device, settings.batch)
    if key not in _HARMONIZER:
        _HARMONIZER.clear()
        model = _PRELOADED.pop(settings.model, None) or settings.model  # loaded once by run_cohort when in-process
        _HARMONIZER[key] = Harmonizer(model, device=settings.device, batch=settings.batch, precision="fp32"
                                      if settings.device == "cpu" else "auto")
    return _HARMONIZER[key]


def output_path(out: Path, scan: Scan) -> Path:
    """Mirrored tree: OUT/harmonized/<scan id> (a DICOM folder for DICOM in, else the input's file name)."""
    return Path(out) / HARMONIZED / scan.id


def _mean_shift(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> float | None:
    return float(np.mean(after[mask] - before[mask])) if mask.any() else None


def tissue_interiors(before) -> dict:
    """Soft tissue and lung away from their edges: the HU range on the input smoothed by a 2-pixel Gaussian, inside
    the body, eroded by 3 pixels in-plane. A kernel keeps the mean HU of a uniform region but moves edges and
    partial-volume voxels: on phantom pairs B30 -> B50 the interiors' mean changed by at most 3.5 HU, whole HU-range
    masks by 14 HU (soft tissue) and -44 HU (lung), which a QA bound must not flag."""
    from scipy import ndimage

    from .reproducibility import body_mask

    body = body_mask(before)
    smooth = np.stack([ndimage.gaussian_filter(s, 2.0) for s in before.hu])
    masks = {}
    for name, (lo, hi) in (("soft_tissue", SOFT_TISSUE_HU), ("lung", LUNG_HU)):
        mask = body & (smooth >= lo) & (smooth <= hi)
        masks[name] = np.stack([ndimage.binary_erosion(s, iterations=3) for s in mask])
    return masks


def qa_measures(before, after: np.ndarray) -> dict:
    """Mean HU change inside soft tissue and lung (``tissue_interiors``) and the outline shifts."""
    from .metrics import anatomy_shift

    hu = before.hu
    masks = tissue_interiors(before)
    soft, lung = masks["soft_tissue"], masks["lung"]
    shift = anatomy_shift(hu, after)
    return {"hu_shift_soft_tissue": _mean_shift(hu, after, soft), "hu_shift_lung": _mean_shift(hu, after, lung),
            "outline_shift_body_px": shift["body_px"], "outline_shift_lung_px": shift["lung_px"]}


def qa_flags(row: dict) -> list[str]:
    """The QA bounds a row breaks, in words."""
    found = []
    for key in ("hu_shift_soft_tissue", "hu_shift_lung"):
        value = row.get(key)
        if value is not None and value != "" and abs(float(value)) > QA_BOUNDS[key]:
            found.append(f"{key.replace('_', ' ')} {float(value):+.1f} HU exceeds +-{QA_BOUNDS[key]:g}")
    for key in ("outline_shift_body_px", "outline_shift_lung_px"):
        value = row.get(key)
        if value is not None and value != "" and float(value) > QA_BOUNDS["outline_shift_px"]:
            found.append(f"{key.replace('_', ' ')} {float(value):.1f} exceeds {QA_BOUNDS['outline_shift_px']:g}")
    p_in, p_out = row.get("p_standard_input"), row.get("p_standard_result")
    if p_in not in (None, "") and p_out not in (None, "") and float(p_out) < float(p_in) - 0.05:
        found.append(f"the discriminator finds the result less standard than the input (p {float(p_out):.2f} < {float(p_in):.2f})")
    return found


def _rois(scan: Scan, volume, settings: Settings):
    from .io import read_volume
    from .reproducibility import sample_hu_rois

    if settings.rois == "labels" and scan.roi:
        from .reproducibility import labels_on_grid, _roi_from_mask

        values = labels_on_grid(read_volume(scan.roi, check_hu=False), volume)
        return [r for v in np.unique(values[values != 0]) if (r := _roi_from_mask(f"label {v}", f"label {v}", values == v))]
    if settings.rois == "ranges":
        return sample_hu_rois(volume, per_range=settings.per_range, size_mm=settings.roi_size_mm,
                              slices=min(settings.roi_slices, volume.shape[0]), seed=settings.seed)
    return []


def _features(scan: Scan, volumes: dict, settings: Settings) -> tuple[list, int]:
    """Long-format rows [roi, group, image, feature, value] for the input and the result on the scan's ROIs."""
    from .reproducibility import extract_features

    rois = _rois(scan, volumes["input"], settings)
    if not rois:
        return [], 0
    raw = extract_features(volumes, rois, settings.params, workers=1)
    rows = []
    for image, per_roi in raw.items():
        for roi, features in zip(rois, per_roi):
            for name, value in features.items():
                if not name.startswith("_"):
                    rows.append([roi.name, roi.group, image, name, value])
    return rows, len(rois)


def process_scan(scan: Scan, settings: Settings, hashes: dict) -> dict:
    """Harmonize (or, for a reference scan, only measure) one scan; write its output and then its marker.
    Returns the marker's record. A problem with this scan becomes a failed row, never an exception."""
    import torch

    from .harmonize import check_kernel, derivation_text
    from .io import read_volume, write_volume

    torch.set_num_threads(max(1, settings.threads))
    out = Path(settings.out)
    started = time.perf_counter()
    row = scan.row()
    row["status"] = "harmonized" if scan.status == "todo" else scan.status
    features: list = []
    preview = None
    notes: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            volume = read_volume(scan.files[0] if scan.kind == "image" else scan.source,
                                 series_uid=scan.series_uid if scan.kind == "dicom" else None)
            harmonizer = _harmonizer(settings)
            if scan.status == "todo":
                hu = harmonizer.harmonize(volume.hu, volume.spacing[:2])
                card = harmonizer.model.card
                result = volume.with_hu(hu, kernel=card.target_kernel or volume.meta.kernel,
                                        series_description=f"{volume.meta.series_description or 'CT'} harmonized to {card.target_kernel}"[:64])
                row.update(qa_measures(volume, hu))
                if harmonizer.model.discriminator is not None:
                    _, cam_in = harmonizer.gradcam(volume.hu, volume.hu, settings.th_fail)
                    _, cam_out = harmonizer.gradcam(volume.hu, hu, settings.th_fail)
                    row.update(p_standard_input=cam_in["standard_probability"], p_standard_result=cam_out["standard_probability"],
                               hot_fraction_input=cam_in["hot_fraction"], hot_fraction_result=cam_out["hot_fraction"])
                warning = check_kernel(volume, harmonizer.model)
                if warning:
                    notes.append(warning.split(": ", 1)[-1])
                target = output_path(out, scan)
                if scan.kind == "image":
                    target = target.parent / Path(scan.source).name
                write_volume(result, target, overwrite=True, description=result.meta.series_description,
                             derivation=derivation_text(volume, card))
                row["output"] = target.relative_to(out).as_posix()
                row["kernel_after"] = card.target_kernel
            else:
                result = volume
            if settings.rois != "none":
                features, row["rois"] = _features(scan, {"input": volume, "result": result}, settings)
            middle = volume.shape[0] // 2
            preview = (volume.hu[middle], result.hu[middle])
        notes += [str(w.message) for w in caught  # the project's own warnings, not libraries' deprecations
                  if issubclass(w.category, UserWarning) and "radiomicgan" in str(w.filename).replace("\\", "/").split("/")[-2:][0]]
    except Exception as exc:  # noqa: BLE001  one bad scan fails alone, with its reason
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not isinstance(exc, RadiomicGANError):
            reason = f"{type(exc).__name__}: {reason}"
        row.update(status="failed", reason=reason[:300])
    row["seconds"] = round(time.perf_counter() - started, 3)
    row["warnings"] = "; ".join(dict.fromkeys(n[:200] for n in notes))
    if row["status"] == "harmonized":
        flags = qa_flags(row)
        row["flagged"] = bool(flags)
        if flags:
            row["warnings"] = "; ".join(filter(None, [row["warnings"], *flags]))
    record = {"format": MARKER_FORMAT, "scan": scan.id, **hashes, "row": row, "features": features}
    if preview is not None:
        staging = _preview_staging(out, scan.id)
        try:
            with open(staging, "wb") as fh:
                np.savez_compressed(fh, input=preview[0].astype(np.int16), result=np.rint(preview[1]).astype(np.int16))
            os.replace(staging, preview_path(out, scan.id))
        except OSError as exc:
            staging.unlink(missing_ok=True)
            raise write_fault(exc, [staging], [preview_path(out, scan.id)], "scan preview") or exc from None
    atomic_write(marker_path(out, scan.id), json.dumps(record, default=_json_default) + "\n")  # last: the scan is done
    return record


def preview_path(out: Path, scan_id: str) -> Path:
    return marker_path(out, scan_id).with_suffix(".npz")


def _preview_staging(out: Path, scan_id: str) -> Path:
    final = preview_path(out, scan_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.with_name(f".{final.stem}.partial-{uuid.uuid4().hex[:8]}.npz")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


def _worker(args):
    scan, settings, hashes = args
    return process_scan(scan, settings, hashes)


# ------------------------------------------------------------------------------------------------ running


def _available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return 8 << 30


def pool_size(scans: list[Scan], requested: int | None, device: str) -> tuple[int, str]:
    """Processes for the pool, bounded by cores and by memory: each holds the model (about 0.6 GB with torch) and
    a dozen float copies of its largest scan (input, result, two Grad-CAM maps, features). One on a GPU."""
    if device.startswith("cuda") or device == "mps":
        return 1, "one process on the GPU"
    cores = os.cpu_count() or 1
    voxels = max([int(np.prod(s.shape)) for s in scans if s.shape] or [1])
    per_worker = 600 * (1 << 20) + 12 * 4 * voxels
    by_memory = max(1, int(0.7 * _available_memory() // per_worker))
    wanted = requested or cores
    workers = max(1, min(wanted, by_memory, len(scans) or 1))
    why = f"{workers} process(es): {cores} cores, memory for {by_memory} (about {per_worker / 2**30:.1f} GB each)"
    return workers, why


@dataclass
class CohortResult:
    out: Path
    rows: list[dict]
    failed: int
    report: Path | None
    summary: dict


class _Distributed:
    """torchrun's environment: a gloo process group (barriers and object exchange only; the GPUs do the work)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1
        if self.active:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")

    def broadcast(self, value):
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        if self.active:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def run_cohort(input_path, model, out, *, device: str = "auto", batch: int | None = None, workers: int | None = None,
               rois: str = "none", params: str | None = None, per_range: int = 5, roi_size_mm: float = 10.0,
               roi_slices: int = 3, min_slices: int = MIN_SLICES, th_fail: float = 0.5, seed: int = 0,
               combat_train_fraction: float = 0.5, alpha: float = 0.05, report: bool = True,
               progress: Callable[..., None] | None = None, log: Callable[[str], None] | None = print,
               show_bar: bool = False) -> CohortResult:
    """The cohort job: discover, process what is not yet done (in a pool or on this torchrun rank's shard), merge,
    report. The report and tables are rewritten on every run from the markers."""
    from .io import check_output_path, check_writable
    from .modelio import load_model, resolve_device

    log = log or (lambda text: None)
    out = Path(out)
    check_output_path(out, [input_path])
    check_writable(out)
    if rois not in ("none", "labels", "ranges"):
        raise RadiomicGANError(f"--rois {rois}: expected none, labels or ranges")
    loaded = load_model(model)  # refuses a bad model folder before any work
    card = loaded.card
    # read-only checks before anything is written (the lock file is the first thing)
    scans = discover(input_path, card.source_kernel, card.target_kernel, min_slices)
    for folder in sorted({s.source for s in scans if s.kind == "dicom" and Path(s.source).is_dir()}):
        check_output_path(out, [folder])  # a CSV may list folders that hold the output: never write among inputs
    if rois == "labels" and not any(s.roi for s in scans):
        raise RadiomicGANError("--rois labels: the input names no label map (give a CSV with a roi column)")
    if rois != "none":
        from .reproducibility import check_params

        params = check_params(params)
    dist = _Distributed()
    lock = CohortLock(out) if dist.rank == 0 else None
    error = None
    if lock is not None:
        try:
            lock.__enter__()
        except RadiomicGANError as exc:
            error = str(exc)
    error = dist.broadcast(error)
    if error:
        dist.close()
        raise RadiomicGANError(error)
    try:
        if dist.rank == 0:
            clean_partials(out)
        dist.barrier()
        resolved = resolve_device(device)
        if dist.active and resolved.startswith("cuda"):
            resolved = f"cuda:{dist.local_rank}"
        settings = Settings(model=str(Path(model).resolve()), out=str(out.resolve()), device=resolved, batch=batch, rois=rois,
                            params=params, per_range=per_range, roi_size_mm=roi_size_mm, roi_slices=roi_slices,
                            th_fail=th_fail, seed=seed)
        model_digest, settings_digest = model_hash(model), settings.hash()
        work = [s for s in scans if s.status in ("todo", "reference")]
        shard = [s for k, s in enumerate(work) if k % dist.world == dist.rank]
        pending, hashes = [], {}
        for scan in shard:
            hashes[scan.id] = {"input_hash": scan_hash(scan), "model_hash": model_digest, "settings_hash": settings_digest}
            if read_marker(out, scan, hashes[scan.id]) is None:
                pending.append(scan)
        done_before = len(shard) - len(pending)
        skipped = len(scans) - len(work)
        count, why = pool_size(pending, 1 if dist.active else workers, resolved)
        if dist.rank == 0:
            log(f"{len(scans)} series found: {len(work)} to harmonize or measure, {skipped} skipped; "
                f"{done_before if not dist.active else 'per-rank'} already done" + (f"; {why}" if pending else ""))
        settings.threads = max(1, (os.cpu_count() or 1) // count)
        _PRELOADED.clear()
        if count <= 1 or len(pending) <= 1:  # processed here: the model loaded above serves
            _PRELOADED[settings.model] = loaded
        _run_pending(pending, settings, hashes, count, progress, show_bar and dist.rank == 0, dist)
        dist.barrier()
        result = None
        if dist.rank == 0:
            result = finalize(out, scans, model, card, combat_train_fraction=combat_train_fraction, alpha=alpha,
                              seed=seed, report=report)
            log(f"{result.summary['counts']['harmonized']} harmonized, {result.summary['counts']['reference']} measured "
                f"as reference, {result.summary['counts']['skipped']} skipped, {result.failed} failed, "
                f"{result.summary['counts']['flagged']} flagged; report {result.report}")
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    dist.close()
    return result


def _run_pending(pending: list[Scan], settings: Settings, hashes: dict, workers: int, progress, show_bar: bool, dist) -> None:
    from tqdm import tqdm

    total = len(pending)
    started = time.monotonic()
    failed = 0

    def tick(done: int, record: dict | None) -> None:
        nonlocal failed
        if record is not None and record["row"]["status"] == "failed":
            failed += 1
        bar.update(1 if record is not None else 0)
        if progress:
            elapsed = time.monotonic() - started
            eta = elapsed / done * (total - done) if done else None
            progress("scans", done, total, failed=failed, eta_s=None if eta is None else round(eta, 1),
                     scan=record["scan"] if record else None, rank=dist.rank)

    with tqdm(total=total, desc="cohort", unit="scan", disable=not show_bar) as bar:
        tick(0, None)
        if workers <= 1 or total <= 1:
            for k, scan in enumerate(pending):
                tick(k + 1, process_scan(scan, settings, hashes[scan.id]))
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = [pool.submit(_worker, (scan, settings, hashes[scan.id])) for scan in pending]
            for k, future in enumerate(as_completed(futures)):
                tick(k + 1, future.result())
        except BaseException:
            # cancelled (Ctrl-C, SIGTERM, a stop request) or broken: stop the workers now rather than after their
            # current scans; what they staged is removed by the next run (markers are written last)
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------ merge and report


def finalize(out: Path, scans: list[Scan], model, card: dict, *, combat_train_fraction: float = 0.5, alpha: float = 0.05,
             seed: int = 0, report: bool = True) -> CohortResult:
    """Rows from the markers (skipped scans from discovery), the statistics, the tables and the report."""
    from .cohort_stats import batch_effect

    out = Path(out)
    rows, features = [], []
    for scan in scans:
        if scan.status == "skipped":
            rows.append(scan.row())
            continue
        try:
            record = json.loads(marker_path(out, scan.id).read_text())
        except (OSError, json.JSONDecodeError):
            row = scan.row()
            row.update(status="failed", reason="no result (the run stopped before this scan finished)")
            rows.append(row)
            continue
        rows.append(record["row"])
        for roi, group, image, name, value in record.get("features", []):
            features.append({"scan": scan.id, "batch": record["row"].get("batch", ""), "kernel": record["row"].get("kernel_before", ""),
                             "patient_id": scan.patient_id, "study_uid": scan.study_uid, "reference": scan.status == "reference",
                             "roi": roi, "group": group,
                             "image": image, "feature": name, "value": value})
    rows.sort(key=lambda r: (not r.get("flagged"), r["status"] != "failed", r["scan"]))
    counts = {status: sum(r["status"] == status for r in rows) for status in STATUSES}
    counts["flagged"] = sum(bool(r.get("flagged")) for r in rows)
    stats = batch_effect(features, train_fraction=combat_train_fraction, alpha=alpha, seed=seed) if features else None
    summary = {
        "format": "radiomicgan-cohort-1",
        "radiomicgan": __version__,
        "model": {"folder": str(model), "method": card.method, "source_kernel": card.source_kernel,
                  "target_kernel": card.target_kernel},
        "counts": counts,
        "qa_bounds": QA_BOUNDS,
        "exit_status": exit_status(counts["failed"]),
        "batch_effect": stats,
    }
    _write_csv(out / "qa.csv", QA_COLUMNS, rows)
    if features:
        _write_csv(out / "features.csv", ("scan", "batch", "kernel", "patient_id", "study_uid", "roi", "group", "image",
                                          "feature", "value"), features)
    atomic_write(out / "cohort.json", json.dumps({**summary, "scans": rows}, indent=2, default=_json_default) + "\n")
    report_path = None
    if report:
        from .cohort_report import write_cohort_report

        report_path = write_cohort_report(out, rows, summary)
    return CohortResult(out, rows, counts["failed"], report_path, summary)


def _write_csv(path: Path, columns, rows) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    atomic_write(path, buffer.getvalue())


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_qa_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


__all__ = ["discover", "run_cohort", "process_scan", "finalize", "Scan", "Settings", "CohortLock", "exit_status",
           "EXIT_SCANS_FAILED_BASE", "QA_COLUMNS", "read_qa_csv"]
