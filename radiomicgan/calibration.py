"""Check (and refit) kernel presets against real images of one scan reconstructed with several kernels.

What one registered multi-kernel slice can tell: the transfer ratio between two kernels per frequency ring
(trusted where the coherence is high) and the noise power in uniform soft tissue at high frequency, where
anatomy no longer dominates. Both are printed next to what the presets predict.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from .errors import RadiomicGANError
from .kernels import PRESETS, KernelPreset, find_uniform_patches, measure_nps, measure_transfer, preset_for_tag, ring_edges

NOISE_BAND = (0.30, 0.60)  # cycles/mm: noise-dominated, below the Nyquist frequency of clinical pixels
TRUSTED_COHERENCE = 0.9
REPORT_FREQUENCIES = (0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70)


@dataclass
class PairCalibration:
    source: str
    target: str
    frequencies: np.ndarray
    measured: np.ndarray
    coherence: np.ndarray
    preset: np.ndarray | None

    @property
    def trusted(self) -> np.ndarray:
        """The band from zero frequency up to where coherence first drops: above it, clipping at the air
        floor and quantisation add content the kernels share without filtering it."""
        below = np.nonzero(~(self.coherence >= TRUSTED_COHERENCE))[0]
        end = below[0] if below.size else len(self.coherence)
        band = np.zeros(len(self.coherence), dtype=bool)
        band[:end] = True
        return band & (self.frequencies > 0.02)

    def worst_relative_error(self) -> float | None:
        if self.preset is None or not self.trusted.any():
            return None
        return float(np.max(np.abs(self.preset[self.trusted] / self.measured[self.trusted] - 1.0)))


@dataclass
class NoiseCalibration:
    kernel: str
    frequencies: np.ndarray
    measured: np.ndarray
    preset: np.ndarray | None

    def band_power(self, which: str) -> float | None:
        values = self.measured if which == "measured" else self.preset
        if values is None:
            return None
        band = (self.frequencies >= NOISE_BAND[0]) & (self.frequencies <= NOISE_BAND[1])
        return float(np.nanmean(values[band]))


def _preset(name: str) -> KernelPreset | None:
    return PRESETS.get(name.upper()) or preset_for_tag(name)


MIN_CALIBRATION_SIZE = 16  # the frequency rings need a few pixels each; the realism check's phantom needs 16


def check_calibration_size(images: dict[str, np.ndarray]) -> None:
    """Slices too small for the frequency rings (and the realism check's phantom) are named, not a traceback."""
    for name, image in images.items():
        if image.ndim != 2 or min(image.shape) < MIN_CALIBRATION_SIZE:
            raise RadiomicGANError(f"{name}: a slice of {'x'.join(map(str, image.shape))} pixels; calibrate needs at least "
                                   f"{MIN_CALIBRATION_SIZE}x{MIN_CALIBRATION_SIZE} (crop less)")


def calibrate(images: dict[str, np.ndarray], spacing_mm: float, rings: int = 36, patch: int = 32):
    """``images``: kernel name -> registered 2D slice (HU) of one scan, ordered smooth to sharp."""
    check_calibration_size(images)
    names = list(images)
    edges = ring_edges(spacing_mm, rings)
    pairs = []
    for a, b in itertools.combinations(names, 2):
        f, ratio, coherence = measure_transfer(images[a], images[b], (spacing_mm, spacing_mm), edges)
        pa, pb = _preset(a), _preset(b)
        predicted = pb.transfer(f) / pa.transfer(f) if pa and pb else None
        pairs.append(PairCalibration(a, b, f, ratio, coherence, predicted))
    corners = find_uniform_patches(images[names[0]], patch)
    noise_edges = ring_edges(spacing_mm, patch // 2)
    noises = []
    for name in names if corners else []:
        f, nps = measure_nps(images[name], (spacing_mm, spacing_mm), corners, patch, noise_edges)
        p = _preset(name)
        noises.append(NoiseCalibration(name, f, nps, p.nps(f) if p else None))
    return pairs, noises


def format_report(pairs: list[PairCalibration], noises: list[NoiseCalibration]) -> str:
    lines = ["Transfer ratio target/source per frequency (cycles/mm): measured | preset | coherence"]
    for pc in pairs:
        lines.append(f"  {pc.target}/{pc.source}")
        for fr in REPORT_FREQUENCIES:
            k = int(np.argmin(np.abs(pc.frequencies - fr)))
            if abs(pc.frequencies[k] - fr) > (pc.frequencies[1] - pc.frequencies[0]):
                continue
            preset = f"{pc.preset[k]:7.3f}" if pc.preset is not None else "      -"
            mark = "" if pc.trusted[k] else "  (low coherence)"
            lines.append(f"    f={pc.frequencies[k]:.3f}  {pc.measured[k]:7.3f} | {preset} | {pc.coherence[k]:.2f}{mark}")
        worst = pc.worst_relative_error()
        if worst is not None:
            lines.append(f"    worst preset error where coherence >= {TRUSTED_COHERENCE}: {100 * worst:.1f} %")
    if not noises:
        lines.append("Noise power: no uniform soft-tissue patch found in the smoothest image; not compared")
    else:
        lines.append(f"Noise power {NOISE_BAND[0]:.2f}-{NOISE_BAND[1]:.2f} cycles/mm in uniform soft tissue (HU^2 mm^2): measured | preset")
    for nc in noises:
        preset = nc.band_power("preset")
        lines.append(f"  {nc.kernel:>6}: {nc.band_power('measured'):9.1f} | " + (f"{preset:9.1f}" if preset is not None else "        -"))
    return "\n".join(lines)


def plot_calibration(pairs: list[PairCalibration], noises: list[NoiseCalibration], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for k, pc in enumerate(pairs):
        colour = f"C{k}"
        ax1.plot(pc.frequencies[pc.trusted], pc.measured[pc.trusted], "o", ms=3, color=colour, label=f"{pc.target}/{pc.source} measured")
        ax1.plot(pc.frequencies[~pc.trusted], pc.measured[~pc.trusted], "x", ms=3, color=colour, alpha=0.4)
        if pc.preset is not None:
            ax1.plot(pc.frequencies, pc.preset, "-", color=colour, lw=1)
    ax1.set_yscale("log")
    ax1.set_xlabel("spatial frequency (cycles/mm)")
    ax1.set_ylabel("transfer ratio")
    ax1.set_title("Kernel transfer ratios (dots measured, x low coherence, lines presets)")
    ax1.legend(fontsize=7)
    for k, nc in enumerate(noises):
        shown = nc.frequencies > 0.04  # the first ring is removed by detrending
        ax2.plot(nc.frequencies[shown], nc.measured[shown], "o", ms=3, color=f"C{k}", label=f"{nc.kernel} measured")
        if nc.preset is not None:
            ax2.plot(nc.frequencies[shown], nc.preset[shown], "-", color=f"C{k}", lw=1)
    ax2.axvspan(*NOISE_BAND, color="0.9", zorder=0)
    ax2.set_yscale("log")
    ax2.set_xlabel("spatial frequency (cycles/mm)")
    ax2.set_ylabel("NPS (HU$^2$ mm$^2$)")
    ax2.set_title("Noise power in uniform soft tissue (shaded: compared band)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    from .staging import staged

    try:
        with staged(path, what="calibration figure") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def fit_presets(pairs: list[PairCalibration], noises: list[NoiseCalibration], anchor: str = "B30") -> dict[str, dict]:
    """Refit each kernel's (a, b, c) from its trusted ratio to the anchor kernel, whose transfer is taken as
    the preset's; and one noise constant from the noise band of all kernels. Prints what to put in PRESETS."""
    base = PRESETS[anchor]
    fitted = {anchor: {"a": base.a, "b": base.b, "c": base.c}}
    for pc in pairs:
        if anchor not in (pc.source, pc.target):
            continue
        other = pc.target if pc.source == anchor else pc.source
        f = pc.frequencies[pc.trusted]
        ratio = pc.measured[pc.trusted] if pc.source == anchor else 1.0 / pc.measured[pc.trusted]
        absolute = ratio * base.transfer(f)

        def residual(p, f=f, absolute=absolute):  # relative error, as the report states it
            return np.log1p(p[2] * f**2) - p[0] * f**2 - p[1] * f**4 - np.log(np.maximum(absolute, 1e-6))

        result = least_squares(residual, x0=[base.a, 0.0, 0.0], bounds=([0, 0, 0], [100, 200, 500]))
        fitted[other] = dict(zip("abc", (float(v) for v in result.x)))
    constants = []
    for nc in noises:
        if nc.kernel not in fitted:
            continue
        p = KernelPreset(nc.kernel, "", **fitted[nc.kernel])
        band = (nc.frequencies >= NOISE_BAND[0]) & (nc.frequencies <= NOISE_BAND[1])
        constants.append(float(np.nanmedian(nc.measured[band] / (nc.frequencies[band] * p.transfer(nc.frequencies[band]) ** 2))))
    noise = float(np.median(constants)) if constants else math.nan
    for values in fitted.values():
        values["noise"] = noise
    return fitted


# ------------------------------------------------------------------------------------- realism criterion

# Bands of the brief's real-vs-simulated table (cycles/mm) and what "behaves like the real pair" allows.
REALISM_BANDS = ((0.20, 0.25), (0.35, 0.40), (0.50, 0.55), (0.60, 0.65), (0.65, 0.70), (0.70, 0.75))
GAIN_TOLERANCE_DB = 1.5
COHERENCE_TOLERANCE = 0.06  # absolute, per band
NOISE_TOLERANCE = 0.25  # relative, as the preset noise check
TILE = 64


def body_mask(image: np.ndarray) -> np.ndarray:
    """The largest connected region above -400 HU of a 2D slice, holes (lungs) filled."""
    from scipy import ndimage

    mask = ndimage.binary_fill_holes(image > -400)
    labels, count = ndimage.label(mask)
    if count > 1:
        mask = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return mask


def band_coherence(source: np.ndarray, target: np.ndarray, spacing_mm: float, bands=REALISM_BANDS, tile: int = TILE):
    """Magnitude-squared coherence and amplitude ratio sqrt(P_target / P_source) per band, pooled over
    Hann-windowed tiles lying wholly inside the body: what a filter could predict of target from source
    where the anatomy is. Returns (tiles, coherence, amplitude)."""
    source, target = _stack(source), _stack(target)
    window = np.outer(np.hanning(tile), np.hanning(tile))
    f = np.hypot(np.fft.fftfreq(tile, spacing_mm)[:, None], np.fft.fftfreq(tile, spacing_mm)[None, :])
    cross = np.zeros((tile, tile), complex)
    power_s, power_t = np.zeros((tile, tile)), np.zeros((tile, tile))
    count = 0
    for s_slice, t_slice in zip(source, target):
        body = body_mask(s_slice)
        for y in range(0, s_slice.shape[0] - tile + 1, tile // 2):
            for x in range(0, s_slice.shape[1] - tile + 1, tile // 2):
                if not body[y : y + tile, x : x + tile].all():
                    continue
                a, b = s_slice[y : y + tile, x : x + tile], t_slice[y : y + tile, x : x + tile]
                A, B = np.fft.fft2((a - a.mean()) * window), np.fft.fft2((b - b.mean()) * window)
                cross += B * np.conj(A)
                power_s += np.abs(A) ** 2
                power_t += np.abs(B) ** 2
                count += 1
    coherence, amplitude = [], []
    for lo, hi in bands:
        m = (f >= lo) & (f < hi)
        ps, pt = power_s[m].sum(), power_t[m].sum()
        coherence.append(abs(cross[m].sum()) ** 2 / (ps * pt) if ps > 0 and pt > 0 else np.nan)
        amplitude.append(np.sqrt(pt / ps) if ps > 0 else np.nan)
    return count, np.array(coherence), np.array(amplitude)


def _stack(image):
    image = np.asarray(image, dtype=np.float64)
    return image[None] if image.ndim == 2 else image


def filter_gain(fit_source, fit_target, test_source, test_target, spacing_mm: float) -> tuple[float, float]:
    """PSNR of the test source against its target as it is, and after the project's fitted radial filter
    (FilterHarmonizer, as `radiomicgan train --method filter` fits it) learnt on the fit pair."""
    from .baselines import FilterHarmonizer
    from .metrics import psnr

    model = FilterHarmonizer.fit([(_stack(fit_source), _stack(fit_target), (spacing_mm, spacing_mm))], 0.5 / spacing_mm)
    out = model.harmonize(_stack(test_source), (spacing_mm, spacing_mm))
    return psnr(_stack(test_target), _stack(test_source)), psnr(_stack(test_target), out)


def _band_noise(source: np.ndarray, images: list[np.ndarray], spacing_mm: float, patch: int = 32) -> list[float]:
    corners = find_uniform_patches(source, patch)
    if not corners:
        return [math.nan] * len(images)
    edges = ring_edges(spacing_mm, patch // 2)
    out = []
    for image in images:
        f, nps = measure_nps(image, (spacing_mm, spacing_mm), corners, patch, edges)
        band = (f >= NOISE_BAND[0]) & (f <= NOISE_BAND[1])
        out.append(float(np.nanmean(nps[band])))
    return out


@dataclass
class PairRealism:
    source: str
    target: str
    real_coherence: np.ndarray
    sim_coherence: np.ndarray
    real_amplitude: np.ndarray
    sim_amplitude: np.ndarray
    real_psnr: tuple[float, float]  # (input, filter): filter fitted and tested on the real pair
    sim_psnr: tuple[float, float]  # filter fitted on one simulated pair, tested on another
    real_noise: list[float]  # source, target noise power in the NOISE_BAND
    sim_noise: list[float]

    @property
    def real_gain(self) -> float:
        return self.real_psnr[1] - self.real_psnr[0]

    @property
    def sim_gain(self) -> float:
        return self.sim_psnr[1] - self.sim_psnr[0]

    @property
    def gain_ok(self) -> bool:
        return abs(self.sim_gain - self.real_gain) <= GAIN_TOLERANCE_DB

    @property
    def coherence_ok(self) -> bool:
        return bool(np.all(np.abs(self.sim_coherence - self.real_coherence) <= COHERENCE_TOLERANCE))

    @property
    def noise_ok(self) -> bool:
        return all(abs(s / r - 1.0) <= NOISE_TOLERANCE for s, r in zip(self.sim_noise, self.real_noise))

    @property
    def met(self) -> bool:
        return self.gain_ok and self.coherence_ok and self.noise_ok


def realism(real_source: np.ndarray, real_target: np.ndarray, spacing_mm: float, source: str, target: str,
            seed: int = 0, slices: int = 2) -> PairRealism:
    """Does the simulator's pair behave like this real pair? Two phantom pairs of the real slice's size and
    spacing: the filter is fitted on one and tested on the other (on the real pair it is fitted and tested on
    the same slice: 96 ring gains against 260,000 pixels overfit by little)."""
    from .simulate import phantom_pair

    size = int(max(real_source.shape))
    sims = []
    for k in range(2):
        s, t, _ = phantom_pair(size, slices, seed=seed + k, source_kernel=source, target_kernel=target, spacing=spacing_mm)
        sims.append((s.hu.astype(np.float64), t.hu.astype(np.float64)))
    (s1, t1), (s2, t2) = sims
    _, real_c, real_a = band_coherence(real_source, real_target, spacing_mm)
    _, sim_c, sim_a = band_coherence(s1, t1, spacing_mm)
    mid = s1.shape[0] // 2
    return PairRealism(
        source, target, real_c, sim_c, real_a, sim_a,
        filter_gain(real_source, real_target, real_source, real_target, spacing_mm),
        filter_gain(s1, t1, s2, t2, spacing_mm),
        _band_noise(real_source, [real_source, real_target], spacing_mm),
        _band_noise(s1[mid], [s1[mid], t1[mid]], spacing_mm),
    )


def format_realism(r: PairRealism) -> str:
    ok = lambda good: "ok" if good else "NOT MET"  # noqa: E731
    bands = " | ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in REALISM_BANDS)
    row = lambda values, fmt: " | ".join(fmt.format(v) for v in values)  # noqa: E731
    lines = [
        f"Realism of simulated {r.source} -> {r.target} pairs against the real pair (criterion of issue 9)",
        f"  band (cycles/mm)        {bands}",
        f"  coherence, real         {row(r.real_coherence, '{:9.3f}')}",
        f"  coherence, simulated    {row(r.sim_coherence, '{:9.3f}')}   [{ok(r.coherence_ok)}: within {COHERENCE_TOLERANCE}]",
        f"  amplitude {r.target}/{r.source}, real {row(r.real_amplitude, '{:9.2f}')}",
        f"  amplitude {r.target}/{r.source}, sim  {row(r.sim_amplitude, '{:9.2f}')}",
        f"  fitted filter, real pair: input {r.real_psnr[0]:.2f} dB -> {r.real_psnr[1]:.2f} dB ({r.real_gain:+.2f} dB)",
        f"  fitted filter, simulated: input {r.sim_psnr[0]:.2f} dB -> {r.sim_psnr[1]:.2f} dB ({r.sim_gain:+.2f} dB)"
        f"   [{ok(r.gain_ok)}: within {GAIN_TOLERANCE_DB} dB]",
        f"  noise {NOISE_BAND[0]:.2f}-{NOISE_BAND[1]:.2f} cycles/mm (HU^2 mm^2), real | simulated: "
        + ", ".join(f"{k} {a:.0f} | {b:.0f}" for k, a, b in zip((r.source, r.target), r.real_noise, r.sim_noise))
        + f"   [{ok(r.noise_ok)}: within {int(100 * NOISE_TOLERANCE)} %]",
        f"  criterion: {'met' if r.met else 'NOT MET'}",
    ]
    return "\n".join(lines)
