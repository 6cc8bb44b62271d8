"""RadiomicGAN Harmonize: bring CT volumes loaded in Slicer to a standard reconstruction kernel.

Thin layer over the ``radiomicgan`` core (no computation here) and ``RadiomicGANLib`` (MRML in and out).
This version simulates kernels on a loaded scan; harmonization with a trained model follows.
"""

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class RadiomicGANHarmonize(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "RadiomicGAN Harmonize"
        self.parent.categories = ["Filtering"]
        self.parent.dependencies = []
        self.parent.contributors = ["RadiomicGAN developers"]
        self.parent.helpText = (
            "Harmonize CT images across reconstruction kernels so that radiomic features become reproducible "
            "(RadiomicGAN, Selim et al.): harmonize a loaded CT volume with a trained model, slice by slice on the "
            "GPU when there is one, and see where the result still looks non-standard (Grad-CAM of the "
            "discriminator). Also re-kernels a scan with calibrated presets (B10/B30/B50/B70-like). Input volumes "
            "are never modified."
        )
        self.parent.acknowledgementText = (
            "Method: M. Selim et al., CT Image Harmonization for Enhancing Radiomics Studies. "
            "Kernel presets calibrated on public multi-kernel data of Choe et al., Radiology 2019."
        )


class RadiomicGANHarmonizeWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        if not ensureDependencies(self.layout):
            return
        from radiomicgan.kernels import PRESETS

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RadiomicGANHarmonize.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RadiomicGANHarmonizeLogic()
        for name, preset in PRESETS.items():
            self.ui.kernelComboBox.addItem(f"{name}: {preset.description}", name)
            self.ui.sourceKernelComboBox.addItem(f"{name}: {preset.description}", name)
        self.ui.kernelComboBox.currentIndex = list(PRESETS).index("B50")
        self.ui.simulateButton.connect("clicked(bool)", self.onSimulate)
        self.ui.harmonizeButton.connect("clicked(bool)", self.onHarmonize)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self._cancelRequested = False
        self.layout.addStretch(1)

    def onCancel(self):
        self._cancelRequested = True

    def onHarmonize(self):
        import qt

        self._cancelRequested = False
        self.ui.harmonizeButton.enabled, self.ui.cancelButton.enabled = False, True

        def progress(done, total):
            self.ui.progressBar.maximum, self.ui.progressBar.value = total, done
            slicer.app.processEvents()

        try:
            with slicer.util.tryWithErrorDisplay("Harmonization failed.", waitCursor=True):
                output, cam, windows = self.logic.harmonize(
                    self.ui.inputSelector.currentNode(), self.ui.modelPathLineEdit.currentPath,
                    device=self.ui.deviceComboBox.currentText, gradcam=self.ui.gradcamCheckBox.checked,
                    progress=progress, cancel=lambda: self._cancelRequested,
                )
                slicer.util.setSliceViewerLayers(background=output, foreground=cam, foregroundOpacity=0.4 if cam else 0, fit=True)
                self.ui.statusLabel.text = self.logic.describe(output, windows)
        finally:
            self.ui.harmonizeButton.enabled, self.ui.cancelButton.enabled = True, False
            qt.QApplication.processEvents()

    def onSimulate(self):
        with slicer.util.tryWithErrorDisplay("Kernel simulation failed.", waitCursor=True):
            source = self.ui.sourceKernelComboBox.currentData  # None: read from the DICOM tag
            node = self.logic.simulateKernel(
                self.ui.inputSelector.currentNode(), self.ui.kernelComboBox.currentData, source or None
            )
            slicer.util.setSliceViewerLayers(background=node, fit=True)
            self.ui.statusLabel.text = f"Created {node.GetName()}"


def ensureDependencies(layout=None):
    """Offer to install what the core needs and Slicer lacks. When the user declines, say so in ``layout``
    (a module panel) and return False. Shared by the RadiomicGAN modules."""
    import qt
    from RadiomicGANLib.dependencies import ensure_dependencies, missing_requirements

    def install(requirements):
        with slicer.util.WaitCursor():
            slicer.util.pip_install(requirements)

    if ensure_dependencies(slicer.util.confirmOkCancelDisplay, install):
        return True
    if layout is not None:
        layout.addWidget(qt.QLabel("RadiomicGAN needs " + ", ".join(missing_requirements()) + ". Restart Slicer to be asked again."))
    return False


class RadiomicGANHarmonizeLogic(ScriptedLoadableModuleLogic):
    """Usable from the Python console::

        logic = RadiomicGANHarmonizeLogic()
        output, cam, windows = logic.harmonize(getNode("CT"), "/models/rgan")   # batch use: loop over nodes
        sharp = logic.simulateKernel(getNode("CT"), "B70")
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._harmonizers = {}  # (model folder, device) -> loaded model, kept between calls

    def harmonize(self, inputNode, modelDir, device="auto", batch=None, gradcam=True, progress=None, cancel=None, scene=None):
        from radiomicgan.harmonize import Cancelled, Harmonizer
        from RadiomicGANLib.mrml import harmonize_node

        key = (str(modelDir), device)
        if key not in self._harmonizers:
            self._harmonizers[key] = Harmonizer(modelDir, device=device, batch=batch)
        try:
            return harmonize_node(scene or slicer.mrmlScene, inputNode, self._harmonizers[key], gradcam=gradcam,
                                  progress=progress, cancel=cancel)
        except Cancelled:
            return None, None, None

    @staticmethod
    def describe(output, windows):
        if output is None:
            return "Cancelled; nothing added"
        text = f"Created {output.GetName()}"
        if windows:
            before, after = windows["input"]["standard_probability"], windows["harmonized"]["standard_probability"]
            text += f"; discriminator 'standard' probability {before:.2f} -> {after:.2f}"
        return text

    def simulateKernel(self, inputNode, kernel, sourceKernel=None, seed=0, scene=None):
        from RadiomicGANLib.mrml import simulate_kernel_node

        return simulate_kernel_node(scene or slicer.mrmlScene, inputNode, kernel, sourceKernel, seed)


class RadiomicGANHarmonizeTest(ScriptedLoadableModuleTest):
    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_simulate_kernel_on_phantom()

    def test_simulate_kernel_on_phantom(self):
        from radiomicgan.simulate import phantom_pair
        from RadiomicGANLib.mrml import add_volume_node, volume_from_node

        source, _, _ = phantom_pair(size=64, slices=2)
        node = add_volume_node(slicer.mrmlScene, source, "phantom")
        before = slicer.util.arrayFromVolume(node).copy()
        out = RadiomicGANHarmonizeLogic().simulateKernel(node, "B70")
        self.assertEqual(volume_from_node(out).meta.kernel, "B70-sim")
        self.assertTrue((slicer.util.arrayFromVolume(node) == before).all())
        self.delayDisplay("Kernel simulation test passed")
