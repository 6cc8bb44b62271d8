"""RadiomicGAN Train: Dynamic Window-based Training with live plots, and the ROI radiomics comparison (CCC).

Thin layer over ``RadiomicGANLib`` (MRML, no qt) and the ``radiomicgan`` core. Training and the comparison run
as the core's command line in a background process; the panel polls it with a timer and never computes.
"""

import pathlib
import sys
import tempfile
from typing import Annotated

import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
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

PLOTS = {"losses": "Losses per epoch", "psnr": "Validation PSNR", "window": "Training window (Fig. 5a)",
         "steps": "Losses per step"}
POLL_MS = 500


class RadiomicGANTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "RadiomicGAN Train"
        self.parent.categories = ["Filtering"]
        self.parent.dependencies = []
        self.parent.contributors = ["RadiomicGAN developers"]
        self.parent.helpText = (
            "Train RadiomicGAN (Dynamic Window-based Training) or a baseline on paired CT data, with live plots of the "
            "losses, the validation PSNR and the training window per epoch; compare radiomic features of volumes on ROIs "
            "(segments, ROI boxes, a label map or automatic HU ranges): Lin's CCC, reproducible feature counts, PSNR/SSIM "
            "and an HTML report. Both run in a background process."
        )
        self.parent.acknowledgementText = "Method: M. Selim et al., CT Image Harmonization for Enhancing Radiomics Studies."


def _withTrainingSettings(cls):
    """Adds the training settings to the panel's parameters, from the core's one list (``radiomicgan.settings``,
    via ``RadiomicGANLib.training.panel_parameters``): names, types, defaults, ranges and choices."""
    from RadiomicGANLib.training import panel_parameters

    for name, kind, default, bounds in panel_parameters():
        if kind is str and bounds:
            cls.__annotations__[name] = Annotated[str, Choice(list(bounds))]
        elif kind in (int, float):
            cls.__annotations__[name] = Annotated[kind, WithinRange(*bounds)]
        else:
            cls.__annotations__[name] = kind  # the device: its list depends on the computer, kept in sync by the widget
        setattr(cls, name, default)
    return cls


class RadiomicGANTrainParameterNode:
    # training: the pairs and the model folder here; the settings (method, epochs, th_acc, ...) added by _withTrainingSettings
    useLoadedVolumes: bool = False
    pairsManifest: pathlib.Path
    sourceVolume: vtkMRMLScalarVolumeNode
    targetVolume: vtkMRMLScalarVolumeNode
    modelFolder: pathlib.Path
    # comparison
    referenceVolume: vtkMRMLScalarVolumeNode
    candidateVolumes: list[vtkMRMLScalarVolumeNode]  # a checkable combo box: kept in sync by the widget
    segmentation: vtkMRMLSegmentationNode
    roiBoxes: list[vtkMRMLMarkupsROINode]  # idem
    labelMap: vtkMRMLLabelMapVolumeNode
    perRange: Annotated[int, WithinRange(3, 1000)] = 20
    reportFolder: pathlib.Path


RadiomicGANTrainParameterNode = parameterNodeWrapper(_withTrainingSettings(RadiomicGANTrainParameterNode))


def _method(name):
    """What a method needs (``radiomicgan.methods``): the schedule box is only for methods trained with windows."""
    from radiomicgan.methods import REGISTRY

    return REGISTRY[name]


def _ensureDependencies(needRadiomics=False):
    """Check (and, after asking once, install) what the core needs, at Start/Compare; nothing in testing mode."""
    from RadiomicGANLib.dependencies import ensure_in_slicer

    ok, message = ensure_in_slicer(need_radiomics=needRadiomics)
    if not ok:
        raise RuntimeError(message or "RadiomicGAN's Python packages are missing")


