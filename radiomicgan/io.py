"""CT input and output: DICOM series, single DICOM files, NRRD, NIfTI and MetaImage.

Reading always ends in a ``CTVolume`` in Hounsfield units (rescale slope and intercept applied, per slice)
with ITK geometry. pydicom reads tags and decodes pixels (SimpleITK's GDCM is the fallback decoder for
compressed syntaxes pydicom has no plugin for); SimpleITK reads and writes the research formats.

Writing never leaves a half-written output: files go to a hidden temporary name in the target folder and are
renamed into place when complete, and an existing output is only replaced when asked to.
"""

from __future__ import annotations

import datetime
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from . import __version__
from .errors import CTInputError
from .staging import check_owned, staged
from .volume import CTMetadata, CTVolume, check_hu_plausible

# Single-file formats SimpleITK reads; the writer accepts those marked True (atomic rename is possible).
IMAGE_SUFFIXES = {".nrrd": True, ".nhdr": False, ".nii": True, ".nii.gz": True, ".mha": True, ".mhd": False}
# Metadata keys written into NRRD/MetaImage headers (NIfTI keeps only a short description).
META_KEYS = {
    "kernel": "ConvolutionKernel",
    "manufacturer": "Manufacturer",
    "model": "ManufacturerModelName",
    "slice_thickness": "SliceThickness",
    "modality": "Modality",
    "series_description": "SeriesDescription",
}
WRITER_MARK = f"RadiomicGAN {__version__}"
SPACING_TOLERANCE_MM = 0.05  # and 1 % of the spacing, whichever is larger


def image_suffix(path: Path | str) -> str:
    name = str(path).lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


# ---------------------------------------------------------------------------------------------- reading


def read_volume(path: str | os.PathLike, series_uid: str | None = None, check_hu: bool = True) -> CTVolume:
    """Read a CT volume in HU from a DICOM folder, a DICOM file, or an NRRD/NIfTI/MetaImage file.

    ``series_uid`` picks one series out of a folder holding several.
    """
    p = Path(path)
    if not p.exists():
        raise CTInputError(f"{p}: does not exist")
    pixel_type = "DICOM rescale tags"  # DICOM: RescaleSlope/Intercept are required, so values are HU
    if p.is_dir():
        volume = read_dicom_series(p, series_uid)
    elif image_suffix(p):
        volume, pixel_type = _read_image_file(p)
    else:
        ds = _try_dcmread(p)
        if ds is None:
            raise CTInputError(
                f"{p}: not a DICOM file and not a known image format ({', '.join(IMAGE_SUFFIXES)})"
            )
        volume = _volume_from_slices(str(p), [(p, ds)])
    if check_hu:
        check_hu_plausible(volume.hu, volume.source, pixel_type)
    return volume


GZIP_MAX_RATIO = 1100  # deflate cannot compress more than about 1032:1: a file that claims more is damaged


def _header_fields(p: Path, separator: str) -> dict[str, str]:
    """Key/value lines of an NRRD (``key: value``) or MetaImage (``Key = Value``) header, keys lower-case."""
    with open(p, "rb") as fh:
        head = fh.read(65536).decode("latin-1")
    head = head.split("\n\n", 1)[0] if separator == ":" else head
    fields = {}
    for line in head.splitlines():
        key, sep, value = line.partition(separator)
        if sep and not line.startswith("#"):
            fields.setdefault(key.strip().lower(), value.strip())
        if separator == "=" and key.strip().lower() == "elementdatafile":
            break  # the pixels follow this line
    return fields


