"""Image similarity as the paper reports it: PSNR and SSIM on HU clipped to a stated range."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

# Clip range for image metrics: air floor to the 12-bit CT ceiling (data range 4095 HU).
METRIC_HU_RANGE = (-1024.0, 3071.0)


def _clipped(image: np.ndarray, hu_range) -> np.ndarray:
    return np.clip(np.asarray(image, dtype=np.float64), hu_range[0], hu_range[1])


def psnr(reference: np.ndarray, candidate: np.ndarray, hu_range=METRIC_HU_RANGE) -> float:
    data_range = hu_range[1] - hu_range[0]
    return float(peak_signal_noise_ratio(_clipped(reference, hu_range), _clipped(candidate, hu_range), data_range=data_range))


def ssim(reference: np.ndarray, candidate: np.ndarray, hu_range=METRIC_HU_RANGE) -> float:
    """Mean SSIM over axial slices (2D, as the paper's slice-wise evaluation)."""
    ref, cand = _clipped(reference, hu_range), _clipped(candidate, hu_range)
    if ref.shape != cand.shape:
        raise ValueError(f"shapes differ: {ref.shape} vs {cand.shape}")
    if ref.ndim == 2:
        ref, cand = ref[None], cand[None]
    data_range = hu_range[1] - hu_range[0]
    return float(np.mean([structural_similarity(r, c, data_range=data_range) for r, c in zip(ref, cand)]))
