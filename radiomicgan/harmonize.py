"""Harmonize whole CT volumes with a trained model, slice by slice in batches, and map where the result still
looks non-standard (Grad-CAM of the frozen discriminator) and the HU window those hot spots span.

On CUDA: bf16 autocast, channels_last, optional torch.compile (one fixed batch shape: a short last batch is
padded, so it never recompiles), pinned host memory with the next chunk's upload and the previous chunk's download
overlapping the current chunk's compute, no host synchronisation inside a chunk; window scaling and the carry-over
blend run on the device. Out of memory: the batch is halved and the batch retried, and at batch 1 the work moves
to the CPU, saying so. Every output is staged under a temporary name and renamed into place only when everything has
been computed and written: a cancelled or failed run leaves nothing.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .jobs import gradcam_paths
from .errors import CTInputError, RadiomicGANError
from .io import (
    check_own_dicom_folder,
    check_output_path,
    check_output_volume,
    check_writable,
    image_suffix,
    read_volume,
    write_map,
    write_volume,
    written_by_radiomicgan,
)
from .kernels import same_kernel
from .modelio import LoadedModel, ModelCard, load_model, resolve_device
from .staging import staged_many
from .volume import CTVolume

CHUNK_SLICES = 64  # slices staged per host-to-device copy
AIR_FLOOR_HU = -1024.0


def carry_over_and_clamp(source: np.ndarray, harmonized: np.ndarray, hu_range) -> np.ndarray:
    """Values outside the model's HU range (padding at -3024, metal) are carried over from the input unchanged,
    and nothing is written below the air floor where the input was at or above it (filter ringing)."""
    lo, hi = hu_range
    out = np.where((source < lo) | (source > hi), source, harmonized)
    return np.where(source >= AIR_FLOOR_HU, np.maximum(out, AIR_FLOOR_HU), out).astype(np.float32)


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
                 compile: bool | str = False, precision: str = "auto"):
        """``batch`` None: 16 slices on CUDA, 1 on the CPU (where batching does not pay, measured). ``compile``:
        True for torch.compile's default mode, or a mode name (e.g. "max-autotune", which tries kernels per layer
        for minutes on the first batch)."""
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
        self._fixed_batch = False
        if self.model.generator is not None:
            self._place(self.device)

    # -------------------------------------------------------------------------------------------- devices

    def _place(self, device: str) -> None:
        import torch

        self.device = device
        self.model.generator.to(device, memory_format=self.memory_format).eval()
        if self.model.discriminator is not None:
            self.model.discriminator.to(device).eval()
        if device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True  # slice shapes are fixed within a volume: pick the fastest kernels once
        compiled = self.compile and device.startswith("cuda")
        # dynamic=False: one graph per batch shape; _run_chunk pads a short last batch up to the batch
        mode = self.compile if isinstance(self.compile, str) and self.compile != "default" else None
        self._network = torch.compile(self.model.generator, dynamic=False, mode=mode) if compiled else self.model.generator
        self._fixed_batch = compiled

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
        hu = np.asarray(hu)
        if hu.dtype not in (np.float32, np.int16):  # int16 (as stored) travels as is: half the bytes to the device
            hu = hu.astype(np.float32)
        squeeze = hu.ndim == 2
        stack = hu[None] if squeeze else hu
        if stack.ndim != 3 or min(stack.shape) < 1:
            raise CTInputError(f"expected slices (N, rows, cols), got shape {hu.shape}")
        if self.model.baseline is not None:
            lo, hi = self.model.hu_range
            out = self.model.baseline.harmonize(np.clip(stack, lo, hi), spacing_xy)
            out = np.rint(carry_over_and_clamp(stack, out, (lo, hi))).astype(np.float32)
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
        """Yield (first slice, harmonized HU) per chunk. On CUDA the GPU never waits for the host: the current chunk's
        work is queued first, then the next chunk is pinned and uploaded on a copy stream, and the previous chunk's
        result, copied back into pinned memory behind the compute, is handed out."""
        import torch

        chunk_slices = max(CHUNK_SLICES, self.batch)  # a chunk never caps the batch (out-of-memory halving starts there)
        starts = list(range(0, len(stack), chunk_slices))
        copy_stream = torch.cuda.Stream() if self.device.startswith("cuda") else None
        pending = self._upload(stack, starts[0], chunk_slices, copy_stream)
        previous = None
        for index, start in enumerate(starts):
            if cancel is not None and cancel():
                raise Cancelled("harmonization cancelled; nothing written")
            chunk, _host, event = pending
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
                chunk.record_stream(torch.cuda.current_stream())  # allocated on the copy stream, used here
            result = self._run_chunk(chunk, cancel)  # queued, not waited for
            if index + 1 < len(starts):
                stream = copy_stream if self.device.startswith("cuda") else None  # None after a CPU fallback
                pending = self._upload(stack, starts[index + 1], chunk_slices, stream)
            if result.is_cuda:
                host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
                host.copy_(result, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                current = (start, host, done)
            else:
                current = (start, result, None)
            if previous is not None:
                yield self._finish(previous)
            previous = current
        yield self._finish(previous)

    @staticmethod
    def _finish(item) -> tuple[int, np.ndarray]:
        start, host, done = item
        if done is not None:
            done.synchronize()
        return start, host.numpy()

    def _upload(self, stack, start, chunk_slices, stream):
        """(tensor on the device, its pinned host copy or None, copy-done event or None) for one chunk."""
        import torch

        host = torch.from_numpy(np.ascontiguousarray(stack[start : start + chunk_slices]))
        if stream is None:
            return host, None, None
        host = host.pin_memory()
        with torch.cuda.stream(stream):
            device_tensor = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return device_tensor, host, event

    def _forward(self, hu):
        """Window scaling, the network and the carry-over blend for one batch of HU slices on the device."""
        import torch

        from .models import pad_to_multiple
        from .window import carry_weight, from_unit, to_unit

        window, scale = self._window_and_scale()
        n = len(hu)
        x = to_unit(hu.clamp(*window), scale)[:, None]
        divisor = self.model.generator.divisor  # and at least a 2x2 bottleneck on tiny slices
        x, (h, w) = pad_to_multiple(x, divisor, minimum=2 * divisor if divisor > 1 else 0)
        if self._fixed_batch and n < self.batch:  # the compiled graph has one batch shape: pad, never recompile
            x = torch.cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))])
        x = x.contiguous(memory_format=self.memory_format)
        with self._autocast():
            y = self._network(x)
        predicted = from_unit(y[:n, 0, :h, :w].float(), scale)
        weight = carry_weight(hu, window)
        blended = weight * predicted + (1.0 - weight) * hu
        # nothing below the air floor where the input was at or above it: the scanner's references stop there
        return torch.round(torch.where(hu >= AIR_FLOOR_HU, blended.clamp_min(AIR_FLOOR_HU), blended))

    def _window_and_scale(self):
        """(HU window the model harmonizes, HU range that maps to [-1, 1]), from the model's card."""
        return self.model.inference_window, self.model.scale_range

    def _run_chunk(self, chunk, cancel):
        """Harmonized HU of one chunk, as a tensor on the device that computed it, in batches that shrink on
        out-of-memory. Nothing here waits for the device."""
        import torch

        out = torch.empty(chunk.shape, dtype=torch.float32, device=chunk.device)
        position = 0
        while position < len(chunk):
            if cancel is not None and cancel():
                raise Cancelled("harmonization cancelled; nothing written")
            count = min(self.batch, len(chunk) - position)
            reason = None
            try:
                with torch.inference_mode():
                    hu = chunk[position : position + count].to(self.device, non_blocking=True).float()
                    out[position : position + count] = self._forward(hu)
            except torch.OutOfMemoryError:
                reason = "out of memory"  # handled below, once the failed batch's tensors are released
            except RuntimeError as exc:
                if not _too_large(exc):
                    raise
                reason = f"batch too large for one kernel ({str(exc).splitlines()[0][:80]})"
            if reason is None:
                position += count
                continue
            if self.batch > 1:
                self.batch = max(1, self.batch // 2)
                note = f"{reason}: batch halved to {self.batch}"
                warnings.warn(note)
                self.notes.append(note)
                if self.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            if self.device == "cpu":
                raise RadiomicGANError("out of memory on the CPU even at batch 1; free memory or use smaller slices") from None
            self._fall_back_to_cpu(reason)
            chunk, out = chunk.cpu(), out.cpu()
        return out

    # -------------------------------------------------------------------------------------------- Grad-CAM

    def gradcam(self, source_hu: np.ndarray, candidate_hu: np.ndarray, th_fail: float = 0.5,
                cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, dict]:
        """Per-slice Grad-CAM maps (float32, 0..1) of the discriminator's "non-standard" decision about
        ``candidate`` given ``source``, and the HU window its hot spots span (as in dynamic selection).

        Scaling, the maps, the standard probability and the hot-spot HU values are all computed on the device in
        batches; the maps come back through pinned memory without stopping the device, and only the set of hot HU
        values is merged on the host (sorting each slice's hot values on the host took longer than the maps)."""
        import torch

        from .gradcam import gradcam_nonstandard
        from .models import pad_to_multiple
        from .window import span_window, to_unit

        if self.model.discriminator is None:
            raise RadiomicGANError(f"method '{self.model.method}' has no discriminator: no Grad-CAM")
        (lo, hi), scale = self._window_and_scale()
        source_hu, candidate_hu = np.asarray(source_hu), np.asarray(candidate_hu)
        cuda = self.device.startswith("cuda")
        cams = torch.empty(candidate_hu.shape, dtype=torch.float32, pin_memory=cuda)
        probability = torch.zeros((), dtype=torch.float64, device=self.device)
        hot_count = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = torch.zeros(1 << 16, dtype=torch.bool, device=self.device)  # rounded HU values kept, offset by 32768
        batch = max(1, min(self.batch, 32))
        for start in range(0, len(source_hu), batch):
            if cancel is not None and cancel():
                raise Cancelled("harmonization cancelled; nothing written")
            s_hu, c_hu = (_to_device(a[start : start + batch], self.device).float() for a in (source_hu, candidate_hu))
            (s, (h, w)), (c, _) = (pad_to_multiple(to_unit(t.clamp(lo, hi), scale)[:, None], 8, minimum=32) for t in (s_hu, c_hu))
            cam, logits = gradcam_nonstandard(self.model.discriminator, s, c, return_logits=True)
            cam = cam[:, 0, :h, :w]
            cams[start : start + len(cam)].copy_(cam, non_blocking=True)
            probability += torch.sigmoid(logits.double()).mean(dim=(1, 2, 3)).sum()
            hot = cam > th_fail
            hot_count += hot.sum()
            seen |= _values_seen_twice(c_hu, hot)
        if cuda:
            torch.cuda.synchronize()
        cams = cams.numpy()
        merged = torch.nonzero(seen).flatten().cpu().numpy().astype(np.int64) - 32768
        window = span_window(merged, (lo, hi))
        summary = {
            "hot_spot_window_hu": list(window) if window else None,
            "hot_values": int(merged.size),
            "hot_fraction": float(hot_count.item()) / max(1, cams.size),
            "standard_probability": float(probability.item()) / max(1, len(cams)),
            "th_fail": th_fail,
        }
        return cams, summary


def _too_large(exc: RuntimeError) -> bool:
    """Errors that mean "this batch is too big" without being an out-of-memory error: kernels limited to 2^31
    elements, and cuDNN/cuBLAS failing to allocate their workspace."""
    text = str(exc)
    return any(s in text for s in ("INT_MAX", "2^31", "32-bit index", "canUse32BitIndexMath", "CUDNN_STATUS_ALLOC_FAILED",
                                   "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED"))


def _values_seen_twice(hu, hot):
    """Boolean table over rounded HU (offset by 32768) of the values that occur at least twice among one slice's
    hot pixels, for every slice of a batch, or-ed together: dynamic selection's noise rule (see
    ``window.select_window``), on the device."""
    import torch

    values = torch.round(hu).clamp(-32768, 32767).long() + 32768
    keys = (torch.arange(len(hu), device=hu.device).view(-1, 1, 1) << 16) + values
    # index_add_ over all pixels, adding 0 for the cold ones: no boolean indexing, so the host never waits here
    counts = torch.zeros(len(hu) << 16, dtype=torch.int32, device=hu.device)
    counts.index_add_(0, keys.flatten(), hot.flatten().to(torch.int32))
    return (counts.view(len(hu), 1 << 16) > 1).any(dim=0)


def _to_device(array: np.ndarray, device: str):
    """A host array on the device; on CUDA through pinned memory, so the host does not wait for queued work."""
    import torch

    host = torch.from_numpy(np.ascontiguousarray(array))
    if not device.startswith("cuda"):
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def harmonize_hu(model: LoadedModel, hu: np.ndarray, spacing_xy=(1.0, 1.0), device: str = "cpu", batch: int | None = None) -> np.ndarray:
    """HU slices (or one slice) -> harmonized HU with a loaded model, in full precision (validation, scripts)."""
    return Harmonizer(model, device=device, batch=batch, precision="fp32").harmonize(hu, spacing_xy)


# ------------------------------------------------------------------------------------------------ volumes


def check_kernel(volume: CTVolume, model: LoadedModel) -> str | None:
    """A warning text when the scan's kernel tag does not name the model's source kernel (never an error: tags
    vary). Compared by name, any vendor (FC51 = FC51, B30f = B30); Siemens tags near one preset count as one."""
    source = model.card.source_kernel
    if not volume.meta.kernel:
        return f"{volume.source}: no ConvolutionKernel tag; the model converts {source} images"
    if source and not same_kernel(volume.meta.kernel, source):
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
    target = card.target_kernel or "standard"
    result = HarmonizeResult(
        volume=volume.with_hu(hu, series_description=f"{volume.meta.series_description or 'CT'} harmonized to {target}"[:64]),
        device=harmonizer.device, batch=harmonizer.batch,
    )
    if gradcam:
        result.cam_input, input_summary = harmonizer.gradcam(volume.hu, volume.hu, th_fail, cancel)
        result.cam_output, output_summary = harmonizer.gradcam(volume.hu, hu, th_fail, cancel)
        result.windows = {"method": card.method, "source_kernel": card.source_kernel, "target_kernel": target,
                          "input": input_summary, "harmonized": output_summary}
    result.seconds = time.perf_counter() - started
    result.notes = list(harmonizer.notes) + ([warning] if warning else [])
    return result


def derivation_text(volume: CTVolume, card: ModelCard) -> str:
    from . import __version__

    return (f"RadiomicGAN {__version__}: {card.method} model harmonized kernel {volume.meta.kernel or card.source_kernel} "
            f"to {card.target_kernel} over {list(card.hu_range)} HU")


def cam_paths(cam_output: Path) -> tuple[Path, Path, Path]:
    """(harmonized CAM volume, input CAM volume, windows JSON) for a --gradcam path."""
    suffix = image_suffix(cam_output)
    if not suffix:
        raise CTInputError(f"{cam_output}: Grad-CAM maps are written as .nrrd, .nii, .nii.gz or .mha")
    return gradcam_paths(cam_output, suffix)


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
    for target in targets[:3]:  # format and path, before any work (the volume, the two Grad-CAM maps)
        check_output_volume(target)
    for target in targets[3:]:  # the windows JSON
        check_writable(target)
    for target in targets:
        if target.exists() and not overwrite and not (target.is_dir() and not any(target.iterdir())):
            raise CTInputError(f"{target}: already exists; refusing to overwrite")
        if target.is_dir() and overwrite:
            check_own_dicom_folder(target)
    volume = read_volume(input_path, series_uid=series_uid)
    harmonizer = model if isinstance(model, Harmonizer) else Harmonizer(model, device=device, batch=batch)
    result = harmonize_volume(volume, harmonizer, gradcam=gradcam_output is not None, th_fail=th_fail,
                              progress=progress, cancel=cancel)
    with staged_many(targets, owned=written_by_radiomicgan) as tmps:  # a DICOM folder: only one this tool wrote
        if not image_suffix(output):
            tmps[0].mkdir()  # a DICOM series: its staging is a folder from the start
        write_volume(result.volume, tmps[0], description=result.volume.meta.series_description,
                     derivation=derivation_text(volume, harmonizer.model.card))
        if gradcam_output is not None:
            write_map(result.cam_output, volume, tmps[1], np.float32)
            write_map(result.cam_input, volume, tmps[2], np.float32)
            windows = {**result.windows, "input_volume": str(input_path), "harmonized_volume": str(output),
                       "cam_harmonized": str(targets[1]), "cam_input": str(targets[2])}
            tmps[3].write_text(json.dumps(windows, indent=2) + "\n")
        if cancel is not None and cancel():
            raise Cancelled("harmonization cancelled; nothing written")
    return result