def _data_bytes_and_ratio(p: Path, suffix: str) -> tuple[int, float] | None:
    """(bytes holding the pixels, most bytes of pixels each can decode to) for an image file, None when unknown."""
    if suffix in (".nii", ".nii.gz"):
        return p.stat().st_size, (1.0 if suffix == ".nii" else GZIP_MAX_RATIO)
    if suffix in (".nrrd", ".nhdr"):
        fields = _header_fields(p, ":")
        encoding = fields.get("encoding", "raw").lower()
        ratio = {"raw": 1.0, "gzip": GZIP_MAX_RATIO, "gz": GZIP_MAX_RATIO, "hex": 0.5}.get(encoding)
        data = fields.get("data file") or fields.get("datafile")
    else:
        fields = _header_fields(p, "=")
        ratio = GZIP_MAX_RATIO if fields.get("compresseddata", "false").lower() == "true" else 1.0
        data = fields.get("elementdatafile")
        data = None if data and data.upper() == "LOCAL" else data
    if ratio is None:
        return None  # bzip2, text: no useful bound
    if data:
        if " " in data or "%" in data or data.upper().startswith("LIST"):
            return None  # several data files
        data_path = p.parent / data
        return (data_path.stat().st_size, ratio) if data_path.is_file() else None
    return p.stat().st_size, ratio


def check_declared_image_size(p: Path) -> None:
    """The voxels an image header declares against the bytes the file holds, before any pixel is read: a damaged
    header declaring 12000 x 12000 x 16 over 200 bytes is refused at once instead of allocating gigabytes."""
    suffix = image_suffix(p)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
        known = _data_bytes_and_ratio(p, suffix)
    except (RuntimeError, OSError, UnicodeError):
        return  # reading reports it
    if known is None:
        return
    size = [int(n) for n in reader.GetSize()]
    itemsize = sitk.GetArrayViewFromImage(sitk.Image([1] * len(size), reader.GetPixelID())).itemsize
    declared = int(np.prod(size, dtype=np.float64)) * int(reader.GetNumberOfComponents()) * itemsize
    available, ratio = known
    if declared > available * ratio:
        raise CTInputError(f"{p}: the header declares {' x '.join(map(str, size))} voxels ({declared / 2**20:.0f} MiB) but the file "
                           f"holds {available} bytes; a damaged header or a truncated file")


def _read_image_file(p: Path) -> tuple[CTVolume, str]:
    check_declared_image_size(p)
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise CTInputError(f"{p}: not a readable {image_suffix(p)} image (truncated or corrupt?): {reason[:160]}") from None
    meta = CTMetadata()
    for attr, key in META_KEYS.items():
        if image.HasMetaDataKey(key):
            value = image.GetMetaData(key).strip()
            if attr == "modality":  # MetaImage stores its own enum, MET_MOD_CT and the like
                value = "" if value == "MET_MOD_UNKNOWN" else value.removeprefix("MET_MOD_")
            setattr(meta, attr, float(value) if attr == "slice_thickness" and value else value)
    if not meta.kernel and image.HasMetaDataKey("descrip"):
        meta.kernel = _kernel_from_description(image.GetMetaData("descrip"))
    if meta.modality and meta.modality.upper() != "CT":
        raise CTInputError(f"{p}: modality {meta.modality}, not CT")
    return CTVolume.from_sitk(image, meta=meta, source=str(p)), image.GetPixelIDTypeAsString()


def _kernel_from_description(text: str) -> str:
    for part in text.split(";"):
        if part.strip().startswith("kernel="):
            return part.strip()[len("kernel="):]
    return ""


def _try_dcmread(path: Path) -> Dataset | None:
    """A parsed header (pixels deferred), None when the file is not DICOM, an error when it is broken DICOM."""
    try:
        return pydicom.dcmread(str(path), defer_size="2 KB")
    except InvalidDicomError:
        return None
    except Exception as exc:  # pydicom raises many types on truncated files
        if _has_dicom_preamble(path):
            raise CTInputError(f"{path}: truncated or corrupt DICOM file ({type(exc).__name__}: {str(exc)[:120]})") from None
        return None


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def scan_dicom_folder(folder: Path) -> dict[str, list[tuple[Path, Dataset]]]:
    """Group the image files under a folder by SeriesInstanceUID; non-DICOM and non-image files are ignored."""
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in sorted(f for f in Path(folder).rglob("*") if f.is_file()):
        if path.name.upper() == "DICOMDIR" or path.name.startswith("."):
            continue
        ds = _try_dcmread(path)
        if ds is None or "PixelData" not in ds:
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    return series


