"""Radiomic reproducibility: pyradiomics features on ROIs of a reference (standard-kernel) volume and of
candidate volumes, Lin's concordance correlation coefficient per feature over ROIs, and the count of
reproducible features (CCC > 0.85), as the paper counts them.

Zero-variance rule: a feature constant over the ROIs of a group in both the reference and the candidate has no
defined CCC (0/0); it is excluded from that group's count and the number excluded is reported. Constant in one
only gives CCC 0 (not reproducible). Features pyradiomics could not compute (NaN) are excluded the same way.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import RadiomicGANError
from .phantom import LABELS as PHANTOM_LABELS
from .volume import CTVolume

# Package data (pyproject's package-data; RESOURCES beside the scripts in Slicer), so an installed wheel finds it.
DEFAULT_PARAMS = Path(__file__).resolve().parent / "data" / "radiomics_ct.yaml"
PAPER_RANGES = ((-800.0, -300.0), (-100.0, 250.0), (300.0, 800.0))
CCC_THRESHOLD = 0.85
MIN_FRACTION = 0.8  # share of a random box's voxels that must be in its HU range (or tissue)
MIN_ROIS = 10  # fewer ROIs in a group give no count: CCC over a handful of ROIs is noise
CONFIDENCE = 0.95  # bootstrap percentile interval of the counts
# The phantom's tissues (radiomicgan.phantom.LABELS) standing for the paper's three HU ranges.
PHANTOM_TISSUES = {"lung": (PHANTOM_LABELS["lung"],), "soft tissue": (PHANTOM_LABELS["soft_tissue"], PHANTOM_LABELS["heart"]),
                   "bone": (PHANTOM_LABELS["bone"],)}


class EvaluationError(RadiomicGANError):
    pass


# ---------------------------------------------------------------------------------------------- CCC


def lins_ccc(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Lin's CCC per column (feature) over rows (ROIs), population (1/N) moments; NaN where both columns are
    constant (undefined)."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(candidate, dtype=np.float64)
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    va, vb = a.var(axis=0), b.var(axis=0)
    cov = ((a - ma) * (b - mb)).mean(axis=0)
    denominator = va + vb + (ma - mb) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        ccc = np.where(denominator > 0, 2.0 * cov / denominator, np.nan)
    both_constant = (va <= 1e-12 * np.maximum(1.0, ma**2)) & (vb <= 1e-12 * np.maximum(1.0, mb**2))
    ccc[both_constant] = np.nan
    return ccc


def count_reproducible(ccc: np.ndarray, threshold: float = CCC_THRESHOLD) -> tuple[int, int]:
    """(features with CCC > threshold, features excluded because their CCC is undefined)."""
    ccc = np.asarray(ccc)
    defined = np.isfinite(ccc)
    return int(np.sum(ccc[defined] > threshold)), int(np.sum(~defined))


def bootstrap_count_stats(reference: np.ndarray, candidate: np.ndarray, threshold: float = CCC_THRESHOLD,
                          resamples: int = 100, seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """The reproducible count on all ROIs (the point estimate) with its percentile interval over bootstrap
    resamples of the ROIs, and the resamples' mean and SD (the paper's mean +- SD)."""
    count, excluded = count_reproducible(lins_ccc(reference, candidate), threshold)
    stats = {"reproducible": count, "excluded_undefined": excluded}
    if resamples <= 0:
        return {**stats, "bootstrap_mean": float(count), "bootstrap_sd": 0.0, "interval": None}
    rng = np.random.default_rng(seed)
    n = len(reference)
    counts = []
    for _ in range(resamples):
        pick = rng.integers(0, n, n)
        counts.append(count_reproducible(lins_ccc(reference[pick], candidate[pick]), threshold)[0])
    tail = 50.0 * (1.0 - confidence)
    lo, hi = np.percentile(counts, [tail, 100.0 - tail])
    return {**stats, "bootstrap_mean": float(np.mean(counts)), "bootstrap_sd": float(np.std(counts)),
            "interval": [float(lo), float(hi)]}


def bootstrap_counts(reference: np.ndarray, candidate: np.ndarray, threshold: float = CCC_THRESHOLD,
                     resamples: int = 100, seed: int = 0) -> tuple[float, float]:
    """Mean and SD of the reproducible count over bootstrap resamples of the ROIs (the paper's mean +- SD)."""
    stats = bootstrap_count_stats(reference, candidate, threshold, resamples, seed)
    return stats["bootstrap_mean"], stats["bootstrap_sd"]


# ---------------------------------------------------------------------------------------------- ROIs


@dataclass
class ROI:
    """A region as a bounding box (z0, z1, y0, y1, x0, x1) and the mask inside it."""

    name: str
    group: str
    box: tuple[int, int, int, int, int, int]
    mask: np.ndarray = field(repr=False)

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())


