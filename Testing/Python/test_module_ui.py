"""The modules' .ui files loaded with Qt's own reader (PySide6's QUiLoader, offscreen), as ``slicer.util.loadUI``
loads them with Slicer's QUiLoader: a widget Qt's reader drops (two widgets in one layout item, say) is missing
here too. Slicer's and CTK's widget classes are stood in for by classes of the same name deriving from the Qt
class their C++ class derives from, with the properties, methods and signals of theirs that the modules use
(names as in qMRMLWidget.h, qMRMLNodeComboBox.h, qMRMLCheckableNodeComboBox.h, ctkCollapsibleButton.h and
ctkPathLineEdit.h). Every ``self.ui.NAME`` the module code uses must then exist with a fitting type: each
attribute it reads or sets, and each signal it connects, must be one the widget has."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET

import pytest
from helpers import REPO

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6-Essentials is a test requirement (Qt's .ui reader)")
from PySide6 import QtCore  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

MODULES = ("RadiomicGANHarmonize", "RadiomicGANTrain")


# Slicer's and CTK's widget classes -> the Qt class their C++ class derives from, or the nearest one Qt can make
# (ctkCollapsibleButton is a QAbstractButton: a QPushButton here) (qMRMLWidget.h, ctkCollapsibleButton.h,
# ctkPathLineEdit.h, qMRMLNodeComboBox.h, qMRMLCheckableNodeComboBox.h), and the members of theirs the modules use
STAND_INS = {
    "qMRMLWidget": ("QWidget", {"setMRMLScene", "mrmlScene", "mrmlSceneChanged(vtkMRMLScene*)"}),
    "ctkCollapsibleButton": ("QPushButton", {"collapsed", "collapsedHeight", "contentsCollapsed(bool)"}),
    "ctkPathLineEdit": ("QWidget", {"currentPath", "setCurrentPath", "filters", "nameFilters", "showBrowseButton",
                                    "currentPathChanged(QString)", "validInputChanged(bool)"}),
    "qMRMLNodeComboBox": ("QWidget", {"currentNode", "setCurrentNode", "currentNodeID", "setCurrentNodeID",
                                      "setMRMLScene", "mrmlScene", "nodeCount", "nodeFromIndex", "nodeTypes",
                                      "showChildNodeTypes", "addEnabled", "removeEnabled", "noneEnabled",
                                      "currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)"}),
}
STAND_INS["qMRMLCheckableNodeComboBox"] = ("QWidget", STAND_INS["qMRMLNodeComboBox"][1] | {
    "checkedNodes", "check", "uncheck", "checkState", "setCheckState", "checkedNodesChanged()"})


@pytest.fixture(scope="module")
def loader():
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    loader = QUiLoader()
    loader.app, loader.loaded = app, {}
    return loader


def load(loader, path):
    """The widget tree Qt's reader makes of the file, with each Slicer/CTK class read as its Qt base class (the
    original class kept in the dynamic property ``slicerClass``); kept for the module's tests, as Slicer keeps
    a panel."""
    if str(path) in loader.loaded:
        return loader.loaded[str(path)]
    tree = ET.parse(path)
    for widget in tree.iter("widget"):
        if widget.get("class") in STAND_INS:
            original = widget.get("class")
            widget.set("class", STAND_INS[original][0])
            marker = ET.SubElement(widget, "property", name="slicerClass", stdset="0")
            ET.SubElement(marker, "string").text = original
    root = tree.getroot()
    for section in ("customwidgets", "connections"):  # stand-ins need no plugin; vtkMRMLScene* signals do not exist
        for element in root.findall(section):
            root.remove(element)
    data = QtCore.QByteArray(ET.tostring(root))
    buffer = QtCore.QBuffer(data)
    buffer.open(QtCore.QIODevice.ReadOnly)
    widget = loader.load(buffer)
    assert widget is not None, loader.errorString()
    loader.loaded[str(path)] = widget
    return widget


def uses(source: str) -> dict[str, set[str]]:
    """NAME -> the attributes read, set or called on ``self.ui.NAME`` (or ``ui.NAME``), and connected signals as
    ``signal(args)``."""
    found: dict[str, set[str]] = {}
    for match in re.finditer(r"\bui\.(\w+)(?:\.(\w+))?(?:\(\s*\"([\w()*,\s]+)\")?", source):
        name, attribute, signal = match.groups()
        found.setdefault(name, set())
        if attribute:
            found[name].add(signal if attribute == "connect" and signal else attribute)
    return found


def answers(widget, attribute: str) -> bool:
    """Whether PythonQt, as Slicer exposes the widget, would have ``attribute``: a Qt property, a method, a
    signal or slot (``name(args)`` checked against the meta-object's signatures)."""
    slicer_class = widget.property("slicerClass")
    if slicer_class and attribute.replace(" ", "") in STAND_INS[slicer_class][1]:
        return True
    meta = widget.metaObject()
    if "(" in attribute:
        wanted = attribute.replace(" ", "")
        signatures = {bytes(meta.method(k).methodSignature()).decode() for k in range(meta.methodCount())}
        return wanted in signatures
    if meta.indexOfProperty(attribute) >= 0:
        return True
    return hasattr(widget, attribute)


def ui_files(module: str) -> list:
    """The panel's .ui and those of its sections (e.g. the Harmonize panel's cohort section), each loaded apart."""
    files = sorted((REPO / module / "Resources" / "UI").glob("*.ui"))
    assert REPO / module / "Resources" / "UI" / f"{module}.ui" in files
    return files


UI_FILES = [path for module in MODULES for path in ui_files(module)]


@pytest.mark.parametrize("module", MODULES)
def test_every_ui_widget_the_module_uses_survives_qts_loader_with_a_fitting_type(loader, module):
    roots = [load(loader, path) for path in ui_files(module)]
    source = (REPO / module / f"{module}.py").read_text()
    used = uses(source)
    assert used
    problems = []
    for name, attributes in sorted(used.items()):
        widget = next((w for w in (root.findChild(QtWidgets.QWidget, name) for root in roots) if w is not None), None)
        if widget is None:
            problems.append(f"{name}: not in the loaded widget tree")
            continue
        problems += [f"{name} ({widget.property('slicerClass') or type(widget).__name__}): has no {a}" for a in sorted(attributes) if not answers(widget, a)]
    assert problems == []


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_qts_loader_keeps_every_named_widget_of_the_ui_file(loader, path):
    """Nothing the file declares is dropped on loading (two widgets in one layout item keep only the last)."""
    declared = {w.get("name") for w in ET.parse(path).iter("widget")}
    root = load(loader, path)
    loaded = {w.objectName() for w in root.findChildren(QtWidgets.QWidget)} | {root.objectName()}
    assert declared - loaded == set()


def test_the_loader_really_drops_a_second_widget_of_one_item(loader, tmp_path):
    """What broke the Harmonize panel: Qt's reader keeps one widget per layout item."""
    ui = tmp_path / "two.ui"
    ui.write_text('<ui version="4.0"><widget class="QWidget" name="w"><layout class="QVBoxLayout"><item>'
                  '<widget class="QPushButton" name="first"/><widget class="QLabel" name="second"/>'
                  '</item></layout></widget></ui>')
    root = load(loader, ui)
    assert root.findChild(QtWidgets.QPushButton, "first") is None
    assert root.findChild(QtWidgets.QLabel, "second") is not None


def test_volume_selectors_offer_no_label_maps(loader):
    """A label map is a scalar volume's child class: selectors for CT volumes hide child node types."""
    for path in UI_FILES:
        root, module = load(loader, path), path.stem
        for element in ET.parse(path).iter("widget"):
            types = [s.text for p in element.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
            if types == ["vtkMRMLScalarVolumeNode"]:
                widget = root.findChild(QtWidgets.QWidget, element.get("name"))
                assert widget.property("showChildNodeTypes") is False, (module, element.get("name"))
