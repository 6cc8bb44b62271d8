"""The one in-memory form of a CT scan: HU voxels plus the geometry and tags that matter here.

Arrays are indexed [slice, row, column] (z, y, x) as SimpleITK's ``GetArrayFromImage`` returns them;
spacing, origin and direction follow ITK (x, y, z order, LPS patient coordinates, direction columns are
the axis directions), so a volume converts to and from SimpleITK and DICOM without guessing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import CTInputError

# Plausible Hounsfield range: padding outside the field of view goes down to about -3024; metal and
# dense contrast can reach the int16 ceiling.
HU_MIN_PLAUSIBLE = -4096.0
HU_MAX_PLAUSIBLE = 32767.0


@dataclass
class CTMetadata:
    """DICOM tags that decide whether two scans are comparable (the kernel above all)."""

    kernel: str = ""  # ConvolutionKernel (0018,1210)
    manufacturer: str = ""
    model: str = ""  # ManufacturerModelName
    slice_thickness: float | None = None
    modality: str = "CT"
    series_uid: str = ""
    series_description: str = ""
    patient_id: str = ""
    study_uid: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CTVolume:
    hu: np.ndarray  # float32, (z, y, x)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # row-major 3x3
    meta: CTMetadata = field(default_factory=CTMetadata)
    source: str = ""  # where it was read from, for messages
    # First slice's DICOM header (no pixels) when read from DICOM: a derived series keeps its identity.
    dicom_template: Any = None
    # 2 for a single-slice 2D image file: written back as 2D (dimension, size, spacing, direction kept).
    image_dimension: int = 3
    # Each slice's ImagePositionPatient when a DICOM series' slices do not lie on one line along the normal (gantry
    # tilt): a derived DICOM series keeps them (see radiomicgan.io); None otherwise.
    slice_positions: Any = None
    # Where the z spacing came from (``radiomicgan info`` shows it): "slice positions", "SpacingBetweenSlices",
    # "SliceThickness" or "none" (1 mm) for a DICOM series or slice, "header" for an image file.
    spacing_z_from: str = ""

    def __post_init__(self) -> None:
        hu = np.asarray(self.hu)
        if hu.ndim == 2:
            hu = hu[None]
        if hu.ndim != 3:
            raise ValueError(f"CT volume must be 2D or 3D, got shape {hu.shape}")
        self.hu = hu.astype(np.float32, copy=False)
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = tuple(float(d) for d in self.direction)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def with_hu(self, hu: np.ndarray, **meta_changes: Any) -> "CTVolume":
        """Same geometry and identity, new voxels: how every derived image is made."""
        if np.shape(hu) != self.shape:
            raise ValueError(f"new voxels have shape {np.shape(hu)}, volume has {self.shape}")
        meta = dataclasses.replace(self.meta, **meta_changes)
        return dataclasses.replace(self, hu=np.asarray(hu, dtype=np.float32), meta=meta)

    def same_geometry(self, other: "CTVolume", tol: float = 1e-3) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * 10)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.hu)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def sitk_like(self, values: np.ndarray) -> sitk.Image:
        """An image of ``values`` on this volume's grid; a 2D input stays 2D."""
        if self.image_dimension == 2 and np.shape(values)[0] == 1:
            image = sitk.GetImageFromArray(np.asarray(values)[0])
            image.SetSpacing(self.spacing[:2])
            image.SetOrigin(self.origin[:2])
            d = self.direction_matrix
            image.SetDirection(tuple(d[:2, :2].ravel()))
            return image
        image = sitk.GetImageFromArray(values)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, meta: CTMetadata | None = None, source: str = "") -> "CTVolume":
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise CTInputError(f"{source}: has {image.GetNumberOfComponentsPerPixel()} components per pixel; CT is single-channel")
        dimension = image.GetDimension()
        if dimension == 2:
            image = sitk.JoinSeries(image)
        if image.GetDimension() != 3:
            raise CTInputError(f"{source}: {image.GetDimension()}D image; expected a 2D slice or a 3D volume")
        return cls(
            hu=sitk.GetArrayFromImage(image).astype(np.float32),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=image.GetDirection(),
            meta=meta or CTMetadata(),
            source=source,
            image_dimension=dimension,
            spacing_z_from="header",
        )


def check_hu_plausible(hu: np.ndarray, source: str, pixel_type: str = "") -> None:
    """Refuse data that are not Hounsfield units, because every later step (windows, kernels) assumes HU.

    Decided from the stored pixel type (``pixel_type``: SimpleITK's name, or "DICOM rescale tags") and the
    range together. Typical failures: 8-bit exports (0..255 cannot hold air at -1000 HU), images normalised to
    [0, 1] or [-1, 1], raw stored values whose rescale intercept was lost (nothing below 0), NaNs. A narrow
    span in a type that holds HU (a cropped organ) is accepted, with a warning saying so.
    """
    import warnings

    if hu.size == 0:
        raise CTInputError(f"{source}: image has no voxels")
    lo, hi = float(np.min(hu)), float(np.max(hu))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise CTInputError(f"{source}: contains NaN or infinite values, not Hounsfield units")
    if lo < HU_MIN_PLAUSIBLE or hi > HU_MAX_PLAUSIBLE:
        raise CTInputError(f"{source}: values span [{lo:g}, {hi:g}], outside any plausible HU range")
    kind = pixel_type.lower()
    if "8-bit" in kind:
        raise CTInputError(f"{source}: {pixel_type} pixels (range [{lo:g}, {hi:g}]): 8 bits cannot hold Hounsfield units; "
                           "looks like a windowed or display export")
    if "float" in kind and lo >= -1.0 and hi <= 1.0:
        raise CTInputError(f"{source}: {pixel_type} values span only [{lo:g}, {hi:g}]; looks normalised, not Hounsfield units")
    if lo >= 0 and hi > 1000:
        raise CTInputError(
            f"{source}: no value below 0 (range [{lo:g}, {hi:g}]); looks like raw stored values without "
            "the rescale intercept, not Hounsfield units"
        )
    if hi - lo < 100:
        if not kind:
            raise CTInputError(f"{source}: values span only [{lo:g}, {hi:g}]; looks normalised, not Hounsfield units")
        warnings.warn(f"{source}: values span only [{lo:g}, {hi:g}]; assumed Hounsfield units ({pixel_type})")


def require_volume(volume: CTVolume, min_slices: int = 2) -> None:
    """For steps that need a stack (3D ROIs, a series), not a single slice."""
    if volume.shape[0] < min_slices:
        raise CTInputError(
            f"{volume.source or 'input'}: a 2D image ({volume.shape[1]}x{volume.shape[2]}, "
            f"{volume.shape[0]} slice); a volume of at least {min_slices} slices is required"
        )