def _roi_from_mask(name: str, group: str, mask: np.ndarray) -> ROI | None:
    where = np.nonzero(mask)
    if not where[0].size:
        return None
    lo = [int(w.min()) for w in where]
    hi = [int(w.max()) + 1 for w in where]
    box = (lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
    return ROI(name, group, box, mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].copy())


MAX_LABELS = 1000  # more distinct values than any segmentation holds: an image given as a label map


def check_label_map(labels: CTVolume) -> None:
    """A label map holds non-negative whole numbers, a few of them; a CT image given by mistake (negative HU,
    thousands of values) is refused instead of measured as a thousand one-voxel "ROIs"."""
    hu = labels.hu
    lo, hi = float(np.min(hu)), float(np.max(hu))
    if lo < 0:
        raise EvaluationError(f"{labels.source}: not a label map (values from {lo:g} to {hi:g}; labels are 0 and positive "
                              "whole numbers): a CT image given as --labels?")
    if not np.array_equal(hu, np.rint(hu)):
        raise EvaluationError(f"{labels.source}: not a label map (values that are not whole numbers)")
    count = len(np.unique(hu))
    if count > MAX_LABELS:
        raise EvaluationError(f"{labels.source}: not a label map ({count} distinct values; at most {MAX_LABELS}): an image "
                              "given as --labels?")


def labels_on_grid(labels: CTVolume, like: CTVolume) -> np.ndarray:
    """Integer labels on ``like``'s voxel grid: as they are when on the same grid, else resampled nearest-neighbour
    in physical space (a label map made at another resolution or by another tool), with a warning that says so and
    names the labels that fall outside the reference."""
    import warnings

    import SimpleITK as sitk

    check_label_map(labels)
    values = np.rint(labels.hu).astype(np.int64)
    if labels.same_geometry(like):
        return values
    image = sitk.GetImageFromArray(values.astype(np.int32))
    grid = sitk.Image([int(n) for n in like.shape[::-1]], sitk.sitkUInt8)
    for target, volume in ((image, labels), (grid, like)):
        target.SetSpacing(volume.spacing)
        target.SetOrigin(volume.origin)
        target.SetDirection(volume.direction)
    resampled = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                     sitk.sitkInt32)).astype(np.int64)
    present, kept = set(np.unique(values[values != 0]).tolist()), set(np.unique(resampled[resampled != 0]).tolist())
    if present and not kept:
        raise EvaluationError(f"{labels.source}: on another grid than the reference {like.source}, and none of its labels "
                              "lands on it")
    lost = sorted(present - kept)
    warnings.warn(f"{labels.source}: on another grid than the reference {like.source}; resampled onto it (nearest "
                  "neighbour)" + (f"; label(s) {', '.join(map(str, lost))} fall outside it and are left out" if lost else ""))
    return resampled


def rois_from_labels(labels: CTVolume, like: CTVolume, group: str = "labels") -> list[ROI]:
    """Each non-zero label value of a label map is one ROI of ``group``, on the reference's grid."""
    values = labels_on_grid(labels, like)
    rois = []
    for value in np.unique(values[values != 0]):
        rois.append(_roi_from_mask(f"label{value}", group, values == value))
    if not rois:
        raise EvaluationError(f"{labels.source}: the label map is empty (no non-zero label)")
    return rois


