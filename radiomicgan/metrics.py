"""Image similarity as the paper reports it: PSNR and SSIM on HU clipped to a stated range."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

# Clip range for image metrics: air floor to the 12-bit CT ceiling (data range 4095 HU).
METRIC_HU_RANGE = (-1024.0, 3071.0)


def _clipped(image: np.ndarray, hu_range) -> np.ndarray:
    return np.clip(np.asarray(image, dtype=np.float64), hu_range[0], hu_range[1])


def psnr(reference: np.ndarray, candidate: np.ndarray, hu_range=METRIC_HU_RANGE, mask: np.ndarray | None = None) -> float:
    """PSNR over the clipped range; with ``mask``, the mean squared error is taken inside it (e.g. the body)."""
    data_range = hu_range[1] - hu_range[0]
    ref, cand = _clipped(reference, hu_range), _clipped(candidate, hu_range)
    if mask is None:
        with np.errstate(divide="ignore"):  # identical images: infinite PSNR, no warning
            return float(peak_signal_noise_ratio(ref, cand, data_range=data_range))
    mse = float(np.mean((ref[mask] - cand[mask]) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def ssim(reference: np.ndarray, candidate: np.ndarray, hu_range=METRIC_HU_RANGE, mask: np.ndarray | None = None) -> float:
    """Mean SSIM over axial slices (2D, as the paper's slice-wise evaluation); with ``mask``, the mean of the
    SSIM map inside it."""
    ref, cand = _clipped(reference, hu_range), _clipped(candidate, hu_range)
    if ref.shape != cand.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {cand.shape}")
    if ref.ndim == 2:
        ref, cand = ref[None], cand[None]
        mask = None if mask is None else np.asarray(mask)[None]
    data_range = hu_range[1] - hu_range[0]
    if mask is None:
        return float(np.mean([structural_similarity(r, c, data_range=data_range) for r, c in zip(ref, cand)]))
    maps = np.stack([structural_similarity(r, c, data_range=data_range, full=True)[1] for r, c in zip(ref, cand)])
    return float(maps[mask].mean())
