"""A procedural 3D chest phantom: the ideal (noise-free, unblurred) anatomy the kernel simulator reconstructs.

Anatomy is laid out on a standard adult chest in millimetres (x to the patient's left, y posterior, z from the
lung apex down) and scaled to fill the field of view, so any grid size gives a whole chest while the pixel
spacing stays clinical (0.7 mm by default) and kernels act at realistic frequencies. Every random choice comes
from one seed: the same arguments give the same phantom.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Label values of the phantom's tissue map (useful as ROIs).
LABELS = {
    "air": 0, "soft_tissue": 1, "fat": 2, "lung": 3, "vessel": 4, "nodule": 5, "heart": 6, "bone": 7, "airway": 8, "table": 9,
}
STANDARD_FOV_MM = 360.0  # the standard chest fits this field of view
CHEST_LENGTH_MM = 300.0


@dataclass
class Phantom:
    hu: np.ndarray  # float32 (z, y, x), ideal anatomy
    labels: np.ndarray  # uint8 (z, y, x), values of LABELS
    spacing: tuple[float, float, float]  # (x, y, z) mm
    nodules: list[dict]  # centre (x, y, z) in voxel indices, radius mm, kind


def _texture(rng: np.random.Generator, shape, sigma_vox) -> np.ndarray:
    """Unit-variance correlated noise: parenchymal and trabecular texture."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox, mode="wrap")
    field /= max(float(field.std()), 1e-6)
    return field