def describe_series(uid: str, files: list[tuple[Path, Dataset]]) -> str:
    ds = files[0][1]
    return (
        f"{uid or '<no SeriesInstanceUID>'} ({ds.get('Modality', '?')}, "
        f"'{ds.get('SeriesDescription', '')}', kernel {_kernel_text(ds) or '?'}, {len(files)} files)"
    )


def read_dicom_series(folder: Path, series_uid: str | None = None) -> CTVolume:
    series = scan_dicom_folder(folder)
    if not series:
        raise CTInputError(f"{folder}: no DICOM image files found")
    if series_uid is not None:
        if series_uid not in series:
            listing = "; ".join(describe_series(u, f) for u, f in series.items())
            raise CTInputError(f"{folder}: no series with SeriesInstanceUID {series_uid}; found: {listing}")
        files = series[series_uid]
    elif len(series) > 1:
        listing = "; ".join(describe_series(u, f) for u, f in series.items())
        raise CTInputError(
            f"{folder}: holds {len(series)} series, pick one by SeriesInstanceUID (--series UID): {listing}"
        )
    else:
        files = next(iter(series.values()))
    return _volume_from_slices(str(folder), files)


def _kernel_text(ds: Dataset) -> str:
    kernel = ds.get("ConvolutionKernel", "")
    if isinstance(kernel, (list, tuple, pydicom.multival.MultiValue)):
        kernel = "\\".join(str(k) for k in kernel)
    return str(kernel)


def _volume_from_slices(source: str, files: list[tuple[Path, Dataset]]) -> CTVolume:
    first_path, first = files[0]
    modality = str(first.get("Modality", ""))
    if modality.upper() != "CT":
        raise CTInputError(f"{source}: modality {modality or 'missing'}, not CT")
    frames = int(first.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise CTInputError(f"{first_path}: enhanced multi-frame DICOM ({frames} frames) is not supported; export as classic slices")
    for path, ds in files:
        missing = [t for t in ("RescaleSlope", "RescaleIntercept") if t not in ds]
        if missing:
            raise CTInputError(f"{path}: missing {' and '.join(missing)}; cannot convert stored values to HU")
        for tag in ("Rows", "Columns"):
            if ds.get(tag) != first.get(tag):
                raise CTInputError(f"{path}: {tag} {ds.get(tag)} differs from {first.get(tag)} in {first_path.name}")

    row_dir, col_dir = _orientation(first, first_path)
    normal = np.cross(row_dir, col_dir)
    pixel_spacing = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]
    _warn_missing_geometry(source, first)

    if len(files) > 1:
        positions = []
        for path, ds in files:
            if "ImagePositionPatient" not in ds:
                raise CTInputError(f"{path}: missing ImagePositionPatient; cannot order slices")
            r, c = _orientation(ds, path)
            if not (np.allclose(r, row_dir, atol=1e-3) and np.allclose(c, col_dir, atol=1e-3)):
                raise CTInputError(f"{path}: ImageOrientationPatient differs from the rest of the series")
            positions.append(np.asarray([float(v) for v in ds.ImagePositionPatient]))
        order = np.argsort([p @ normal for p in positions], kind="stable")
        files = [files[i] for i in order]
        distances = np.array([positions[i] @ normal for i in order])
        gaps = np.diff(distances)
        if np.any(gaps < 1e-3):
            k = int(np.argmin(gaps))
            raise CTInputError(
                f"{source}: two slices at the same position ({files[k][0].name}, {files[k + 1][0].name}); "
                "several acquisitions mixed in one series?"
            )
        step = float(np.median(gaps))
        if np.max(np.abs(gaps - step)) > max(SPACING_TOLERANCE_MM, 0.01 * step):
            raise CTInputError(
                f"{source}: uneven slice spacing (gaps from {gaps.min():.3f} to {gaps.max():.3f} mm); "
                "missing slices or a variable-spacing series"
            )
        origin = positions[order[0]]
        slice_positions = _in_plane_offsets(source, [positions[i] for i in order], normal, step)
        spacing_z_from = "slice positions"
    else:
        step, spacing_z_from = single_slice_spacing(source, first)
        origin = np.asarray([float(v) for v in first.get("ImagePositionPatient", [0.0, 0.0, 0.0])])
        slice_positions = None

    check_declared_pixels(files)  # before the allocation: a header may declare gigabytes over a few bytes
    hu = np.empty((len(files), int(first.Rows), int(first.Columns)), dtype=np.float32)
    for k, (path, ds) in enumerate(files):
        hu[k] = _slice_hu(path, ds)

    direction = np.column_stack([row_dir, col_dir, normal])
    template = _header_only(first)
    meta = CTMetadata(
        kernel=_kernel_text(first),
        manufacturer=str(first.get("Manufacturer", "")),
        model=str(first.get("ManufacturerModelName", "")),
        slice_thickness=float(first.SliceThickness) if first.get("SliceThickness") not in (None, "") else None,
        modality=modality,
        series_uid=str(first.get("SeriesInstanceUID", "")),
        series_description=str(first.get("SeriesDescription", "")),
        patient_id=str(first.get("PatientID", "")),
        study_uid=str(first.get("StudyInstanceUID", "")),
    )
    return CTVolume(
        hu=hu,
        spacing=(pixel_spacing[1], pixel_spacing[0], step),
        origin=tuple(origin),
        direction=tuple(direction.ravel()),
        meta=meta,
        source=source,
        dicom_template=template,
        slice_positions=slice_positions,
        spacing_z_from=spacing_z_from,
    )


