"""Reconstruction-kernel simulator: the same anatomy as if reconstructed with another kernel.

A kernel is a radial transfer function T(f) of spatial frequency f (cycles/mm, in-plane) and a noise power
spectrum NPS(f) (HU^2 mm^2). Filtered back-projection filters signal and quantum noise with the same kernel,
and ramp-filters the noise, so the quantum noise of a kernel is ``noise * f * T(f)^2``, one realisation shared
by every kernel made from one scan. A real kernel pair is not that exact: above ~0.3 cycles/mm part of one
kernel is no linear function of the other (issue 9, measured on a real B30f/B50f slice), so each kernel adds an
independent part; noise also grows with depth in the body, and what the field of view cuts is shared unfiltered.

Presets were fitted on a real chest slice reconstructed with four Siemens kernels (``radiomicgan calibrate``
prints measured against preset, and the realism criterion: coherence per band, and the gain of the project's
fitted filter on simulated pairs against its gain on the real pair). Ratios of two kernels are what the slice
measures; the absolute scale rests on the B30 fit (about 50 % transfer at 0.35 cycles/mm).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.fft
from scipy import ndimage

from .errors import CTInputError

# Siemens scanners store nothing below -1024 HU; the simulator clips the same way so simulated and real
# images share their floor.
DEFAULT_HU_RANGE = (-1024.0, 3071.0)
# Noise grows with depth in the body (see depth_noise_amplitude); the body is what lies above this HU.
DEPTH_NOISE_GAIN = 0.17
BODY_THRESHOLD_HU = -500.0
BORDER_PAD_MM = 16.0  # beyond the reach of every kernel's point spread
AIR_NOISE = 0.65  # air beside the body, relative to noise at the skin (real slice: B50 std 25 HU vs 35 HU)


@dataclass(frozen=True)
class KernelPreset:
    """T(f) = (1 + c f^2) exp(-a f^2 - b f^4) [exp(-(f/cutoff)^8)]; noise = shared + independent, where the
    shared part, noise * f * T(f)^2, is the raw data's quantum noise through this kernel (the same realisation
    for every kernel of one scan) and the independent part, floor * (f / 0.5)^-floor_slope (HU^2 mm^2, taken
    at 0.2 cycles/mm below that), is what a real kernel pair measures as not a linear function of each other."""

    name: str
    description: str
    a: float
    b: float
    c: float
    noise: float = 5200.0
    cutoff: float = 0.0
    floor: float = 0.0
    floor_slope: float = 2.0

    def transfer(self, f: np.ndarray) -> np.ndarray:
        f2 = np.square(f)
        t = (1.0 + self.c * f2) * np.exp(-self.a * f2 - self.b * f2 * f2)
        if self.cutoff > 0:
            t = t * np.exp(-np.power(np.abs(f) / self.cutoff, 8))
        return t

    def shared_nps(self, f: np.ndarray, noise_scale: float = 1.0) -> np.ndarray:
        return noise_scale * self.noise * np.abs(f) * np.square(self.transfer(f))

    def independent_nps(self, f: np.ndarray, noise_scale: float = 1.0) -> np.ndarray:
        return noise_scale * self.floor * np.power(np.maximum(np.abs(f), INDEPENDENT_FLAT_BELOW) / 0.5, -self.floor_slope)

    def nps(self, f: np.ndarray, noise_scale: float = 1.0) -> np.ndarray:
        """The noise power a uniform region of one image measures."""
        return self.shared_nps(f, noise_scale) + self.independent_nps(f, noise_scale)

    def noise_std(self, spacing_mm: float, noise_scale: float = 1.0, size: int = 256) -> float:
        """Pixel noise standard deviation (HU) this kernel gives on a grid of the given spacing."""
        f = radial_frequency((size, size), (spacing_mm, spacing_mm), real=False)
        return float(math.sqrt(np.sum(self.nps(f, noise_scale)) / (size * size * spacing_mm * spacing_mm)))


INDEPENDENT_FLAT_BELOW = 0.2  # cycles/mm
# Fitted on the real four-kernel slice (0.693 mm). B30 (a, b), B50 (cutoff, floor) and the noise constant:
# least squares on the B30/B50 pair's tile coherence and amplitude per band, soft-tissue noise per band and the
# fitted filter's gain (simulated +6.6 dB vs real +5.7 dB). B10 and B70: `radiomicgan calibrate --fit` against
# that B30 (tapered ratios within 11 % where coherent). Independent floors of B10 and B70 are rough guesses
# from the B10/B30 and B50/B70 coherence.
PRESETS: dict[str, KernelPreset] = {
    p.name: p
    for p in (
        KernelPreset("B10", "very smooth (Siemens B10f-like)", a=15.417, b=0.0, c=6.798, floor=12.0, floor_slope=4.0),
        KernelPreset("B30", "smooth (Siemens B30f-like)", a=5.084, b=4.266, c=0.0),
        KernelPreset("B50", "sharp (Siemens B50f-like)", a=0.115, b=2.745, c=0.0, cutoff=0.755, floor=198.0),
        KernelPreset("B70", "very sharp (Siemens B70f-like)", a=0.0, b=5.098, c=4.541, floor=60.0),
    )
}
ALIASES = {"very-smooth": "B10", "smooth": "B30", "sharp": "B50", "very-sharp": "B70"}


def get_preset(name: str) -> KernelPreset:
    key = ALIASES.get(name.lower(), name.upper())
    if key not in PRESETS:
        choices = ", ".join([*PRESETS, *ALIASES])
        raise CTInputError(f"unknown kernel '{name}'; choose one of {choices}")
    return PRESETS[key]


# Siemens names its kernels with a capital, an optional small letter and two digits (B30f, Br40d, I70f\\3, Hr40f);
# the digits grow with sharpness, which is what the presets (fitted on Siemens B10f-B70f) are indexed by. Other
# vendors' numbers mean other things (Toshiba/Canon FC13 is a soft body kernel, FC51 a lung kernel; GE and Philips
# use words and letters), so only Siemens-style tags are matched to a preset.
SIEMENS_TAG = re.compile(r"^\s*([A-Z][a-z]?)(\d{2})(?!\d)")


def preset_for_tag(tag: str) -> KernelPreset | None:
    """The preset a Siemens-style ConvolutionKernel tag (e.g. 'B30f', 'Br40', 'I50f') is closest to, if any is
    close; None for other vendors' tags (FC51, STANDARD), whose numbers are no Siemens sharpness."""
    match = SIEMENS_TAG.match(tag or "")
    if not match:
        return None
    number = int(match.group(2))
    best = min(PRESETS.values(), key=lambda p: abs(int(p.name[1:]) - number))
    return best if abs(int(best.name[1:]) - number) <= 10 else None


