"""The Train module's Slicer-side layer against the real MRML classes (slicer-core): ROIs from segments and
markups ROI boxes as masks, comparison results as tables and a plot, the training log as plot series, and a
real training and a real comparison launched through the background process."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from helpers import ramp_volume

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is a test requirement")

from RadiomicGANLib.comparison import ComparisonRun, load_results  # noqa: E402
from RadiomicGANLib.mrml import add_volume_node, volume_from_node  # noqa: E402
from RadiomicGANLib.process import ExitCode  # noqa: E402
from RadiomicGANLib.plots import TRAINING_CHARTS, TrainingLogReader, TrainingPlots, column, load_cam_samples  # noqa: E402
from RadiomicGANLib.rois import label_layers, roi_box_mask, segment_masks  # noqa: E402
from RadiomicGANLib.training import TrainingRun, TrainingSettings, write_pairs_from_nodes  # noqa: E402

from radiomicgan.simulate import phantom_pair  # noqa: E402
from radiomicgan.volume import CTMetadata, CTVolume  # noqa: E402

FAST_PARAMS = "setting: {binWidth: 25, label: 1}\nimageType: {Original: {}}\nfeatureClass: {firstorder: }\n"


@pytest.fixture(scope="module", autouse=True)
def segmentation_converters():
    """What Slicer's Segmentations module registers at start-up (the application is not here)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def _oblique(shape=(4, 12, 10)) -> CTVolume:
    c, s = np.cos(0.5), np.sin(0.5)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return CTVolume(hu=ramp_volume(*shape), spacing=(0.7, 0.9, 2.0), origin=(-30.0, 12.0, 40.0),
                    direction=tuple(direction.ravel()), meta=CTMetadata(kernel="B50f"))


def _ijk_to_ras(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _segmentation_from(scene, reference, masks: dict):
    """A segmentation node whose segments are the given (z, y, x) masks on the reference grid, imported the way
    Slicer imports a label map."""
    import vtk

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    for name, mask in masks.items():
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
        matrix = vtk.vtkMatrix4x4()
        reference.GetIJKToRASMatrix(matrix)
        labelmap.SetIJKToRASMatrix(matrix)
        slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8))
        before = segmentation.GetSegmentation().GetNumberOfSegments()
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
        segmentation.GetSegmentation().GetNthSegment(before).SetName(name)
        scene.RemoveNode(labelmap)
    return segmentation


def test_segments_become_masks_on_an_oblique_reference(scene):
    reference = add_volume_node(scene, _oblique(), "ref")
    assert not np.allclose(_ijk_to_ras(reference)[:3, :3], np.diag(np.diag(_ijk_to_ras(reference)[:3, :3])))
    a = np.zeros((4, 12, 10), bool)
    a[1:3, 2:7, 3:8] = True
    b = np.zeros_like(a)
    b[0, 8:11, 1:4] = True
    b[3, 0, 0] = True
    segmentation = _segmentation_from(scene, reference, {"nodule": a, "vessel": b})
    nodes = scene.GetNumberOfNodes()
    masks = segment_masks(segmentation, reference)
    assert list(masks) == ["nodule", "vessel"]
    np.testing.assert_array_equal(masks["nodule"], a)
    np.testing.assert_array_equal(masks["vessel"], b)
    assert masks["nodule"].sum() == 2 * 5 * 5 and masks["vessel"].sum() == 10
    assert scene.GetNumberOfNodes() == nodes  # the temporary label map is gone


def test_segment_on_another_grid_lands_at_the_same_place(scene):
    """A segment made on a fine grid, exported on a coarser, shifted reference: same physical place."""
    fine = add_volume_node(scene, CTVolume(hu=np.zeros((6, 40, 40), np.float32), spacing=(0.5, 0.5, 1.0),
                                           origin=(0.0, 0.0, 0.0)), "fine")
    mask = np.zeros((6, 40, 40), bool)
    mask[:, 10:30, 16:24] = True  # x 8..12 mm, y 5..15 mm (LPS), all slices
    segmentation = _segmentation_from(scene, fine, {"box": mask})
    coarse = add_volume_node(scene, CTVolume(hu=np.zeros((3, 20, 20), np.float32), spacing=(1.0, 1.0, 2.0),
                                             origin=(0.25, 0.25, 0.5)), "coarse")
    got = segment_masks(segmentation, coarse)["box"]
    assert got.shape == (3, 20, 20)
    # coarse voxel centres x = 0.25 + i; inside 7.75 <= x < 11.75 -> i = 8..11; y the same way -> j = 5..14
    expected = np.zeros_like(got)
    expected[:, 5:15, 8:12] = True
    assert abs(int(got.sum()) - int(expected.sum())) <= 2 * 3 * 2  # at most a one-voxel rim differs
    assert (got & expected).sum() >= 0.9 * expected.sum()


def _roi(scene, centre_ras, size, rotation_deg: float = 0.0):
    import vtk

    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    roi.SetSize(*size)
    transform = vtk.vtkTransform()
    transform.Translate(*centre_ras)
    transform.RotateZ(rotation_deg)
    roi.SetAndObserveObjectToNodeMatrix(transform.GetMatrix())
    return roi


