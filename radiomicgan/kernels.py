"""Reconstruction-kernel simulator: the same anatomy as if reconstructed with another kernel.

A kernel is a radial transfer function T(f) of spatial frequency f (cycles/mm, in-plane) and a noise power
spectrum NPS(f) (HU^2 mm^2). Filtered back-projection filters signal and quantum noise with the same kernel,
and ramp-filters the noise, so a preset's spectrum is ``NPS(f) = noise * f * T(f)^2``. Two kernels made from
one scan share one noise realisation, as reconstructing the same raw data twice does.

Presets were fitted on a real chest slice reconstructed with four Siemens kernels (``radiomicgan calibrate``
prints measured against preset): the ratio of two kernels' spectra is what the slice measures; the absolute
scale is anchored by one assumption, a smooth B30-like kernel with a Gaussian transfer of 50 % at 0.35 cycles/mm.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.fft

from .errors import CTInputError

# Siemens scanners store nothing below -1024 HU; the simulator clips the same way so simulated and real
# images share their floor.
DEFAULT_HU_RANGE = (-1024.0, 3071.0)


@dataclass(frozen=True)
class KernelPreset:
    """T(f) = (1 + c f^2) exp(-a f^2 - b f^4); NPS(f) = noise * f * T(f)^2 at the calibration dose."""

    name: str
    description: str
    a: float
    b: float
    c: float
    noise: float = 6100.0

    def transfer(self, f: np.ndarray) -> np.ndarray:
        f2 = np.square(f)
        return (1.0 + self.c * f2) * np.exp(-self.a * f2 - self.b * f2 * f2)

    def nps(self, f: np.ndarray, noise_scale: float = 1.0) -> np.ndarray:
        return noise_scale * self.noise * np.abs(f) * np.square(self.transfer(f))

    def noise_std(self, spacing_mm: float, noise_scale: float = 1.0, size: int = 256) -> float:
        """Pixel noise standard deviation (HU) this kernel gives on a grid of the given spacing."""
        f = radial_frequency((size, size), (spacing_mm, spacing_mm), real=False)
        return float(math.sqrt(np.sum(self.nps(f, noise_scale)) / (size * size * spacing_mm * spacing_mm)))


_B30_A = math.log(2.0) / 0.35**2
# Values printed by `radiomicgan calibrate --fit` on the real four-kernel slice (relative error of the
# ratios below 11 % where the kernels are coherent, noise power within 12 %).
PRESETS: dict[str, KernelPreset] = {
    p.name: p
    for p in (
        KernelPreset("B10", "very smooth (Siemens B10f-like)", a=9.495, b=0.0, c=0.0),
        KernelPreset("B30", "smooth (Siemens B30f-like)", a=_B30_A, b=0.0, c=0.0),
        KernelPreset("B50", "sharp (Siemens B50f-like)", a=0.115, b=2.745, c=0.0),
        KernelPreset("B70", "very sharp (Siemens B70f-like)", a=0.0, b=1.856, c=3.039),
    )
}
ALIASES = {"very-smooth": "B10", "smooth": "B30", "sharp": "B50", "very-sharp": "B70"}


def get_preset(name: str) -> KernelPreset:
    key = ALIASES.get(name.lower(), name.upper())
    if key not in PRESETS:
        choices = ", ".join([*PRESETS, *ALIASES])
        raise CTInputError(f"unknown kernel '{name}'; choose one of {choices}")
    return PRESETS[key]


def preset_for_tag(tag: str) -> KernelPreset | None:
    """The preset a DICOM ConvolutionKernel tag (e.g. 'B30f', 'Br40', 'I50f') is closest to, if any is close."""
    match = re.search(r"(\d{2})", tag or "")
    if not match:
        return None
    number = int(match.group(1))
    best = min(PRESETS.values(), key=lambda p: abs(int(p.name[1:]) - number))
    return best if abs(int(best.name[1:]) - number) <= 10 else None


def radial_frequency(shape: tuple[int, int], spacing_yx: tuple[float, float], real: bool = True) -> np.ndarray:
    """|f| in cycles/mm on the (r)fft2 grid of an image of ``shape`` (rows, cols) with pixel spacing (y, x)."""
    fy = np.fft.fftfreq(shape[0], spacing_yx[0])
    fx = np.fft.rfftfreq(shape[1], spacing_yx[1]) if real else np.fft.fftfreq(shape[1], spacing_yx[1])
    return np.hypot(fy[:, None], fx[None, :])


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def simulate_kernels(
    hu: np.ndarray,
    spacing_xy: tuple[float, float],
    kernels: Sequence[KernelPreset],
    *,
    seed: int = 0,
    noise_scale: float = 1.0,
    hu_range: tuple[float, float] | None = DEFAULT_HU_RANGE,
    chunk: int = 16,
) -> list[np.ndarray]:
    """Reconstruct ideal (noise-free, unblurred) anatomy with each kernel, all sharing one noise realisation.

    ``hu`` is (slices, rows, cols) or one 2D slice; kernels act in-plane, slice by slice, as in FBP.
    """
    return _filter_stack(hu, spacing_xy, [(k.transfer, k.nps) for k in kernels], seed, noise_scale, hu_range, chunk)


def rekernel(
    hu: np.ndarray,
    spacing_xy: tuple[float, float],
    source: KernelPreset,
    target: KernelPreset,
    *,
    seed: int = 0,
    noise_scale: float = 1.0,
    hu_range: tuple[float, float] | None = DEFAULT_HU_RANGE,
    regularization: float = 0.05,
    chunk: int = 16,
) -> np.ndarray:
    """A real scan made with ``source`` as if reconstructed with ``target``.

    The scan's own noise is filtered by the kernel ratio like its anatomy; where the source kernel removed
    frequencies the target keeps (smooth to sharp), the ratio is regularised and the missing noise power
    is added, since image data cannot give back what the raw data had.
    """

    def ratio(f):
        ts = source.transfer(f)
        return target.transfer(f) * ts / (ts * ts + regularization**2)

    def extra_nps(f, scale):
        return np.maximum(target.nps(f, scale) - np.square(ratio(f)) * source.nps(f, scale), 0.0)

    return _filter_stack(hu, spacing_xy, [(ratio, extra_nps)], seed, noise_scale, hu_range, chunk)[0]


def _filter_stack(hu, spacing_xy, filters, seed, noise_scale, hu_range, chunk):
    if not noise_scale >= 0:
        raise ValueError(f"noise_scale must be zero or more, got {noise_scale}")
    hu = np.asarray(hu, dtype=np.float32)
    squeeze = hu.ndim == 2
    stack = hu[None] if squeeze else hu
    if stack.ndim != 3:
        raise ValueError(f"expected a 2D slice or a 3D stack, got shape {hu.shape}")
    rows, cols = stack.shape[1:]
    sx, sy = float(spacing_xy[0]), float(spacing_xy[1])
    f = radial_frequency((rows, cols), (sy, sx)).astype(np.float32)
    gains = [np.asarray(t(f), dtype=np.float32) for t, _ in filters]
    noise_amps = [np.sqrt(np.asarray(n(f, noise_scale), dtype=np.float32) / (sx * sy)) for _, n in filters]
    rng = np.random.default_rng(seed)
    outputs = [np.empty_like(stack) for _ in filters]
    for part in _chunks(stack.shape[0], chunk):
        spectrum = scipy.fft.rfft2(stack[part], workers=-1)
        noise = rng.standard_normal(stack[part].shape, dtype=np.float32)  # one realisation for every kernel
        noise_spectrum = scipy.fft.rfft2(noise, workers=-1) if noise_scale > 0 else None
        for out, gain, amp in zip(outputs, gains, noise_amps):
            filtered = spectrum * gain
            if noise_spectrum is not None:
                filtered += noise_spectrum * amp
            out[part] = scipy.fft.irfft2(filtered, s=(rows, cols), workers=-1)
    if hu_range is not None:
        for out in outputs:
            np.clip(out, hu_range[0], hu_range[1], out=out)
    return [o[0] for o in outputs] if squeeze else outputs


# ------------------------------------------------------------------------------------------ measurement


def _as_stack(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    return image[None] if image.ndim == 2 else image


def ring_edges(spacing_mm: float, rings: int = 24) -> np.ndarray:
    """Frequency ring edges from 0 to the Nyquist frequency of the given pixel spacing."""
    return np.linspace(0.0, 0.5 / spacing_mm, rings + 1)


def _ring_sum(values: np.ndarray, index: np.ndarray, rings: int) -> np.ndarray:
    valid = (index >= 0) & (index < rings)
    return np.bincount(index[valid], values[valid], minlength=rings)[:rings]


def transfer_sums(
    source: np.ndarray, target: np.ndarray, spacing_xy: tuple[float, float], edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frequency ring: sum of Re(T S*), sum of |S|^2, sum of |T|^2 over the whole plane and all slices.
    Sums from several image pairs add up to the pooled least-squares transfer."""
    source, target = _as_stack(source), _as_stack(target)
    f = radial_frequency(source.shape[1:], (spacing_xy[1], spacing_xy[0]))
    index = np.broadcast_to(np.digitize(f, edges) - 1, source.shape[:1] + f.shape).ravel()
    rings = len(edges) - 1
    S = np.fft.rfft2(source)
    T = np.fft.rfft2(target)
    weight = np.ones(f.shape)
    weight[:, 1:] = 2.0  # rfft stores half the plane: count mirrored bins twice (except f_x = 0)
    if source.shape[2] % 2 == 0:
        weight[:, -1] = 1.0
    weight = np.broadcast_to(weight, S.shape).ravel()
    cross = _ring_sum(((T * np.conj(S)).real).ravel() * weight, index, rings)
    power_s = _ring_sum((np.abs(S) ** 2).ravel() * weight, index, rings)
    power_t = _ring_sum((np.abs(T) ** 2).ravel() * weight, index, rings)
    return cross, power_s, power_t


