"""The Slicer side: MRML conversion against the real MRML classes (slicer-core), dependency prompts, and
an extension layout Slicer's build accepts. Qt widgets cannot run here; they are kept thin."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, ramp_volume

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML) is a test requirement")

from RadiomicGANLib.mrml import (  # noqa: E402
    KERNEL_ATTRIBUTE,
    add_volume_node,
    simulate_kernel_node,
    volume_from_node,
)

from radiomicgan.simulate import phantom_pair  # noqa: E402
from radiomicgan.volume import CTMetadata, CTVolume  # noqa: E402


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def _oblique_volume() -> CTVolume:
    c, s = np.cos(0.4), np.sin(0.4)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return CTVolume(hu=ramp_volume(3, 10, 8), spacing=(0.7, 0.8, 2.0), origin=(-50.0, 20.0, 100.0),
                    direction=tuple(direction.ravel()), meta=CTMetadata(kernel="B30f"))


def test_volume_node_round_trip_keeps_lps_geometry(scene):
    volume = _oblique_volume()
    node = add_volume_node(scene, volume, "ct")
    # MRML holds RAS: the first two axes flip sign
    origin_ras = node.GetOrigin()
    assert origin_ras == pytest.approx((50.0, -20.0, 100.0))
    back = volume_from_node(node)
    np.testing.assert_array_equal(back.hu, volume.hu)
    assert back.spacing == pytest.approx(volume.spacing)
    assert back.origin == pytest.approx(volume.origin)
    assert back.direction == pytest.approx(volume.direction)
    assert back.meta.kernel == "B30f" and node.GetAttribute(KERNEL_ATTRIBUTE) == "B30f"


def test_node_from_a_voxel_position_matches_the_core(scene):
    """A voxel's physical place agrees between the core (LPS) and MRML (RAS) conventions."""
    import vtk

    volume = _oblique_volume()
    node = add_volume_node(scene, volume, "ct")
    ijk = np.array([3.0, 4.0, 2.0])  # (i, j, k) = (x, y, z) index
    lps = np.asarray(volume.origin) + volume.direction_matrix @ (ijk * np.asarray(volume.spacing))
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ras = matrix.MultiplyPoint([*ijk, 1.0])[:3]
    assert ras == pytest.approx([-lps[0], -lps[1], lps[2]])


def test_simulate_kernel_node_makes_a_new_node_and_keeps_the_input(scene):
    source, _, _ = phantom_pair(size=64, slices=2, seed=1)
    node = add_volume_node(scene, source, "phantom")
    before = slicer.util.arrayFromVolume(node).copy()
    out = simulate_kernel_node(scene, node, "B70")
    assert out is not node and out.GetName() == "phantom_B70"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before)
    result = slicer.util.arrayFromVolume(out)
    assert result.shape == before.shape and result.dtype == np.int16
    assert np.std(result - before.astype(float)) > 20  # a much sharper, noisier kernel
    assert out.GetAttribute(KERNEL_ATTRIBUTE) == "B70-sim"
    assert volume_from_node(out).same_geometry(volume_from_node(node))


def test_simulated_node_of_a_transformed_input_goes_under_its_transform(scene):
    from RadiomicGANLib.mrml import ijk_to_world

    source, _, _ = phantom_pair(size=32, slices=1, seed=1)
    node = add_volume_node(scene, source, "phantom")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    import vtk

    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    out = simulate_kernel_node(scene, node, "B70")
    assert out.GetTransformNodeID() == transform.GetID()
    np.testing.assert_allclose(ijk_to_world(out), ijk_to_world(node))
    assert ijk_to_world(out)[0, 3] == pytest.approx(out.GetOrigin()[0] + 25.0)


def test_no_slicer_side_code_runs_torch_or_the_core_jobs_in_slicers_process():
    """Harmonization, training and pyradiomics run in the background process only: the Slicer side (the modules
    and RadiomicGANLib) never imports the modules that run them (mrml.harmonize_node did, unused), nor torch."""
    heavy = {"torch", "torchvision", "radiomics", "radiomicgan.harmonize", "radiomicgan.train", "radiomicgan.models",
             "radiomicgan.modelio", "radiomicgan.gradcam", "radiomicgan.reproducibility", "radiomicgan.baselines"}
    allowed = {("RadiomicGANLib/harmonization.py", "radiomicgan.modelio"),  # the card's names: modelio imports torch lazily
               ("RadiomicGANLib/training.py", "radiomicgan.modelio"), ("RadiomicGANLib/harmonization.py", "torch")}  # GPU list
    for path in [*REPO.glob("RadiomicGANLib/*.py"), REPO / "RadiomicGANHarmonize" / "RadiomicGANHarmonize.py",
                 REPO / "RadiomicGANTrain" / "RadiomicGANTrain.py"]:
        tree = ast.parse(path.read_text())
        tests = {n for c in tree.body if isinstance(c, ast.ClassDef) and c.name.endswith("Test") for n in ast.walk(c)}
        for node in ast.walk(tree):
            if node in tests or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                where = (str(path.relative_to(REPO)), name)
                if name in heavy and where not in allowed and not (path.name.startswith("RadiomicGANTrain") and name == "torch"):
                    raise AssertionError(f"{where[0]} imports {name}")
    import RadiomicGANLib.mrml as mrml

    assert not hasattr(mrml, "harmonize_node")