def single_slice_spacing(source: str, ds: Dataset) -> tuple[float, str]:
    """The z spacing of a lone slice, which has no neighbour to measure it from: SpacingBetweenSlices when given,
    else SliceThickness (the slab the slice stands for, so a volume or an ROI in mm keeps its physical depth; SimpleITK
    takes 1 mm here), else 1 mm with a warning. A DICOM output writes both tags, so every reader agrees on it."""
    for tag in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(ds.get(tag, 0) or 0)
        except (TypeError, ValueError):
            value = 0.0
        if math.isfinite(value) and value > 0:
            return value, tag
    warnings.warn(f"{source}: one slice with neither SpacingBetweenSlices nor SliceThickness; z spacing taken as 1 mm")
    return 1.0, "none"


def _warn_missing_geometry(source: str, first: Dataset) -> None:
    """Geometry the header does not give is assumed, and said: distances, ROI sizes in mm and the kernel's
    frequency response depend on the pixel spacing."""
    if "PixelSpacing" not in first:
        warnings.warn(f"{source}: no PixelSpacing; pixels taken as 1 x 1 mm (sizes in mm and frequencies are wrong if not)")
    if "ImageOrientationPatient" not in first:
        warnings.warn(f"{source}: no ImageOrientationPatient; slices taken as axial (rows along x, columns along y)")


def _in_plane_offsets(source: str, positions: list[np.ndarray], normal: np.ndarray, step: float):
    """The slices' own positions when they do not lie on one line along the slice normal (a gantry-tilted series, a
    slice shifted in-plane), else None. A DICOM output keeps them, so the result overlays the input; an image file
    (NRRD, NIfTI) cannot hold them and stacks the slices along the normal, which the warning says."""
    first = positions[0]
    offsets = [(p - first) - float((p - first) @ normal) * normal for p in positions]
    largest = max(float(np.linalg.norm(o)) for o in offsets)
    if largest <= max(SPACING_TOLERANCE_MM, 0.01 * step):
        return None
    tilt = np.degrees(np.arctan2(float(np.linalg.norm(offsets[-1])), float((positions[-1] - first) @ normal)))
    warnings.warn(f"{source}: slices offset in-plane by up to {largest:.2f} mm along the series (gantry tilt of about "
                  f"{tilt:.1f} degrees, or a shifted slice); a DICOM output keeps each slice's position, an image file "
                  "(NRRD, NIfTI) stacks the slices along the slice normal and will not overlay the input")
    return tuple(tuple(float(v) for v in p) for p in positions)