def test_markups_roi_box_counts_voxels_by_geometry(scene):
    reference = add_volume_node(scene, CTVolume(hu=np.zeros((5, 20, 30), np.float32), spacing=(1.0, 1.0, 2.0),
                                                origin=(0.0, 0.0, 0.0)), "ref")
    # RAS = (-x, -y, z) of LPS; box centre at LPS (10.2, 6.2, 4.0), 7.4 x 5.4 x 4.4 mm
    roi = _roi(scene, (-10.2, -6.2, 4.0), (7.4, 5.4, 4.4))
    mask = roi_box_mask(roi, reference)
    # x in [6.5, 13.9] -> 7..13 (7 voxels); y in [3.5, 8.9] -> 4..8 (5); z in [1.8, 6.2] -> slices 1..3 (3)
    expected = np.zeros_like(mask)
    expected[1:4, 4:9, 7:14] = True
    np.testing.assert_array_equal(mask, expected)


def test_rotated_markups_roi_on_an_oblique_volume_matches_slicers_own_test(scene):
    reference = add_volume_node(scene, _oblique((4, 16, 14)), "ref")
    centre = _ijk_to_ras(reference) @ np.array([7.0, 8.0, 1.5, 1.0])
    roi = _roi(scene, centre[:3], (6.0, 3.5, 3.0), rotation_deg=30.0)
    mask = roi_box_mask(roi, reference)
    ijk_to_ras = _ijk_to_ras(reference)
    expected = np.zeros_like(mask)
    for k, j, i in np.ndindex(mask.shape):
        expected[k, j, i] = roi.IsPointInROIWorld((ijk_to_ras @ np.array([i, j, k, 1.0]))[:3])
    assert expected.sum() > 10
    np.testing.assert_array_equal(mask, expected)


# ------------------------------------------------------------------------------------------ transforms, label maps


def _linear_transform(scene, rotation_deg=0.0, translation=(0.0, 0.0, 0.0), name="moved", about=(0.0, 0.0, 0.0)):
    """A linear transform node: rotation about the z axis through ``about`` (RAS), then a translation."""
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    transform = vtk.vtkTransform()
    transform.Translate(*translation)
    transform.Translate(*about)
    transform.RotateZ(rotation_deg)
    transform.Translate(*(-np.asarray(about, float)))
    node.SetMatrixTransformToParent(transform.GetMatrix())
    return node


def _displacement_transform(scene, displacement_ras, name="warp"):
    """A non-linear (grid) transform node whose displacement is the same everywhere, so its effect is known."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    grid = vtk.vtkImageData()
    grid.SetDimensions(12, 12, 12)
    grid.SetOrigin(-100.0, -100.0, -100.0)
    grid.SetSpacing(20.0, 20.0, 20.0)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    vtk_to_numpy(grid.GetPointData().GetScalars())[:] = displacement_ras  # parent -> node: p + d, node -> parent: p - d
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformFromParent(transform)
    assert not node.IsTransformToWorldLinear()
    return node


def _world_centres(node) -> np.ndarray:
    """World RAS of every voxel centre (z, y, x, 3), through the node's transform as Slicer applies it to points
    (vtkGeneralTransform), independently of the code under test."""
    import vtk

    ijk_to_ras = _ijk_to_ras(node)
    to_world = vtk.vtkGeneralTransform()
    if node.GetParentTransformNode() is not None:
        node.GetParentTransformNode().GetTransformToWorld(to_world)
    dims = node.GetImageData().GetDimensions()
    out = np.zeros((dims[2], dims[1], dims[0], 3))
    for k, j, i in np.ndindex(out.shape[:3]):
        out[k, j, i] = to_world.TransformPoint((ijk_to_ras @ np.array([i, j, k, 1.0]))[:3])
    return out


def test_markups_roi_box_on_a_transformed_reference_uses_its_world_position(scene):
    reference = add_volume_node(scene, _oblique((4, 16, 14)), "ref")
    centre = _ijk_to_ras(reference) @ np.array([7.0, 8.0, 1.5, 1.0])
    roi = _roi(scene, centre[:3], (6.0, 3.5, 3.0), rotation_deg=30.0)
    untransformed = roi_box_mask(roi, reference)
    reference.SetAndObserveTransformNodeID(_linear_transform(scene, 12.0, (2.3, -1.7, 0.4), about=centre[:3]).GetID())
    roi.SetAndObserveTransformNodeID(_linear_transform(scene, -5.0, (0.5, 0.8, 0.0), "roi moved", centre[:3]).GetID())
    mask = roi_box_mask(roi, reference)
    centres = _world_centres(reference)
    expected = np.zeros_like(mask)
    for k, j, i in np.ndindex(mask.shape):
        expected[k, j, i] = roi.IsPointInROIWorld(centres[k, j, i])  # Slicer's own test, in world coordinates
    assert expected.sum() > 10 and not np.array_equal(expected, untransformed)
    np.testing.assert_array_equal(mask, expected)


def test_markups_roi_box_refuses_a_non_linear_reference_transform(scene):
    reference = add_volume_node(scene, _oblique(), "ref")
    reference.SetAndObserveTransformNodeID(_displacement_transform(scene, (3.0, 0.0, 0.0)).GetID())
    roi = _roi(scene, (_ijk_to_ras(reference) @ np.array([5.0, 6.0, 1.0, 1.0]))[:3], (4.0, 4.0, 4.0))
    with pytest.raises(ValueError, match=r"^ref: under the non-linear transform 'warp'; harden the transform") as caught:
        roi_box_mask(roi, reference)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("moved", ["reference", "segmentation", "both", "reference, non-linear"])
def test_segments_follow_the_transforms_of_segmentation_and_reference(scene, moved):
    """Slicer's export places segments in world coordinates, linear or grid transforms, on either node: a move by
    whole voxels along the reference's first axis shifts the mask by as many voxels."""
    reference = add_volume_node(scene, _oblique((3, 12, 16)), "ref")
    mask = np.zeros((3, 12, 16), bool)
    mask[:, 3:8, 6:11] = True
    segmentation = _segmentation_from(scene, reference, {"nodule": mask})
    step = 3 * _ijk_to_ras(reference)[:3, 0]  # three voxels along i, in RAS
    if moved == "reference, non-linear":
        transform = _displacement_transform(scene, step)  # node -> world: p - step
    else:
        transform = _linear_transform(scene, translation=tuple(-step))
    for node in ([reference] if moved.startswith("reference") else [segmentation] if moved == "segmentation"
                 else [reference, segmentation]):
        node.SetAndObserveTransformNodeID(transform.GetID())
    got = segment_masks(segmentation, reference)["nodule"]
    expected = np.zeros_like(mask)
    if moved == "both":
        expected = mask
    elif moved == "segmentation":  # the segment moved by -3 voxels along i
        expected[:, 3:8, 3:8] = True
    else:  # the reference moved by -3 voxels: the segment sits 3 voxels further along its i
        expected[:, 3:8, 9:14] = True
    np.testing.assert_array_equal(got, expected)