def rois_from_boxes(boxes: list[dict], like: CTVolume) -> list[ROI]:
    """Boxes in physical (LPS, mm) coordinates: {"name": ..., "min": [x, y, z], "max": [x, y, z]}."""
    inverse = np.linalg.inv(like.direction_matrix * np.asarray(like.spacing)[None, :])
    if not isinstance(boxes, list):
        raise EvaluationError(f"boxes: expected a JSON list of boxes, got a {type(boxes).__name__}")
    rois = []
    for k, box in enumerate(boxes):
        try:
            corners = [np.asarray(box["min"], float), np.asarray(box["max"], float)]
        except (KeyError, TypeError, ValueError):
            raise EvaluationError(f"box {k}: needs 'min' and 'max' as [x, y, z] in mm") from None
        if any(c.shape != (3,) or not np.all(np.isfinite(c)) for c in corners):
            raise EvaluationError(f"box {k}: 'min' and 'max' must each be a list of three numbers [x, y, z] in mm")
        index = [inverse @ (c - np.asarray(like.origin)) for c in corners]  # (i, j, k) = (x, y, z) indices
        lo = np.floor(np.minimum(*index) + 0.5).astype(int)
        hi = np.floor(np.maximum(*index) + 0.5).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, [like.shape[2], like.shape[1], like.shape[0]])
        if np.any(hi <= lo):
            raise EvaluationError(f"box {k} ({box.get('name', '')}): outside the image")
        mask = np.ones((hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]), dtype=bool)
        rois.append(ROI(str(box.get("name", f"box{k}")), "boxes", (lo[2], hi[2], lo[1], hi[1], lo[0], hi[0]), mask))
    return rois