def _cudaDevices():
    try:
        import torch
    except ImportError:
        return []
    return [f"cuda:{k}" for k in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


class RadiomicGANTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Takes its logic in the constructor (a test can pass its own) and only reads and writes the
    parameter node, starts and polls background runs, and shows their nodes."""

    def __init__(self, parent=None, logic=None):
        VTKObservationMixin.__init__(self)  # without a parent, the base class calls setup() itself: set all first
        self.logic = logic
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.training = None
        self.comparison = None
        self.timer = None
        self._camNodes = []
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self):
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RadiomicGANTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.logic or RadiomicGANTrainLogic()

        self.ui.deviceComboBox.addItems(["auto", "cpu"] + _cudaDevices())
        for key, text in PLOTS.items():
            self.ui.plotComboBox.addItem(text, key)
        from radiomicgan.kernels import PRESETS

        for name, preset in PRESETS.items():
            self.ui.sourceKernelComboBox.addItem(f"{name}: {preset.description}", name)
            self.ui.targetKernelComboBox.addItem(f"{name}: {preset.description}", name)
        self.ui.sourceKernelComboBox.currentIndex = list(PRESETS).index("B30")
        self.ui.targetKernelComboBox.currentIndex = list(PRESETS).index("B50")

        self.ui.startButton.connect("clicked(bool)", lambda: self.onStartTraining(resume=False))
        self.ui.resumeButton.connect("clicked(bool)", lambda: self.onStartTraining(resume=True))
        self.ui.cancelTrainingButton.connect("clicked(bool)", self.onCancelTraining)
        self.ui.plotComboBox.connect("currentIndexChanged(int)", self.showPlot)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.candidatesSelector.connect("checkedNodesChanged()", self.onCandidatesChanged)
        self.ui.roiBoxesSelector.connect("checkedNodesChanged()", self.onRoiBoxesChanged)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.cancelCompareButton.connect("clicked(bool)", self.onCancelCompare)
        self.ui.openReportButton.connect("clicked(bool)", self.onOpenReport)
        self.ui.makePairsButton.connect("clicked(bool)", self.onMakePairs)
        self.ui.showCamSamplesButton.connect("clicked(bool)", self.onShowCamSamples)

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.layout.addStretch(1)

    # ------------------------------------------------------------------------------------- parameter node

    def cleanup(self):
        """Slicer is closing: no background run may outlive it (a training keeps its last complete epoch)."""
        self.removeObservers()
        if self.timer is not None:
            self.timer.stop()
        for job in (self.training, self.comparison):
            if job is not None and job.running:
                job.grace_s = min(job.grace_s, 10.0)
                job.cancel()
                try:
                    job.wait(job.grace_s + 5)  # killed after the grace period
                except TimeoutError:
                    pass

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if getattr(self.parent, "isEntered", True):  # a widget made without a module panel has no isEntered
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.referenceVolume:
            self._parameterNode.referenceVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self._writeUnboundWidgets()
            self.updateButtons()

    def _writeUnboundWidgets(self):
        """The widgets the wrapper has no connector for: device list, checkable node lists."""
        p = self._parameterNode
        index = self.ui.deviceComboBox.findText(p.device)
        self.ui.deviceComboBox.currentIndex = index if index >= 0 else 0
        for selector, nodes in ((self.ui.candidatesSelector, p.candidateVolumes), (self.ui.roiBoxesSelector, p.roiBoxes)):
            wanted = {n.GetID() for n in nodes if n is not None}
            wasBlocked = selector.blockSignals(True)
            for k in range(selector.nodeCount()):
                node = selector.nodeFromIndex(k)
                selector.check(node) if node.GetID() in wanted else selector.uncheck(node)
            selector.blockSignals(wasBlocked)

    def onDeviceChanged(self, index):
        if self._parameterNode:
            self._parameterNode.device = self.ui.deviceComboBox.currentText

    def onCandidatesChanged(self):
        if self._parameterNode:
            self._parameterNode.candidateVolumes = list(self.ui.candidatesSelector.checkedNodes())

    def onRoiBoxesChanged(self):
        if self._parameterNode:
            self._parameterNode.roiBoxes = list(self.ui.roiBoxesSelector.checkedNodes())

    def updateButtons(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        training = self.training is not None and self.training.running
        pairsReady = (p.sourceVolume and p.targetVolume and p.sourceVolume != p.targetVolume) if p.useLoadedVolumes \
            else str(p.pairsManifest) not in ("", ".")
        folderReady = str(p.modelFolder) not in ("", ".")
        self.ui.pairsPathLineEdit.enabled = not p.useLoadedVolumes
        self.ui.sourceVolumeSelector.enabled = self.ui.targetVolumeSelector.enabled = p.useLoadedVolumes
        self.ui.startButton.enabled = bool(pairsReady and folderReady and not training)
        self.ui.resumeButton.enabled = bool(pairsReady and folderReady and not training)
        self.ui.cancelTrainingButton.enabled = training
        self.ui.scheduleComboBox.enabled = _method(p.method).windows
        comparing = self.comparison is not None and self.comparison.running
        candidates = [n for n in p.candidateVolumes if n and n != p.referenceVolume]
        self.ui.compareButton.enabled = bool(p.referenceVolume and candidates and str(p.reportFolder) not in ("", ".")
                                             and not comparing)
        self.ui.cancelCompareButton.enabled = comparing

    # ------------------------------------------------------------------------------------- training

    def onStartTraining(self, resume=False):
        with slicer.util.tryWithErrorDisplay("Could not start the training.", waitCursor=True):
            _ensureDependencies()
            p = self._parameterNode
            from RadiomicGANLib.training import panel_parameters

            settings = {name: getattr(p, name) for name, *_ in panel_parameters()}  # every training field of the panel
            if not _method(p.method).windows:
                settings["schedule"] = None  # the method's own (none)
            self.training = self.logic.train(
                pairs=None if p.useLoadedVolumes else p.pairsManifest, modelFolder=p.modelFolder,
                sourceNode=p.sourceVolume if p.useLoadedVolumes else None, targetNode=p.targetVolume if p.useLoadedVolumes else None,
                resume=resume, waitForCompletion=False, **settings)
            self.ui.trainingProgressBar.maximum = p.epochs
            self.ui.trainingProgressBar.value = 0
            self.ui.camImageLabel.clear()
            self.ui.showCamSamplesButton.enabled = False
            self.ui.trainingStatusLabel.text = "Training started in the background (" + ("resumed" if resume else "new run") + ")"
            self.showPlot()
            self.timer.start()
            self.updateButtons()

    def onCancelTraining(self):
        if self.training is not None:
            self.training.cancel()  # returns at once; killed by a later poll if it has not stopped after 60 s
            self.ui.trainingStatusLabel.text = "Stopping after the current step; the last complete epoch is kept"

    def showPlot(self, index=None):
        if self.training is None or self.training.plots is None:
            return
        key = self.ui.plotComboBox.currentData or "losses"
        chart = self.training.plots.charts[key]
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    def onPoll(self):
        if self.training is not None and self.training.running:
            self._pollTraining()
        if self.comparison is not None and self.comparison.running:
            self._pollComparison()
        if not ((self.training is not None and self.training.running) or (self.comparison is not None and self.comparison.running)):
            self.timer.stop()
        self.updateButtons()

    def _pollTraining(self):
        from RadiomicGANLib.process import JobStatus

        run = self.training
        try:
            status = run.poll()
        except Exception as exc:  # a broken log must not leave the timer firing errors
            run.cancel()
            self.ui.trainingStatusLabel.text = f"Training stopping: {exc}"
            return
        epochs = run.plots.epochs.GetNumberOfRows() if run.plots is not None else 0
        progress = run.progress or {}
        self.ui.trainingProgressBar.value = int(progress.get("done", epochs))
        if epochs and status is JobStatus.RUNNING and not run.cancelled:
            self.ui.trainingStatusLabel.text = f"Epoch {epochs} of {self._parameterNode.epochs} done"
        if run.cam_samples_changed():  # shown on request (the button), never in place of the user's views
            self.ui.showCamSamplesButton.enabled = True
        if status is JobStatus.RUNNING:
            return
        self._showCamPlot(run.folder)  # drawn when the training ends
        if run.warnings:
            slicer.util.warningDisplay("\n".join(run.warnings), windowTitle="RadiomicGAN training")
        if status is JobStatus.COMPLETED:
            self.ui.trainingStatusLabel.text = f"Training completed: {run.folder}"
        elif status is JobStatus.CANCELLED:
            self.ui.trainingStatusLabel.text = f"Training stopped; {run.folder} holds the last complete epoch, if any"
        else:
            message = "\n".join(run.errors) or "\n".join(run.process.lines[-15:])
            self.ui.trainingStatusLabel.text = "Training failed"
            slicer.util.errorDisplay(f"Training failed (exit status {run.exit_code}).", detailedText=message)

    def _showCamPlot(self, folder):
        import qt
        from radiomicgan.jobs import CAM_PLOT

        png = pathlib.Path(folder) / CAM_PLOT
        if png.is_file():
            pixmap = qt.QPixmap(str(png))
            self.ui.camImageLabel.setPixmap(pixmap.scaledToWidth(min(pixmap.width(), 420)))

    def onShowCamSamples(self):
        """The latest Grad-CAM samples as two volume nodes in the slice views, when the user asks for them."""
        if self.training is not None:
            self._showCamSamples(self.training.folder)

    def _showCamSamples(self, folder):
        for node in self._camNodes:  # the previous epoch's samples make way for this one's
            if node.GetScene() is not None:
                slicer.mrmlScene.RemoveNode(node)
        try:
            nodes = self.logic.loadCamSamples(folder)
        except (OSError, ValueError, KeyError) as exc:
            self.ui.trainingStatusLabel.text = f"Could not read the Grad-CAM samples: {exc}"
            return
        self._camNodes = list(nodes or [])
        if nodes is not None:
            image, cam = nodes
            slicer.util.setSliceViewerLayers(background=image, foreground=cam, foregroundOpacity=0.4, fit=True)

    # ------------------------------------------------------------------------------------- comparison

    def onCompare(self):
        with slicer.util.tryWithErrorDisplay("Could not start the radiomics comparison.", waitCursor=True):
            _ensureDependencies(needRadiomics=True)
            p = self._parameterNode
            self.comparison = self.logic.compare(
                p.referenceVolume, list(p.candidateVolumes), p.reportFolder, segmentationNode=p.segmentation,
                roiNodes=list(p.roiBoxes), labelMapNode=p.labelMap, perRange=p.perRange, waitForCompletion=False)
            self.ui.openReportButton.enabled = False
            self.ui.compareProgressBar.value = 0
            self.ui.compareStatusLabel.text = self.comparison.status_text()
            self.timer.start()
            self.updateButtons()

    def onCancelCompare(self):
        if self.comparison is not None:
            self.comparison.cancel()  # returns at once; onPoll sees the end
            self.ui.compareStatusLabel.text = "Cancelling the comparison..."
            self.updateButtons()

    def _pollComparison(self):
        from RadiomicGANLib.process import JobStatus

        run = self.comparison
        status = run.poll()
        self.ui.compareProgressBar.value = int(round(100 * run.progress))
        if status is JobStatus.RUNNING:
            if not run.cancelled:
                self.ui.compareStatusLabel.text = run.status_text()
            return
        if status is JobStatus.CANCELLED:
            self.ui.compareStatusLabel.text = "Comparison cancelled; no report written"
            return
        if status is JobStatus.FAILED:
            message = "\n".join(run.errors) or "\n".join(run.process.lines[-15:])
            self.ui.compareStatusLabel.text = "Comparison failed"
            slicer.util.errorDisplay(f"Radiomics comparison failed (exit status {run.exit_code}).", detailedText=message)
            return
        results = run.results
        skipped = [f"{g}: {e.get('too_small') or e.get('skipped')}" for g, e in results.summary["groups"].items()
                   if "too_small" in e or "skipped" in e]
        self.ui.compareStatusLabel.text = (f"{results.summary['features']} features on {results.summary['rois']} ROIs; report in "
                                           f"{results.report_folder}" + ("\nSkipped " + "; ".join(skipped) if skipped else "")
                                           + "".join(f"\nNote: {w}" for w in run.warnings))
        self.ui.openReportButton.enabled = True
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(results.summary_table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        slicer.modules.plots.logic().ShowChartInLayout(results.counts_chart)

    def onOpenReport(self):
        import qt

        if self.comparison is not None and self.comparison.results is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self.comparison.results.report)))

    # ------------------------------------------------------------------------------------- phantom pairs

    def onMakePairs(self):
        with slicer.util.tryWithErrorDisplay("Could not make phantom pairs.", waitCursor=True):
            cases = self.ui.casesSpinBox.value
            progress = slicer.util.createProgressDialog(maximum=cases, labelText="Simulating phantom pairs")

            def report(done, total):
                progress.value = done
                slicer.app.processEvents()
                if progress.wasCanceled:
                    raise KeyboardInterrupt

            try:
                manifest = self.logic.makePhantomPairs(
                    self.ui.outputPathLineEdit.currentPath, cases, self.ui.sizeSpinBox.value, self.ui.slicesSpinBox.value,
                    self.ui.sourceKernelComboBox.currentData, self.ui.targetKernelComboBox.currentData, progress=report,
                )
                self.ui.statusLabel.text = f"Wrote {manifest}"
                if self._parameterNode:
                    self._parameterNode.pairsManifest = pathlib.Path(manifest)
            except KeyboardInterrupt:
                self.ui.statusLabel.text = "Cancelled; nothing written"
            finally:
                progress.close()


class RadiomicGANTrainLogic(ScriptedLoadableModuleLogic):
    """Usable from the Python console::

        logic = slicer.util.getModuleLogic("RadiomicGANTrain")   # or RadiomicGANTrain.RadiomicGANTrainLogic()
        plots = logic.train(pairs="/data/pairs/manifest.json", modelFolder="/data/model", epochs=30)
        run = logic.train(sourceNode=getNode("B30"), targetNode=getNode("B50"), modelFolder="/data/m2",
                          waitForCompletion=False)   # run.poll(), run.cancel(), run.wait(), run.plots
        results = logic.compare(getNode("B50"), [getNode("B30"), getNode("B30_harmonized")], "/data/report",
                                segmentationNode=getNode("Segmentation"))
        results.summary_table, results.ccc_tables, results.counts_chart, results.report
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return RadiomicGANTrainParameterNode(super().getParameterNode())

    def train(self, pairs=None, modelFolder=None, *, sourceNode=None, targetNode=None, sourceKernel=None, targetKernel=None,
              resume=False, waitForCompletion=True, timeout=None, scene=None, onOutput=None, **settings):
        """Train from a pairs manifest, or from two loaded volumes of one scan (written to a temporary pairs set).
        ``settings``: any training setting of the core (``radiomicgan.settings``) by its panel or camelCase name
        (``method``, ``epochs``, ``stepsPerEpoch``, ``thAcc``, ``learningRate``, ``crop``, ``vggWeights``, ...); one
        left out keeps the core's default; ``learningRate`` None (or 0): the method's (4e-4 RadiomicGAN, 1e-4 Choe).

        ``waitForCompletion=True``: blocks and returns the ``TrainingPlots`` (table and chart nodes of the log;
        ``.status`` says completed or cancelled); raises RuntimeError when the training failed.
        ``False``: returns the running ``TrainingRun`` (``poll()``, ``cancel()``, ``wait()``, ``.plots``)."""
        from RadiomicGANLib.process import JobStatus
        from RadiomicGANLib.training import TrainingRun, TrainingSettings, settings_from_slicer_names, write_pairs_from_nodes

        if modelFolder in (None, "") or str(modelFolder) == ".":
            raise ValueError("choose an output model folder")
        if pairs in (None, "") or str(pairs) == ".":
            if sourceNode is None or targetNode is None:
                raise ValueError("give a pairs manifest, or a non-standard and a standard kernel volume")
            work = tempfile.mkdtemp(prefix="RadiomicGAN-pairs-", dir=slicer.app.temporaryPath)
            pairs = write_pairs_from_nodes(sourceNode, targetNode, work, sourceKernel, targetKernel)
        training = TrainingSettings(**settings_from_slicer_names(**settings))
        run = TrainingRun(pairs, modelFolder, training, resume=resume, scene=scene or slicer.mrmlScene, on_output=onOutput).start()
        if not waitForCompletion:
            return run
        if run.wait(timeout=timeout) is JobStatus.FAILED:  # cancelled: the last complete epoch kept
            raise RuntimeError("training failed: " + ("\n".join(run.errors) or "\n".join(run.process.lines[-15:])))
        return run.plots

    def compare(self, referenceNode, candidateNodes, reportFolder, *, segmentationNode=None, segmentIds=None, roiNodes=(),
                labelMapNode=None, huRanges=None, perRange=20, params=None, workers=None, threshold=0.85, bootstrap=100,
                waitForCompletion=True, timeout=None, scene=None, onOutput=None):
        """The ROI radiomics comparison in one background process (pyradiomics never runs in Slicer's process).

        ROIs: the segments, the markups ROI boxes and the label map given (each an ROI group); none given: random
        ROIs in ``huRanges`` (default the paper's). ``waitForCompletion=True`` returns ``ComparisonResults`` (a CCC
        table per candidate, the summary table, the counts plot, the report path); ``False`` the running
        ``ComparisonRun`` (``poll()``, ``cancel()``, ``wait()``, ``.results``)."""
        from RadiomicGANLib.comparison import ComparisonRun
        from RadiomicGANLib.process import JobStatus

        run = ComparisonRun(scene or slicer.mrmlScene, referenceNode, candidateNodes, reportFolder,
                            segmentation_node=segmentationNode, segment_ids=segmentIds, roi_nodes=roiNodes or (),
                            label_node=labelMapNode, hu_ranges=huRanges, per_range=perRange, params=params, workers=workers,
                            threshold=threshold, bootstrap=bootstrap, on_output=onOutput).start()
        if not waitForCompletion:
            return run
        if run.wait(timeout=timeout) is not JobStatus.COMPLETED:
            raise RuntimeError(f"comparison {run.status.value}: " + ("\n".join(run.errors) or "\n".join(run.process.lines[-15:])))
        return run.results

    def loadCamSamples(self, modelFolder, scene=None):
        """The Grad-CAM samples of a model folder as (synthesized, map) volume nodes, or None."""
        from RadiomicGANLib.plots import load_cam_samples

        return load_cam_samples(scene or slicer.mrmlScene, modelFolder)

    def makePhantomPairs(self, outDir, cases=4, size=256, slices=16, sourceKernel="B30", targetKernel="B50", seed=0, progress=None):
        from radiomicgan.simulate import simulate_phantom_pairs

        return simulate_phantom_pairs(outDir, cases, size=size, slices=slices, seed=seed,
                                      source_kernel=sourceKernel, target_kernel=targetKernel, progress=progress)


class RadiomicGANTrainTest(ScriptedLoadableModuleTest):
    """End to end inside Slicer on a small phantom: a 1-epoch training and a comparison on segments."""

    def setUp(self):
        slicer.mrmlScene.Clear()
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="RadiomicGANTrainTest-", dir=slicer.app.temporaryPath))

    def runTest(self):
        self.setUp()
        self.test_make_phantom_pairs()
        self.setUp()
        self.test_training_one_epoch()
        self.setUp()
        self.test_comparison_on_segments()

    def test_make_phantom_pairs(self):
        from radiomicgan.dataset import load_manifest

        manifest = load_manifest(RadiomicGANTrainLogic().makePhantomPairs(self.tmp / "pairs", cases=1, size=32, slices=1))
        self.assertEqual(len(manifest.pairs), 1)
        self.delayDisplay("Phantom pair test passed")

    def dependenciesMissing(self, needRadiomics=False):
        """Why the test cannot run here (testing mode installs nothing: a fresh Slicer has no torch), or None."""
        from RadiomicGANLib.dependencies import ensure_in_slicer

        ok, message = ensure_in_slicer(need_radiomics=needRadiomics)
        return None if ok else message

    def test_training_one_epoch(self):
        import json

        missing = self.dependenciesMissing()
        if missing:
            self.delayDisplay(f"1-epoch training test skipped: {missing}")
            return
        logic = RadiomicGANTrainLogic()
        manifest = logic.makePhantomPairs(self.tmp / "pairs", cases=1, size=32, slices=2)
        plots = logic.train(pairs=manifest, modelFolder=self.tmp / "model", epochs=1, stepsPerEpoch=2, batch=1, crop=32,
                            schedule="none", vggWeights="random", device="cpu", valSlices=1, timeout=600)
        self.assertEqual(plots.status, "completed")
        self.assertEqual(plots.epochs.GetNumberOfRows(), 1)
        card = json.loads((self.tmp / "model" / "model.json").read_text())
        self.assertEqual(card["training"]["epochs_done"], 1)
        self.assertAlmostEqual(plots.epochs.GetTable().GetColumnByName("val_psnr_db").GetValue(0), card["validation"]["psnr_db"], 6)
        self.assertEqual(plots.charts["window"].GetNumberOfPlotSeriesNodes(), 2)
        self.delayDisplay("1-epoch training test passed")

    def test_comparison_on_segments(self):
        import numpy as np
        from radiomicgan.simulate import phantom_pair
        from RadiomicGANLib.mrml import add_volume_node

        missing = self.dependenciesMissing(needRadiomics=True)
        if missing:
            self.delayDisplay(f"Comparison test skipped: {missing}")
            return
        source, target, _ = phantom_pair(size=48, slices=3, seed=2)
        reference = add_volume_node(slicer.mrmlScene, target, "B50")
        candidate = add_volume_node(slicer.mrmlScene, source, "B30")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ROIs")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        for k in range(10):  # a count needs at least 10 ROIs in a group
            y, x = 2 + 12 * (k // 4), 2 + 12 * (k % 4)
            mask = np.zeros(target.shape, np.uint8)
            mask[:, y:y + 8, x:x + 8] = 1
            segmentId = segmentation.GetSegmentation().AddEmptySegment(f"roi{k}")
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segmentId, reference)
        params = self.tmp / "fast.yaml"
        params.write_text("setting: {binWidth: 25, label: 1}\nimageType: {Original: {}}\nfeatureClass: {firstorder: }\n")
        results = RadiomicGANTrainLogic().compare(reference, [candidate], self.tmp / "report", segmentationNode=segmentation,
                                                  params=params, workers=1, bootstrap=10, timeout=600)
        self.assertEqual(results.summary["groups"]["segments"]["rois"], 10)
        self.assertEqual(results.summary_table.GetNumberOfRows(), 1)
        self.assertEqual(results.ccc_tables["B30"].GetNumberOfRows(), results.summary["features"])
        self.assertTrue(results.report.is_file())
        self.delayDisplay("Comparison on segments test passed")