def _label_volume(shape, spacing, origin, angle, seed=0) -> CTVolume:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.float32)
    labels[:, 2:9, 3:10] = 1
    labels[1:, 6:12, 8:15] = 2
    labels[rng.random(shape) < 0.05] = 3  # scattered single voxels: any misplaced voxel shows
    c, s = np.cos(angle), np.sin(angle)
    return CTVolume(hu=labels, spacing=spacing, origin=origin, direction=tuple(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).ravel()))


def _nearest_labels(label_node, reference_node) -> np.ndarray:
    """The label at each reference voxel centre by hand: world position -> label IJK -> nearest voxel, 0 outside."""
    values = slicer.util.arrayFromVolume(label_node)
    world_to_label = np.linalg.inv(_world_matrix(label_node))
    centres = _world_centres(reference_node)
    ijk = np.einsum("ab,zyxb->zyxa", world_to_label[:3, :3], centres) + world_to_label[:3, 3]
    fractional = np.abs(ijk - np.floor(ijk) - 0.5)
    assert fractional.min() > 1e-6  # no centre half-way between two label voxels: nearest is well defined
    index = np.floor(ijk + 0.5).astype(int)
    dims = np.array(values.shape[::-1])
    inside = np.all((index >= 0) & (index < dims), axis=-1)
    out = np.zeros(centres.shape[:3], np.int64)
    i, j, k = index[inside].T
    out[inside] = values[k, j, i]
    return out


def _world_matrix(node) -> np.ndarray:
    import vtk

    to_world = np.eye(4)
    if node.GetParentTransformNode() is not None:
        m = vtk.vtkMatrix4x4()
        node.GetParentTransformNode().GetMatrixTransformToWorld(m)
        to_world = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    return to_world @ _ijk_to_ras(node)


def _label_node(scene, volume, name="labels"):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    source = add_volume_node(scene, volume, "tmp")
    matrix = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(node, volume.hu.astype(np.int16))
    scene.RemoveNode(source)
    return node


def test_label_map_on_an_oblique_shifted_grid_is_resampled_nearest_neighbour(scene):
    from RadiomicGANLib.rois import labelmap_masks

    reference = add_volume_node(scene, _oblique((5, 14, 12)), "ref")
    labels = _label_node(scene, _label_volume((4, 16, 18), (0.55, 0.65, 2.6), (-33.13, 9.71, 39.37), 0.83))
    notes = []
    masks = labelmap_masks(labels, reference, notes=notes)
    expected = _nearest_labels(labels, reference)
    assert set(np.unique(expected)) == {0, 1, 2, 3} and masks.keys() == {"label 1", "label 2", "label 3"}
    for value in (1, 2, 3):
        np.testing.assert_array_equal(masks[f"label {value}"], expected == value)
    assert len(notes) == 1 and "resampled onto it (nearest neighbour)" in notes[0] and "ref" in notes[0]
    # the label map under a transform: resampled from where the views show it
    centre = _ijk_to_ras(reference) @ np.array([6.0, 7.0, 2.0, 1.0])
    labels.SetAndObserveTransformNodeID(_linear_transform(scene, 7.0, (1.37, -0.91, 0.23), about=centre[:3]).GetID())
    moved = labelmap_masks(labels, reference)
    expected_moved = _nearest_labels(labels, reference)
    assert not np.array_equal(expected_moved, expected)
    for value in (1, 2, 3):
        np.testing.assert_array_equal(moved.get(f"label {value}", np.zeros_like(expected_moved, bool)), expected_moved == value)