def test_volume_from_node_rejects_empty_node(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(ValueError, match="scalar volume with image data"):
        volume_from_node(node)


# ------------------------------------------------------------------------------------------ layout


def _cmake_listed(cmake: Path) -> set[str]:
    text = cmake.read_text()
    return {m for m in re.findall(r"^\s+([\w${}/.-]+\.(?:py|ui|png))\s*$", text, re.M)}


def test_extension_layout():
    for path in ("RadiomicGANHarmonize", "RadiomicGANTrain", "RadiomicGANLib", "Resources", "Testing", "CMakeLists.txt",
                 "RadiomicGAN.s4ext", "README.md", "pyproject.toml", ".ci/run", "radiomicgan"):
        assert (REPO / path).exists(), path
    s4ext = dict(line.split(" ", 1) for line in (REPO / "RadiomicGAN.s4ext").read_text().splitlines()
                 if line.strip() and not line.startswith("#") and " " in line)
    # SlicerRadiomics has had no macOS package since Slicer 5.3: depending on it drops the extension there
    assert s4ext["category"] == "Filtering" and s4ext["depends"].split() == ["PyTorch"]
    import json  # the three descriptions of the extension agree on its dependencies

    assert json.loads((REPO / "RadiomicGAN.json").read_text())["build_dependencies"] == ["PyTorch"]
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', (REPO / "CMakeLists.txt").read_text())


def test_cmake_lists_every_core_and_module_file():
    core = {f"radiomicgan/{p.name}" for p in (REPO / "radiomicgan").glob("*.py")}
    assert core <= _cmake_listed(REPO / "CMakeLists.txt")
    for module in ("RadiomicGANHarmonize", "RadiomicGANTrain", "RadiomicGANLib"):
        folder = REPO / module
        listed = {p.replace("${MODULE_NAME}", module) for p in _cmake_listed(folder / "CMakeLists.txt")}
        present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".py", ".ui", ".png")
                   and "__pycache__" not in p.parts}
        assert listed == present, module
    for listed in _cmake_listed(REPO / "CMakeLists.txt"):
        assert (REPO / listed).is_file(), listed
    top = (REPO / "CMakeLists.txt").read_text()
    for folder in ("RadiomicGANLib", "RadiomicGANHarmonize", "RadiomicGANTrain"):
        assert f"add_subdirectory({folder})" in top, folder
    assert "WITH_SUBDIR" in (REPO / "RadiomicGANLib" / "CMakeLists.txt").read_text()  # a package, like DICOMLib


def test_core_imports_nothing_from_slicer():
    forbidden = {"slicer", "qt", "ctk", "vtk", "mrml", "RadiomicGANLib"}
    for path in (REPO / "radiomicgan").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
    for path in (REPO / "RadiomicGANLib").glob("*.py"):  # MRML yes, qt no
        assert not re.search(r"^\s*(import|from)\s+(qt|ctk)\b", path.read_text(), re.M), path.name


@pytest.mark.parametrize("module", ["RadiomicGANHarmonize", "RadiomicGANTrain"])
def test_module_ui_has_every_widget_the_module_uses(module):
    source = (REPO / module / f"{module}.py").read_text()
    compile(source, module, "exec")
    # the module's .ui and its sections' (e.g. RadiomicGANHarmonizeCohort.ui, loaded by the cohort section)
    names = {w.get("name") for path in (REPO / module / "Resources" / "UI").glob(f"{module}*.ui") for w in ET.parse(path).iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used and used <= names, used - names


def test_parameter_node_names_in_the_ui_are_wrapper_fields():
    """Every SlicerParameterName in the .ui names a field of the module's @parameterNodeWrapper class."""
    module = "RadiomicGANHarmonize"
    tree = ast.parse((REPO / module / f"{module}.py").read_text())
    wrappers = [n for n in tree.body if isinstance(n, ast.ClassDef)
                and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in n.decorator_list)]
    assert len(wrappers) == 1
    fields = {n.target.id for n in wrappers[0].body if isinstance(n, ast.AnnAssign)}
    ui = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui")
    bound = {p.find("string").text for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and bound <= fields, bound - fields
    assert fields - bound == {"device"}  # the device list depends on the GPUs found: bound by hand