def make_chest_phantom(
    size: int = 256, slices: int = 16, seed: int = 0, spacing: float = 0.7, slice_thickness: float = 1.0
) -> Phantom:
    if size < 16 or slices < 1:
        raise ValueError("phantom needs size >= 16 and slices >= 1")
    rng = np.random.default_rng(seed)
    scale = size * spacing / STANDARD_FOV_MM  # image mm per standard mm
    half = size / 2.0
    x = ((np.arange(size) + 0.5 - half) * spacing / scale).astype(np.float32)[None, None, :]
    y = ((np.arange(size) + 0.5 - half) * spacing / scale).astype(np.float32)[None, :, None]
    z_centre = 0.55 * CHEST_LENGTH_MM  # around the hilum and heart
    z = (z_centre + (np.arange(slices) + 0.5 - slices / 2.0) * slice_thickness / scale).astype(np.float32)[:, None, None]
    shape = (slices, size, size)
    vox_std = spacing / scale  # standard mm per voxel (in-plane)
    sigma = lambda mm: (max(mm * scale / slice_thickness, 0.3), max(mm * scale / spacing, 0.3), max(mm * scale / spacing, 0.3))  # noqa: E731

    fine = _texture(rng, shape, sigma(1.0))
    coarse = _texture(rng, shape, sigma(4.0))
    hu = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    def paint(mask, value, label):
        mask = np.broadcast_to(mask, shape)
        hu[mask] = value if np.isscalar(value) else value[mask]
        labels[mask] = LABELS[label]

    def ellipse(cx, cy, ax, ay):
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2

    # Patient table under the back, wider than the field of view and a little off-centre, as on real scans:
    # carbon-fibre shells around a foam core (HU read off the real chest slice). Its shells meet the air floor
    # and cross the image border at different heights left and right, where the image wraps for any FFT filter.
    below = y - (124.0 + 0.03 * x - 0.0002 * x**2)
    rows = np.nonzero((below >= 0.0).any(axis=(0, 2)))[0]
    if rows.size:  # worked out on the rows under the back only
        band = (slice(None), slice(rows[0], None), slice(None))
        b, foam = below[band], -928.0 + 8.0 * coarse[band]
        for mask, value in (((b >= 0.0) & (b < 2.5), 180.0), ((b >= 2.5) & (b < 30.0), foam),
                            ((b >= 30.0) & (b < 32.5), 220.0), ((np.abs(x) < 120.0) & (b >= 32.5), foam)):
            mask = np.broadcast_to(mask, foam.shape)
            hu[band][mask] = value if np.isscalar(value) else value[mask]
            labels[band][mask] = LABELS["table"]

    # Body: skin and subcutaneous fat, muscle wall, mediastinal soft tissue; slightly wider lower down.
    widen = 1.0 + 0.08 * np.clip((z - 100.0) / 200.0, 0, 1)
    body = ellipse(0.0, 5.0, 160.0 * widen, 112.0 * widen)
    paint(body < 1.0, -95.0 + 12.0 * coarse, "fat")
    paint(ellipse(0.0, 5.0, 160.0 * widen - 14.0, 112.0 * widen - 14.0) < 1.0, 45.0 + 8.0 * coarse, "soft_tissue")
    paint(ellipse(0.0, 5.0, 160.0 * widen - 26.0, 112.0 * widen - 26.0) < 1.0, 30.0 + 6.0 * coarse, "soft_tissue")

    # Lungs: apex at z~15 mm, widest mid-chest, cut by the diaphragm dome; denser posteriorly (gravity).
    taper = np.sqrt(np.clip((z - 15.0) / 110.0, 0, 1)).astype(np.float32)
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        cx, ax = side * 70.0, (50.0 if side > 0 else 56.0)
        r = ellipse(cx, 2.0, ax * taper + 1e-3, 80.0 * taper + 1e-3)
        dome = 285.0 - 45.0 * np.clip(1.0 - ((x - cx) / 60.0) ** 2 - (y / 80.0) ** 2, 0, 1)
        lungs |= (r < 1.0) & (z < dome)
    heart_r = ((x - 18.0) / 62.0) ** 2 + ((y + 22.0) / 50.0) ** 2 + ((z - 225.0) / 60.0) ** 2
    lungs &= heart_r >= 1.12  # heart and pericardial fat push the lungs aside
    parenchyma = -865.0 + 25.0 * fine + 10.0 * coarse + 45.0 * np.clip((y + 60.0) / 140.0, 0, 1)
    paint(lungs, parenchyma, "lung")

    # Heart with a rim of pericardial fat; great vessels (ascending and descending aorta, pulmonary trunk).
    paint((heart_r < 1.12) & (heart_r >= 1.0), -80.0 + 10.0 * coarse, "fat")
    paint(heart_r < 1.0, 40.0 + 5.0 * coarse, "heart")
    for cx, cy, radius, z0, z1 in ((8.0, -18.0, 15.0, 110.0, 190.0), (28.0, 48.0, 12.0, 105.0, 300.0), (22.0, -38.0, 13.0, 145.0, 178.0)):
        paint((ellipse(cx, cy, radius, radius) < 1.0) & (z >= z0) & (z <= z1), 45.0 + 4.0 * coarse, "heart")
    arch = _segment_distance(x, y, z, np.array([8.0, -18.0, 110.0]), np.array([28.0, 48.0, 105.0])) < 13.0
    paint(arch, 45.0 + 4.0 * coarse, "heart")

    # Trachea down to the carina, then the two main bronchi.
    trachea_wall = ellipse(0.0, -8.0, 11.0, 10.0) < 1.0
    trachea_lumen = ellipse(0.0, -8.0, 9.0, 8.0) < 1.0
    in_trachea = z < 160.0
    paint(trachea_wall & in_trachea, 50.0, "soft_tissue")
    paint(trachea_lumen & in_trachea, -1000.0, "airway")

    _paint_vessel_trees(rng, hu, labels, lungs, x, y, z, vox_std)
    _paint_spine_and_ribs(rng, hu, labels, x, y, z, widen, fine)
    nodules = _paint_nodules(rng, hu, labels, lungs, x, y, z, fine, scale, spacing, slice_thickness)
    return Phantom(hu=hu, labels=labels, spacing=(spacing, spacing, slice_thickness), nodules=nodules)


