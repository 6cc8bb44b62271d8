"""RadiomicGAN Train: paired training data, Dynamic Window-based Training and reproducibility reports.

Thin layer over the ``radiomicgan`` core. This version makes phantom training pairs (the embedded default
data set); training and CCC reports follow.
"""

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class RadiomicGANTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "RadiomicGAN Train"
        self.parent.categories = ["Filtering"]
        self.parent.dependencies = []
        self.parent.contributors = ["RadiomicGAN developers"]
        self.parent.helpText = (
            "Make paired CT data (one scan, two reconstruction kernels) from a procedural chest phantom with "
            "calibrated kernel presets, and compare radiomic features of volumes on ROIs of a label map (Lin's "
            "CCC, reproducible feature counts, PSNR/SSIM). Training runs from the command line (radiomicgan train)."
        )
        self.parent.acknowledgementText = "Method: M. Selim et al., CT Image Harmonization for Enhancing Radiomics Studies."


class RadiomicGANTrainWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from RadiomicGANHarmonize import ensureDependencies

        if not ensureDependencies(self.layout):
            return
        from radiomicgan.kernels import PRESETS

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RadiomicGANTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RadiomicGANTrainLogic()
        for name, preset in PRESETS.items():
            self.ui.sourceKernelComboBox.addItem(f"{name}: {preset.description}", name)
            self.ui.targetKernelComboBox.addItem(f"{name}: {preset.description}", name)
        self.ui.sourceKernelComboBox.currentIndex = list(PRESETS).index("B30")
        self.ui.targetKernelComboBox.currentIndex = list(PRESETS).index("B50")
        self.ui.makePairsButton.connect("clicked(bool)", self.onMakePairs)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.layout.addStretch(1)

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
            except KeyboardInterrupt:
                self.ui.statusLabel.text = "Cancelled; nothing written"
            finally:
                progress.close()


    def onCompare(self):
        with slicer.util.tryWithErrorDisplay("Radiomics comparison failed.", waitCursor=True):
            candidates = {n.GetName(): n for n in (self.ui.candidateASelector.currentNode(), self.ui.candidateBSelector.currentNode()) if n}
            table = self.logic.compareRadiomics(self.ui.referenceSelector.currentNode(), candidates, self.ui.roiSelector.currentNode())
            layoutManager = slicer.app.layoutManager()
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
            self.ui.statusLabel.text = f"Created {table.GetName()}"


class RadiomicGANTrainLogic(ScriptedLoadableModuleLogic):
    """Usable from the Python console::

        logic = RadiomicGANTrainLogic()
        logic.makePhantomPairs("/data/pairs", cases=4)
        table = logic.compareRadiomics(getNode("B50"), {"B30": getNode("B30"), "harmonized": getNode("H")}, getNode("rois"))
    """

    def compareRadiomics(self, referenceNode, candidateNodes, roiNode, params=None, scene=None):
        from RadiomicGANLib.mrml import compare_radiomics_nodes

        table, _ = compare_radiomics_nodes(scene or slicer.mrmlScene, referenceNode, candidateNodes, roiNode, params=params)
        return table

    def makePhantomPairs(self, outDir, cases=4, size=256, slices=16, sourceKernel="B30", targetKernel="B50", seed=0, progress=None):
        from radiomicgan.simulate import simulate_phantom_pairs

        return simulate_phantom_pairs(outDir, cases, size=size, slices=slices, seed=seed,
                                      source_kernel=sourceKernel, target_kernel=targetKernel, progress=progress)


class RadiomicGANTrainTest(ScriptedLoadableModuleTest):
    def runTest(self):
        self.test_make_phantom_pairs()

    def test_make_phantom_pairs(self):
        import tempfile
        from pathlib import Path

        from radiomicgan.dataset import load_manifest

        out = Path(tempfile.mkdtemp()) / "pairs"
        manifest = load_manifest(RadiomicGANTrainLogic().makePhantomPairs(out, cases=1, size=32, slices=1))
        self.assertEqual(len(manifest.pairs), 1)
        self.delayDisplay("Phantom pair test passed")
