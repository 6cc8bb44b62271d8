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


def calibrate(images: dict[str, np.ndarray], spacing_mm: float, rings: int = 36, patch: int = 32):
    """``images``: kernel name -> registered 2D slice (HU) of one scan, ordered smooth to sharp."""
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
    fig.savefig(path, dpi=110)
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