def _orientation(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray]:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    try:
        v = np.asarray([float(x) for x in iop])
    except (TypeError, ValueError):
        raise CTInputError(f"{path}: ImageOrientationPatient {list(iop)} is not six numbers") from None
    row, col = v[:3], v[3:]
    norms = np.linalg.norm(row), np.linalg.norm(col)
    if not np.all(np.isfinite(v)) or min(norms) < 1e-6:
        raise CTInputError(f"{path}: ImageOrientationPatient {list(iop)} has a zero or invalid direction")
    row, col = row / norms[0], col / norms[1]
    if abs(float(row @ col)) > ORTHOGONALITY_TOLERANCE:
        raise CTInputError(f"{path}: ImageOrientationPatient row and column directions are not perpendicular "
                           f"(angle {np.degrees(np.arccos(np.clip(row @ col, -1, 1))):.1f} degrees); the slice has no plane")
    return row, col


ORTHOGONALITY_TOLERANCE = 1e-3  # cosine of the angle between the row and column directions (DICOM: perpendicular)


def check_declared_pixels(files: list[tuple[Path, Dataset]]) -> None:
    """Rows x Columns x BitsAllocated of each uncompressed slice against the pixel bytes the file holds, before any
    memory is allocated for the volume; a compressed slice is checked when decoded."""
    for path, ds in files:
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
            bits = int(ds.get("BitsAllocated", 16) or 16)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
        except (AttributeError, TypeError, ValueError):
            raise CTInputError(f"{path}: Rows, Columns or BitsAllocated missing or not numbers") from None
        if rows < 1 or cols < 1:
            raise CTInputError(f"{path}: Rows x Columns {rows} x {cols}; no pixels")
        transfer_syntax = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian) if hasattr(ds, "file_meta") else ExplicitVRLittleEndian
        if _is_compressed(transfer_syntax) or "PixelData" not in ds:
            continue
        expected, found = rows * cols * samples * bits // 8, len(ds.PixelData)  # at most the file's size
        if found < expected:
            raise CTInputError(f"{path}: the header declares {rows} x {cols} pixels ({expected} bytes) but the pixel data holds "
                               f"{found} bytes; truncated or corrupt (or a damaged header)")


def _slice_hu(path: Path, ds: Dataset) -> np.ndarray:
    transfer_syntax = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    if not _is_compressed(transfer_syntax) and "PixelData" in ds:
        _check_pixel_data_length(path, ds)
    try:
        stored = ds.pixel_array
    except Exception as exc:
        if not _is_compressed(transfer_syntax):
            raise CTInputError(f"{path}: truncated or corrupt pixel data ({type(exc).__name__}: {str(exc)[:100]})") from None
        return _slice_hu_with_gdcm(path, transfer_syntax)
    if stored.ndim != 2:
        raise CTInputError(f"{path}: pixel data of shape {stored.shape}; expected one grayscale slice")
    return stored.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _is_compressed(transfer_syntax) -> bool:
    """pydicom 2.4 raises ValueError for syntaxes newer than itself (e.g. HTJ2K); every new one is encapsulated."""
    try:
        return bool(transfer_syntax.is_compressed)
    except AttributeError:
        return False
    except ValueError:
        return True