def test_label_map_on_the_reference_grid_is_taken_as_is_and_one_elsewhere_is_refused(scene, tmp_path):
    from RadiomicGANLib.rois import labelmap_masks

    volume = _oblique((4, 12, 10))
    reference = add_volume_node(scene, volume, "ref")
    hu = np.zeros(volume.shape, np.float32)
    hu[1:3, 2:5, 2:6] = 4
    same = _label_node(scene, volume.with_hu(hu, kernel=""), "same")
    notes = []
    masks = labelmap_masks(same, reference, notes=notes)
    assert notes == [] and list(masks) == ["label 4"]
    np.testing.assert_array_equal(masks["label 4"], hu == 4)
    far = _label_node(scene, CTVolume(hu=hu, spacing=volume.spacing, origin=(500.0, 500.0, 500.0)), "far")
    with pytest.raises(ValueError, match=r"^label map far: does not overlap the reference ref"):
        labelmap_masks(far, reference)
    warp = _displacement_transform(scene, (1.0, 0.0, 0.0))
    far.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(ValueError, match="^far: under the non-linear transform 'warp'; harden the transform"):
        labelmap_masks(far, reference)
    for node in (same, reference):  # both under the same warp: still the same grid, nothing to resample
        node.SetAndObserveTransformNodeID(warp.GetID())
    np.testing.assert_array_equal(labelmap_masks(same, reference, notes=notes)["label 4"], hu == 4)
    assert notes == []
    reference.SetAndObserveTransformNodeID(None)
    # the comparison passes the resampling note on to the panel
    coarse = _label_node(scene, _label_volume((3, 8, 8), (1.3, 1.1, 2.5), (-31.2, 10.3, 40.7), 0.1), "coarse")
    run = ComparisonRun(scene, reference, [add_volume_node(scene, volume, "candidate")], tmp_path / "report", label_node=coarse)
    groups = run.roi_groups()
    assert set(groups) == {"labels"} and groups["labels"] and any("resampled" in w for w in run.warnings)
    assert not any("transform" in w for w in run.warnings)
    # a candidate under another transform than the reference is compared on its grid, and the panel says so
    moved = add_volume_node(scene, volume, "moved")
    moved.SetAndObserveTransformNodeID(warp.GetID())
    run = ComparisonRun(scene, reference, [moved], tmp_path / "report2")
    assert run.warnings == ["moved: under another transform than the reference ref; compared voxel by voxel on the "
                            "volumes' own grids"]


def test_overlapping_rois_go_into_separate_label_maps():
    a = np.zeros((2, 6, 6), bool)
    a[:, :3] = True
    b = np.zeros_like(a)
    b[:, 2:5] = True  # overlaps a on row 2
    c = np.zeros_like(a)
    c[:, 5] = True
    layers, names = label_layers({"a": a, "b": b, "c": c, "empty": np.zeros_like(a)})
    assert len(layers) == 2 and names == [{1: "a", 2: "c"}, {1: "b"}]
    np.testing.assert_array_equal(layers[0] == 1, a)
    np.testing.assert_array_equal(layers[0] == 2, c)
    np.testing.assert_array_equal(layers[1] == 1, b)


def test_training_log_reader_takes_only_complete_lines(tmp_path):
    path = tmp_path / "train_log.jsonl"
    reader = TrainingLogReader(path)
    assert reader.read_new() == []
    first = json.dumps({"event": "epoch", "epoch": 0, "loss_g": 1.5})
    second = json.dumps({"event": "epoch", "epoch": 1, "loss_g": 1.25})
    path.write_text(first + "\n" + second[:12])  # the trainer is half-way through writing a line
    assert [r["epoch"] for r in reader.read_new()] == [0]
    assert reader.read_new() == []
    with open(path, "a") as fh:
        fh.write(second[12:] + "\n" + json.dumps({"event": "end", "status": "completed"}) + "\n")
    assert reader.read_new() == [json.loads(second), {"event": "end", "status": "completed"}]
    assert reader.read_new() == []


