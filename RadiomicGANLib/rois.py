"""ROIs drawn in Slicer (segmentation segments, markups ROI boxes, a label map) as masks on the reference
volume's voxel grid, and the label-map files the core's ``radiomicgan evaluate --labels GROUP=FILE`` reads.

Masks are (z, y, x) arrays like ``slicer.util.arrayFromVolume`` of the reference. Geometry is Slicer's own,
in world coordinates (parent transforms included, as the views show them): segments are exported by the
Segmentations logic into the reference geometry (it applies the segmentation's and the reference's transforms,
linear or not); a markups ROI box is tested at each voxel centre in the ROI's object coordinates (so rotated
boxes and oblique volumes are right); a label map on another grid is resampled onto the reference's
(nearest neighbour). Boxes and label maps refuse a non-linear transform (harden it first). No qt.
"""

from __future__ import annotations

from pathlib import Path

import logging

import numpy as np

from .mrml import _ijk_to_ras, ijk_to_world, volume_from_node

log = logging.getLogger(__name__)

SEGMENTS_GROUP, BOXES_GROUP, LABELS_GROUP = "segments", "boxes", "labels"


def segment_masks(segmentation_node, reference_node, segment_ids=None) -> dict[str, np.ndarray]:
    """{segment name: boolean mask on the reference grid} for the given segment IDs (default: all)."""
    import vtk
    from slicer import vtkSlicerSegmentationsModuleLogic
    from slicer.util import arrayFromVolume

    segmentation = segmentation_node.GetSegmentation()
    if segment_ids is None:
        segment_ids = [segmentation.GetNthSegmentID(k) for k in range(segmentation.GetNumberOfSegments())]
    scene = segmentation_node.GetScene()
    masks = {}
    for segment_id in segment_ids:
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            raise ValueError(f"{segmentation_node.GetName()}: no segment '{segment_id}'")
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        before = {scene.GetNthNode(k).GetID() for k in range(scene.GetNumberOfNodes())}
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("__radiomicgan_roi__"))
        try:
            if not vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_node):
                raise ValueError(f"segment '{segment.GetName()}' could not be exported on the grid of {reference_node.GetName()}")
            mask = arrayFromVolume(labelmap) > 0
        finally:  # the temporary label map and the display and colour nodes the export made for it
            added = [scene.GetNthNode(k) for k in range(scene.GetNumberOfNodes())]
            for node in [n for n in added if n.GetID() not in before]:
                scene.RemoveNode(node)
        masks[_unique(masks, segment.GetName())] = mask
    return masks


