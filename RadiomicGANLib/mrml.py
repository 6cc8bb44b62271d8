"""MRML volume nodes to and from the core's CTVolume.

MRML geometry is RAS; the core (like ITK and DICOM) uses LPS. The conversion lives here only. Every
function takes the scene as an argument and never changes an input node: results are new nodes. A parent
transform stays in MRML: the core sees the voxel grid (IJK to RAS), and results go under their input's transform.
"""

from __future__ import annotations

import numpy as np

from radiomicgan.volume import CTMetadata, CTVolume

KERNEL_ATTRIBUTE = "RadiomicGAN.ConvolutionKernel"
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


def _ijk_to_ras(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_world(node) -> np.ndarray:
    """IJK to world RAS, the node's parent transforms included: where the views show its voxels. A non-linear
    transform has no matrix: ValueError (hardening it resamples the volume onto a grid of its own)."""
    import vtk

    ijk_to_ras = _ijk_to_ras(node)
    transform = node.GetParentTransformNode()
    if transform is None:
        return ijk_to_ras
    if not transform.IsTransformToWorldLinear():
        raise ValueError(f"{node.GetName()}: under the non-linear transform '{transform.GetName()}'; harden the "
                         "transform first (Data module: right-click the transform > Harden transform)")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    return to_world @ ijk_to_ras


def place_like(output_node, input_node) -> None:
    """Put a result under its input's parent transform: computed on the input's voxel grid, it then shows where
    the input shows (and follows it when the transform changes), linear or not."""
    output_node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())


def volume_from_node(node, kernel: str | None = None) -> CTVolume:
    """The node's voxels as HU with LPS geometry. ``kernel`` overrides the node's recorded kernel tag."""
    from slicer.util import arrayFromVolume

    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.GetImageData() is None:
        raise ValueError("select a scalar volume with image data")
    ijk_to_lps = _ijk_to_ras(node)
    ijk_to_lps[:3] = RAS_FROM_LPS @ ijk_to_lps[:3]
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    meta = CTMetadata(kernel=kernel or node.GetAttribute(KERNEL_ATTRIBUTE) or "", series_description=node.GetName())
    return CTVolume(
        hu=arrayFromVolume(node).astype(np.float32),  # copy: the node's buffer is never written through
        spacing=tuple(spacing),
        origin=tuple(ijk_to_lps[:3, 3]),
        direction=tuple((axes / spacing).ravel()),
        meta=meta,
        source=node.GetName(),
    )


def add_volume_node(scene, volume: CTVolume, name: str, dtype=np.int16):
    """A new scalar volume node holding ``volume`` (HU as int16, as CT is stored, unless ``dtype`` says
    otherwise) in its LPS geometry."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    set_volume_node(node, volume, dtype)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.AutoWindowLevelOff()
        display.SetWindowLevel(1600, -200)  # lung and mediastinum at once: [-1000, 600] HU
    return node


def set_volume_node(node, volume: CTVolume, dtype=np.int16):
    """Put ``volume`` (voxels, LPS geometry, kernel tag) into an existing node, e.g. a chosen output node."""
    from slicer.util import updateVolumeFromArray

    lps = volume.direction_matrix * np.asarray(volume.spacing)[None, :]
    ras = RAS_FROM_LPS @ lps
    origin = RAS_FROM_LPS @ np.asarray(volume.origin)
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, ras[r, c])
        matrix.SetElement(r, 3, origin[r])
    node.SetIJKToRASMatrix(matrix)
    voxels = np.clip(np.rint(volume.hu), -32768, 32767) if np.dtype(dtype).kind == "i" else volume.hu
    updateVolumeFromArray(node, voxels.astype(dtype))
    if volume.meta.kernel:
        node.SetAttribute(KERNEL_ATTRIBUTE, volume.meta.kernel)
    else:
        node.RemoveAttribute(KERNEL_ATTRIBUTE)
    return node


def set_window(node, window) -> None:
    """Show ``node`` with the HU window (lo, hi), e.g. the Grad-CAM hot-spot window."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"not a window: [{lo}, {hi}]")
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(hi - lo, (hi + lo) / 2)


def show_thresholded(node, threshold: float) -> None:
    """A 0..1 map shown as a colour overlay only where it exceeds ``threshold`` (transparent elsewhere)."""
    display = node.GetDisplayNode()
    if display is None:
        return
    display.SetApplyThreshold(1)
    display.SetLowerThreshold(float(threshold))
    display.SetUpperThreshold(1.0)


def simulate_kernel_node(scene, input_node, kernel: str, source_kernel: str | None = None, seed: int = 0):
    """The loaded scan as if reconstructed with ``kernel``: a new node, the input untouched."""
    from radiomicgan.simulate import rekernel_volume

    volume = volume_from_node(input_node)
    result = rekernel_volume(volume, kernel, source_kernel, seed=seed)
    output = add_volume_node(scene, result, f"{input_node.GetName()}_{kernel}")
    place_like(output, input_node)
    return output


def add_map_node(scene, values, like: CTVolume, name: str):
    """A float map (e.g. Grad-CAM, 0..1) on the grid of ``like``, shown with a rainbow colour table when the
    scene has Slicer's default colours."""
    node = add_volume_node(scene, like.with_hu(values, kernel=""), name, dtype=np.float32)
    display = node.GetDisplayNode()
    if display is not None:
        display.SetWindowLevel(1.0, 0.5)
        colour = scene.GetFirstNodeByName("Rainbow")
        if colour is not None:
            display.SetAndObserveColorNodeID(colour.GetID())
    return node
