"""Paired "same scan, two kernels" data anyone can make: phantom pairs for training and testing, and
re-kernelled copies of a user's own scans."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .dataset import manifest_entry, write_manifest
from .errors import CTInputError
from .io import check_owned, write_map, write_volume
from .staging import staged
from .kernels import KernelPreset, get_preset, kernel_name, preset_for_tag, rekernel, simulate_kernels
from .phantom import make_chest_phantom
from .volume import CTMetadata, CTVolume

SIMULATED_MANUFACTURER = "RadiomicGAN simulation"


def simulated_kernel_tag(preset: KernelPreset) -> str:
    """What a simulated image's ConvolutionKernel says: the preset, and that it was simulated."""
    return f"{preset.name}-sim"


def phantom_pair(
    size: int = 256,
    slices: int = 16,
    seed: int = 0,
    source_kernel: str = "B30",
    target_kernel: str = "B50",
    spacing: float = 0.7,
    slice_thickness: float = 1.0,
    noise_scale: float = 1.0,
) -> tuple[CTVolume, CTVolume, np.ndarray]:
    """One phantom reconstructed with two kernels from one noise realisation: (source, target, labels)."""
    source_preset, target_preset = get_preset(source_kernel), get_preset(target_kernel)
    phantom_seed, noise_seed = np.random.SeedSequence(seed).generate_state(2)
    phantom = make_chest_phantom(size, slices, seed=int(phantom_seed), spacing=spacing, slice_thickness=slice_thickness)
    source_hu, target_hu = simulate_kernels(
        phantom.hu, (spacing, spacing), [source_preset, target_preset], seed=int(noise_seed), noise_scale=noise_scale
    )
    half = (size - 1) / 2.0
    origin = (-half * spacing, -half * spacing, -(slices - 1) / 2.0 * slice_thickness)

    def volume(hu, preset):
        meta = CTMetadata(
            kernel=simulated_kernel_tag(preset), manufacturer=SIMULATED_MANUFACTURER, model=f"chest phantom {__version__}",
            slice_thickness=slice_thickness, series_description=f"Chest phantom, {preset.description} (simulated)",
        )
        return CTVolume(hu=hu, spacing=(spacing, spacing, slice_thickness), origin=origin, meta=meta, source=f"phantom seed {seed}")

    return volume(source_hu, source_preset), volume(target_hu, target_preset), phantom.labels


def _phantom_file(path: Path) -> bool:
    """A file ``simulate_phantom_pairs`` writes: the manifest, or a case's volume or label map."""
    return re.fullmatch(r"manifest\.json|case\d+_[\w.-]+\.(nrrd|nii|nii\.gz|mha)", path.name) is not None