# ------------------------------------------------------------------------------------------ comparison


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """A real comparison through the background process: segments and ROI boxes as ROI groups."""
    root = tmp_path_factory.mktemp("compare")
    (root / "fast.yaml").write_text(FAST_PARAMS)
    scene = slicer.vtkMRMLScene()
    source, target, _ = phantom_pair(size=48, slices=3, seed=2)
    reference = add_volume_node(scene, target, "B50")
    b30 = add_volume_node(scene, source, "B30")
    copy = add_volume_node(scene, target, "copy")
    masks = {}
    spots = [(2 + 12 * (k // 4), 2 + 12 * (k % 4)) for k in range(12)]
    for k, (y, x) in enumerate(spots[:10]):  # a count needs at least 10 ROIs in a group
        m = np.zeros(target.shape, bool)
        m[:, y : y + 8, x : x + 8] = True
        masks[f"s{k}"] = m
    segmentation = _segmentation_from(scene, reference, masks)
    rois = []
    for k, (y, x) in enumerate(spots[2:12] + [(spots[2][0] + 3, spots[2][1] + 3)]):  # overlapping segments and each other
        centre = _ijk_to_ras(reference) @ np.array([x + 4.5, y + 4.5, 1.0, 1.0])
        rois.append(_roi(scene, centre[:3], (6.0, 6.0, 4.0)))
    before = slicer.util.arrayFromVolume(reference).copy()
    lines, seen = [], []  # seen: the job's (stage, progress) as each line arrived, as the panel's timer reads them
    run = ComparisonRun(scene, reference, [b30, copy], root / "report", segmentation_node=segmentation, roi_nodes=rois,
                        params=root / "fast.yaml", workers=1, bootstrap=10,
                        on_output=lambda line: (lines.append(line), seen.append((run.stage, run.progress, run.status_text()))))
    run.start()
    assert run.wait(timeout=600) == "completed", "\n".join(lines)
    run.seen = seen
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(reference), before)
    return scene, run, root


def test_comparison_runs_in_the_background_and_fills_tables(comparison):
    scene, run, root = comparison
    results = run.results
    assert run.work is None  # the temporary inputs are gone
    assert results.report.is_file() and results.report.parent == root / "report"
    summary = json.loads((root / "report" / "summary.json").read_text())
    assert set(summary["groups"]) == {"segments", "boxes"}
    assert summary["groups"]["segments"]["rois"] == 10 and summary["groups"]["boxes"]["rois"] == 11
    legend = json.loads((root / "report" / "roi_names.json").read_text())
    assert sorted(n for names in legend["segments"].values() for n in names.values()) == sorted(f"s{k}" for k in range(10))
    assert len(legend["boxes"]) == 2  # the two overlapping boxes cannot share one label map
    assert sorted(n for names in legend["boxes"].values() for n in names.values()) == sorted(
        ["roi"] + [f"roi ({k})" for k in range(2, 12)])
    # summary table: one row per candidate and group, the counts of summary.json
    table = results.summary_table
    assert table.GetNumberOfRows() == 4  # 2 candidates x 2 groups
    rows = list(zip(column(table, "candidate"), column(table, "ROI group"), column(table, "reproducible"), column(table, "ROIs")))
    for candidate, group, count, n in rows:
        assert count == summary["groups"][group][candidate]["reproducible"]
        assert n == summary["groups"][group]["rois"]
    assert column(table, "PSNR (dB)")[column(table, "candidate").index("copy")] == math.inf
    assert table.GetAttribute("RadiomicGAN.Report") == str(results.report)


def test_comparison_reports_the_evaluate_progress_lines(comparison):
    """evaluate --progress-json, run for real: ROI measurements counted from 0 to images x ROIs, never backwards,
    then the report stage; the job turns them into a monotonic 0..1 progress and status lines."""
    from RadiomicGANLib.process import parse_progress

    scene, run, root = comparison
    assert "--progress-json" in run.process.args
    records = [parse_progress(line) for line in run.process.lines if parse_progress(line)]
    features = [r for r in records if r["stage"] == "features"]
    assert all(r["task"] == "evaluate" for r in records)
    total = 3 * 21  # the reference and two candidates, 10 segments and 11 boxes
    assert features[0]["done"] == 0 and features[-1]["done"] == features[-1]["total"] == total
    assert all(r["total"] == total and r["images"] == 3 and r["rois"] == 21 for r in features)
    assert all(a["done"] <= b["done"] for a, b in zip(features, features[1:]))
    assert records[-1] == {"task": "evaluate", "stage": "report", "done": 0, "total": 1, "fraction": 0.0}
    assert records.index(features[-1]) == len(records) - 2
    progress = [p for _, p, _ in run.seen]
    assert all(a <= b for a, b in zip(progress, progress[1:])) and 0 < max(progress) < 1
    assert any(stage == "features" and f"{total} of {total} ROI measurements (3 volumes x 21 ROIs; 1 worker process: "
               "1 as asked (--workers))" in text for stage, _, text in run.seen)
    assert features[0]["workers"] == 1 and features[0]["workers_reason"] == "1 as asked (--workers)"
    assert run.progress == 1.0 and run.status_text() == "Comparison completed"


def test_ccc_table_per_candidate_matches_the_report(comparison):
    scene, run, root = comparison
    with open(root / "report" / "ccc.csv", newline="") as fh:
        expected = list(csv.DictReader(fh))
    threshold = run.results.summary["threshold"]
    for candidate, table in run.results.ccc_tables.items():
        assert table.GetNumberOfRows() == len(expected) == 2 * run.results.summary["features"]
        ccc, verdict = column(table, "CCC"), column(table, "reproducible")
        for k, row in enumerate(expected):
            assert column(table, "feature")[k] == row["feature"] and column(table, "ROI group")[k] == row["group"]
            if row[candidate] == "":
                assert math.isnan(ccc[k]) and verdict[k] == "undefined"
            else:
                assert ccc[k] == pytest.approx(float(row[candidate]))
                assert verdict[k] == ("yes" if float(row[candidate]) > threshold else "no")
    copy = run.results.ccc_tables["copy"]
    assert all(v in ("yes", "undefined") for v in column(copy, "reproducible"))  # the reference itself


def test_counts_plot_has_a_bar_series_per_candidate(comparison):
    scene, run, root = comparison
    chart, counts = run.results.counts_chart, run.results.counts_table
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    names = set()
    for k in range(2):
        series = chart.GetNthPlotSeriesNode(k)
        assert series.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeBar
        assert series.GetTableNodeID() == counts.GetID() and series.GetLabelColumnName() == "ROI group"
        names.add(series.GetYColumnName())
    assert names == {"B30", "copy"}
    groups = column(counts, "ROI group")
    for candidate in names:
        assert column(counts, candidate) == [run.results.summary["groups"][g][candidate]["reproducible"] for g in groups]
    again = load_results(scene, root / "report")  # the same folder loads the same numbers
    assert column(again.counts_table, "copy") == column(counts, "copy")


def test_cancelled_comparison_leaves_nothing(comparison, tmp_path):
    scene, run, root = comparison
    reference = scene.GetFirstNodeByName("B50")
    (tmp_path / "fast.yaml").write_text(FAST_PARAMS)
    cancelled = ComparisonRun(scene, reference, [scene.GetFirstNodeByName("B30")], tmp_path / "report",
                              hu_ranges=[(-100, 250)], per_range=3, params=tmp_path / "fast.yaml", workers=1).start()
    work = cancelled.work
    assert work.is_dir() and cancelled.running
    nodes = scene.GetNumberOfNodes()
    cancelled.cancel()  # asks, returns at once
    assert cancelled.wait(60) == "cancelled" and not cancelled.running and cancelled.process.returncode != 0
    assert not (tmp_path / "report").exists() and not work.exists()
    assert not list(tmp_path.glob(".report*partial*")) and cancelled.results is None
    assert scene.GetNumberOfNodes() == nodes


def test_comparison_refuses_a_used_report_folder(comparison, tmp_path):
    scene, run, root = comparison
    reference = scene.GetFirstNodeByName("B50")
    with pytest.raises(ValueError, match="not empty"):
        ComparisonRun(scene, reference, [scene.GetFirstNodeByName("B30")], root / "report")
    with pytest.raises(ValueError, match="candidate"):
        ComparisonRun(scene, reference, [reference], tmp_path / "r")


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def cancelled_training(tmp_path_factory):
    """A real training through the background process on a phantom pair made from two loaded volumes, cancelled
    (a stop request on its standard input) once its first epoch is plotted."""
    root = tmp_path_factory.mktemp("train")
    scene = slicer.vtkMRMLScene()
    source, target, _ = phantom_pair(size=32, slices=2, seed=3)
    manifest = write_pairs_from_nodes(add_volume_node(scene, source, "B30"), add_volume_node(scene, target, "B50"),
                                      root / "pairs", "B30", "B50")
    settings = TrainingSettings(schedule="none", epochs=4, steps_per_epoch=10, batch=1, crop=32, device="cpu",
                                vgg_weights="random", val_slices=1)
    epochs, lines = [], []
    run = TrainingRun(manifest, root / "model", settings, scene=scene, on_epoch=epochs.append, on_output=lines.append)
    run.start()
    import time

    deadline = time.monotonic() + 400
    while not epochs and run.poll() == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert epochs, "\n".join(lines)
    run.cancel()
    status = run.wait(timeout=400)
    return scene, run, root, status, lines


def test_pairs_from_loaded_volumes(cancelled_training):
    from radiomicgan.dataset import load_manifest

    scene, run, root, code, lines = cancelled_training
    manifest = load_manifest(root / "pairs")
    assert manifest.kernels == ("B30", "B50") and len(manifest.pairs) == 1
    from radiomicgan.io import read_volume

    written = read_volume(manifest.pairs[0].target)
    node = scene.GetFirstNodeByName("B50")
    np.testing.assert_array_equal(written.hu, slicer.util.arrayFromVolume(node).astype(np.float32))
    assert written.same_geometry(volume_from_node(node))


def test_cancel_keeps_the_last_complete_epoch(cancelled_training):
    import torch

    from radiomicgan.modelio import load_model

    scene, run, root, status, lines = cancelled_training
    assert status == "cancelled" and run.exit_code == ExitCode.CANCELLED and not run.killed, "\n".join(lines)
    assert run.result is run.plots
    card = json.loads((root / "model" / "model.json").read_text())
    assert card["training"]["status"] == "cancelled"
    assert 1 <= card["training"]["epochs_done"] < 4
    assert not run.cancel_flag.exists()
    assert run.progress["task"] == "train" and run.progress["stage"] == "epoch"  # the core's --progress-json lines
    assert run.progress["done"] == card["training"]["epochs_done"] and run.progress["total"] == 4
    model = load_model(root / "model")
    assert model.generator is not None
    torch.load(root / "model" / "checkpoint.pt", weights_only=True)


def test_training_log_becomes_plot_series(cancelled_training):
    scene, run, root, code, lines = cancelled_training
    plots = run.plots
    records = [json.loads(line) for line in (root / "model" / "train_log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    steps = [r for r in records if r["event"] == "step"]
    assert plots.status == "cancelled" and len(epochs) >= 1 and len(steps) >= 1
    assert column(plots.epochs, "epoch") == [r["epoch"] + 1 for r in epochs]
    for name in ("loss_g", "loss_d", "l1", "accuracy", "val_psnr_db", "val_input_psnr_db"):
        assert column(plots.epochs, name) == pytest.approx([r[name] for r in epochs])
    assert column(plots.epochs, "window_lo") == [r["window"][0] for r in epochs] == [-1024.0] * len(epochs)
    assert column(plots.epochs, "window_hi") == [r["window"][1] for r in epochs]
    assert column(plots.steps, "step") == [r["step"] for r in steps]
    assert column(plots.steps, "loss_g") == pytest.approx([r["loss_g"] for r in steps])
    for key, (title, _, table, x_column, series) in TRAINING_CHARTS.items():
        chart = plots.charts[key]
        assert chart.GetNumberOfPlotSeriesNodes() == len(series)
        for k, (_, y_column) in enumerate(series):
            node = chart.GetNthPlotSeriesNode(k)
            assert node.GetXColumnName() == x_column and node.GetYColumnName() == y_column
            assert node.GetTableNodeID() == (plots.epochs if table == "epochs" else plots.steps).GetID()
    # a second reader of the same folder (e.g. after reloading) gets the same table
    again = TrainingPlots(scene, root / "model", name="again")
    again.update()
    assert column(again.epochs, "val_psnr_db") == column(plots.epochs, "val_psnr_db")


def test_gradcam_samples_become_volume_nodes(cancelled_training):
    scene, run, root, code, lines = cancelled_training
    assert run.cam_samples_changed() and not run.cam_samples_changed()
    image, cam = load_cam_samples(scene, root / "model")
    with np.load(root / "model" / "gradcam_samples.npz") as data:
        np.testing.assert_allclose(slicer.util.arrayFromVolume(cam), data["cam"], atol=1e-6)
        assert slicer.util.arrayFromVolume(image).shape == data["synthesized"].shape
        samples = {k: data[k] for k in data.files}
    # written after each epoch, of the model that epoch saved (not of the half-trained one the cancel interrupted)
    records = [json.loads(line) for line in (root / "model" / "train_log.jsonl").read_text().splitlines()]
    assert all(r.get("cam_samples") == "gradcam_samples.npz" for r in records if r["event"] == "epoch")
    from radiomicgan.modelio import load_model
    from radiomicgan.train import synthesize_with_cam

    model = load_model(root / "model", device="cpu")
    card = json.loads((root / "model" / "model.json").read_text())
    synthesized, _ = synthesize_with_cam(model.generator, model.discriminator, samples["source"], tuple(card["hu_range"]), "cpu")
    np.testing.assert_allclose(synthesized, samples["synthesized"], atol=0.5)


def test_failed_training_leaves_no_folder_and_no_nodes(tmp_path, scene):
    settings = TrainingSettings(epochs=1, steps_per_epoch=1, device="cpu", vgg_weights="random")
    run = TrainingRun(tmp_path / "no-such-pairs", tmp_path / "model", settings, scene=scene).start()
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 4
    assert run.wait(timeout=300) == "failed" and run.exit_code == ExitCode.BAD_INPUT  # one line, exit status 2
    assert len(run.errors) == 1 and "manifest" in run.errors[0]
    assert not (tmp_path / "model").exists() and run.plots is None
    assert scene.GetNumberOfNodes() == 0


def test_training_killed_after_the_grace_period_leaves_nothing(tmp_path, scene):
    from radiomicgan.simulate import simulate_phantom_pairs

    manifest = simulate_phantom_pairs(tmp_path / "pairs", 1, size=32, slices=1)
    settings = TrainingSettings(schedule="none", epochs=50, steps_per_epoch=1000, batch=1, crop=32, device="cpu",
                                vgg_weights="random", val_slices=1)
    run = TrainingRun(manifest, tmp_path / "model", settings, scene=scene, grace_s=0.0).start()
    pid = run.process.pid
    import time

    time.sleep(3.0)  # the trainer is starting or in its first epoch
    run.cancel()
    assert run.wait(timeout=120) == "cancelled" and run.killed and run.exit_code != 0
    import os

    with pytest.raises(ProcessLookupError):  # the whole process group is gone
        os.killpg(pid, 0)
    assert not (tmp_path / "model").exists() and scene.GetNumberOfNodes() == 0


def test_training_command_carries_the_panel_settings(tmp_path):
    settings = TrainingSettings(method="radiomicgan", schedule="dwt", epochs=7, steps_per_epoch=11, th_acc=0.6, th_eta=3,
                                growing_share=0.0, th_fail=0.4, lr=2e-4, batch=2, device="cpu")
    run = TrainingRun(tmp_path / "pairs", tmp_path / "model", settings, resume=True)
    command = run.command()
    assert command[1:3] == ["-m", "radiomicgan.cli"] and command[3] == "train" and command[-1] == "--resume"
    from radiomicgan.cli import build_parser

    args = build_parser().parse_args(command[3:])
    assert (args.epochs, args.steps_per_epoch, args.th_acc, args.th_eta, args.growing_share, args.th_fail, args.lr, args.batch,
            args.schedule, args.device, args.resume) == (7, 11, 0.6, 3, 0.0, 0.4, 2e-4, 2, "dwt", "cpu", True)
    assert "--growing-share" not in TrainingRun(tmp_path / "p", tmp_path / "m", TrainingSettings()).command()


def _ui_widgets() -> dict:
    """SlicerParameterName -> (widget class, its properties) in the Train panel's .ui."""
    import xml.etree.ElementTree as ET

    from helpers import REPO

    widgets = {}
    for widget in ET.parse(REPO / "RadiomicGANTrain" / "Resources" / "UI" / "RadiomicGANTrain.ui").iter("widget"):
        props = {p.get("name"): p[0].text for p in widget.findall("property")}
        if "SlicerParameterName" in props:
            widgets[props["SlicerParameterName"]] = (widget.get("class"), props)
    return widgets


def test_panel_fields_and_command_line_options_come_from_one_list():
    """Every training field of the panel is a setting of radiomicgan.settings, with the command line's default,
    range and choices; the .ui's spin boxes agree; what the panel passes parses back to the same values."""
    from RadiomicGANLib.training import panel_parameters

    from radiomicgan.cli import build_parser
    from radiomicgan.settings import BY_NAME, PANEL_SETTINGS, SETTINGS, TrainConfig

    defaults = build_parser().parse_args(["train", "--pairs", "p", "--out", "o"])
    assert [f.name for f in __import__("dataclasses").fields(TrainConfig)] == [s.name for s in SETTINGS]
    for s in SETTINGS:  # every setting on the command line but the two internal ones, with its default
        assert (hasattr(defaults, s.name) and getattr(defaults, s.name) == (list(s.default) if s.kind is tuple else s.default)) == s.cli
    fields = panel_parameters()
    assert [name for name, *_ in fields] == [s.panel for s in PANEL_SETTINGS]
    widgets = _ui_widgets()
    assert {name for name, *_ in fields} - set(widgets) == {"device"}  # each has its widget; the device list is the widget's
    panel_values = {}
    for (name, kind, default, bounds), s in zip(fields, PANEL_SETTINGS):
        if s.choices:
            assert bounds == s.choices and default in s.choices
        elif kind in (int, float):
            widget_class, props = widgets[name]
            assert widget_class == ("QSpinBox" if kind is int else "QDoubleSpinBox")
            assert float(props["value"]) == default and float(props["minimum"]) == bounds[0] == (s.minimum or 0)
            assert float(props["maximum"]) == bounds[1] and (s.maximum is None or bounds[1] == s.maximum)
            if s.default is not None:
                assert default == s.default == getattr(defaults, s.name)
        panel_values[s.name] = default if kind is not float or default else None
    panel_values.update(method="pix2pix", schedule="none", epochs=7, th_acc=0.625, lr=3e-4)
    args = build_parser().parse_args(["train", "--pairs", "p", "--out", "o", *TrainingSettings(**panel_values).arguments()])
    assert {name: getattr(args, name) for name in panel_values} == panel_values
    with pytest.raises(TypeError, match="unknown training setting 'epoch'"):
        TrainingSettings(epoch=3)
    with pytest.raises(ValueError, match="must be in"):
        TrainingSettings(th_fail=1.5)
    assert BY_NAME["growing_start"].default == -769.0 and not BY_NAME["growing_start"].panel  # the paper's start, a setting


def test_panel_learning_rate_default_means_the_methods_own(tmp_path):
    """The panel's learning rate 0 ("method default") passes no --lr: Choe trained from it gets its published 1e-4
    (in the written model card), RadiomicGAN 4e-4; a value the user set is passed as is."""
    import xml.etree.ElementTree as ET

    from helpers import REPO

    from radiomicgan.cli import build_parser
    from radiomicgan.simulate import simulate_phantom_pairs

    from RadiomicGANLib.training import panel_parameters

    assert next(default for name, _, default, _ in panel_parameters() if name == "learningRate") == 0.0
    spin = next(w for w in ET.parse(REPO / "RadiomicGANTrain" / "Resources" / "UI" / "RadiomicGANTrain.ui").iter("widget")
                if w.get("name") == "learningRateSpinBox")
    props = {p.get("name"): p[0].text for p in spin.findall("property")}
    assert float(props["value"]) == float(props["minimum"]) == 0.0 and props["specialValueText"] == "method default"

    for lr in (None, 0.0):
        arguments = TrainingSettings(method="choe", schedule="none", lr=lr).arguments()
        assert "--lr" not in arguments and build_parser().parse_args(["train", "--pairs", "p", "--out", "o", *arguments]).lr is None
    assert TrainingSettings(method="choe", lr=3e-4).arguments()[-2:] == ["--lr", "0.0003"]

    manifest = simulate_phantom_pairs(tmp_path / "pairs", 1, size=32, slices=1)
    for method, expected in (("choe", 1e-4), ("radiomicgan", 4e-4)):
        settings = TrainingSettings(method=method, schedule="none", lr=0.0, epochs=1, steps_per_epoch=1, batch=1, crop=32,
                                    device="cpu", vgg_weights="random", val_slices=1)
        run = TrainingRun(manifest, tmp_path / method, settings).start()
        assert run.wait(timeout=300) == "completed", run.process.lines[-5:]
        assert "--lr" not in run.process.args
        card = json.loads((tmp_path / method / "model.json").read_text())
        assert card["method"] == method and card["config"]["lr"] == expected


# ------------------------------------------------------------------------------------------ panel wiring

CONNECTABLE = {  # annotation -> widget classes Slicer's parameterNodeWrapper has a GUI connector for (5.6+)
    "bool": {"QCheckBox", "QPushButton"}, "int": {"QSpinBox", "QSlider"}, "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QComboBox", "QLineEdit", "QTextEdit"}, "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
}


def test_every_bound_widget_has_a_parameter_of_a_connectable_type():
    """Each SlicerParameterName in the .ui names a parameter of the wrapper class whose type Slicer can connect
    to that widget class (connectGui raises otherwise, in front of the user)."""
    import ast
    import xml.etree.ElementTree as ET

    from helpers import REPO

    from RadiomicGANLib.training import panel_parameters

    tree = ast.parse((REPO / "RadiomicGANTrain" / "RadiomicGANTrain.py").read_text())
    wrapper = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "RadiomicGANTrainParameterNode")
    fields = {name: kind.__name__ for name, kind, _, _ in panel_parameters()}  # the settings, added by _withTrainingSettings
    for item in wrapper.body:
        if isinstance(item, ast.AnnAssign):
            annotation = item.annotation
            if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
                annotation = annotation.slice.elts[0]
            fields[item.target.id] = ast.unparse(annotation)
    ui = ET.parse(REPO / "RadiomicGANTrain" / "Resources" / "UI" / "RadiomicGANTrain.ui")
    bound = {}
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    assert bound and set(bound) <= set(fields), set(bound) - set(fields)
    for name, widget_class in bound.items():
        kind = fields[name]
        allowed = {"qMRMLNodeComboBox"} if kind.startswith("vtkMRML") else CONNECTABLE.get(kind, set())
        assert widget_class in allowed, (name, kind, widget_class)
    unbound = set(fields) - set(bound)
    assert unbound == {"device", "candidateVolumes", "roiBoxes"}  # synchronised by the widget itself


def test_pairs_from_loaded_volumes_keep_the_vendors_kernel_tags(tmp_path):
    """Two loaded Toshiba series: the pairs set names FC51 -> FC13 from the nodes' tags; untagged nodes leave
    the names empty (no placeholder that a scan's tag would later be compared with)."""
    from radiomicgan.dataset import load_manifest

    scene = slicer.vtkMRMLScene()
    hu = ramp_volume(1, 16, 16)
    sharp = CTVolume(hu=hu, spacing=(0.7, 0.7, 1.0), meta=CTMetadata(kernel="FC51"))
    soft = CTVolume(hu=hu + 1.0, spacing=(0.7, 0.7, 1.0), meta=CTMetadata(kernel="FC13"))
    tagged = write_pairs_from_nodes(add_volume_node(scene, sharp, "sharp"), add_volume_node(scene, soft, "soft"), tmp_path / "a")
    assert load_manifest(tagged).kernels == ("FC51", "FC13")
    bare = [CTVolume(hu=v.hu, spacing=v.spacing) for v in (sharp, soft)]
    untagged = write_pairs_from_nodes(add_volume_node(scene, bare[0], "s"), add_volume_node(scene, bare[1], "t"), tmp_path / "b")
    assert load_manifest(untagged).kernels == ("", "")
