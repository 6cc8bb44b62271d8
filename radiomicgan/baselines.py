"""Closed-form baselines a physicist would try first, fitted on the same training pairs as the networks.

- ``filter``: the radial transfer function target/source, least squares per frequency ring over all training
  slices (a linear, shift-invariant kernel conversion);
- ``histmatch``: quantile mapping of the source kernel's HU distribution onto the target kernel's.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from .kernels import radial_frequency, transfer_sums

FILTER_RINGS = 96
HIST_QUANTILES = 1001
FILTER_PAD = 32  # pixels mirrored around a slice before the FFT (the kernel ratio's response is shorter)


def reflect_pad(stack: np.ndarray, width: int = FILTER_PAD) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Mirror ``width`` pixels around each slice (fewer on a small slice) so the FFT's wrap-around joins the
    image to its own mirror, not to the opposite border; the slices crop the result back."""
    pads = [min(width, n - 1) for n in stack.shape[-2:]]
    padded = np.pad(stack, [(0, 0)] * (stack.ndim - 2) + [(p, p) for p in pads], mode="reflect")
    crop = (Ellipsis, slice(pads[0], pads[0] + stack.shape[-2]), slice(pads[1], pads[1] + stack.shape[-1]))
    return padded, crop


class FilterHarmonizer:
    method = "filter"

    def __init__(self, frequencies: np.ndarray, ratio: np.ndarray):
        self.frequencies = np.asarray(frequencies, dtype=np.float64)
        self.ratio = np.asarray(ratio, dtype=np.float64)

    @classmethod
    def fit(cls, pairs, max_frequency: float) -> "FilterHarmonizer":
        """``pairs``: iterable of (source HU stack, target HU stack, in-plane spacing (x, y))."""
        edges = np.linspace(0.0, max_frequency, FILTER_RINGS + 1)
        cross = np.zeros(FILTER_RINGS)
        power = np.zeros(FILTER_RINGS)
        for source, target, spacing in pairs:
            c, p, _ = transfer_sums(source, target, spacing, edges)
            cross += c
            power += p
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(power > 0, cross / power, np.nan)
        known = np.isfinite(ratio)
        if not known.any():
            raise ValueError("no frequency content in the training pairs")
        f = 0.5 * (edges[:-1] + edges[1:])
        ratio = np.interp(f, f[known], ratio[known])  # rings beyond a pair's Nyquist take the nearest known value
        return cls(f, ratio)

    def harmonize(self, hu: np.ndarray, spacing_xy) -> np.ndarray:
        stack, crop = reflect_pad(np.asarray(hu, dtype=np.float32))
        f = radial_frequency(stack.shape[-2:], (spacing_xy[1], spacing_xy[0]))
        gain = np.interp(f, self.frequencies, self.ratio).astype(np.float32)
        out = scipy.fft.irfft2(scipy.fft.rfft2(stack, workers=-1) * gain, s=stack.shape[-2:], workers=-1)
        return out[crop].astype(np.float32)

    def state(self) -> dict:
        import torch

        return {"frequencies": torch.from_numpy(self.frequencies), "ratio": torch.from_numpy(self.ratio)}

    @classmethod
    def from_state(cls, state: dict) -> "FilterHarmonizer":
        return cls(state["frequencies"].numpy(), state["ratio"].numpy())


class HistMatchHarmonizer:
    method = "histmatch"

    def __init__(self, source_quantiles: np.ndarray, target_quantiles: np.ndarray):
        self.source_quantiles = np.asarray(source_quantiles, dtype=np.float64)
        self.target_quantiles = np.asarray(target_quantiles, dtype=np.float64)

    @classmethod
    def fit(cls, pairs) -> "HistMatchHarmonizer":
        sources, targets = [], []
        for source, target, _ in pairs:
            sources.append(np.asarray(source, dtype=np.float32).ravel())
            targets.append(np.asarray(target, dtype=np.float32).ravel())
        q = np.linspace(0.0, 1.0, HIST_QUANTILES)
        source_q = np.quantile(np.concatenate(sources), q)
        target_q = np.quantile(np.concatenate(targets), q)
        # ties (e.g. many voxels at the air floor) must map to one value: keep the first of each run
        source_q, first = np.unique(source_q, return_index=True)
        return cls(source_q, target_q[first])

    def harmonize(self, hu: np.ndarray, spacing_xy=None) -> np.ndarray:
        hu = np.asarray(hu, dtype=np.float64)
        out = np.interp(hu, self.source_quantiles, self.target_quantiles)
        below, above = hu < self.source_quantiles[0], hu > self.source_quantiles[-1]
        out[below] = hu[below] + (self.target_quantiles[0] - self.source_quantiles[0])
        out[above] = hu[above] + (self.target_quantiles[-1] - self.source_quantiles[-1])
        return out.astype(np.float32)

    def state(self) -> dict:
        import torch

        return {"source_quantiles": torch.from_numpy(self.source_quantiles), "target_quantiles": torch.from_numpy(self.target_quantiles)}

    @classmethod
    def from_state(cls, state: dict) -> "HistMatchHarmonizer":
        return cls(state["source_quantiles"].numpy(), state["target_quantiles"].numpy())
