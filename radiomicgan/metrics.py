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


def _outline_masks(hu2d: np.ndarray) -> dict[str, np.ndarray]:
    """Body (above -500 HU, holes filled, largest component) and lungs (below -500 HU inside the body, specks
    under 20 pixels dropped) of one slice, after a 2-pixel Gaussian so that noise and sharpness, which differ
    between kernels by design, do not count: the outlines a harmonizer must not move."""
    from scipy import ndimage

    above = ndimage.gaussian_filter(np.asarray(hu2d, dtype=np.float32), 2.0) > -500.0
    labels, count = ndimage.label(ndimage.binary_fill_holes(above))
    if count == 0:
        return {"body": np.zeros_like(above), "lung": np.zeros_like(above)}
    sizes = ndimage.sum(np.ones_like(above), labels, range(1, count + 1))
    body = labels == 1 + int(np.argmax(sizes))
    lung = ndimage.binary_opening(body & ~above)
    labels, count = ndimage.label(lung)
    if count:
        sizes = ndimage.sum(np.ones_like(lung), labels, range(1, count + 1))
        lung = np.isin(labels, 1 + np.flatnonzero(sizes >= 20))
    return {"body": body, "lung": lung}


def _outline_distance(a: np.ndarray, b: np.ndarray, percentile: float = 95.0) -> float:
    """Symmetric outline distance (pixels): the ``percentile`` of the distances from each outline pixel of one
    mask to the other's outline (95 %: a Hausdorff distance that one vessel crossing -500 HU does not set)."""
    from scipy import ndimage

    edge_a = a & ~ndimage.binary_erosion(a)
    edge_b = b & ~ndimage.binary_erosion(b)
    if not edge_a.any() and not edge_b.any():
        return 0.0
    if not edge_a.any() or not edge_b.any():
        return float("inf")
    to_b = ndimage.distance_transform_edt(~edge_b)
    to_a = ndimage.distance_transform_edt(~edge_a)
    return float(np.percentile(np.concatenate([to_b[edge_a], to_a[edge_b]]), percentile))


def anatomy_shift(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How far a harmonized image moved the anatomy of its input: the largest outline displacement (pixels) of
    the body and of the lungs over all slices. A kernel change moves no outline; a harmonizer that bulges an
    organ into the lung does."""
    ref, cand = np.asarray(reference), np.asarray(candidate)
    ref, cand = (ref[None], cand[None]) if ref.ndim == 2 else (ref, cand)
    worst = {"body_px": 0.0, "lung_px": 0.0}
    for r, c in zip(ref, cand):
        masks_r, masks_c = _outline_masks(r), _outline_masks(c)
        for name in ("body", "lung"):
            worst[f"{name}_px"] = max(worst[f"{name}_px"], _outline_distance(masks_r[name], masks_c[name]))
    return worst
