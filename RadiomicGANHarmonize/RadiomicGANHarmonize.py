"""RadiomicGAN Harmonize: bring CT volumes loaded in Slicer to a standard reconstruction kernel.

Thin layer: the work runs as the ``radiomicgan`` core's command line in a background process (PythonSlicer), and
everything that talks to MRML lives in ``RadiomicGANLib`` (qt-free, tested with pytest against slicer-core).
"""

import pathlib
import sys
from typing import Annotated, Optional

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Run from the source tree (module folders added to Slicer's module paths): the core (radiomicgan/) and
# RadiomicGANLib/ are one folder up. In an installed extension they sit beside this file, already importable.
_SOURCE_ROOT = pathlib.Path(__file__).resolve().parent.parent
if (_SOURCE_ROOT / "RadiomicGANLib").is_dir() and str(_SOURCE_ROOT) not in sys.path:
    sys.path.append(str(_SOURCE_ROOT))


class RadiomicGANHarmonize(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "RadiomicGAN Harmonize"
        self.parent.categories = ["Filtering"]
        self.parent.dependencies = []
        self.parent.contributors = ["RadiomicGAN developers"]
        self.parent.helpText = (
            "Harmonize CT images across reconstruction kernels so that radiomic features become reproducible "
            "(RadiomicGAN, Selim et al.): harmonize a loaded CT volume with a trained model in the background (GPU when "
            "there is one; Cancel stops it), and see where the result still looks non-standard (Grad-CAM of the "
            "discriminator) and which HU window those hot spots span. Also re-kernels a scan with calibrated presets "
            "(B10/B30/B50/B70-like). Input volumes are never modified."
        )
        self.parent.acknowledgementText = (
            "Method: M. Selim et al., CT Image Harmonization for Enhancing Radiomics Studies. "
            "Kernel presets calibrated on public multi-kernel data of Choe et al., Radiology 2019."
        )


@parameterNodeWrapper
class RadiomicGANHarmonizeParameterNode:
    """Saved with the scene, so selections survive save and reload."""

    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: pathlib.Path
    device: str = "auto"  # filled from the GPUs found, so bound by hand rather than through the .ui
    batch: Annotated[int, WithinRange(0, 512)] = 0  # 0: automatic
    gradcam: bool = True
    thFail: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    outputVolume: vtkMRMLScalarVolumeNode  # None: a new volume


def modelFolder(path) -> str:
    """'' for an unset path (the wrapper's default pathlib.Path() reads '.')."""
    text = str(path or "")
    return "" if text in ("", ".") else text


class RadiomicGANHarmonizeWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Takes its logic in the constructor (as SlicerNNUnet's widget does) so a test can hand it another one.

    Without a parent, ScriptedLoadableModuleWidget.__init__ makes one and calls ``setup()`` itself: everything
    ``setup()`` uses is set before it."""

    def __init__(self, parent=None, logic=None):
        VTKObservationMixin.__init__(self)
        self.logic = logic
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None
        self._windows = None
        self._result = None
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self):
        import qt
        from radiomicgan.kernels import PRESETS
        from RadiomicGANLib.harmonization import available_devices

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RadiomicGANHarmonize.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        if self.logic is None:
            self.logic = RadiomicGANHarmonizeLogic()

        for label, device in available_devices():
            self.ui.deviceComboBox.addItem(label, device)
        self.ui.sourceKernelComboBox.addItem("from DICOM tag", "")
        for name, preset in PRESETS.items():
            self.ui.kernelComboBox.addItem(f"{name}: {preset.description}", name)
            self.ui.sourceKernelComboBox.addItem(f"{name}: {preset.description}", name)
        self.ui.kernelComboBox.currentIndex = list(PRESETS).index("B50")

        self.ui.applyButton.connect("clicked(bool)", self.onApplyOrCancel)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.applyWindowButton.connect("clicked(bool)", self.onApplyHotSpotWindow)
        self.ui.showFiguresButton.connect("clicked(bool)", self.onShowFigures)
        self.ui.simulateButton.connect("clicked(bool)", self.onSimulate)
        self._timer = qt.QTimer()
        self._timer.setInterval(250)
        self._timer.connect("timeout()", self.onPoll)

        self.cohortSection = CohortSection(self)  # a section of its own (Resources/UI/RadiomicGANHarmonizeCohort.ui)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.layout.addStretch(1)
        self.initializeParameterNode()

    # ---------------------------------------------------------------------------------------- parameter node

    def cleanup(self):
        self.removeObservers()
        if getattr(self, "cohortSection", None) is not None:
            self.cohortSection.cleanup()
        if self._timer is not None:
            self._timer.stop()
        if self._job is not None and self._job.running:  # never leave a process behind when Slicer closes
            self._job.cancel()
            try:
                self._job.wait(self._job.grace_s + 5)  # killed after the grace period
            except TimeoutError:
                pass

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if getattr(self.parent, "isEntered", True):  # a widget made without a module panel has no isEntered
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def onDeviceChanged(self, index):
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def updateGUIFromParameterNode(self, caller=None, event=None):
        """Apply only when the inputs are valid; Grad-CAM off and greyed for a model without a discriminator."""
        p = self._parameterNode
        if p is None:
            return
        index = self.ui.deviceComboBox.findData(p.device)
        if index >= 0 and index != self.ui.deviceComboBox.currentIndex:
            self.ui.deviceComboBox.currentIndex = index
        card, reason = self.logic.modelCard(modelFolder(p.modelPath))
        self.ui.modelCardLabel.text = self.logic.describeModel(card) if card else reason
        self.ui.showFiguresButton.enabled = bool(card and self.logic.modelFigures(modelFolder(p.modelPath)))
        gradcamPossible = bool(card) and self.logic.supportsGradcam(card)
        self.ui.gradcamCheckBox.enabled = gradcamPossible
        if card and not gradcamPossible and p.gradcam:
            p.gradcam = False
        self.ui.thFailSpinBox.enabled = gradcamPossible and p.gradcam
        if self._job is not None and self._job.running:
            return  # Apply is Cancel now
        problem = self.logic.inputProblem(p.inputVolume, modelFolder(p.modelPath), p.outputVolume)
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or "Harmonize in the background; while it runs this button cancels."

    # ---------------------------------------------------------------------------------------- apply / cancel

    def onApplyOrCancel(self):
        if self._job is not None and self._job.running:
            self._job.cancel()  # returns at once; onPoll sees the end (a kill after the grace period)
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = "Cancelling..."
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Harmonization could not start.", waitCursor=True):
            ok, message = self.logic.ensureDependencies()  # an installation that fails shows its error here
            if not ok:
                slicer.util.warningDisplay(message, windowTitle="RadiomicGAN Harmonize")
                return
            self._job = self.logic.process(p.inputVolume, modelFolder(p.modelPath), device=p.device, batch=p.batch or None,
                                           gradcam=p.gradcam, thFail=p.thFail, outputNode=p.outputVolume, waitForCompletion=False)
        if self._job is None:
            return
        self.ui.applyButton.text, self.ui.applyButton.enabled = "Cancel", True
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text, self.ui.warningsLabel.text = "Harmonizing in the background...", ""
        self._timer.start()

    def onPoll(self):
        from RadiomicGANLib.process import JobStatus

        job = self._job
        status = job.poll()
        self.ui.progressBar.value = int(100 * job.progress)
        self.ui.statusLabel.text = {"harmonize": "Harmonizing slices...", "gradcam": "Computing Grad-CAM maps..."}.get(job.stage, self.ui.statusLabel.text)
        self.ui.warningsLabel.text = "\n".join(f"Warning: {w}" for w in job.warnings)
        if status is not JobStatus.RUNNING:
            self._finish()

    def _finish(self):
        """Views change only after success; a cancel or failure leaves them (and the scene) as they were."""
        self._timer.stop()
        job, self._job = self._job, None
        self.ui.applyButton.text = "Apply"
        if job.status == "completed":
            result = job.result
            self._result = result
            slicer.util.setSliceViewerLayers(background=result.volume, foreground=result.gradcam,
                                              foregroundOpacity=0.5 if result.gradcam else 0.0, fit=True)
            self.ui.statusLabel.text = self.logic.summary(result)
            self._showWindows(result.windows)
            self.ui.progressBar.value = 100
        elif job.status == "cancelled":
            self.ui.statusLabel.text, self.ui.progressBar.value = "Cancelled; nothing was added.", 0
        else:
            self.ui.statusLabel.text = "Failed; nothing was added."
            slicer.util.errorDisplay(f"Harmonization failed:\n{job.error}", windowTitle="RadiomicGAN Harmonize")
        self.updateGUIFromParameterNode()

    def _showWindows(self, windows):
        from RadiomicGANLib.harmonization import format_windows, hot_spot_windows

        self._windows = hot_spot_windows(windows)
        self.ui.inputWindowLabel.text, self.ui.resultWindowLabel.text = format_windows(windows)
        self.ui.applyWindowButton.enabled = self._windows["harmonized"] is not None

    def onApplyHotSpotWindow(self):
        from RadiomicGANLib.mrml import set_window

        if self._result is not None and self._windows and self._windows["harmonized"]:
            set_window(self._result.volume, self._windows["harmonized"])

    def onShowFigures(self):
        import qt

        for figure in self.logic.modelFigures(modelFolder(self._parameterNode.modelPath)):
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(figure)))

    def onSimulate(self):
        with slicer.util.tryWithErrorDisplay("Kernel simulation failed.", waitCursor=True):
            source = self.ui.sourceKernelComboBox.currentData  # '': read from the DICOM tag
            node = self.logic.simulateKernel(self._parameterNode.inputVolume, self.ui.kernelComboBox.currentData, source or None)
            slicer.util.setSliceViewerLayers(background=node, fit=True)
            self.ui.statusLabel.text = f"Created {node.GetName()}"


class CohortSection:
    """The panel's Cohort section: input folder, model, output folder, Start/Cancel, progress, the QA table as a
    table node, Open report. Kept apart from the single-volume controls; the work is ``logic.processCohort``."""

    def __init__(self, widget):
        import qt

        self.widget = widget
        uiWidget = slicer.util.loadUI(widget.resourcePath("UI/RadiomicGANHarmonizeCohort.ui"))
        widget.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.job = None
        self._report = None
        self.ui.cohortStartButton.connect("clicked(bool)", self.onStartOrCancel)
        self.ui.cohortReportButton.connect("clicked(bool)", self.onOpenReport)
        self.timer = qt.QTimer()
        self.timer.setInterval(500)
        self.timer.connect("timeout()", self.onPoll)

    def cleanup(self):
        self.timer.stop()
        if self.job is not None and self.job.running:  # never leave a process behind when Slicer closes
            self.job.cancel()
            try:
                self.job.wait(timeout=self.job.grace_s + 5)
            except TimeoutError:
                pass

    def onStartOrCancel(self):
        if self.job is not None and self.job.running:
            self.job.cancel()  # returns at once; onPoll sees the end (a kill after the grace period)
            self.ui.cohortStartButton.enabled = False
            self.ui.cohortStatusLabel.text = "Cancelling (finished scans are kept)..."
            return
        with slicer.util.tryWithErrorDisplay("The cohort run could not start.", waitCursor=True):
            ok, message = self.widget.logic.ensureDependencies()  # an installation that fails shows its error here
            if not ok:
                slicer.util.warningDisplay(message, windowTitle="RadiomicGAN Harmonize")
                return
            self.job = self.widget.logic.processCohort(self.ui.cohortInputPathLineEdit.currentPath,
                                                      self.ui.cohortModelPathLineEdit.currentPath,
                                                      self.ui.cohortOutputPathLineEdit.currentPath, waitForCompletion=False)
        if self.job is None:
            return
        self.ui.cohortStartButton.text = "Cancel"
        self.ui.cohortProgressBar.value = 0
        self.ui.cohortStatusLabel.text = "Listing the series..."
        self.timer.start()

    def onPoll(self):
        status = self.job.poll()
        self.ui.cohortProgressBar.value = int(100 * self.job.progress)
        self.ui.cohortStatusLabel.text = self.job.status_text()
        if status != "running":
            self._finish()

    def _finish(self):
        self.timer.stop()
        job, self.job = self.job, None
        self.ui.cohortStartButton.text, self.ui.cohortStartButton.enabled = "Start", True
        self.ui.cohortStatusLabel.text = job.status_text()
        if job.status == "completed":
            node = self.widget.logic.cohortTable(job, self.ui.cohortTableSelector.currentNode())
            self.ui.cohortTableSelector.setCurrentNode(node)
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(node.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
            self.ui.cohortProgressBar.value = 100
        elif job.status == "failed":
            slicer.util.errorDisplay(f"The cohort run failed:\n{job.error}", windowTitle="RadiomicGAN Harmonize")
        self.ui.cohortReportButton.enabled = job.report.is_file()
        self._report = job.report

    def onOpenReport(self):
        import qt

        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self._report)))


def ensureDependencies(layout=None, needRadiomics=False):
    """Ask once and install what is missing (torch through the PyTorch extension, the rest with pip); shared by
    the RadiomicGAN modules. Returns True when everything is there; otherwise tells the user why not."""
    from RadiomicGANLib.dependencies import ensure_in_slicer

    ok, message = ensure_in_slicer(need_radiomics=needRadiomics)
    if not ok and message:
        slicer.util.warningDisplay(message, windowTitle="RadiomicGAN")
    return ok


class RadiomicGANHarmonizeLogic(ScriptedLoadableModuleLogic):
    """Usable from the Python console::

        logic = slicer.util.getModuleLogic("RadiomicGANHarmonize")  # or RadiomicGANHarmonizeLogic()
        output, cam, windows = logic.process(getNode("CT"), "/models/rgan")          # waits; new nodes
        job = logic.process(getNode("CT"), "/models/rgan", waitForCompletion=False)  # returns at once
        job.poll(); job.progress; job.cancel()                                        # or job.wait()
        sharp = logic.simulateKernel(getNode("CT"), "B70")
        job = logic.processCohort("/data/study", "/models/rgan", "/data/out", waitForCompletion=False)  # a whole folder
    """

    def getParameterNode(self):
        return RadiomicGANHarmonizeParameterNode(super().getParameterNode())

    @staticmethod
    def ensureDependencies(needRadiomics=False):
        from RadiomicGANLib.dependencies import ensure_in_slicer

        return ensure_in_slicer(need_radiomics=needRadiomics)

    def process(self, inputNode, modelPath, device="auto", batch=None, gradcam=None, thFail=0.5, outputNode=None,
                waitForCompletion=True, onOutput=None, scene=None):
        """Harmonize ``inputNode`` with the model folder in a background process (PythonSlicer running the core).

        ``gradcam`` None: on when the model has a discriminator. ``waitForCompletion``: return the result
        (volume, gradcam, gradcam_input, windows, warnings; unpacks as ``output, cam, windows``) or raise
        RuntimeError with the core's message; otherwise return the running ``HarmonizeJob`` (``poll()``,
        ``cancel()``, ``wait()``, ``result``).
        """
        from RadiomicGANLib.harmonization import HarmonizeJob
        from RadiomicGANLib.process import JobStatus

        job = HarmonizeJob(scene or slicer.mrmlScene, inputNode, str(modelPath), device=device, batch=batch, gradcam=gradcam,
                           th_fail=thFail, output_node=outputNode, on_output=onOutput, kernel=self.dicomKernel(inputNode))
        if not waitForCompletion:
            return job
        with slicer.util.WaitCursor():
            status = job.wait()
        if status is not JobStatus.COMPLETED:
            raise RuntimeError(job.error or f"harmonization {status.value}")
        return job.result

    def processCohort(self, folder, model, outFolder, waitForCompletion=True, device="auto", rois="none", workers=None,
                      params=None, tableNode=None, onOutput=None, scene=None):
        """Harmonize and measure every CT series under ``folder`` (or listed in a CSV) into ``outFolder`` with the
        core's ``radiomicgan cohort`` in a background process; a rerun on the same output resumes.

        ``waitForCompletion``: wait, put the QA rows into a table node (``tableNode`` or a new one) and return the
        finished ``CohortJob`` (``job.rows``, ``job.failed``, ``job.report``, ``job.tableNode``), or raise RuntimeError
        with the core's message; otherwise return the running job at once (``poll()``, ``progress``, ``status_text()``,
        ``cancel()``, ``wait()``; then ``logic.cohortTable(job)``)."""
        from RadiomicGANLib.cohort import CohortJob

        for value, what in ((folder, "an input folder or CSV"), (model, "a model folder"), (outFolder, "an output folder")):
            if not value or not str(value).strip():
                raise ValueError(f"Select {what}.")
        job = CohortJob(folder, model, outFolder, device=device, rois=rois, workers=workers, params=params, on_output=onOutput)
        if not waitForCompletion:
            return job
        with slicer.util.WaitCursor():
            status = job.wait()
        if status != "completed":
            raise RuntimeError(job.error or f"cohort run {status}")
        self.cohortTable(job, tableNode, scene)
        return job

    @staticmethod
    def cohortTable(job, tableNode=None, scene=None):
        """The finished job's QA rows in a table node (refilled when given); also kept as ``job.tableNode``."""
        from RadiomicGANLib.cohort import qa_table_node

        job.tableNode = qa_table_node(scene or slicer.mrmlScene, job.rows, "Cohort QA", tableNode)
        return job.tableNode

    @staticmethod
    def dicomKernel(node):
        """ConvolutionKernel of a volume loaded from DICOM (Slicer keeps its instance UIDs), else None."""
        uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split() if node is not None else []
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None:
            return None
        try:
            value = database.fileValue(database.fileForInstance(uids[0]), "0018,1210")
        except Exception:  # a moved or closed database: the core then says the tag is missing
            return None
        return value.strip() or None

    @staticmethod
    def modelCard(modelPath):
        """(card, None) or (None, reason)."""
        from RadiomicGANLib.harmonization import read_model_card

        try:
            return read_model_card(modelPath), None
        except ValueError as exc:
            return None, str(exc)

    @staticmethod
    def describeModel(card):
        from RadiomicGANLib.harmonization import describe_model

        return describe_model(card)

    @staticmethod
    def supportsGradcam(card):
        from RadiomicGANLib.harmonization import supports_gradcam

        return supports_gradcam(card)

    @staticmethod
    def modelFigures(modelPath):
        from RadiomicGANLib.harmonization import model_figures

        return model_figures(modelPath) if modelPath else []

    def inputProblem(self, inputNode, modelPath, outputNode=None) -> Optional[str]:
        """Why Apply is disabled, or None."""
        if inputNode is None or inputNode.GetImageData() is None:
            return "Select an input CT volume."
        card, reason = self.modelCard(modelPath)
        if card is None:
            return reason
        if outputNode is not None and outputNode.GetID() == inputNode.GetID():
            return "The output volume must not be the input volume."
        return None

    @staticmethod
    def summary(result):
        text = f"Created {result.volume.GetName()}"
        if result.windows:
            before = result.windows["input"]["standard_probability"]
            after = result.windows["harmonized"]["standard_probability"]
            text += f"; discriminator 'standard' probability {before:.2f} -> {after:.2f}"
        return text

    def simulateKernel(self, inputNode, kernel, sourceKernel=None, seed=0, scene=None):
        from RadiomicGANLib.mrml import simulate_kernel_node

        return simulate_kernel_node(scene or slicer.mrmlScene, inputNode, kernel, sourceKernel, seed)


class RadiomicGANHarmonizeTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Developer mode: Reload and Test). Harmonizes a small phantom with a tiny model trained
    here, in the background process, and cancels a second run."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_simulate_kernel_on_phantom()
        self.setUp()
        self.test_harmonize_phantom_in_background()

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

    def test_harmonize_phantom_in_background(self):
        import numpy as np
        from radiomicgan.simulate import phantom_pair, simulate_phantom_pairs
        from RadiomicGANLib.mrml import add_volume_node
        from RadiomicGANLib.process import BackgroundProcess, core_command

        logic = RadiomicGANHarmonizeLogic()
        ok, message = logic.ensureDependencies()  # installs nothing in testing mode
        if not ok:
            self.delayDisplay(f"Harmonization test skipped: {message}")
            return
        folder = pathlib.Path(slicer.util.tempDirectory())
        simulate_phantom_pairs(folder / "pairs", cases=2, size=32, slices=2, seed=1)
        train = BackgroundProcess(core_command(
            "train", "--pairs", str(folder / "pairs"), "--out", str(folder / "model"), "--epochs", "1",
            "--steps-per-epoch", "2", "--batch", "2", "--crop", "32", "--vgg-weights", "random", "--val-slices", "1",
            "--device", "cpu")).start()
        self.assertEqual(train.wait(600), 0, "\n".join(train.lines[-5:]))

        source, _, _ = phantom_pair(size=32, slices=2, seed=4)
        node = add_volume_node(slicer.mrmlScene, source, "phantom")
        before = slicer.util.arrayFromVolume(node).copy()
        output, cam, windows = logic.process(node, folder / "model", device="cpu", thFail=0.5)
        self.assertEqual(output.GetName(), "phantom_harmonized")
        self.assertTrue((slicer.util.arrayFromVolume(node) == before).all())
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(a)
        output.GetIJKToRASMatrix(b)
        self.assertTrue(np.allclose([a.GetElement(r, c) for r in range(4) for c in range(4)],
                                    [b.GetElement(r, c) for r in range(4) for c in range(4)]))
        self.assertIsNotNone(cam)
        self.assertIn("harmonized", windows)

        count = slicer.mrmlScene.GetNumberOfNodes()
        job = logic.process(node, folder / "model", device="cpu", waitForCompletion=False)
        job.cancel()
        self.assertEqual(job.wait(60), "cancelled")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Background harmonization test passed")