def voxel_centres_ras(reference_node, lo=(0, 0, 0), hi=None) -> np.ndarray:
    """World RAS positions of voxel centres with IJK index in [lo, hi) (i, j, k order), as a (z, y, x, 3) array."""
    dims = reference_node.GetImageData().GetDimensions()
    hi = dims if hi is None else hi
    k, j, i = np.meshgrid(*(np.arange(lo[a], hi[a]) for a in (2, 1, 0)), indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (ijk1 @ ijk_to_world(reference_node).T)[..., :3]


def _object_to_world(roi_node) -> np.ndarray:
    """The ROI box's object coordinates (centred, axes along the box) to world RAS, parent transforms included."""
    matrix = roi_node.GetObjectToWorldMatrix()
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def roi_box_mask(roi_node, reference_node) -> np.ndarray:
    """Boolean mask of the reference voxels whose centres lie inside a markups ROI box (closed box)."""
    dims = np.array(reference_node.GetImageData().GetDimensions())
    object_to_world = _object_to_world(roi_node)
    half = np.asarray(roi_node.GetSize(), float) / 2.0
    # the box's corners -> IJK bounds, so only voxels near the box are tested
    corners = np.array([[sx * half[0], sy * half[1], sz * half[2], 1.0] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    ras_to_ijk = np.linalg.inv(ijk_to_world(reference_node))
    ijk = (corners @ object_to_world.T) @ ras_to_ijk.T
    lo = np.clip(np.floor(ijk[:, :3].min(axis=0)).astype(int) - 1, 0, dims)
    hi = np.clip(np.ceil(ijk[:, :3].max(axis=0)).astype(int) + 2, 0, dims)
    mask = np.zeros(tuple(dims[::-1]), dtype=bool)
    if np.any(hi <= lo):
        return mask
    ras = voxel_centres_ras(reference_node, lo, hi)
    world_to_object = np.linalg.inv(object_to_world)
    local = ras @ world_to_object[:3, :3].T + world_to_object[:3, 3]
    tolerance = 1e-6 * max(1.0, float(np.max(half)))
    inside = np.all(np.abs(local) <= half + tolerance, axis=-1)
    mask[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = inside
    return mask


def roi_box_masks(roi_nodes, reference_node) -> dict[str, np.ndarray]:
    masks = {}
    for node in roi_nodes:
        masks[_unique(masks, node.GetName())] = roi_box_mask(node, reference_node)
    return masks


def labelmap_masks(label_node, reference_node, notes: list | None = None) -> dict[str, np.ndarray]:
    """{"label N": mask} for each non-zero value of a label map, on the reference's grid. A label map on another
    grid (or under another transform) is resampled onto it, nearest neighbour; that is said in a warning, logged
    and appended to ``notes``. ValueError when none of its labels lands on the reference."""
    values = np.rint(volume_from_node(label_node).hu).astype(np.int64)
    shape = tuple(reference_node.GetImageData().GetDimensions())[::-1]
    present = np.unique(values[values != 0])
    same_grid = (values.shape == shape and label_node.GetTransformNodeID() == reference_node.GetTransformNodeID()
                 and np.allclose(_ijk_to_ras(label_node), _ijk_to_ras(reference_node), atol=1e-4))  # any transform
    if not same_grid:
        label_to_world, reference_to_world = ijk_to_world(label_node), ijk_to_world(reference_node)
        same_grid = values.shape == shape and np.allclose(label_to_world, reference_to_world, atol=1e-4)
    if not same_grid:
        values = _resample_nearest(values, label_to_world, reference_to_world, shape)
        kept = np.unique(values[values != 0])
        if present.size and not kept.size:
            raise ValueError(f"label map {label_node.GetName()}: does not overlap the reference {reference_node.GetName()} "
                             "(check the label map and the volumes' transforms)")
        lost = sorted(set(present.tolist()) - set(kept.tolist()))
        message = (f"label map {label_node.GetName()}: on another grid than the reference {reference_node.GetName()}; "
                   "resampled onto it (nearest neighbour)"
                   + (f"; label(s) {', '.join(map(str, lost))} fall outside it and are left out" if lost else ""))
        log.warning(message)
        if notes is not None:
            notes.append(message)
    return {f"label {v}": values == v for v in np.unique(values[values != 0])}


def _resample_nearest(values: np.ndarray, label_to_world: np.ndarray, reference_to_world: np.ndarray,
                      shape: tuple) -> np.ndarray:
    """``values`` (z, y, x) on the label grid, resampled at the reference's voxel centres by SimpleITK's nearest
    neighbour (0 outside the label map). Both grids are kept as they are; their relation is an affine transform."""
    import SimpleITK as sitk

    label_grid = sitk.GetImageFromArray(values.astype(np.int32))  # index space: spacing 1, origin 0, identity
    reference_grid = sitk.Image([int(n) for n in shape[::-1]], sitk.sitkInt32)
    # a reference voxel index -> world -> the label map's voxel index (ITK's indices are i, j, k like IJK)
    reference_to_label = np.linalg.inv(label_to_world) @ reference_to_world
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(reference_to_label[:3, :3].ravel().tolist())
    transform.SetTranslation(reference_to_label[:3, 3].tolist())
    resampled = sitk.Resample(label_grid, reference_grid, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    return sitk.GetArrayFromImage(resampled).astype(np.int64)


def _unique(existing: dict, name: str) -> str:
    candidate, n = name, 2
    while candidate in existing:
        candidate, n = f"{name} ({n})", n + 1
    return candidate


def label_layers(masks: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[dict[int, str]]]:
    """Pack masks into as few label maps as possible without overlaps (a label map holds one label per voxel).

    Returns the label arrays (int16, values 1..n) and for each the {value: ROI name} it holds. Empty masks are
    dropped: an ROI outside the reference cannot be measured."""
    layers, names = [], []
    for name, mask in masks.items():
        if not mask.any():
            continue
        for layer, legend in zip(layers, names):
            if not layer[mask].any() and len(legend) < 32767:
                break
        else:
            layer, legend = np.zeros(mask.shape, np.int16), {}
            layers.append(layer)
            names.append(legend)
        value = len(legend) + 1
        layer[mask] = value
        legend[value] = name
    return layers, names


def write_roi_label_maps(groups: dict[str, dict[str, np.ndarray]], reference_node, folder) -> tuple[list[str], dict]:
    """Write each ROI group as label map file(s) on the reference grid; returns the ``--labels GROUP=FILE``
    arguments and {group: {file name: {label value: ROI name}}}."""
    from radiomicgan.io import write_volume

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    reference = volume_from_node(reference_node)
    args, legend = [], {}
    for group, masks in groups.items():
        layers, names = label_layers(masks)
        for k, (layer, layer_names) in enumerate(zip(layers, names)):
            path = folder / f"{_safe(group)}_{k}.nrrd"
            write_volume(reference.with_hu(layer.astype(np.float32), kernel=""), path, overwrite=True)
            args += ["--labels", f"{group}={path}"]
            legend.setdefault(group, {})[path.name] = layer_names
    return args, legend


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text) or "rois"
