"""The Slicer modules' background harmonization against the real MRML classes (slicer-core), without Slicer: the
core runs as a subprocess and its results come back as MRML nodes with their geometry; a cancel leaves nothing.
test_slicer_jobs.py has the background process, the job contract and the dependency logic, which need no MRML."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is a test requirement")

from RadiomicGANLib.harmonization import (  # noqa: E402
    HarmonizeJob,
    describe_model,
    format_windows,
    hot_spot_windows,
    model_figures,
    read_model_card,
    supports_gradcam,
)
from RadiomicGANLib.mrml import KERNEL_ATTRIBUTE, add_volume_node, ijk_to_world, set_window, volume_from_node  # noqa: E402
from RadiomicGANLib.process import (  # noqa: E402
    BackgroundProcess,
    ExitCode,
    JobStatus,
    core_command,
    warning_text,
)

from helpers import alive, oblique_scan, train_tiny_models  # noqa: E402
from radiomicgan.io import write_volume  # noqa: E402


pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="process checks read /proc")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return train_tiny_models(tmp_path_factory.mktemp("models"))


_oblique_scan = oblique_scan


def _matrix(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


# ------------------------------------------------------------------------------------------ harmonization job


def test_model_card_for_the_panel(models, tmp_path):
    card = read_model_card(models / "gan")
    assert supports_gradcam(card) and not supports_gradcam(read_model_card(models / "filter"))
    text = describe_model(card)
    assert "B30 -> B50 (radiomicgan" in text and "Validation PSNR" in text and "random initialisation" in text
    assert "no Grad-CAM" in describe_model(read_model_card(models / "filter"))
    figures = model_figures(models / "gan")
    assert figures and all(p.suffix == ".png" and p.parent == models / "gan" for p in figures)
    with pytest.raises(ValueError, match="no model.json"):
        read_model_card(tmp_path)
    with pytest.raises(ValueError, match="select a model folder"):
        read_model_card("")


def test_harmonize_job_wait_returns_nodes_with_the_input_geometry(models):
    scene = slicer.vtkMRMLScene()
    node = add_volume_node(scene, _oblique_scan(kernel="B70f"), "scan")  # not the model's source kernel
    before = slicer.util.arrayFromVolume(node).copy()
    lines = []
    job = HarmonizeJob(scene, node, models / "gan", device="cpu", th_fail=0.4, on_output=lines.append)
    assert job.wait(300) is JobStatus.COMPLETED and job.status == "completed" and job.exit_code == ExitCode.OK
    result = job.result
    assert job.progress == 1.0 and not job.workdir.exists()
    output, cam, windows = result
    assert output.GetName() == "scan_harmonized" and output.GetAttribute("RadiomicGAN.HarmonizedTo") == "B50"
    np.testing.assert_allclose(_matrix(output), _matrix(node), atol=1e-9)  # IJK-to-RAS kept
    np.testing.assert_allclose(_matrix(cam), _matrix(node), atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before)  # input untouched
    assert slicer.util.arrayFromVolume(output).shape == before.shape
    values = slicer.util.arrayFromVolume(cam)
    assert values.dtype == np.float32 and 0 <= values.min() and values.max() <= 1
    display = cam.GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.4)  # thresholded overlay
    assert result.gradcam_input is not None and result.gradcam_input.GetName() == "scan_GradCAM"
    assert set(windows) >= {"input", "harmonized"}
    assert any("differs from the model's source kernel" in w for w in job.warnings)  # shown to the user
    assert any(warning_text(line) for line in lines)
    spans = hot_spot_windows(windows)
    left, right = format_windows(windows)
    for key, text in (("input", left), ("harmonized", right)):
        assert (spans[key] is None) == ("no hot spots" in text)
    if spans["harmonized"]:  # the window/level button
        set_window(output, spans["harmonized"])
        lo, hi = spans["harmonized"]
        assert output.GetDisplayNode().GetWindow() == pytest.approx(hi - lo)
        assert output.GetDisplayNode().GetLevel() == pytest.approx((hi + lo) / 2)


def test_harmonize_job_into_a_chosen_output_node(models):
    scene = slicer.vtkMRMLScene()
    node = add_volume_node(scene, _oblique_scan(), "scan")
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    count = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    job = HarmonizeJob(scene, node, models / "filter", device="cpu", output_node=target)
    assert job.wait(300) is JobStatus.COMPLETED
    output, cam, windows = job.result
    assert output is target and cam is None and windows is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == count  # no Grad-CAM for a filter model
    np.testing.assert_allclose(_matrix(target), _matrix(node), atol=1e-9)
    assert volume_from_node(target).same_geometry(volume_from_node(node)) and target.GetAttribute(KERNEL_ATTRIBUTE)
    assert target.GetDisplayNode() is not None
    with pytest.raises(ValueError, match="must not be the input"):
        HarmonizeJob(scene, node, models / "filter", output_node=node)


def test_harmonize_job_result_of_a_transformed_input_shows_where_the_input_shows(models):
    """A result is computed on the input's voxel grid, so it goes under the input's parent transform: the same
    world position in the views, voxel for voxel, and it follows the input when the transform is edited."""
    import vtk

    scene = slicer.vtkMRMLScene()
    node = add_volume_node(scene, _oblique_scan(), "scan")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    moved = vtk.vtkTransform()
    moved.Translate(12.0, -4.0, 3.0)
    moved.RotateX(10.0)
    transform.SetMatrixTransformToParent(moved.GetMatrix())
    node.SetAndObserveTransformNodeID(transform.GetID())
    before = _matrix(node)
    chosen = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chosen")
    for output_node in (None, chosen):
        job = HarmonizeJob(scene, node, models / "filter", device="cpu", output_node=output_node)
        assert job.wait(300) == "completed"
        output, _, _ = job.result
        assert output.GetTransformNodeID() == transform.GetID()
        np.testing.assert_allclose(ijk_to_world(output), ijk_to_world(node), atol=1e-9)
        assert not np.allclose(ijk_to_world(node), _matrix(node))  # the transform does move it
    assert node.GetTransformNodeID() == transform.GetID() and np.array_equal(_matrix(node), before)  # input untouched


def test_harmonize_job_cancelled_mid_run_adds_nothing(models):
    scene = slicer.vtkMRMLScene()
    # 24 slices: the Grad-CAM stage must outlast the stop request's way in; with 4 it could end first on a busy machine
    node = add_volume_node(scene, _oblique_scan(slices=24), "scan")
    count = scene.GetNumberOfNodes()
    job = HarmonizeJob(scene, node, models / "gan", device="cpu")
    deadline = time.monotonic() + 300
    while job.stage != "gradcam":
        assert job.poll() == "running", job.process.lines
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert job.progress == pytest.approx(0.5)
    started = time.monotonic()
    job.cancel()  # asks and returns at once: the GUI thread never waits
    assert time.monotonic() - started < 1 and job.poll() is JobStatus.RUNNING or job.status is JobStatus.CANCELLED
    assert job.wait(60) is JobStatus.CANCELLED and job.poll() == "cancelled" and not job.process.running
    assert job.exit_code == ExitCode.CANCELLED and not job.killed  # it stopped on the request, staged files removed
    assert not alive(job.process.pid) and not job.workdir.exists() and job.result is None
    assert scene.GetNumberOfNodes() == count


def test_gradcam_without_discriminator_is_refused_up_front(models, tmp_path):
    scene = slicer.vtkMRMLScene()
    node = add_volume_node(scene, _oblique_scan(), "scan")
    with pytest.raises(ValueError, match="no discriminator"):
        HarmonizeJob(scene, node, models / "filter", gradcam=True)
    assert HarmonizeJob(scene, node, models / "filter", device="cpu").gradcam is False  # default follows the model
    write_volume(_oblique_scan(), tmp_path / "scan.nrrd")
    process = BackgroundProcess(core_command("harmonize", str(tmp_path / "scan.nrrd"), "--model", str(models / "filter"),
                                             "--out", str(tmp_path / "h.nrrd"), "--gradcam", str(tmp_path / "cam.nrrd"))).start()
    assert process.wait(300) == 2
    assert [line for line in process.lines if "radiomicgan: error:" in line][0].endswith("harmonize without it")
    assert "Traceback" not in "\n".join(process.lines) and sorted(os.listdir(tmp_path)) == ["scan.nrrd"]


def test_failed_job_reports_the_core_error_and_adds_nothing(models):
    scene = slicer.vtkMRMLScene()
    node = add_volume_node(scene, _oblique_scan(), "scan")
    count = scene.GetNumberOfNodes()
    job = HarmonizeJob(scene, node, models / "gan", device="cuda:7")
    assert job.wait(300) is JobStatus.FAILED and job.exit_code == ExitCode.BAD_INPUT
    assert "cuda" in job.error.lower() and scene.GetNumberOfNodes() == count
    assert not job.workdir.exists()