def kernel_name(tag: str) -> str:
    """A kernel tag reduced to what names the kernel, for comparing tags: the first value of a multi-valued tag,
    upper case, without a Siemens suffix (B30f, B30s -> B30; Br40d -> BR40) or the simulator's '-sim'
    (B50-sim -> B50); other vendors' names as they are (FC51, STANDARD)."""
    first = str(tag or "").split("\\")[0].strip()
    first = re.sub(r"-sim$", "", first, flags=re.IGNORECASE)
    match = SIEMENS_TAG.match(first)
    if match:
        return (match.group(1) + match.group(2)).upper()
    return first.upper()


def same_kernel(a: str, b: str) -> bool:
    """Whether two kernel tags name the same kernel: equal names (FC51 = fc51, B30f = B30), or Siemens tags close
    to the same preset (B31f ~ B30). Tags from different vendors never match."""
    if not a or not b:
        return False
    if kernel_name(a) == kernel_name(b):
        return True
    pa, pb = preset_for_tag(a), preset_for_tag(b)
    return pa is not None and pa == pb


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
    depth_gain: float = DEPTH_NOISE_GAIN,
) -> list[np.ndarray]:
    """Reconstruct ideal (noise-free, unblurred) anatomy with each kernel: all share one quantum-noise
    realisation, each adds its own independent part, and noise grows with depth in the body.

    ``hu`` is (slices, rows, cols) or one 2D slice; kernels act in-plane, slice by slice, as in FBP. With
    ``hu_range`` the output is clipped to it and rounded to whole HU, as a scanner stores it.
    """
    filters = [(k.transfer, k.shared_nps, k.independent_nps) for k in kernels]
    return _filter_stack(hu, spacing_xy, filters, seed, noise_scale, hu_range, chunk, depth_gain)


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
    depth_gain: float = DEPTH_NOISE_GAIN,
) -> np.ndarray:
    """A real scan made with ``source`` as if reconstructed with ``target``.

    The scan's own noise is filtered by the kernel ratio like its anatomy; where the source kernel removed
    frequencies the target keeps (smooth to sharp), the ratio is regularised and the missing noise power
    is added, since image data cannot give back what the raw data had. The target's independent noise is
    always added: it is the part of a real kernel that no filter of another kernel predicts.
    """

    def ratio(f):
        ts = source.transfer(f)
        return target.transfer(f) * ts / (ts * ts + regularization**2)

    def extra_nps(f, scale):
        return np.maximum(target.shared_nps(f, scale) - np.square(ratio(f)) * source.nps(f, scale), 0.0)

    return _filter_stack(hu, spacing_xy, [(ratio, extra_nps, target.independent_nps)], seed, noise_scale, hu_range, chunk,
                         depth_gain)[0]