def _segment_distance(px, py, pz, a, b):
    ab = b - a
    t = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1] + (pz - a[2]) * ab[2]) / max(float(ab @ ab), 1e-6), 0, 1)
    return np.sqrt((px - a[0] - t * ab[0]) ** 2 + (py - a[1] - t * ab[1]) ** 2 + (pz - a[2] - t * ab[2]) ** 2)


def _paint_vessel_trees(rng, hu, labels, lungs, x, y, z, vox_std):
    """Pulmonary vessels: a random branching tree from each hilum, tapering, kept inside the lungs."""
    segments = []
    trunks = ((0.2, 0.1, -1.0), (1.0, 0.0, 0.1), (0.5, 0.4, 1.0), (0.4, -0.5, 0.6))  # upper, lateral, lower, anterior
    for side in (-1.0, 1.0):
        hilum = np.array([side * 42.0, 5.0, 170.0])
        stack = [(hilum, np.array([side * t[0], t[1], t[2]]), 6.0, 30.0, 0) for t in trunks]
        while stack:
            start, direction, radius, length, level = stack.pop()
            direction = direction / np.linalg.norm(direction)
            end = start + direction * length
            segments.append((start, end, radius))
            if level < 7:
                for _ in range(2):
                    turn = direction + rng.normal(0, 0.6, 3)
                    stack.append((end, turn, radius * 0.76, length * 0.8, level + 1))
    xs, ys, zs = x[0, 0], y[0, :, 0], z[:, 0, 0]
    for start, end, radius in segments:
        r = max(radius, 0.6 * vox_std)
        lo, hi = np.minimum(start, end) - r, np.maximum(start, end) + r
        ix = np.nonzero((xs >= lo[0]) & (xs <= hi[0]))[0]
        iy = np.nonzero((ys >= lo[1]) & (ys <= hi[1]))[0]
        iz = np.nonzero((zs >= lo[2]) & (zs <= hi[2]))[0]
        if not (ix.size and iy.size and iz.size):
            continue
        box = (slice(iz[0], iz[-1] + 1), slice(iy[0], iy[-1] + 1), slice(ix[0], ix[-1] + 1))
        d = _segment_distance(xs[box[2]][None, None, :], ys[box[1]][None, :, None], zs[box[0]][:, None, None], start, end)
        mask = (d < r) & lungs[box]
        hu[box][mask] = 40.0
        labels[box][mask] = 4