def _boxes_holding(indicator: np.ndarray, size: tuple[int, int, int], at_least: float) -> np.ndarray:
    """Whether each box of ``size`` (z, y, x), indexed by its first corner, holds at least ``at_least`` set
    voxels; built slab by slab (a 2D summed-area table per slab) so a whole scan needs no 3D integer tables."""
    sz, sy, sx = size
    nz, ny, nx = indicator.shape
    out = np.empty((nz - sz + 1, ny - sy + 1, nx - sx + 1), bool)
    slab = indicator[:sz].sum(axis=0, dtype=np.int32)
    for z in range(nz - sz + 1):
        if z:
            slab += indicator[z + sz - 1].astype(np.int32) - indicator[z - 1]
        table = np.pad(slab, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        out[z] = table[sy:, sx:] - table[:-sy, sx:] - table[sy:, :-sx] + table[:-sy, :-sx] >= at_least
    return out


def _pick_boxes(accepted: np.ndarray, size: tuple[int, int, int], count: int, rng: np.random.Generator,
                attempts: int) -> list[tuple[int, int, int]]:
    """Up to ``count`` non-overlapping boxes, drawn at random among the accepted corners."""
    corners = np.flatnonzero(accepted)
    order = corners[rng.permutation(corners.size)[:attempts]]
    taken = np.zeros(tuple(a + s - 1 for a, s in zip(accepted.shape, size)), bool)
    picked = []
    for z, y, x in zip(*np.unravel_index(order, accepted.shape)):
        if len(picked) >= count:
            break
        box = (slice(z, z + size[0]), slice(y, y + size[1]), slice(x, x + size[2]))
        if not taken[box].any():
            taken[box] = True
            picked.append((int(z), int(y), int(x)))
    return picked


def _box_size(reference: CTVolume, size_mm: float, slices: int) -> tuple[int, int, int]:
    nz, ny, nx = reference.shape
    size = (min(slices, nz), max(3, int(round(size_mm / reference.spacing[1]))), max(3, int(round(size_mm / reference.spacing[0]))))
    if size[1] > ny or size[2] > nx:
        raise EvaluationError(f"{reference.source}: image smaller than a {size_mm} mm ROI")
    return size


def _label_array(labels, reference: CTVolume) -> np.ndarray:
    if isinstance(labels, CTVolume):
        if not labels.same_geometry(reference):
            raise EvaluationError(f"{labels.source}: label map geometry differs from the reference {reference.source}")
        labels = labels.hu
    labels = np.asarray(labels)
    if labels.shape != reference.shape:
        raise EvaluationError(f"label map shape {labels.shape} differs from the reference's {reference.shape}")
    return np.rint(labels).astype(np.int64)


def sample_hu_rois(reference: CTVolume, ranges: Sequence[tuple[float, float]] = PAPER_RANGES, per_range: int = 20,
                   size_mm: float = 10.0, slices: int = 3, seed: int = 0, attempts: int = 20000, *,
                   min_fraction: float = MIN_FRACTION, labels=None, tissues: dict | None = None) -> list[ROI]:
    """Random box ROIs in each HU range, non-overlapping within a range. A box is taken only when it lies wholly
    inside the body (``body_mask`` of the reference) and at least ``min_fraction`` of its voxels are in the range
    on the reference (so every candidate is measured on the same ROIs): a box of outside air and fat whose mean
    happens to fall in the lung range is not lung.

    With ``labels`` (a tissue label map on the reference's grid, as ``radiomicgan simulate`` writes) the groups
    are tissues instead of ranges (``sample_tissue_rois``; ``ranges`` is then unused)."""
    if labels is not None:
        return sample_tissue_rois(reference, labels, tissues or PHANTOM_TISSUES, per_range, size_mm, slices, seed,
                                  attempts, min_fraction=min_fraction)
    size = _box_size(reference, size_mm, slices)
    volume = size[0] * size[1] * size[2]
    inside = _boxes_holding(body_mask(reference), size, volume)
    rng = np.random.default_rng(seed)
    rois = []
    for lo, hi in ranges:
        group = f"[{lo:g}, {hi:g}]"
        in_range = (reference.hu >= lo) & (reference.hu <= hi)
        accepted = inside & _boxes_holding(in_range, size, min_fraction * volume)
        rois += _boxes_as_rois(group, _pick_boxes(accepted, size, per_range, rng, attempts), size)
    return rois


def sample_tissue_rois(reference: CTVolume, labels, tissues: dict | None = None, per_group: int = 20,
                       size_mm: float = 10.0, slices: int = 3, seed: int = 0, attempts: int = 20000, *,
                       min_fraction: float = MIN_FRACTION) -> list[ROI]:
    """Random box ROIs per tissue of a label map ({group name: label values}, the phantom's lung, soft tissue
    and bone by default): a box wholly inside the body with at least ``min_fraction`` of its voxels carrying
    the tissue's labels. The label decides, not HU: the phantom's lung lies mostly below -800 HU."""
    values = _label_array(labels, reference)
    tissues = tissues or PHANTOM_TISSUES
    size = _box_size(reference, size_mm, slices)
    volume = size[0] * size[1] * size[2]
    inside = _boxes_holding(body_mask(reference), size, volume)
    rng = np.random.default_rng(seed)
    rois = []
    for group, label_values in tissues.items():
        in_tissue = np.isin(values, np.atleast_1d(label_values))
        accepted = inside & _boxes_holding(in_tissue, size, min_fraction * volume)
        rois += _boxes_as_rois(group, _pick_boxes(accepted, size, per_group, rng, attempts), size)
    return rois


def _boxes_as_rois(group: str, corners: list, size: tuple[int, int, int]) -> list[ROI]:
    sz, sy, sx = size
    return [ROI(f"{group} #{k + 1}", group, (z, z + sz, y, y + sy, x, x + sx), np.ones(size, bool))
            for k, (z, y, x) in enumerate(corners)]


def body_mask(reference: CTVolume, threshold: float = -500.0) -> np.ndarray:
    """The patient: voxels above ``threshold`` HU, holes (lungs) filled slice by slice, largest component."""
    from scipy import ndimage

    mask = reference.hu > threshold
    filled = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    labels, count = ndimage.label(filled)
    if count > 1:
        sizes = ndimage.sum(filled, labels, range(1, count + 1))
        filled = labels == (1 + int(np.argmax(sizes)))
    return filled


def body_slice_rois(reference: CTVolume) -> list[ROI]:
    """The whole body on each slice: the paper's whole-image level, one ROI per slice."""
    body = body_mask(reference)
    rois = []
    for k in range(reference.shape[0]):
        mask = np.zeros_like(body)
        mask[k] = body[k]
        roi = _roi_from_mask(f"slice {k}", "whole image", mask)
        if roi is not None:
            rois.append(roi)
    return rois


# ---------------------------------------------------------------------------------------------- extraction

_WORKER: dict = {}


def check_params(params: str | os.PathLike | None) -> str:
    """The pyradiomics parameter file exists, is YAML and names only known image types and settings (checked
    once here, before any work, so a bad file is one line naming it instead of a traceback from a worker)."""
    from radiomics import featureextractor

    params = str(params or DEFAULT_PARAMS)
    if not Path(params).is_file():
        raise EvaluationError(f"{params}: pyradiomics parameter file not found")
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    try:
        featureextractor.RadiomicsFeatureExtractor(params)
    except Exception as exc:  # ruamel YAML errors, pykwalify schema errors, ValueError for an unknown image type
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise EvaluationError(f"{params}: not a usable pyradiomics parameter file ({reason})") from None
    return params


def _init_worker(volumes: dict, params: str) -> None:
    from radiomics import featureextractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    _WORKER["volumes"] = volumes
    _WORKER["extractor"] = featureextractor.RadiomicsFeatureExtractor(params)


def _margin_voxels(spacing, params_margin_mm: float) -> tuple[int, int, int]:
    return tuple(int(np.ceil(params_margin_mm / s)) for s in (spacing[2], spacing[1], spacing[0]))


def _extract(task: tuple[str, int, ROI]) -> tuple[str, int, dict]:
    """Features of one ROI of one image, on a crop around the ROI (filters then see the ROI's neighbourhood
    only, the way pyradiomics' preCrop works, without a whole-image mask per ROI)."""
    import SimpleITK as sitk

    image_name, roi_index, roi = task
    hu, spacing, origin, direction = _WORKER["volumes"][image_name]
    margin = _margin_voxels(spacing, 15.0)
    z0, z1, y0, y1, x0, x1 = roi.box
    lo = [max(0, z0 - margin[0]), max(0, y0 - margin[1]), max(0, x0 - margin[2])]
    hi = [min(hu.shape[0], z1 + margin[0]), min(hu.shape[1], y1 + margin[1]), min(hu.shape[2], x1 + margin[2])]
    crop = hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    mask = np.zeros(crop.shape, np.uint8)
    mask[z0 - lo[0] : z1 - lo[0], y0 - lo[1] : y1 - lo[1], x0 - lo[2] : x1 - lo[2]] = roi.mask
    d = np.asarray(direction).reshape(3, 3)
    crop_origin = np.asarray(origin) + d @ (np.array([lo[2], lo[1], lo[0]]) * np.asarray(spacing))
    image = sitk.GetImageFromArray(np.ascontiguousarray(crop, dtype=np.float32))
    for im in (image,):
        im.SetSpacing(spacing)
        im.SetOrigin(tuple(crop_origin))
        im.SetDirection(tuple(direction))
    mask_image = sitk.GetImageFromArray(mask)
    mask_image.CopyInformation(image)
    try:
        result = _WORKER["extractor"].execute(image, mask_image)
        features = {k: float(v) for k, v in result.items() if not k.startswith("diagnostics")}
    except (ValueError, RuntimeError) as exc:  # e.g. an ROI too small for a filter or a texture matrix
        features = {"_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return image_name, roi_index, features


WORKER_OVERHEAD_BYTES = 512 * 2**20  # a worker's interpreter, pyradiomics, SimpleITK and its filtered crops
GiB = 2**30


def available_memory() -> int | None:
    """Bytes of memory available to new processes now (psutil, else /proc/meminfo, else sysconf), or None."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def plan_workers(volume_bytes: int, tasks: int, *, requested: int | None = None, max_memory: int | None = None,
                 cores: int | None = None, available: int | None = None) -> tuple[int, str]:
    """How many extraction processes, and why. Each worker holds a copy of every volume (its crops are cut from
    them) plus ``WORKER_OVERHEAD_BYTES``, so real CTs on a many-core machine are bounded by memory, not cores:
    ``min(cores, memory // per_worker, tasks)``, where memory is the smaller of what is available now and
    ``max_memory``. ``requested`` (``--workers``) is taken as given."""
    cores = cores or os.cpu_count() or 1
    per_worker = int(volume_bytes) + WORKER_OVERHEAD_BYTES
    if requested:
        return int(requested), f"{requested} as asked (--workers)"
    budget = [b for b in (available, max_memory) if b is not None]
    if not budget:
        n = max(1, min(cores, tasks))
        return n, f"one per core ({cores} cores; free memory unknown)"
    memory = min(budget)
    by_memory = max(1, memory // per_worker)
    n = max(1, min(cores, by_memory, tasks))
    source = "--max-memory" if max_memory is not None and memory == max_memory else "available"
    if n == by_memory and by_memory < min(cores, tasks):
        why = (f"bounded by memory: {memory / GiB:.1f} GiB {source}, about {per_worker / GiB:.1f} GiB per worker "
               f"(a copy of every volume and pyradiomics); {cores} cores")
    else:
        why = f"one per core ({cores} cores; about {per_worker / GiB:.1f} GiB per worker, {memory / GiB:.1f} GiB {source})"
    return int(n), why


def extract_features(volumes: dict[str, CTVolume], rois: list[ROI], params: str | os.PathLike | None = None,
                     workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """{image name: [features dict per ROI]} for every volume, in ``workers`` processes (default: as many as the
    cores and the memory allow, ``plan_workers``)."""
    params = check_params(params)
    packed = {name: (v.hu, v.spacing, v.origin, v.direction) for name, v in volumes.items()}
    tasks = [(name, k, roi) for name in volumes for k, roi in enumerate(rois)]
    out = {name: [None] * len(rois) for name in volumes}
    if not workers:
        workers, _ = plan_workers(sum(v.hu.nbytes for v in volumes.values()), len(tasks), available=available_memory())
    done = 0
    if workers == 1:
        _init_worker(packed, params)
        iterator = map(_extract, tasks)
        pool = None
    else:
        import multiprocessing

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                   initargs=(packed, params))
        iterator = pool.map(_extract, tasks, chunksize=max(1, len(tasks) // (8 * workers)))
    try:
        for name, k, features in iterator:
            out[name][k] = features
            done += 1
            if progress:
                progress(done, len(tasks))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out


def feature_matrix(per_roi: list[dict], names: list[str]) -> np.ndarray:
    return np.array([[row.get(n, np.nan) for n in names] for row in per_roi], dtype=np.float64)


def feature_kind(name: str) -> tuple[str, str]:
    """('original' | 'log-sigma-1-0-mm-3D' | 'wavelet-LLH' | ..., 'glcm' | 'firstorder' | ...)."""
    parts = name.split("_")
    return parts[0], parts[1] if len(parts) > 2 else ""


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    reference_name: str
    feature_names: list[str]
    rois: list[ROI]
    features: dict  # image name -> (n_rois, n_features)
    ccc: dict  # (group, candidate) -> (n_features,)
    summary: dict


def evaluate(reference: CTVolume, candidates: dict[str, CTVolume], rois: list[ROI], *, params=None, workers=None,
             threshold: float = CCC_THRESHOLD, bootstrap: int = 100, seed: int = 0, reference_name: str = "reference",
             progress: Callable[[int, int], None] | None = None, min_rois: int = MIN_ROIS,
             confidence: float = CONFIDENCE) -> Evaluation:
    """Features on every ROI of the reference and of each candidate; CCC per ROI group and candidate. A group
    with fewer than ``min_rois`` measured ROIs is reported as too small instead of given a count."""
    import radiomics

    from .metrics import psnr, ssim

    if not candidates:
        raise EvaluationError("no candidate to compare with the reference")
    if reference_name in candidates:
        raise EvaluationError(f"candidate '{reference_name}': named like the reference; give it another name")
    for name, volume in candidates.items():
        if not volume.same_geometry(reference):
            raise EvaluationError(f"candidate '{name}' ({volume.source}): geometry differs from the reference "
                                  f"(shape {volume.shape} vs {reference.shape}, spacing {volume.spacing} vs {reference.spacing})")
    if not rois:
        raise EvaluationError("no ROI to measure (check the label map, boxes or HU ranges)")
    volumes = {reference_name: reference, **candidates}
    raw = extract_features(volumes, rois, params, workers, progress)
    failed = {k: rows[k]["_error"] for rows in raw.values() for k in range(len(rois)) if "_error" in rows[k]}
    keep = [k for k in range(len(rois)) if k not in failed]
    if not keep:
        raise EvaluationError(f"no ROI could be measured: {next(iter(failed.values()))}")
    names = [n for n in raw[reference_name][keep[0]] if not n.startswith("_")]
    kept_rois = [rois[k] for k in keep]
    features = {image: feature_matrix([rows[k] for k in keep], names) for image, rows in raw.items()}
    all_groups = list(dict.fromkeys(r.group for r in rois))  # groups whose ROIs all failed are reported too
    min_rois = max(3, int(min_rois))  # CCC needs 3 at the very least
    ccc, table = {}, {}
    for group in all_groups:
        rows = np.array([r.group == group for r in kept_rois])
        if rows.sum() < min_rois:
            table[group] = {"rois": int(rows.sum()),
                            "too_small": f"only {int(rows.sum())} ROI(s); a count needs at least {min_rois}"}
            continue
        ref = features[reference_name][rows]
        table[group] = {"rois": int(rows.sum())}
        for name in candidates:
            values = lins_ccc(ref, features[name][rows])
            ccc[(group, name)] = values
            stats = bootstrap_count_stats(ref, features[name][rows], threshold, bootstrap, seed, confidence)
            by_class, by_type = {}, {}
            for feature, value in zip(names, values):
                image_type, feature_class = feature_kind(feature)
                for bucket, key in ((by_class, feature_class), (by_type, image_type.split("-")[0])):
                    entry = bucket.setdefault(key, [0, 0])
                    entry[1] += int(np.isfinite(value))
                    entry[0] += int(np.isfinite(value) and value > threshold)
            table[group][name] = {**stats, "by_class": by_class, "by_image_type": by_type}
    body = body_mask(reference)
    images = {name: {"psnr_db": psnr(reference.hu, v.hu), "ssim": ssim(reference.hu, v.hu),
                     "psnr_body_db": psnr(reference.hu, v.hu, mask=body), "ssim_body": ssim(reference.hu, v.hu, mask=body)}
              for name, v in candidates.items()}
    summary = {
        "reference": reference_name,
        "candidates": list(candidates),
        "features": len(names),
        "threshold": threshold,
        "zero_variance_rule": "features constant over a group's ROIs in both images have no CCC: excluded and counted",
        "rois": len(kept_rois),
        "rois_skipped": [{"roi": rois[k].name, "reason": reason} for k, reason in failed.items()],
        "groups": table,
        "image_metrics": images,
        "bootstrap_resamples": bootstrap,
        "interval": f"{confidence:.0%} percentile interval of the count over {bootstrap} bootstrap resamples of a group's ROIs",
        "confidence": confidence,
        "min_rois": min_rois,
        "seed": seed,
        "pyradiomics_version": radiomics.__version__,
        "params_file": str(params or DEFAULT_PARAMS),
    }
    return Evaluation(reference_name, names, kept_rois, features, ccc, summary)