def depth_noise_amplitude(hu: np.ndarray, spacing_xy: tuple[float, float], gain: float = DEPTH_NOISE_GAIN) -> np.ndarray:
    """Relative noise amplitude per voxel of a (slices, rows, cols) stack: 1 + gain * depth / 100 mm inside the
    body (depth capped at 100 mm), AIR_NOISE in the air around it, scaled to an RMS of 1 over the body. Rays
    through the body's centre cross the most tissue, so FBP noise is highest there (measured on the real chest
    slice: 1.17x the noise near the skin) and lowest in the air beside it."""
    step = max(1, int(round(2.8 / min(spacing_xy))))  # a ~3 mm grid is fine for a map this smooth
    small = hu[:, ::step, ::step] > BODY_THRESHOLD_HU
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    body = ndimage.binary_fill_holes(small, structure=in_plane)
    padded = np.pad(body, ((0, 0), (1, 1), (1, 1)))  # the image border counts as outside
    depth = ndimage.distance_transform_edt(padded, sampling=(1e6, step * spacing_xy[1], step * spacing_xy[0]))[:, 1:-1, 1:-1]
    amp = np.where(body, 1.0 + gain * np.minimum(depth / 100.0, 1.0), AIR_NOISE if gain else 1.0)
    if body.any():
        amp /= math.sqrt(float(np.mean(np.square(amp[body]))))
    # back to full resolution: repeat, then a box filter of the step's width (a linear ramp between samples)
    full = np.repeat(np.repeat(amp.astype(np.float32), step, axis=1), step, axis=2)[:, : hu.shape[1], : hu.shape[2]]
    if step > 1:
        for axis in (1, 2):
            full = ndimage.uniform_filter1d(full, step, axis=axis, mode="nearest")
    return full