def _check_pixel_data_length(path: Path, ds: Dataset) -> None:
    """pydicom drops excess pixel bytes with a warning that names no file; the slice would come out sheared."""
    try:
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.BitsAllocated) // 8
    except (AttributeError, TypeError, ValueError):
        return  # pixel_array reports missing geometry tags itself
    found = len(ds.PixelData)
    if found > expected + (expected % 2) + 1:
        raise CTInputError(f"{path}: pixel data holds {found} bytes but Rows x Columns x BitsAllocated say {expected}; "
                           "refusing a slice whose header does not match its pixels")


def _slice_hu_with_gdcm(path: Path, transfer_syntax) -> np.ndarray:
    """Compressed syntaxes pydicom has no plugin for; GDCM applies the rescale itself."""
    name = getattr(transfer_syntax, "name", str(transfer_syntax))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = sitk.ImageFileReader()
            reader.SetImageIO("GDCMImageIO")
            reader.SetFileName(str(path))
            image = reader.Execute()
    except RuntimeError:
        raise CTInputError(
            f"{path}: compressed transfer syntax {transfer_syntax} ({name}) that no installed decoder handles; "
            "decompress it (e.g. gdcmconv --raw) or install a pydicom decoder plugin"
        ) from None
    return sitk.GetArrayFromImage(image).astype(np.float32).reshape(image.GetHeight(), image.GetWidth())


def _header_only(ds: Dataset) -> Dataset:
    header = Dataset()
    for element in ds:
        if element.tag.group == 0x7FE0:
            continue
        header.add(element)
    return header


# ---------------------------------------------------------------------------------------------- writing


