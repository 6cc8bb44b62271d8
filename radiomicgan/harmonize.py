"""Harmonize whole CT volumes with a trained model, slice by slice in batches, and map where the result still
looks non-standard (Grad-CAM of the frozen discriminator) and the HU window those hot spots span.

On CUDA: bf16 autocast, channels_last, optional torch.compile, pinned host memory with the next chunk's copy
overlapping the current chunk's compute; window scaling and the carry-over blend run on the device, and HU come
back as int16. Out of memory: the batch is halved and the batch retried, and at batch 1 the work moves to the
CPU, saying so. Every output is staged under a temporary name and renamed into place only when everything has
been computed and written: a cancelled or failed run leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CTInputError, RadiomicGANError
from .io import check_output_path, image_suffix, read_volume, write_map, write_volume
from .kernels import preset_for_tag
from .modelio import LoadedModel, load_model, resolve_device
from .volume import CTVolume
from .window import select_window

CHUNK_SLICES = 64  # slices staged per host-to-device copy


class Cancelled(RadiomicGANError):
    """The user stopped the run; nothing was written."""


@dataclass
class HarmonizeResult:
    volume: CTVolume
    cam_input: np.ndarray | None = None
    cam_output: np.ndarray | None = None
    windows: dict | None = None
    device: str = "cpu"
    batch: int = 1
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class Harmonizer:
    """A loaded model ready to harmonize HU stacks. Reuse one for many volumes (loading and compiling once)."""

    def __init__(self, model: LoadedModel | str | os.PathLike, device: str = "auto", batch: int | None = None,
                 compile: bool = False, precision: str = "auto"):
        """``batch`` None: 16 slices on CUDA, 1 on the CPU (where batching does not pay, measured)."""
        import torch

        self.device = resolve_device(device)
        self.model = model if isinstance(model, LoadedModel) else load_model(model, "cpu")
        self.batch = max(1, int(batch)) if batch else (16 if self.device.startswith("cuda") else 1)
        self.notes: list[str] = []
        cuda = self.device.startswith("cuda")
        if precision == "auto":
            precision = "bf16" if cuda else "fp32"
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16, fp32 or auto, not {precision}")
        self.precision = precision
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        self.compile = compile
        self._network = None
        if self.model.generator is not None:
            self._place(self.device)

    # -------------------------------------------------------------------------------------------- devices

    def _place(self, device: str) -> None:
        import torch

        self.device = device
        self.model.generator.to(device, memory_format=self.memory_format).eval()
        if self.model.discriminator is not None:
            self.model.discriminator.to(device).eval()
        self._network = torch.compile(self.model.generator) if self.compile and device.startswith("cuda") else self.model.generator

    def _autocast(self):
        import torch

        if self.precision == "bf16":
            return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)
        return nullcontext()

    def _fall_back_to_cpu(self, reason: str) -> None:
        import torch

        note = f"{reason} on {self.device} even at batch 1: continuing on the CPU (slower)"
        warnings.warn(note)
        self.notes.append(note)
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        self.memory_format = torch.contiguous_format
        self.precision = "fp32"
        self._place("cpu")

    # -------------------------------------------------------------------------------------------- harmonize

    def harmonize(self, hu: np.ndarray, spacing_xy=(1.0, 1.0), progress: Callable[[int, int], None] | None = None,
                  cancel: Callable[[], bool] | None = None) -> np.ndarray:
        """HU (slices, rows, cols) or one slice -> harmonized HU (float32, rounded to whole HU)."""
        hu = np.asarray(hu, dtype=np.float32)
        squeeze = hu.ndim == 2
        stack = hu[None] if squeeze else hu
        if stack.ndim != 3 or min(stack.shape) < 1:
            raise CTInputError(f"expected slices (N, rows, cols), got shape {hu.shape}")
        if self.model.baseline is not None:
            out = np.rint(self.model.baseline.harmonize(stack, spacing_xy)).astype(np.float32)
            if progress:
                progress(len(stack), len(stack))
            return out[0] if squeeze else out
        out = np.empty(stack.shape, dtype=np.float32)
        done = 0
        for start, chunk_out in self._chunks(stack, cancel):
            out[start : start + len(chunk_out)] = chunk_out
            done += len(chunk_out)
            if progress:
                progress(done, len(stack))
        return out[0] if squeeze else out

    def _chunks(self, stack: np.ndarray, cancel):
        """Yield (first slice, harmonized HU) per chunk; on CUDA the next chunk's upload overlaps compute."""
        import torch

        cuda = self.device.startswith("cuda")
        starts = list(range(0, len(stack), CHUNK_SLICES))
        copy_stream = torch.cuda.Stream() if cuda else None
        pending = self._upload(stack, starts[0], copy_stream) if starts else None
        for index, start in enumerate(starts):
            if cancel is not None and cancel():
                raise Cancelled("harmonization cancelled; nothing written")
            chunk, event = pending
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
                chunk.record_stream(torch.cuda.current_stream())  # allocated on the copy stream, used here
            pending = self._upload(stack, starts[index + 1], copy_stream) if index + 1 < len(starts) else None
            yield start, self._run_chunk(chunk, cancel)

    def _upload(self, stack, start, stream):
        import torch

        host = torch.from_numpy(np.ascontiguousarray(stack[start : start + CHUNK_SLICES]))
        if stream is None:
            return host, None
        host = host.pin_memory()
        with torch.cuda.stream(stream):
            device_tensor = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return device_tensor, event

    def _run_chunk(self, chunk, cancel) -> np.ndarray:
        """Window scaling, the network, and the carry-over blend, in batches that shrink on out-of-memory."""
        import torch

        from .models import pad_to_multiple
        from .window import carry_weight, from_unit, to_unit

        hu_range = self.model.hu_range
        results = []
        position = 0
        while position < len(chunk):
            if cancel is not None and cancel():
                raise Cancelled("harmonization cancelled; nothing written")
            hu = chunk[position : position + self.batch].to(self.device, non_blocking=True).float()
            try:
                with torch.inference_mode():
                    x = to_unit(hu.clamp(*hu_range), hu_range)[:, None]
                    x, (h, w) = pad_to_multiple(x, self.model.generator.divisor)
                    x = x.contiguous(memory_format=self.memory_format)
                    with self._autocast():
                        y = self._network(x)
                    predicted = from_unit(y[:, 0, :h, :w].float(), hu_range)
                    weight = carry_weight(hu, hu_range)
                    blended = torch.round(weight * predicted + (1.0 - weight) * hu)
                    results.append(blended.cpu().numpy())
            except torch.OutOfMemoryError:
                if self.batch > 1:
                    self.batch = max(1, self.batch // 2)
                    note = f"out of memory: batch halved to {self.batch}"
                    warnings.warn(note)
                    self.notes.append(note)
                    if self.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                    continue
                if self.device == "cpu":
                    raise RadiomicGANError("out of memory on the CPU even at batch 1; free memory or use smaller slices") from None
                self._fall_back_to_cpu("out of memory")
                chunk = chunk.cpu()
                continue
            position += len(hu)
        return np.concatenate(results)

    # -------------------------------------------------------------------------------------------- Grad-CAM

    def gradcam(self, source_hu: np.ndarray, candidate_hu: np.ndarray, th_fail: float = 0.5,
                cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, dict]:
        """Per-slice Grad-CAM maps (float32, 0..1) of the discriminator's "non-standard" decision about
        ``candidate`` given ``source``, and the HU window its hot spots span (as in dynamic selection)."""
        import torch

        from .gradcam import gradcam_nonstandard
        from .models import pad_to_multiple
        from .window import to_unit

        if self.model.discriminator is None:
            raise RadiomicGANError(f"method '{self.model.method}' has no discriminator: no Grad-CAM")
        lo, hi = self.model.hu_range
        cams = np.empty(source_hu.shape, dtype=np.float32)
        probability = []
        batch = max(1, min(self.batch, 8))
        for start in range(0, len(source_hu), batch):
            if cancel is not None and cancel():
                raise Cancelled("harmonization cancelled; nothing written")
            s = torch.from_numpy(to_unit(np.clip(source_hu[start : start + batch], lo, hi), (lo, hi)).astype(np.float32))[:, None]
            c = torch.from_numpy(to_unit(np.clip(candidate_hu[start : start + batch], lo, hi), (lo, hi)).astype(np.float32))[:, None]
            (s, (h, w)), (c, _) = (pad_to_multiple(t.to(self.device), 8, minimum=32) for t in (s, c))
            cam = gradcam_nonstandard(self.model.discriminator, s, c)
            cams[start : start + batch] = cam[:, 0, :h, :w].float().cpu().numpy()
            with torch.inference_mode():
                probability.append(torch.sigmoid(self.model.discriminator(s, c)).float().mean(dim=(1, 2, 3)).cpu().numpy())
        window, details = select_window(list(cams), list(candidate_hu), th_fail, (lo, hi))
        summary = {
            "hot_spot_window_hu": list(window) if window else None,
            "hot_values": details["hot_values"],
            "hot_fraction": float((cams > th_fail).mean()),
            "standard_probability": float(np.mean(np.concatenate(probability))),
            "th_fail": th_fail,
        }
        return cams, summary


def harmonize_hu(model: LoadedModel, hu: np.ndarray, spacing_xy=(1.0, 1.0), device: str = "cpu", batch: int | None = None) -> np.ndarray:
    """HU slices (or one slice) -> harmonized HU with a loaded model, in full precision (validation, scripts)."""
    return Harmonizer(model, device=device, batch=batch, precision="fp32").harmonize(hu, spacing_xy)


# ------------------------------------------------------------------------------------------------ volumes


def check_kernel(volume: CTVolume, model: LoadedModel) -> str | None:
    """A warning text when the scan's kernel tag is not the model's source kernel (never an error: tags vary)."""
    source = model.card.get("source_kernel", "")
    expected = preset_for_tag(source) or None
    found = preset_for_tag(volume.meta.kernel)
    if not volume.meta.kernel:
        return f"{volume.source}: no ConvolutionKernel tag; the model converts {source} images"
    if expected is not None and found != expected:
        return f"{volume.source}: kernel '{volume.meta.kernel}' differs from the model's source kernel '{source}'; results may not be valid"
    return None


def harmonize_volume(
    volume: CTVolume,
    model: Harmonizer | LoadedModel | str | os.PathLike,
    *,
    device: str = "auto",
    batch: int | None = None,
    gradcam: bool = False,
    th_fail: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> HarmonizeResult:
    """A volume in, its harmonized copy out (same geometry; the input is not changed)."""
    harmonizer = model if isinstance(model, Harmonizer) else Harmonizer(model, device=device, batch=batch)
    if gradcam and harmonizer.model.discriminator is None:  # refuse before the work, not after the whole volume
        raise RadiomicGANError(f"method '{harmonizer.model.method}' has no discriminator: no Grad-CAM; harmonize without it")
    warning = check_kernel(volume, harmonizer.model)
    if warning:
        warnings.warn(warning)
    started = time.perf_counter()
    hu = harmonizer.harmonize(volume.hu, volume.spacing[:2], progress=progress, cancel=cancel)
    card = harmonizer.model.card
    target = card.get("target_kernel", "standard")
    result = HarmonizeResult(
        volume=volume.with_hu(hu, series_description=f"{volume.meta.series_description or 'CT'} harmonized to {target}"[:64]),
        device=harmonizer.device, batch=harmonizer.batch,
    )
    if gradcam:
        result.cam_input, input_summary = harmonizer.gradcam(volume.hu, volume.hu, th_fail, cancel)
        result.cam_output, output_summary = harmonizer.gradcam(volume.hu, hu, th_fail, cancel)
        result.windows = {"method": card["method"], "source_kernel": card.get("source_kernel"), "target_kernel": target,
                          "input": input_summary, "harmonized": output_summary}
    result.seconds = time.perf_counter() - started
    result.notes = list(harmonizer.notes) + ([warning] if warning else [])
    return result


def derivation_text(volume: CTVolume, card: dict) -> str:
    from . import __version__

    return (f"RadiomicGAN {__version__}: {card['method']} model harmonized kernel {volume.meta.kernel or card.get('source_kernel')} "
            f"to {card.get('target_kernel')} over {card.get('hu_range')} HU")


def cam_paths(cam_output: Path) -> tuple[Path, Path, Path]:
    """(harmonized CAM volume, input CAM volume, windows JSON) for a --gradcam path."""
    suffix = image_suffix(cam_output)
    if not suffix:
        raise CTInputError(f"{cam_output}: Grad-CAM maps are written as .nrrd, .nii, .nii.gz or .mha")
    stem = cam_output.name[: -len(suffix)]
    return cam_output, cam_output.with_name(f"{stem}_input{suffix}"), cam_output.with_name(f"{stem}_windows.json")


def harmonize_file(
    input_path: str | os.PathLike,
    model: Harmonizer | str | os.PathLike,
    output: str | os.PathLike,
    *,
    gradcam_output: str | os.PathLike | None = None,
    device: str = "auto",
    batch: int | None = None,
    series_uid: str | None = None,
    overwrite: bool = False,
    th_fail: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> HarmonizeResult:
    """Read, harmonize, write: HU as int16 with the input's geometry (a derived DICOM series for DICOM input)."""
    input_path, output = Path(input_path), Path(output)
    targets = [output] + (list(cam_paths(Path(gradcam_output))) if gradcam_output else [])
    check_output_path(output, [input_path])
    for target in targets[1:]:
        check_output_path(target, [input_path])
    if len(set(targets)) != len(targets):
        raise CTInputError("the output and the Grad-CAM output must be different paths")
    if not image_suffix(output) and not (input_path.is_dir() or not image_suffix(input_path)):
        raise CTInputError(f"{output}: give the output a suffix like the input's ({image_suffix(input_path)}); "
                           "a folder output is a DICOM series")
    for target in targets:
        if target.exists() and not overwrite and not (target.is_dir() and not any(target.iterdir())):
            raise CTInputError(f"{target}: already exists; refusing to overwrite")
    volume = read_volume(input_path, series_uid=series_uid)
    harmonizer = model if isinstance(model, Harmonizer) else Harmonizer(model, device=device, batch=batch)
    result = harmonize_volume(volume, harmonizer, gradcam=gradcam_output is not None, th_fail=th_fail,
                              progress=progress, cancel=cancel)
    staged: list[tuple[Path, Path]] = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            staged.append((_staging_name(target), target))
        write_volume(result.volume, staged[0][0], description=result.volume.meta.series_description,
                     derivation=derivation_text(volume, harmonizer.model.card))
        if gradcam_output is not None:
            write_map(result.cam_output, volume, staged[1][0], np.float32)
            write_map(result.cam_input, volume, staged[2][0], np.float32)
            windows = {**result.windows, "input_volume": str(input_path), "harmonized_volume": str(output),
                       "cam_harmonized": str(targets[1]), "cam_input": str(targets[2])}
            staged[3][0].write_text(json.dumps(windows, indent=2) + "\n")
        if cancel is not None and cancel():
            raise Cancelled("harmonization cancelled; nothing written")
        for tmp, target in staged:
            _replace(tmp, target)
    finally:
        for tmp, _ in staged:
            if tmp.is_dir():
                shutil.rmtree(tmp)
            elif tmp.exists():
                tmp.unlink()
    return result


def _staging_name(target: Path) -> Path:
    """A hidden sibling with the same format: same suffix for files, none for a DICOM folder."""
    suffix = image_suffix(target) or (target.suffix if target.suffix == ".json" else "")
    return target.with_name(f".{target.name}-partial-{uuid.uuid4().hex[:8]}{suffix}")


def _replace(tmp: Path, target: Path) -> None:
    if target.is_dir():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