def simulate_phantom_pairs(
    out_dir: str | Path,
    cases: int = 1,
    *,
    size: int = 256,
    slices: int = 16,
    seed: int = 0,
    source_kernel: str = "B30",
    target_kernel: str = "B50",
    spacing: float = 0.7,
    slice_thickness: float = 1.0,
    noise_scale: float = 1.0,
    suffix: str = ".nrrd",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``cases`` phantom pairs, their tissue label maps and a manifest; returns the manifest's path.

    The folder appears complete or not at all.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CTInputError(f"{out}: already exists and is not empty; refusing to overwrite")
    if out.is_dir():
        check_owned(out, _phantom_file)
    source_preset, target_preset = get_preset(source_kernel), get_preset(target_kernel)
    if source_preset == target_preset:
        raise CTInputError(f"source and target kernel are both {source_preset.name}; a pair needs two kernels")
    out.parent.mkdir(parents=True, exist_ok=True)
    case_seeds = np.random.SeedSequence(seed).generate_state(cases)
    with staged(out, directory=True, owned=_phantom_file) as tmp:
        entries = []
        for k in range(cases):
            source, target, labels = phantom_pair(
                size, slices, int(case_seeds[k]), source_preset.name, target_preset.name, spacing, slice_thickness, noise_scale
            )
            case = f"case{k:03d}"
            names = [f"{case}_{source_preset.name}{suffix}", f"{case}_{target_preset.name}{suffix}", f"{case}_labels.nrrd"]
            write_volume(source, tmp / names[0])
            write_volume(target, tmp / names[1])
            write_map(labels, source, tmp / names[2])
            entries.append(manifest_entry(case, names[0], names[1], source_preset.name, target_preset.name, names[2]))
            if progress:
                progress(k + 1, cases)
        info = {
            "generator": f"radiomicgan {__version__} chest phantom",
            "size": size, "slices": slices, "seed": seed, "spacing_mm": spacing, "slice_thickness_mm": slice_thickness,
            "noise_scale": noise_scale, "source_kernel": source_preset.description, "target_kernel": target_preset.description,
        }
        write_manifest(tmp, entries, info)
    return out / "manifest.json"


def rekernel_volume(
    volume: CTVolume, target_kernel: str, source_kernel: str | None = None, seed: int = 0, noise_scale: float = 1.0
) -> CTVolume:
    """A user's scan as if reconstructed with another kernel; the source kernel comes from the DICOM tag
    unless given."""
    target = get_preset(target_kernel)
    if source_kernel:
        source = get_preset(source_kernel)
    else:
        source = preset_for_tag(volume.meta.kernel)
        if source is None:
            raise CTInputError(
                f"{volume.source}: kernel tag '{volume.meta.kernel or 'missing'}' matches no preset; "
                "name the source kernel (--source-kernel)"
            )
        if kernel_name(volume.meta.kernel) != source.name:
            warnings.warn(f"{volume.source}: kernel '{volume.meta.kernel}' taken as the {source.name} preset ({source.description})")
    hu = rekernel(volume.hu, volume.spacing[:2], source, target, seed=seed, noise_scale=noise_scale)
    return volume.with_hu(
        hu,
        kernel=simulated_kernel_tag(target),
        series_description=f"{volume.meta.series_description or 'CT'} as {target.name} (simulated)"[:64],
    )


def find_scans(folder: str | Path) -> list[tuple[str, Callable[[], CTVolume]]]:
    """Every volume a folder holds: image files (NRRD, NIfTI, MetaImage) and DICOM series, at any depth, as
    (name, loader) in a stable order."""
    from .io import _volume_from_slices, image_suffix, read_volume, scan_dicom_folder

    root = Path(folder)
    if not root.is_dir():
        raise CTInputError(f"{root}: not a folder of scans")
    found: list[tuple[str, Callable[[], CTVolume]]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if image_suffix(path) and not path.name.endswith((".raw", ".zraw")):
            found.append((str(path.relative_to(root)), lambda p=path: read_volume(p)))
    for uid, files in scan_dicom_folder(root).items():
        where = files[0][0].parent.relative_to(root)
        found.append((f"{where}/series {uid[-12:] or 'unnamed'}", lambda f=files: _volume_from_slices(str(root), f)))
    return found


def rekernel_folder_pairs(
    folder: str | Path,
    out_dir: str | Path,
    kernel: str,
    scan_kernel: str | None = None,
    *,
    seed: int = 0,
    noise_scale: float = 1.0,
    suffix: str = ".nrrd",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, int]:
    """Paired data without paired scans: each scan of ``folder`` re-kernelled to ``kernel`` (the pair's source)
    beside a copy of the scan itself (the pair's target), and a manifest. A site with only sharp-kernel scans
    can so train a smooth-to-sharp harmonizer. Scans that cannot be read as CT are skipped with a warning.
    Returns (manifest path, number of pairs); the folder appears complete or not at all."""
    from .io import check_output_path

    out = Path(out_dir)
    check_output_path(out, [folder])
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CTInputError(f"{out}: already exists and is not empty; refusing to overwrite")
    source_preset = get_preset(kernel)
    scans = find_scans(folder)
    if not scans:
        raise CTInputError(f"{folder}: no image files or DICOM series found")
    seeds = np.random.SeedSequence(seed).generate_state(len(scans))
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out, directory=True) as tmp:
        entries, first = [], None
        for k, (name, load) in enumerate(scans):
            try:
                volume = load()
            except CTInputError as error:
                warnings.warn(f"skipped {name}: {error}")
                continue
            scan_preset = get_preset(scan_kernel) if scan_kernel else preset_for_tag(volume.meta.kernel)
            if scan_preset is None:
                raise CTInputError(
                    f"{name}: kernel tag '{volume.meta.kernel or 'missing'}' matches no preset; name it (--source-kernel)"
                )
            if scan_preset == source_preset:
                raise CTInputError(f"{name}: already a {scan_preset.name} scan; simulate another kernel than the scans'")
            first = first or (name, scan_preset)
            if scan_preset != first[1]:  # pairs of two directions: a manifest train refuses; say so now
                raise CTInputError(f"{name}: a {scan_preset.name} scan, but {first[0]} is {first[1].name}; one manifest "
                                   "learns one direction: give a folder of scans of one kernel")
            simulated = rekernel_volume(volume, source_preset.name, scan_preset.name, seed=int(seeds[k]), noise_scale=noise_scale)
            case = f"scan{len(entries):03d}"
            # the target is named by the scan's own tag (FC51, B50f), the vendor's name, not the preset's
            target_name = kernel_name(volume.meta.kernel) or scan_preset.name
            names = [f"{case}_{source_preset.name}-sim{suffix}", f"{case}_{target_name}{suffix}"]
            write_volume(simulated, tmp / names[0])
            write_volume(volume, tmp / names[1])
            entries.append(manifest_entry(case, names[0], names[1], source_preset.name, target_name))
            entries[-1]["scan"] = name
            if progress:
                progress(k + 1, len(scans))
        if not entries:
            raise CTInputError(f"{folder}: none of its {len(scans)} volume(s) could be read as CT")
        if len({e["target_kernel"] for e in entries}) > 1:  # scans tagged B30f and B31f: one model, one direction
            for e in entries:
                e["target_kernel"] = scan_preset.name
        info = {
            "generator": f"radiomicgan {__version__} re-kernelled scans",
            "source_kernel": f"{source_preset.description}, simulated from each scan",
            "target_kernel": "the scans as reconstructed", "seed": seed, "noise_scale": noise_scale,
        }
        write_manifest(tmp, entries, info)
    return out / "manifest.json", len(entries)