def check_output_path(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output that would overwrite or live inside an input: a user's data is never touched."""
    out = Path(output).resolve()
    for item in inputs:
        src = Path(item).resolve()
        if out == src:
            raise CTInputError(f"{output}: output path is the input; choose another output")
        if src.is_file() and out.is_dir() and src.parent == out:
            raise CTInputError(f"{output}: output folder holds the input file {src.name}; choose another output")
        if src.is_dir() and (out in src.parents or src in out.parents):
            raise CTInputError(f"{output}: output is inside the input folder {src} (or holds it); choose another output")


def check_output_volume(output: str | os.PathLike) -> None:
    """Before any work: the output format can be written in one piece and the path can be created."""
    _check_output_format(Path(output))
    check_writable(output)


def _check_output_format(p: Path) -> None:
    suffix = image_suffix(p)
    if suffix and not IMAGE_SUFFIXES[suffix]:
        raise CTInputError(f"{p}: {suffix} writes two files; use .nrrd, .nii, .nii.gz or .mha")
    if not suffix and p.suffix.lower() not in ("", ".dcm", ".dicom") and not p.is_dir():
        raise CTInputError(f"{p}: unknown output format {p.suffix}; use .nrrd, .nii, .nii.gz, .mha or a folder for DICOM")


def check_writable(output: str | os.PathLike) -> None:
    """An output path that can be created: no regular file on the way, a writable folder, names the file
    system accepts (each a one-line error naming the output, before any work is done)."""
    p = Path(output).absolute()
    ancestor = p
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor != p and not ancestor.is_dir():
        raise CTInputError(f"{output}: cannot be created: {ancestor} is a file, not a folder")
    try:
        name_max = os.pathconf(ancestor if ancestor.is_dir() else ancestor.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    for part in p.relative_to(ancestor).parts if ancestor != p else (p.name,):
        if len(os.fsencode(part)) > name_max - 32:  # room for the hidden staging name's prefix and suffix
            raise CTInputError(f"{output}: name '{part[:40]}...' is too long ({len(part)} characters; at most {name_max - 32})")
    folder = ancestor if ancestor != p else p.parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise CTInputError(f"{output}: cannot be written: folder {folder} is not writable")


def write_volume(
    volume: CTVolume,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    description: str | None = None,
    derivation: str | None = None,
) -> Path:
    """Write HU as int16 to NRRD/NIfTI/MetaImage (by suffix) or, for a path without one, a DICOM series folder.

    ``description`` becomes the series description; ``derivation`` says how the image was made (both land in
    DICOM tags, and in the header of the research formats).
    """
    p = Path(path)
    suffix = image_suffix(p)
    _check_output_format(p)
    if not suffix and overwrite and p.is_dir():
        check_own_dicom_folder(p)
    if p.exists() and not overwrite and not (p.is_dir() and not any(p.iterdir())):
        raise CTInputError(f"{p}: already exists; refusing to overwrite (choose another output or allow overwrite)")
    p.parent.mkdir(parents=True, exist_ok=True)
    if suffix:
        return _write_image_file(volume, p, suffix, description, derivation)
    return write_dicom_series(volume, p, description=description, derivation=derivation, overwrite=overwrite)


def hu_to_int16(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def _write_image_file(volume: CTVolume, p: Path, suffix: str, description: str | None, derivation: str | None) -> Path:
    image = volume.sitk_like(hu_to_int16(volume.hu))
    meta = volume.meta
    if description:
        meta = CTMetadata(**{**meta.as_dict(), "series_description": description})
    for attr, key in META_KEYS.items():
        value = getattr(meta, attr)
        if value not in (None, ""):
            if key == "Modality" and suffix == ".mha":  # MetaImage's own modality enum
                value = f"MET_MOD_{value}"
            image.SetMetaData(key, str(value))
    if derivation:
        image.SetMetaData("DerivationDescription", derivation)
    # NIfTI keeps only an 80-character description; put the kernel first so it survives.
    image.SetMetaData("ITK_FileNotes", f"kernel={meta.kernel};{description or ''}"[:79])
    return _write_sitk(image, p)


def _write_sitk(image: sitk.Image, p: Path) -> Path:
    with staged(p) as tmp:  # the staging name keeps the suffix: SimpleITK picks the format from it
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return p


def write_map(values: np.ndarray, like: CTVolume, path: str | os.PathLike, dtype=np.uint8) -> Path:
    """A map on the grid of a volume: a label map (uint8: ROIs, the phantom's tissues) or a float map
    (Grad-CAM), aligned voxel for voxel."""
    p = Path(path)
    suffix = image_suffix(p)
    if not suffix or not IMAGE_SUFFIXES[suffix]:
        raise CTInputError(f"{p}: maps are written as .nrrd, .nii, .nii.gz or .mha")
    if np.shape(values) != like.shape:
        raise ValueError(f"map shape {np.shape(values)} differs from the volume's {like.shape}")
    image = like.sitk_like(np.asarray(values, dtype=dtype))
    return _write_sitk(image, p)


# Patient, study, frame-of-reference and equipment tags a derived series keeps from its source.
_KEPT_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
    "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer", "ManufacturerModelName",
    "InstitutionName", "BodyPartExamined", "KVP", "PatientPosition", "ConvolutionKernel", "SeriesNumber",
)


def write_dicom_series(
    volume: CTVolume,
    folder: Path,
    *,
    description: str | None = None,
    derivation: str | None = None,
    overwrite: bool = False,
) -> Path:
    """A derived CT series: new series and instance UIDs, ImageType DERIVED, the source's identity and frame
    of reference kept, so PACS and Slicer file it next to the original."""
    template = volume.dicom_template if volume.dicom_template is not None else Dataset()
    now = datetime.datetime.now()
    series_uid = generate_uid()
    direction = volume.direction_matrix
    row_dir, col_dir, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    sx, sy, sz = volume.spacing
    pixels = hu_to_int16(volume.hu)

    base = Dataset()
    for keyword in _KEPT_TAGS:
        if keyword in template:
            setattr(base, keyword, template.data_element(keyword).value)
    base.PatientName = base.get("PatientName", "Anonymous")
    base.PatientID = base.get("PatientID", "RADIOMICGAN")
    base.StudyInstanceUID = base.get("StudyInstanceUID", generate_uid())
    base.FrameOfReferenceUID = base.get("FrameOfReferenceUID", generate_uid())
    base.StudyDate = base.get("StudyDate", now.strftime("%Y%m%d"))
    base.StudyTime = base.get("StudyTime", now.strftime("%H%M%S"))
    base.Modality = "CT"
    base.SOPClassUID = CTImageStorage
    base.SeriesInstanceUID = series_uid
    base.SeriesNumber = int(base.get("SeriesNumber", 0) or 0) + 1000
    base.SeriesDescription = (description or volume.meta.series_description or "RadiomicGAN")[:64]
    base.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    base.SoftwareVersions = WRITER_MARK  # how --overwrite recognises a series this tool wrote
    if derivation:
        base.DerivationDescription = derivation[:1024]
    if volume.meta.kernel:
        base.ConvolutionKernel = volume.meta.kernel[:16]
    for attr, keyword in (("manufacturer", "Manufacturer"), ("model", "ManufacturerModelName")):
        if getattr(volume.meta, attr) and keyword not in base:
            setattr(base, keyword, getattr(volume.meta, attr))
    base.SeriesDate = base.ContentDate = now.strftime("%Y%m%d")
    base.SeriesTime = base.ContentTime = now.strftime("%H%M%S")
    base.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    base.PixelSpacing = [_ds(sy), _ds(sx)]
    base.SliceThickness = _ds(volume.meta.slice_thickness or sz)
    base.SpacingBetweenSlices = _ds(sz)
    base.Rows, base.Columns = pixels.shape[1], pixels.shape[2]
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.BitsAllocated, base.BitsStored, base.HighBit, base.PixelRepresentation = 16, 16, 15, 1
    base.RescaleIntercept, base.RescaleSlope, base.RescaleType = "0", "1", "HU"
    base.WindowCenter, base.WindowWidth = "40", "400"

    with staged(folder, directory=True, overwrite=overwrite, owned=written_by_radiomicgan) as tmp:
        for k in range(pixels.shape[0]):
            ds = Dataset()
            ds.update(base)
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            position = np.asarray(volume.origin) + k * sz * normal
            if volume.slice_positions is not None and len(volume.slice_positions) == pixels.shape[0]:
                position = np.asarray(volume.slice_positions[k])  # a tilted series keeps its slices' positions
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.SliceLocation = _ds(float(position @ normal))
            ds.PixelData = pixels[k].tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.preamble = b"\0" * 128
            save_dicom(ds, tmp / f"IM{k + 1:05d}.dcm")
    return folder


PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])