def measure_transfer(
    source: np.ndarray, target: np.ndarray, spacing_xy: tuple[float, float], edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares transfer ratio target/source per frequency ring, and the coherence that says how far to
    trust it (1 where target is a pure filtering of source). Returns (ring centres, ratio, coherence)."""
    cross, power_s, power_t = transfer_sums(source, target, spacing_xy, edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = cross / power_s
        coherence = cross / np.sqrt(power_s * power_t)
    return 0.5 * (edges[:-1] + edges[1:]), ratio, coherence


def find_uniform_patches(
    reference: np.ndarray, size: int = 32, hu_window: tuple[float, float] = (-150.0, 150.0), count: int = 12
) -> list[tuple[int, int]]:
    """Top-left corners of the most uniform soft-tissue patches of a 2D image: where noise can be measured."""
    candidates = []
    step = size // 2
    for y in range(0, reference.shape[0] - size + 1, step):
        for x in range(0, reference.shape[1] - size + 1, step):
            patch = reference[y : y + size, x : x + size]
            if hu_window[0] < patch.min() and patch.max() < hu_window[1] + 150 and patch.mean() < hu_window[1]:
                candidates.append((float(patch.std()), y, x))
    candidates.sort()
    return [(y, x) for _, y, x in candidates[:count]]


def measure_nps(
    image: np.ndarray, spacing_xy: tuple[float, float], corners: Sequence[tuple[int, int]], size: int, edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged noise power spectrum (HU^2 mm^2) over square patches, each detrended by a quadratic
    surface so slow anatomy does not count as noise. Returns (ring centres, NPS)."""
    if not corners:
        raise ValueError("no patches to measure noise in")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    design = np.stack([np.ones(size * size), yy.ravel(), xx.ravel(), (yy**2).ravel(), (xx**2).ravel(), (xx * yy).ravel()], 1)
    sx, sy = spacing_xy
    power = np.zeros((size, size))
    for y, x in corners:
        patch = np.asarray(image[y : y + size, x : x + size], dtype=np.float64).ravel()
        coef, *_ = np.linalg.lstsq(design, patch, rcond=None)
        residual = (patch - design @ coef).reshape(size, size)
        power += np.abs(np.fft.fft2(residual)) ** 2 * sx * sy / (size * size)
    power /= len(corners)
    f = radial_frequency((size, size), (sy, sx), real=False)
    index = (np.digitize(f, edges) - 1).ravel()
    rings = len(edges) - 1
    counts = _ring_sum(np.ones(index.size), index, rings)
    with np.errstate(invalid="ignore", divide="ignore"):
        nps = _ring_sum(power.ravel(), index, rings) / counts
    return 0.5 * (edges[:-1] + edges[1:]), nps