def _white_spectrum(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """The rfft2 of unit white noise of ``shape``, drawn in the frequency domain (saves a transform)."""
    half = (shape[0], shape[1], shape[2] // 2 + 1)
    draws = rng.standard_normal((*half, 2), dtype=np.float32)
    return draws.view(np.complex64)[..., 0] * np.float32(math.sqrt(shape[1] * shape[2] / 2.0))


def _filter_stack(hu, spacing_xy, filters, seed, noise_scale, hu_range, chunk, depth_gain=DEPTH_NOISE_GAIN):
    if not noise_scale >= 0:
        raise ValueError(f"noise_scale must be zero or more, got {noise_scale}")
    hu = np.asarray(hu, dtype=np.float32)
    squeeze = hu.ndim == 2
    stack = hu[None] if squeeze else hu
    if stack.ndim != 3:
        raise ValueError(f"expected a 2D slice or a 3D stack, got shape {hu.shape}")
    rows, cols = stack.shape[1:]
    sx, sy = float(spacing_xy[0]), float(spacing_xy[1])
    # Kernels act on the whole object, not on a periodic copy of the field of view: filter a padded copy
    # (edges continued) and crop, so what crosses the image border is cut the same way in every kernel.
    pad_y, pad_x = int(math.ceil(BORDER_PAD_MM / sy)), int(math.ceil(BORDER_PAD_MM / sx))
    shape_padded = (scipy.fft.next_fast_len(rows + 2 * pad_y, real=True), scipy.fft.next_fast_len(cols + 2 * pad_x, real=True))
    pads = ((0, 0), (pad_y, shape_padded[0] - rows - pad_y), (pad_x, shape_padded[1] - cols - pad_x))
    crop = (slice(None), slice(pad_y, pad_y + rows), slice(pad_x, pad_x + cols))
    f = radial_frequency(shape_padded, (sy, sx)).astype(np.float32)
    gains = [np.asarray(t(f), dtype=np.float32) for t, _, _ in filters]
    shared_amps = [np.sqrt(np.asarray(n(f, noise_scale), dtype=np.float32) / (sx * sy)) for _, n, _ in filters]
    own_amps = [np.sqrt(np.asarray(n(f, noise_scale), dtype=np.float32) / (sx * sy)) for _, _, n in filters]
    rng = np.random.default_rng(seed)
    outputs = [np.empty_like(stack) for _ in filters]
    for part in _chunks(stack.shape[0], chunk):
        spectrum = scipy.fft.rfft2(np.pad(stack[part], pads, mode="edge"), workers=-1)
        shape = (spectrum.shape[0], *shape_padded)
        shared = _white_spectrum(rng, shape) if noise_scale > 0 else None
        amplitude = depth_noise_amplitude(stack[part], (sx, sy), depth_gain) if noise_scale > 0 and depth_gain else None
        for out, gain, shared_amp, own_amp in zip(outputs, gains, shared_amps, own_amps):
            out[part] = scipy.fft.irfft2(spectrum * gain, s=shape_padded, workers=-1)[crop]
            if shared is None:
                continue
            noise = shared * shared_amp  # one quantum-noise realisation for every kernel
            if own_amp.any():
                noise += _white_spectrum(rng, shape) * own_amp
            noise = scipy.fft.irfft2(noise, s=shape_padded, workers=-1)[crop]
            if amplitude is not None:
                noise *= amplitude
            out[part] += noise
    if hu_range is not None:
        for out in outputs:
            np.clip(out, hu_range[0], hu_range[1], out=out)
            np.rint(out, out=out)  # scanners store whole HU (int16)
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
    source: np.ndarray, target: np.ndarray, spacing_xy: tuple[float, float], edges: np.ndarray, taper: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frequency ring: sum of Re(T S*), sum of |S|^2, sum of |T|^2 over the whole plane and all slices.
    Sums from several image pairs add up to the pooled least-squares transfer. ``taper`` (a Hann window)
    keeps what the image border cuts, identical in both kernels, out of the measurement."""
    source, target = _as_stack(source), _as_stack(target)
    if taper:
        window = np.outer(np.hanning(source.shape[1]), np.hanning(source.shape[2]))
        source = (source - source.mean(axis=(1, 2), keepdims=True)) * window
        target = (target - target.mean(axis=(1, 2), keepdims=True)) * window
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
    source: np.ndarray, target: np.ndarray, spacing_xy: tuple[float, float], edges: np.ndarray, taper: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares transfer ratio target/source per frequency ring, and the coherence that says how far to
    trust it (1 where target is a pure filtering of source). Returns (ring centres, ratio, coherence).
    Tapered by default: on the real chest slice the border cut alone lowers the B50/B30 coherence at
    0.7 cycles/mm from 0.91 to 0.59."""
    cross, power_s, power_t = transfer_sums(source, target, spacing_xy, edges, taper)
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