def save_dicom(ds: Dataset, path: Path) -> None:
    """Write a conformant DICOM file (preamble, file meta) with pydicom 3 and with pydicom 2.4, the version that
    Slicer 5.6-5.10 ship: 3 takes ``enforce_file_format``; 2.4 takes ``write_like_original=False`` and needs the
    encoding set on the dataset (3 derives it from the transfer syntax and deprecates those attributes)."""
    if PYDICOM_MAJOR >= 3:
        ds.save_as(path, enforce_file_format=True)
        return
    syntax = ds.file_meta.TransferSyntaxUID
    ds.is_little_endian, ds.is_implicit_VR = syntax.is_little_endian, syntax.is_implicit_VR
    ds.save_as(path, write_like_original=False)


def written_by_radiomicgan(path: Path) -> bool:
    """A DICOM file of a derived series this tool wrote (SoftwareVersions or DerivationDescription say so)."""
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # not DICOM, unreadable: not ours
        return False
    marks = (str(ds.get("SoftwareVersions", "")), str(ds.get("DerivationDescription", "")))
    image_type = ds.get("ImageType") or [""]
    return str(image_type[0]).upper() == "DERIVED" and any(m.startswith("RadiomicGAN") for m in marks)


def check_own_dicom_folder(folder: Path) -> None:
    check_owned(folder, written_by_radiomicgan)


def _ds(value: float) -> str:
    """DICOM decimal strings hold at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


__all__: Sequence[str] = (
    "read_volume", "write_volume", "read_dicom_series", "write_dicom_series", "scan_dicom_folder",
    "check_output_path", "image_suffix",
)