def _paint_spine_and_ribs(rng, hu, labels, x, y, z, widen, fine):
    """Vertebrae (cortical shell, trabecular core, discs), spinal canal, posterior elements, ribs and sternum."""
    full = lambda mask: np.broadcast_to(mask, hu.shape)  # noqa: E731
    disc = full(np.mod(z, 28.0) < 6.0)
    body_r = full((x / 18.0) ** 2 + ((y - 82.0) / 16.0) ** 2)
    cancellous = 230.0 + 60.0 * fine
    bone = body_r < 1.0
    hu[bone & ~disc] = cancellous[bone & ~disc]
    hu[bone & (body_r > 0.78) & ~disc] = 900.0
    hu[bone & disc] = 85.0
    labels[bone & ~disc] = 7
    labels[bone & disc] = 1
    posterior = ((np.abs(x) / 24.0) ** 2 + ((y - 112.0) / 12.0) ** 2 < 1.0) | ((np.abs(x) / 5.0) ** 2 + ((y - 128.0) / 14.0) ** 2 < 1.0)
    posterior = posterior & ~disc
    hu[posterior] = 650.0 + 80.0 * fine[posterior]
    labels[posterior] = 7
    canal = full((x / 8.0) ** 2 + ((y - 108.0) / 7.0) ** 2 < 1.0)
    hu[canal] = 15.0
    labels[canal] = 1

    # Ribs: oblique bands in the chest wall, absent next to the sternum (costal cartilage there). Worked out
    # on the wall voxels only: the rest of the volume cannot hold a rib.
    theta = full(np.arctan2(y - 5.0, x))
    radial = full(np.sqrt(((x / (160.0 * widen)) ** 2 + ((y - 5.0) / (112.0 * widen)) ** 2)))
    wall = np.nonzero(np.abs(radial - 0.83) < 0.035)
    theta_w, radial_w, z_w = theta[wall], radial[wall], np.broadcast_to(z, hu.shape)[wall]
    anterior = np.abs(theta_w + np.pi / 2) < 0.45
    rib_hu = np.full(z_w.shape, np.nan, dtype=np.float32)
    for z0 in np.arange(-20.0, 330.0, 27.0):
        zc = z0 + 22.0 * (1.0 + np.sin(theta_w))  # ribs run down toward the front
        rib = np.abs(z_w - zc) < 5.5
        cortex = rib & ((np.abs(radial_w - 0.83) > 0.02) | (np.abs(z_w - zc) > 4.0))
        rib_hu[rib] = 280.0 + 40.0 * fine[wall][rib]
        rib_hu[cortex] = 850.0
        rib_hu[rib & anterior] = 140.0
    is_rib = ~np.isnan(rib_hu)
    rib_index = tuple(axis[is_rib] for axis in wall)
    hu[rib_index] = rib_hu[is_rib]
    labels[rib_index] = 7
    sternum = full(((x / 16.0) ** 2 + ((y + 95.0) / 6.0) ** 2) < 1.0)
    hu[sternum] = 400.0
    labels[sternum] = 7


def _paint_nodules(rng, hu, labels, lungs, x, y, z, fine, scale, spacing, slice_thickness):
    """Solid, part-solid and ground-glass nodules with lobulated margins, centred on a lung voxel."""
    nodules = []
    lung_voxels = np.argwhere(lungs)
    if lung_voxels.size == 0:
        return nodules
    for _ in range(int(rng.integers(2, 5))):
        kz, ky, kx = lung_voxels[rng.integers(len(lung_voxels))]
        centre = np.array([x[0, 0, kx], y[0, ky, 0], z[kz, 0, 0]])
        radius = max(float(rng.uniform(3.0, 12.0)), 2.5 * spacing / scale)  # at least 2.5 pixels on small grids
        kind = str(rng.choice(["solid", "solid", "ground-glass", "part-solid"]))
        reach = 1.3 * radius  # lobulation stays within 18 %
        box = tuple(
            slice(int(np.searchsorted(axis, c - reach)), int(np.searchsorted(axis, c + reach)) + 1)
            for axis, c in ((z[:, 0, 0], centre[2]), (y[0, :, 0], centre[1]), (x[0, 0, :], centre[0]))
        )
        dx, dy, dz = x[:, :, box[2]] - centre[0], y[:, box[1], :] - centre[1], z[box[0]] - centre[2]
        dist = np.sqrt(dx**2 + dy**2 + dz**2)
        angle = np.arctan2(dy, dx)
        elevation = np.arctan2(dz, np.sqrt(dx**2 + dy**2) + 1e-6)
        phase = rng.uniform(0, 2 * np.pi, 2)
        margin = radius * (1.0 + 0.18 * np.sin(3 * angle + phase[0]) * np.cos(2 * elevation + phase[1]))
        inside = dist < margin
        base = {"solid": 35.0, "ground-glass": -560.0, "part-solid": -520.0}[kind]
        value = base + 15.0 * fine[box]
        if kind == "part-solid":
            value = np.where(dist < 0.45 * margin, 30.0 + 10.0 * fine[box], value)
        hu[box][inside] = value[inside]
        labels[box][inside] = 5
        nodules.append({
            "kind": kind,
            "radius_mm": radius * scale,
            "centre_index": [int(kx), int(ky), int(kz)],
        })
    return nodules
